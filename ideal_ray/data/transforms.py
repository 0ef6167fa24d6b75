"""Image transforms of the tokenizer pipeline and helpers to turn [-1, 1] tensors back into pictures.

Training augmentation follows the paper: shorter side resized to a random size in [resize_min, resize_max]
(bicubic, antialiased), a random ``image_size`` crop and a horizontal flip; evaluation resizes the shorter side
to ``image_size`` and takes the centre crop. Both end as float (3, H, W) tensors in [-1, 1], the range every
model of the project consumes. Randomness comes from torch's global RNG, so DataLoader worker seeding applies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ideal_ray.io import atomic_path

if TYPE_CHECKING:  # annotations only: torch and torchvision are imported where used (the decode actors skip them)
    import torch
    from torchvision.transforms import v2


def _v2():
    """torchvision's v2 transforms, imported when a transform is built: the Ray decode actors, which only validate
    augmentation settings here, start without torch or torchvision."""
    from torchvision.transforms import v2

    return v2


def _bicubic():
    from torchvision.transforms import InterpolationMode

    return InterpolationMode.BICUBIC


def _to_pm1() -> list:
    """PIL/uint8 -> float32 [0, 1] -> [-1, 1] (mean = std = 0.5)."""
    import torch

    v2 = _v2()
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
    ]


def check_train_augmentation(image_size: int, resize_min: int, resize_max: int, hflip_prob: float,
                             prefix: str = "") -> None:
    """Reject crop/resize/flip settings the train augmentation cannot honour (``prefix``: e.g. "data.")."""
    if image_size < 1:
        raise ValueError(f"{prefix}image_size={image_size} must be positive.")
    if not image_size <= resize_min <= resize_max:
        raise ValueError(
            f"need {prefix}image_size <= {prefix}resize_min <= {prefix}resize_max, got {image_size}, {resize_min}, "
            f"{resize_max}; the random crop must fit inside the resized image."
        )
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"{prefix}hflip_prob={hflip_prob} must be in [0, 1].")


def train_transform(image_size: int, resize_min: int, resize_max: int, hflip_prob: float = 0.5) -> "v2.Compose":
    """Random shorter-side resize in [resize_min, resize_max] -> random crop -> flip -> float (3, S, S) in [-1, 1]."""
    check_train_augmentation(image_size, resize_min, resize_max, hflip_prob)
    v2 = _v2()
    return v2.Compose(
        [
            # Picks the shorter side uniformly from the integer list; PIL resizes are always antialiased.
            v2.RandomShortestSize(list(range(resize_min, resize_max + 1)), interpolation=_bicubic(), antialias=True),
            v2.RandomCrop(image_size),
            v2.RandomHorizontalFlip(p=hflip_prob),
            *_to_pm1(),
        ]
    )


def eval_transform(image_size: int) -> "v2.Compose":
    """Shorter side resized to image_size (bicubic, antialiased) -> centre crop -> float (3, S, S) in [-1, 1]."""
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be positive.")
    v2 = _v2()
    return v2.Compose(
        [
            v2.Resize(image_size, interpolation=_bicubic(), antialias=True),
            v2.CenterCrop(image_size),
            *_to_pm1(),
        ]
    )


def transforms_from_config(data_cfg) -> tuple["v2.Compose", "v2.Compose"]:
    """(train, eval) transforms from a ``config.DataConfig``."""
    return (
        train_transform(data_cfg.image_size, data_cfg.resize_min, data_cfg.resize_max, data_cfg.hflip_prob),
        eval_transform(data_cfg.image_size),
    )


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float (C, H, W) or (B, C, H, W) -> uint8 numpy (H, W, C) or (B, H, W, C): values outside are clamped,
    each rounded to the nearest level ``round(127.5 * (x + 1))``. The one conversion of tokenizer inputs and outputs
    to pixels: grids, the evaluation protocol (``ideal_ray.eval.recon``), the demo's PSNR."""
    import torch

    if images.dim() not in (3, 4):
        raise ValueError(f"to_uint8 expects (C, H, W) or (B, C, H, W), got shape {tuple(images.shape)}.")
    x = images.detach().float().cpu().clamp(-1.0, 1.0)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8)  # (..., C, H, W)
    return x.movedim(-3, -1).contiguous().numpy()  # (..., H, W, C)


def make_grid_png(
    inputs: torch.Tensor,
    outputs: torch.Tensor,
    path: str | os.PathLike,
    nrow: int = 4,
    padding: int = 2,
) -> Path:
    """Save an (input | output) comparison grid as PNG and return its path.

    ``inputs`` and ``outputs`` are (B, 3, H, W) in [-1, 1]; each cell is an input with its reconstruction to
    its right, ``nrow`` pairs per row. The file is written atomically (tmp + rename), so an MLflow artifact
    upload never sees half a PNG.
    """
    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    if inputs.dim() != 4 or inputs.shape != outputs.shape:
        raise ValueError(
            f"inputs and outputs must both be (B, C, H, W) of the same shape, got {tuple(inputs.shape)} "
            f"and {tuple(outputs.shape)}; resize the outputs to the input size first."
        )
    if nrow < 1:
        raise ValueError(f"nrow={nrow} must be at least 1.")
    x = inputs.detach().float().cpu().clamp(-1, 1)
    y = outputs.detach().float().cpu().clamp(-1, 1)
    pairs = torch.cat([x, y], dim=-1)  # (B, C, H, 2W): input | output
    grid = make_grid(pairs, nrow=nrow, padding=padding, pad_value=1.0)  # (C, GH, GW) in [-1, 1]
    img = to_uint8(grid)  # (GH, GW, C)
    if img.shape[-1] == 1:
        img = img[..., 0]
    path = Path(path)
    with atomic_path(str(path)) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")
    return path


__all__ = ["train_transform", "eval_transform", "transforms_from_config", "to_uint8", "make_grid_png"]
