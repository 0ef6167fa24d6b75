"""Shallow-to-deep fusion before quantization (spec section 2, paper "AttnFuse").

The deep VFM tokens carry semantics but lose fine detail; the shallow tokens keep it. Fusion lets each deep
token pull detail from the shallow tokens before the tokens are compressed to codes. Three modes exist for the
paper's ablation (Table 7a): ``attention`` (the paper's block), ``linear`` (a per-token mix; the release has
no such mode, so it is defined here as one Linear over the concatenated pair) and ``none`` (deep tokens only).

All modules take ``forward(deep, shallow)`` with tokens shaped (B, N, C) and return (B, N, C).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ideal_ray.config import FusionConfig
from ideal_ray.models.layers import mlp


def _require_shallow(shallow: Optional[torch.Tensor], deep: torch.Tensor, mode: str) -> torch.Tensor:
    if shallow is None:
        raise ValueError(f"Fusion mode '{mode}' needs shallow tokens but got None: pass the shallow VFM tokens "
                         f"or set model.fusion.mode=none.")
    if shallow.shape != deep.shape:
        raise ValueError(f"Fusion mode '{mode}' needs shallow tokens shaped like the deep tokens {tuple(deep.shape)}, "
                         f"got {tuple(shallow.shape)}.")
    return shallow


class AttnFusion(nn.Module):
    """One cross-attention block: deep tokens (queries) attend to shallow tokens (keys/values).

    Queries and keys/values get separate LayerNorms because the two layers have different statistics.
    The attention output is added to the *un-normalized* deep tokens, so with a small update the fused
    tokens stay close to the deep features the decoder must reconstruct. A pre-LN FFN follows.
    Attribute names match the authors' release so their checkpoint keys map one-to-one.
    """

    def __init__(self, width: int, heads: int = 8, mlp_ratio: float = 2.0, dropout: float = 0.1):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"AttnFusion heads {heads} do not divide the width {width}; pick a divisor.")
        hidden = int(width * mlp_ratio)
        self.query_norm = nn.LayerNorm(width, eps=1e-5)
        self.kv_norm = nn.LayerNorm(width, eps=1e-5)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, bias=True, batch_first=True)
        self.ffn_norm = nn.LayerNorm(width, eps=1e-5)
        self.ffn = mlp(width, hidden, dropout)

    def forward(self, deep: torch.Tensor, shallow: Optional[torch.Tensor]) -> torch.Tensor:
        shallow = _require_shallow(shallow, deep, "attention")
        q = self.query_norm(deep)  # (B, N, C)
        kv = self.kv_norm(shallow)  # (B, N, C)
        attended, _ = self.attn(q, kv, kv, need_weights=False)  # (B, N, C)
        x = deep + attended  # (B, N, C)
        return x + self.ffn(self.ffn_norm(x))  # (B, N, C)


class LinearFusion(nn.Module):
    """Per-token Linear over concat(deep, shallow): the ablation's cheapest fusion (no token mixing)."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(2 * width, width)

    def forward(self, deep: torch.Tensor, shallow: Optional[torch.Tensor]) -> torch.Tensor:
        shallow = _require_shallow(shallow, deep, "linear")
        return self.proj(torch.cat([deep, shallow], dim=-1))  # (B, N, C)


class NoFusion(nn.Module):
    """Deep tokens only (ablation baseline and the single-layer probe); has no parameters."""

    def forward(self, deep: torch.Tensor, shallow: Optional[torch.Tensor] = None) -> torch.Tensor:
        return deep  # (B, N, C)


def build_fusion(cfg: FusionConfig, width: int) -> nn.Module:
    """Build the fusion module named by ``cfg.mode`` for VFM tokens of ``width`` channels."""
    if cfg.mode == "attention":
        return AttnFusion(width, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout)
    if cfg.mode == "linear":
        return LinearFusion(width)
    if cfg.mode == "none":
        return NoFusion()
    raise ValueError(f"Fusion mode '{cfg.mode}' is unknown; set model.fusion.mode to attention, linear or none.")
