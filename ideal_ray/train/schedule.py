"""Learning-rate schedule: linear warm-up then cosine, per optimizer step (spec section 6).

Matches the release's use of timm's ``CosineLRScheduler(warmup_prefix=True, t_in_epochs=False)``: the warm-up
runs from ``warmup_start_lr`` to the peak over ``warmup_steps``; the cosine then decays from the peak towards
``min_lr`` over ``decay_steps`` counted *after* the warm-up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def lr_at(step: int, peak_lr: float, warmup_steps: int, decay_steps: int, warmup_start_lr: float,
          min_lr: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start_lr + step * (peak_lr - warmup_start_lr) / warmup_steps
    t = step - warmup_steps
    if decay_steps <= 0 or t >= decay_steps:
        return min_lr
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * t / decay_steps))


def scaled_lr(lr: float, global_batch: int, base_batch: int) -> float:
    """Linear scaling rule (the tokenizer's lr 1e-4 is for a global batch of 256); ``base_batch`` 0 = no scaling
    (the AR stage's constant 1e-4, as LlamaGen)."""
    return lr * global_batch / base_batch if base_batch > 0 else lr


@dataclass
class LRSchedule:
    """The learning rate of every step of a run, from its optimizer config (shared by all trainers)."""

    kind: str  # cosine | constant
    peak_lr: float
    warmup_steps: int
    decay_steps: int
    warmup_start_lr: float
    min_lr: float

    @classmethod
    def from_config(cls, optim, global_batch: int, steps_per_epoch: int) -> "LRSchedule":
        return cls(kind=optim.lr_schedule, peak_lr=scaled_lr(optim.lr, global_batch, optim.base_batch),
                   warmup_steps=int(optim.warmup_epochs * steps_per_epoch),
                   decay_steps=int(optim.epochs * steps_per_epoch), warmup_start_lr=optim.warmup_start_lr,
                   min_lr=optim.min_lr)

    def __call__(self, step: int) -> float:
        """lr of the 0-based step ``step`` (the step about to be taken)."""
        if self.kind == "constant":
            if self.warmup_steps > 0 and step < self.warmup_steps:
                return self.warmup_start_lr + step * (self.peak_lr - self.warmup_start_lr) / self.warmup_steps
            return self.peak_lr
        return lr_at(step, self.peak_lr, self.warmup_steps, self.decay_steps, self.warmup_start_lr, self.min_lr)
