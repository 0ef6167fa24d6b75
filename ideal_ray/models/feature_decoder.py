"""ViT feature decoder with CLS + register tokens and deep/shallow heads (spec section 4).

Decodes post-quantization tokens back into the frozen VFM's feature space. Two linear heads on the patch
outputs reconstruct both the deep (semantic) and the shallow (detail) features: the deep reconstruction
feeds the pixel decoder and zero-shot classification, the shallow one is aligned to the shallow target so
the codes keep detail. A CLS token and register tokens give attention somewhere to park global state
without disturbing the patch tokens; they are dropped at the output.

Parameter names vs. the authors' release (for checkpoint conversion): slot_position_embedding -> pos_embed,
cls_pos_embedding -> cls_pos_embed, norm_post -> norm_in, transformer.layers.{i} -> blocks.{i},
blocks.{i}.ffn.net.{j} -> blocks.{i}.mlp.{j}, project_semantic -> deep_head, project_shallow -> shallow_head.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from ideal_ray.config import FeatureDecoderConfig
from ideal_ray.models.layers import mlp


class DecoderBlock(nn.Module):
    """Pre-LN transformer block: x + Dropout(MHA(LN x)), then x + MLP(LN x)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.drop1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = mlp(width, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)  # (B, S, W)
        attended, _ = self.attn(h, h, h, need_weights=False)  # (B, S, W)
        x = x + self.drop1(attended)  # (B, S, W)
        return x + self.mlp(self.norm2(x))  # (B, S, W)


class FeatureDecoder(nn.Module):
    """[CLS] + N tokens (+ learned positions) + registers -> LN -> pre-LN blocks -> deep/shallow heads."""

    def __init__(self, cfg: FeatureDecoderConfig, num_tokens: int, out_dim: int):
        super().__init__()
        if cfg.width % cfg.heads != 0:
            raise ValueError(f"FeatureDecoder heads {cfg.heads} do not divide its width {cfg.width}.")
        self.cfg = cfg
        self.num_tokens = num_tokens
        self.num_registers = cfg.num_registers
        W = cfg.width
        scale = W ** -0.5
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, W) * scale)
        self.cls_token = nn.Parameter(torch.randn(1, 1, W) * scale)
        self.cls_pos_embed = nn.Parameter(torch.randn(1, 1, W) * scale)
        # Registers start at zero and carry no position: they are free scratch slots.
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, W))
        # The sequence is normalized once before the blocks (the input tokens come from a Linear on codes
        # and can have any scale); the blocks end without a final norm, the heads read the raw stream.
        self.norm_in = nn.LayerNorm(W)
        self.blocks = nn.ModuleList(
            [DecoderBlock(W, cfg.heads, cfg.mlp_dim, cfg.dropout) for _ in range(cfg.depth)]
        )
        self.deep_head = nn.Linear(W, out_dim)
        self.shallow_head = nn.Linear(W, out_dim)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Like the release: xavier-uniform for every Linear (MHA's out_proj too; its packed in_proj keeps
        # torch's own xavier init), zero biases, LayerNorm at identity.
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, W) -> (deep (B, N, out_dim), shallow (B, N, out_dim))."""
        if tokens.dim() != 3 or tokens.shape[1] != self.num_tokens or tokens.shape[2] != self.cfg.width:
            raise ValueError(f"FeatureDecoder expects tokens shaped (B, {self.num_tokens}, {self.cfg.width}), "
                             f"got {tuple(tokens.shape)}; check the token grid and model.feature_decoder.width.")
        B, N, _ = tokens.shape
        x = tokens + self.pos_embed  # (B, N, W)
        cls = (self.cls_token + self.cls_pos_embed).expand(B, -1, -1)  # (B, 1, W)
        regs = self.register_tokens.expand(B, -1, -1)  # (B, R, W)
        x = torch.cat([cls, x, regs], dim=1)  # (B, 1 + N + R, W)
        x = self.norm_in(x)
        for block in self.blocks:
            x = block(x)  # (B, 1 + N + R, W)
        patches = x[:, 1:1 + N]  # (B, N, W)
        return self.deep_head(patches), self.shallow_head(patches)  # (B, N, out_dim) x2
