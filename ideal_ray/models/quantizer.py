"""Factorized, L2-normalized vector quantizer (spec section 3).

The 1024 -> 64 and 64 -> 1024 projections live in the tokenizer; this module only looks codes up in a
low-dimensional codebook. With ``l2_norm`` the inputs and the codebook rows are normalized at every forward,
so the nearest code by squared Euclidean distance is the code of highest cosine similarity; this (with the
entropy term) is what keeps all 16384 codes in use.

Losses are not computed here: ``ideal_ray.losses.vq`` turns a :class:`QuantizerOutput` into losses. The
rolling codebook-usage figure is kept in a ring buffer of the most recent indices; it is local to this
process (gather indices across ranks before :meth:`VectorQuantizer.update_usage` for a global figure).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ideal_ray.config import QuantizerConfig


@dataclass
class QuantizerOutput:
    """Everything the losses and the decoder need from one lookup.

    z:         (B, N, D) normalized input; keeps its graph (commitment loss, straight-through).
    z_q:       (B, N, D) chosen codebook rows; gradient flows to the codebook (codebook loss).
    z_st:      (B, N, D) straight-through value: equals z_q, gradient goes to z. Feed this to the decoder.
    indices:   (B, N) long code ids.
    distances: (B*N, K) squared Euclidean distances, with graph (entropy loss uses softmax(-d / T)).
    """

    z: torch.Tensor
    z_q: torch.Tensor
    z_st: torch.Tensor
    indices: torch.Tensor
    distances: torch.Tensor


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        self.codebook_size = cfg.codebook_size
        self.dim = cfg.dim
        self.l2_norm = cfg.l2_norm
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.dim)
        with torch.no_grad():
            bound = 1.0 / cfg.codebook_size
            self.embedding.weight.uniform_(-bound, bound)
            if cfg.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        # Most recent code ids, newest last; -1 marks an empty slot. Not persistent: it is a logging figure,
        # and keeping it out of the state dict keeps checkpoints independent of the window size.
        self.register_buffer("usage_buffer", torch.full((cfg.usage_window,), -1, dtype=torch.long),
                             persistent=False)

    # ------------------------------------------------------------------------------------------ lookup
    def codebook(self) -> torch.Tensor:
        """The codebook as used for lookup: (K, D), rows L2-normalized when ``l2_norm``."""
        w = self.embedding.weight  # (K, D)
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize (B, N, D) vectors to their nearest codes.

        Distances are computed in float32 with autocast off: under bf16 the gaps between the nearest codes
        of a 16384-entry codebook fall below bf16 resolution and the argmin would pick wrong codes.
        """
        if z.dim() != 3 or z.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer expects tokens shaped (B, N, {self.dim}), got {tuple(z.shape)}; "
                             f"project to model.quantizer.dim first.")
        B, N, D = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if self.l2_norm:
                z = F.normalize(z, p=2, dim=-1)  # (B, N, D)
            codebook = self.codebook().float()  # (K, D)
            flat = z.reshape(B * N, D)  # (M, D)
            distances = (flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None, :]
                         - 2.0 * flat @ codebook.t())  # (M, K)
            indices = distances.detach().argmin(dim=1).view(B, N)  # (B, N)
            z_q = F.embedding(indices, codebook)  # (B, N, D)
            z_st = z + (z_q - z).detach()  # (B, N, D)
        return QuantizerOutput(z=z, z_q=z_q, z_st=z_st, indices=indices, distances=distances)

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for ids of any shape, e.g. (B, N) -> (B, N, D) or (B, H, W) -> (B, H, W, D)."""
        if indices.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"Code indices must be an integer tensor, got {indices.dtype}; cast with .long().")
        return F.embedding(indices.long(), self.codebook())  # (..., D)

    # ------------------------------------------------------------------------------------------- usage
    @torch.no_grad()
    def update_usage(self, indices: torch.Tensor) -> None:
        """Push code ids into the ring buffer (oldest dropped first, newest last)."""
        flat = indices.detach().reshape(-1).to(device=self.usage_buffer.device, dtype=torch.long)  # (M,)
        window = self.usage_buffer.numel()
        n = flat.numel()
        if n == 0:
            return
        if n >= window:
            self.usage_buffer.copy_(flat[-window:])
            return
        self.usage_buffer[:-n] = self.usage_buffer[n:].clone()
        self.usage_buffer[-n:] = flat

    @torch.no_grad()
    def usage(self) -> float:
        """Fraction of codebook entries seen among the remembered indices (0 when nothing was pushed)."""
        return float(self.usage_tensor().item())

    @torch.no_grad()
    def usage_tensor(self) -> torch.Tensor:
        """:meth:`usage` as a 0-dim float32 tensor on the buffer's device, computed without a host sync (the
        training step logs it; the loop reads it only when it logs)."""
        k = self.codebook_size
        buf = self.usage_buffer
        slots = torch.where(buf >= 0, buf, torch.full_like(buf, k))  # empty slots (-1) land in the extra entry k
        seen = torch.zeros(k + 1, dtype=torch.float32, device=buf.device).index_fill_(0, slots, 1.0)  # (K + 1,)
        return seen[:k].sum() / k

    @torch.no_grad()
    def reset_usage(self) -> None:
        self.usage_buffer.fill_(-1)
