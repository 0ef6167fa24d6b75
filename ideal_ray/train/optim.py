"""Optimizer construction shared by the tokenizer and AR stages."""
from __future__ import annotations

from typing import Iterable, List, Tuple

import torch
import torch.nn as nn


def decay_groups(named_params: Iterable[Tuple[str, nn.Parameter]], weight_decay: float) -> List[dict]:
    """AdamW groups: weight decay on >= 2-D weights only (no decay on biases, norms, embeddings' 1-D params)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(module: nn.Module, lr: float, betas, weight_decay: float) -> torch.optim.AdamW:
    fused = torch.cuda.is_available() and next(module.parameters()).is_cuda
    return torch.optim.AdamW(decay_groups(module.named_parameters(), weight_decay), lr=lr, betas=tuple(betas),
                             weight_decay=weight_decay, fused=fused or None)
