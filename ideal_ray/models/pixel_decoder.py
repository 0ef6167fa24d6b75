"""CNN pixel decoder: reconstructed deep-feature grid -> image (spec section 5).

A VQGAN-style decoder without a quantizer in front: conv_in, a middle of ResBlock / spatial self-attention /
ResBlock at the token grid, then one level per ``ch_mult`` entry from the widest to the narrowest, each with
``num_res_blocks`` ResBlocks followed by nearest x2 + conv3x3 (except the last level). No tanh at the end:
the output is trained against images in [-1, 1] and clamped only for metrics.

Attribute names follow the authors' release (conv_in, mid, conv_blocks[i].res[j], conv_blocks[i].upsample,
norm_out, conv_out; ResBlock norm1/conv1/norm2/conv2/nin_shortcut; attention norm/q/k/v/proj_out) so their
checkpoint keys map one-to-one. Note: the release's ``num_res_blocks=1`` builds num_res_blocks + 1 = 2 ResBlocks
per level; here ``num_res_blocks`` is the count itself (paper: 2).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ideal_ray.config import PixelDecoderConfig


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups != 0:
        raise ValueError(f"Pixel decoder channels {channels} are not divisible by norm_groups {groups}; "
                         f"change model.pixel_decoder.base_channels or norm_groups.")
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> dropout -> conv3x3, plus a 1x1 skip when channels change."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, out, H, W)
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all positions of the smallest grid (global context, 24x24 = 576)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)

        # flatten + transpose instead of .view: works for both contiguous and channels_last memory.
        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, C)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))  # (B,1,HW,C)
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    """Nearest x2 then conv3x3 (avoids the checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class PixelDecoder(nn.Module):
    def __init__(self, cfg: PixelDecoderConfig, in_channels: int):
        super().__init__()
        if len(cfg.ch_mult) < 1 or cfg.num_res_blocks < 1:
            raise ValueError("The pixel decoder needs at least one ch_mult level and one ResBlock per level; "
                             "fix model.pixel_decoder.ch_mult / num_res_blocks.")
        self.cfg = cfg
        self.num_levels = len(cfg.ch_mult)
        g, p = cfg.norm_groups, cfg.dropout
        ch = cfg.base_channels * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        self.mid = nn.ModuleList([ResBlock(ch, ch, g, p), SpatialSelfAttention(ch, g), ResBlock(ch, ch, g, p)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(self.num_levels)):  # widest level (token grid) first
            out_ch = cfg.base_channels * cfg.ch_mult[level]
            block = nn.Module()
            res = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                res.append(ResBlock(ch, out_ch, g, p))
                ch = out_ch
            block.res = res
            if level != 0:
                block.upsample = Upsample(ch)
            self.conv_blocks.append(block)
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, kernel_size=3, padding=1)
        # activations in NHWC (cuDNN's tensor-core layout); the weights keep their layout, which the engines' flat
        # parameter buffers need (train/levers.py: perf.channels_last)
        self.channels_last = False

    @property
    def upsample_factor(self) -> int:
        return 2 ** (self.num_levels - 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final conv (for adaptive GAN weighting by gradient norms)."""
        return self.conv_out.weight

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """feat (B, C, h, w) -> image (B, out_channels, h * 2**(L-1), w * 2**(L-1)), unbounded."""
        if self.channels_last:
            feat = feat.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(feat)  # (B, C0, h, w)
        for layer in self.mid:
            h = layer(h)
        for block in self.conv_blocks:
            for res in block.res:
                h = res(h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)  # (B, C_l, 2H, 2W)
        h = F.silu(self.norm_out(h))
        return self.conv_out(h)  # (B, 3, H_out, W_out)
