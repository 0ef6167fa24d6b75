"""Pixel and perceptual reconstruction losses (spec section 6). Pure functions returning (loss, metrics)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Metrics = Dict[str, torch.Tensor]  # detached scalars; the loop calls .item() only when it logs


def mse_loss(x: torch.Tensor, x_hat: torch.Tensor) -> Tuple[torch.Tensor, Metrics]:
    """Mean squared error in [-1, 1] pixel space."""
    loss = F.mse_loss(x_hat.float(), x.float())
    return loss, {"rec_mse": loss.detach()}


def perceptual_weight(step: int, base: float, warmup_steps: int) -> float:
    """w_p = base * min(1, step / warmup): the release ramps LPIPS in over the first steps."""
    if warmup_steps <= 0:
        return base
    return base * min(1.0, step / warmup_steps)


def lpips_loss(lpips_net: nn.Module, x: torch.Tensor, x_hat: torch.Tensor) -> Tuple[torch.Tensor, Metrics]:
    """LPIPS(x, x_hat) averaged over the batch; ``lpips_net`` is an ``lpips.LPIPS`` taking [-1, 1] images."""
    loss = lpips_net(x_hat.float(), x.float()).mean()
    return loss, {"rec_lpips": loss.detach()}
