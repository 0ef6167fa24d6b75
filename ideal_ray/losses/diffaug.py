"""DiffAugment (Zhao et al. 2020) for the discriminator and the generator's adversarial loss (spec section 6).

Why: the discriminator sees every image through the same random, differentiable augmentations on both the real and
the generated side, so it cannot win by memorising the training images, and the generator still gets gradients
through the augmentation.

Groups (as in the authors' release, ``utils/diff_aug.py``), applied in this order:

* ``color``: brightness + U(-0.5, 0.5), saturation x U(0, 2) around the per-pixel channel mean, contrast
  x U(0.5, 1.5) around the per-image mean;
* ``translation``: integer shift of up to round(size / 8) pixels in each axis, zero fill;
* ``cutout``: one zeroed square whose side is ``cutout_ratio`` of the image size (0.2; 0.5 for the strong
  augmentation of consistency regularization), centred anywhere in the image and clipped at its border.

Whether a group runs is decided ONCE PER BATCH (probability ``prob``), as the release does; the magnitudes (shift,
cutout position, colour factors) are drawn per sample. Random numbers come from ``generator`` when given, otherwise
from torch's global RNG (the decisions on the CPU RNG, the magnitudes on ``x``'s device), so ``torch.manual_seed``
makes a run repeatable.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

POLICY = ("color", "translation", "cutout")


def _rand(shape, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """U[0, 1) of ``shape`` in x's dtype on x's device (drawn on the generator's device when one is given)."""
    if generator is None:
        return torch.rand(shape, device=x.device, dtype=x.dtype)
    return torch.rand(shape, generator=generator, device=generator.device).to(device=x.device, dtype=x.dtype)


def _randint(low: int, high: int, shape, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Integers in [low, high) on x's device."""
    if generator is None:
        return torch.randint(low, high, shape, device=x.device)
    return torch.randint(low, high, shape, generator=generator, device=generator.device).to(x.device)


def _decide(prob: float, generator: Optional[torch.Generator]) -> bool:
    """True with probability ``prob`` (strictly: prob 0 never, prob 1 always); a host-side draw, no device sync."""
    if prob <= 0.0:
        return False
    if prob >= 1.0:
        return True
    if generator is None:
        u = torch.rand(())
    else:
        u = torch.rand((), generator=generator, device=generator.device)
    return float(u) < prob


def rand_color(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Brightness, saturation and contrast jitter with per-sample factors. x: (B, C, H, W)."""
    B = x.shape[0]
    x = x + (_rand((B, 1, 1, 1), x, generator) - 0.5)  # brightness +-0.5
    m = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    x = (x - m) * (_rand((B, 1, 1, 1), x, generator) * 2.0) + m  # saturation x U(0, 2)
    m = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = (x - m) * (_rand((B, 1, 1, 1), x, generator) + 0.5) + m  # contrast x U(0.5, 1.5)
    return x


def rand_translation(x: torch.Tensor, ratio: float = 0.125,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Shift each sample by integers in [-round(ratio H), round(ratio H)] (and W), filling with zeros."""
    B, C, H, W = x.shape
    sh, sw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    if sh == 0 and sw == 0:
        return x
    ty = _randint(-sh, sh + 1, (B, 1), x, generator)  # (B, 1)
    tx = _randint(-sw, sw + 1, (B, 1), x, generator)  # (B, 1)
    padded = F.pad(x, (sw, sw, sh, sh))  # (B, C, H + 2 sh, W + 2 sw)
    rows = torch.arange(H, device=x.device)[None] + sh - ty  # (B, H) rows of padded that land on output rows
    cols = torch.arange(W, device=x.device)[None] + sw - tx  # (B, W)
    b = torch.arange(B, device=x.device)[:, None, None]  # (B, 1, 1)
    out = padded[b, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C): advanced indices go first
    return out.permute(0, 3, 1, 2)  # (B, C, H, W)


def rand_cutout(x: torch.Tensor, ratio: float = 0.2, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Zero one square of side round(ratio * size) per sample; its centre is uniform over the image."""
    B, C, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    if ch == 0 or cw == 0:
        return x
    cy = _randint(0, H + (1 - ch % 2), (B, 1), x, generator)  # (B, 1) centre row
    cx = _randint(0, W + (1 - cw % 2), (B, 1), x, generator)  # (B, 1)
    y0, x0 = cy - ch // 2, cx - cw // 2
    r = torch.arange(H, device=x.device)[None]  # (1, H)
    c = torch.arange(W, device=x.device)[None]  # (1, W)
    in_rows = (r >= y0) & (r < y0 + ch)  # (B, H)
    in_cols = (c >= x0) & (c < x0 + cw)  # (B, W)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])  # (B, H, W)
    return x * keep[:, None].to(x.dtype)  # (B, C, H, W)


def diff_augment(x: torch.Tensor, policy: Sequence[str] = POLICY, prob: float = 0.5,
                 generator: Optional[torch.Generator] = None, cutout_ratio: float = 0.2,
                 translation_ratio: float = 0.125) -> torch.Tensor:
    """Differentiable augmentation of x (B, C, H, W); each policy group runs for the whole batch with ``prob``.

    ``policy`` names groups from ``("color", "translation", "cutout")``; prob 0 returns x unchanged.
    """
    for name in policy:
        if name not in POLICY:
            raise ValueError(f"DiffAugment policy '{name}' is unknown; choose from {POLICY}.")
    for name in policy:
        if not _decide(prob, generator):
            continue
        if name == "color":
            x = rand_color(x, generator)
        elif name == "translation":
            x = rand_translation(x, translation_ratio, generator)
        else:
            x = rand_cutout(x, cutout_ratio, generator)
    return x.contiguous()


def strong_augment(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Consistency-regularization augmentation: colour, translation and a 0.5 cutout, always applied."""
    return diff_augment(x, POLICY, prob=1.0, generator=generator, cutout_ratio=0.5)
