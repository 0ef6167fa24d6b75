"""Vector-quantization losses (spec section 3). Pure functions over the quantizer's outputs."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F


def entropy_loss(distances: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Mean per-token entropy minus the entropy of the batch-mean code distribution.

    p = softmax(-d / T) over the codebook for each token (d = squared distance). Low per-token entropy makes each
    assignment confident; high entropy of the average spreads tokens over the whole codebook (usage).
    distances: (M, K).
    """
    logits = -distances.float() / temperature  # (M, K)
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits, dim=-1)
    per_token = -(probs * log_probs).sum(-1).mean()
    avg = probs.mean(0)  # (K,)
    batch = -(avg * torch.log(avg + 1e-5)).sum()
    return per_token - batch


def vq_losses(z: torch.Tensor, z_q: torch.Tensor, distances: torch.Tensor, codebook_weight: float = 1.0,
              commitment_weight: float = 0.25, entropy_weight: float = 0.01,
              entropy_temperature: float = 0.01) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """codebook mean((z_q - sg z)^2) + beta mean((sg z_q - z)^2) + w_e * entropy; z, z_q: (B, N, D) normalized."""
    codebook = F.mse_loss(z_q.float(), z.detach().float())
    commit = F.mse_loss(z.float(), z_q.detach().float())
    total = codebook_weight * codebook + commitment_weight * commit
    metrics = {"vq_codebook": codebook.detach(), "vq_commit": commit.detach()}
    if entropy_weight > 0:
        ent = entropy_loss(distances, entropy_temperature)
        total = total + entropy_weight * ent
        metrics["vq_entropy"] = ent.detach()
    return total, metrics
