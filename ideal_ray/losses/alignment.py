"""Feature alignment against the frozen VFM targets (spec section 6): MSE + (1 - mean per-token cosine)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F


def alignment_loss(pred: torch.Tensor, target: torch.Tensor, mse_weight: float = 1.0, cos_weight: float = 1.0,
                   prefix: str = "deep") -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """pred, target: (B, N, C). The target is a frozen feature, so it is detached here."""
    target = target.detach().float()
    pred = pred.float()
    mse = F.mse_loss(pred, target)
    cos = F.cosine_similarity(pred, target, dim=-1).mean()  # mean over tokens and batch
    loss = mse_weight * mse + cos_weight * (1.0 - cos)
    return loss, {f"{prefix}_mse": mse.detach(), f"{prefix}_cos": cos.detach()}
