"""Learning-rate schedule: linear warm-up then cosine, per optimizer step (spec section 6).

Matches the release's use of timm's ``CosineLRScheduler(warmup_prefix=True, t_in_epochs=False)``: the warm-up
runs from ``warmup_start_lr`` to the peak over ``warmup_steps``; the cosine then decays from the peak towards
``min_lr`` over ``decay_steps`` counted *after* the warm-up.
"""
from __future__ import annotations

import math


def lr_at(step: int, peak_lr: float, warmup_steps: int, decay_steps: int, warmup_start_lr: float,
          min_lr: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start_lr + step * (peak_lr - warmup_start_lr) / warmup_steps
    t = step - warmup_steps
    if decay_steps <= 0 or t >= decay_steps:
        return min_lr
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * t / decay_steps))


def scaled_lr(lr: float, global_batch: int, base_batch: int) -> float:
    """Linear scaling rule: the paper's lr 1e-4 is for a global batch of 256."""
    return lr * global_batch / base_batch
