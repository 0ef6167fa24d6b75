"""The Ideal tokenizer: frozen VFM -> fusion -> factorized VQ -> feature decoder -> CNN pixel decoder.

Single-device PyTorch. ``encode`` turns images into a grid of code indices, ``decode`` turns indices back into
images, ``decode_features`` into the reconstructed deep VFM features (the tokenizer used as a vision encoder), and
``forward`` returns everything the training losses need (:class:`TokenizerOutput`). The ``*_from_trunk`` variants
start from the frozen VFM trunk's outputs instead of images, for when the trunk ran elsewhere (Ray Data actors).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn

from ideal_ray.config import TokenizerConfig, validate_tokenizer
from ideal_ray.models.feature_decoder import FeatureDecoder
from ideal_ray.models.fusion import build_fusion
from ideal_ray.models.pixel_decoder import PixelDecoder
from ideal_ray.models.quantizer import QuantizerOutput, VectorQuantizer
from ideal_ray.models.vfm import FrozenVFM


@dataclass
class TokenizerOutput:
    recon: torch.Tensor  # (B, 3, H, W) in about [-1, 1], not clamped
    deep_target: torch.Tensor  # (B, N, C) frozen VFM deep tokens (final norm applied)
    shallow_target: Optional[torch.Tensor]  # (B, N, C) shallow tokens (fresh LayerNorm) or None (single layer)
    deep_pred: torch.Tensor  # (B, N, C) reconstructed deep tokens
    shallow_pred: torch.Tensor  # (B, N, C) reconstructed shallow tokens
    quant: QuantizerOutput


class IdealTokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig, load_weights: bool = True):
        super().__init__()
        validate_tokenizer(cfg)
        self.cfg = cfg
        v, q = cfg.vfm, cfg.quantizer
        self.grid = v.grid
        self.vfm = FrozenVFM(v, load_weights=load_weights)
        width = v.width
        self.fusion = build_fusion(cfg.fusion, width)
        self.pre_quant = nn.Linear(width, q.dim)
        self.quantizer = VectorQuantizer(q)
        self.post_quant = nn.Linear(q.dim, cfg.feature_decoder.width)
        self.feature_decoder = FeatureDecoder(cfg.feature_decoder, num_tokens=v.num_tokens, out_dim=width)
        self.pixel_decoder = PixelDecoder(cfg.pixel_decoder, in_channels=width)

    # ------------------------------------------------------------------------------------------ encoder
    def encode_features(self, images: torch.Tensor):
        """images (B, 3, H, W) in [-1, 1] -> (shallow, deep, fused) tokens, each (B, N, C)."""
        return self.features_from_trunk(*self.vfm.trunk_features(images))

    def features_from_trunk(self, shallow_raw: Optional[torch.Tensor], deep: torch.Tensor):
        """The frozen trunk's outputs (``vfm.trunk_features``, computed here or in a Ray Data actor: shallow before
        its norm (B, N, C) or None, deep (B, N, C)) -> (shallow, deep, fused) tokens, each (B, N, C)."""
        shallow, deep = self.vfm.finish(shallow_raw, deep)  # (B, N, C) each; shallow None for single-layer
        fused = self.fusion(deep, shallow)  # (B, N, C)
        return shallow, deep, fused

    def quantize(self, fused: torch.Tensor) -> QuantizerOutput:
        return self.quantizer(self.pre_quant(fused))  # (B, N, D) -> codes

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> code indices (B, g, g) (g = 24 for the paper)."""
        return self.encode_from_trunk(*self.vfm.trunk_features(images))

    @torch.no_grad()
    def encode_from_trunk(self, shallow_raw: Optional[torch.Tensor], deep: torch.Tensor) -> torch.Tensor:
        """:meth:`encode` from the frozen trunk's outputs (see :meth:`features_from_trunk`) -> indices (B, g, g)."""
        _, _, fused = self.features_from_trunk(shallow_raw, deep)
        idx = self.quantize(fused).indices  # (B, N)
        return idx.view(idx.shape[0], self.grid, self.grid)

    # ------------------------------------------------------------------------------------------ decoder
    def _decode_codes(self, codes: torch.Tensor):
        """codes (B, N, D) -> (deep (B, N, C), shallow (B, N, C))."""
        return self.feature_decoder(self.post_quant(codes))

    def _to_pixels(self, deep: torch.Tensor) -> torch.Tensor:
        b, n, c = deep.shape
        grid = deep.transpose(1, 2).reshape(b, c, self.grid, self.grid)  # (B, C, g, g)
        return self.pixel_decoder(grid)  # (B, 3, H, W)

    def _codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dim() == 3:
            indices = indices.flatten(1)  # (B, N)
        if indices.shape[1] != self.grid * self.grid:
            raise ValueError(f"Expected {self.grid * self.grid} indices per image ({self.grid}x{self.grid}), "
                             f"got {indices.shape[1]}.")
        return self.quantizer.codes(indices.long())  # (B, N, D)

    def decode_features(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, g, g) or (B, N) -> reconstructed deep VFM features (B, N, C)."""
        deep, _ = self._decode_codes(self._codes_from_indices(indices))
        return deep

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, g, g) or (B, N) -> images (B, 3, H, W), about [-1, 1] (clamp for display/metrics)."""
        deep, _ = self._decode_codes(self._codes_from_indices(indices))
        return self._to_pixels(deep)

    # ------------------------------------------------------------------------------------------ training
    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        """images (B, 3, H, W) in [-1, 1] -> everything the training losses need."""
        return self.forward_from_trunk(*self.vfm.trunk_features(images))

    def forward_from_trunk(self, shallow_raw: Optional[torch.Tensor], deep: torch.Tensor) -> TokenizerOutput:
        """:meth:`forward` from the frozen trunk's outputs (see :meth:`features_from_trunk`): the training forward
        when the VFM runs in Ray Data actors (``dist.vfm_placement=data``)."""
        shallow, deep, fused = self.features_from_trunk(shallow_raw, deep)
        quant = self.quantize(fused)
        deep_pred, shallow_pred = self._decode_codes(quant.z_st)
        recon = self._to_pixels(deep_pred)
        return TokenizerOutput(recon=recon, deep_target=deep, shallow_target=shallow, deep_pred=deep_pred,
                               shallow_pred=shallow_pred, quant=quant)

    # ------------------------------------------------------------------------------------------ helpers
    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Every trainable parameter and every buffer outside the frozen trunk (what a checkpoint must keep)."""
        out = {}
        for name, t in self.state_dict().items():
            if not name.startswith("vfm.trunk."):
                out[name] = t
        return out

    def param_groups_by_module(self) -> Dict[str, Dict[str, int]]:
        """{module: {"trainable": n, "frozen": n}} for the benchmark's parameter table."""
        rows: Dict[str, Dict[str, int]] = {}
        for mod_name in ("vfm", "fusion", "pre_quant", "quantizer", "post_quant", "feature_decoder", "pixel_decoder"):
            mod = getattr(self, mod_name)
            tr = sum(p.numel() for p in mod.parameters() if p.requires_grad)
            fr = sum(p.numel() for p in mod.parameters() if not p.requires_grad)
            rows[mod_name] = {"trainable": tr, "frozen": fr}
        return rows
