"""Exponential moving average of a model's trainable parameters.

Only trainable parameters are averaged (the frozen VFM trunk is 316M parameters that never change, so copying it
would waste 1.2 GB per rank); buffers are copied as they are. The shadow is kept in fp32.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow: Dict[str, torch.Tensor] = {
            n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """shadow <- d * shadow + (1 - d) * param, for all parameters in two multi-tensor kernels (the same
        arithmetic as a per-tensor ``mul_`` then ``add_``, without hundreds of small launches per step)."""
        d = self.decay if decay is None else decay
        pairs = [(self.shadow[n], p.detach().float()) for n, p in model.named_parameters() if n in self.shadow]
        if not pairs:
            return
        shadow, params = (list(x) for x in zip(*pairs))
        torch._foreach_mul_(shadow, d)
        torch._foreach_add_(shadow, params, alpha=1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (e.g. a copy used for evaluation or export)."""
        params = dict(model.named_parameters())
        for n, t in self.shadow.items():
            params[n].copy_(t.to(params[n].dtype))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state is missing {len(missing)} parameters, e.g. {sorted(missing)[:3]}.")
        for n in self.shadow:
            self.shadow[n] = state[n].detach().float().clone()
