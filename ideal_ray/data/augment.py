"""The per-sample schedule and train augmentation of the training pipeline: pure functions, no Ray.

Why it exists: "train to step k, resume, continue to 2k" must reach the same parameters as one uninterrupted
run, so which image (and which crop/flip of it) rank r sees at step t has to be a pure function of
``(seed, t, r)``. :mod:`ideal_ray.data.ray_pipeline` runs it on Ray Data (and in process); the AR stage's token
readers (:mod:`ideal_ray.data.ar_reader`) follow the same schedule over the images.

* epoch ``e`` visits the N training images in the order ``np.random.default_rng([seed, e]).permutation(N)``;
  each epoch drops its last partial batch, so ``steps_per_epoch = N // global_batch``;
* global step ``t`` (0-based) is epoch ``e = t // spe`` and uses the epoch positions
  ``[(t % spe) * GB, (t % spe + 1) * GB)``; rank ``r`` of ``W`` takes the contiguous ``local_batch = GB // W``
  positions ``[r * LB, (r + 1) * LB)`` of that step;
* the augmentation of the sample at ``(e, position)`` draws from its own generator seeded by
  ``(seed, e, position)`` only, so its bytes do not depend on the world size either.

:func:`load_sample` reads, decodes and augments one listing item exactly as the pipeline does; the trainer turns
the pipeline's uint8 images into model input on its device with :func:`to_model_input`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
from PIL import Image

from ideal_ray.data.reader import ByteReader, decode_bytes, load_rgb
from ideal_ray.data.transforms import check_train_augmentation

if TYPE_CHECKING:  # annotations only: torch is imported where it is used (the Ray decode actors run without it)
    import torch

# Last word of the augmentation seed: SeedSequence pads short entropy with zeros, so [seed, e, 0] would
# otherwise equal the epoch-permutation seed [seed, e]; a non-zero tag keeps the two streams apart.
_AUG_STREAM = 0x6175676D  # "augm"
_PERM_CACHE_EPOCHS = 2  # an actor only ever straddles one epoch boundary at a time


class PermutationCache:
    """The epoch permutations a reader actor needs, computed once and kept for the last two epochs."""

    def __init__(self, seed: int, num_items: int):
        self.seed, self.n = int(seed), int(num_items)
        self._perms: dict[int, np.ndarray] = {}

    def __call__(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            while len(self._perms) >= _PERM_CACHE_EPOCHS:
                self._perms.pop(min(self._perms))
            perm = self._perms[epoch] = epoch_permutation(self.seed, epoch, self.n)
        return perm


# ------------------------------------------------------------------------------------- pure schedule
def schedule_info(num_images: int, global_batch: int) -> int:
    """Steps per epoch with drop_last: ``num_images // global_batch`` (at least one full batch required)."""
    if global_batch < 1:
        raise ValueError(f"global_batch={global_batch} must be at least 1.")
    if num_images < global_batch:
        raise ValueError(
            f"the training set has {num_images} images, fewer than one global batch of {global_batch}; "
            f"add images or lower data.global_batch."
        )
    return num_images // global_batch


def local_batch_size(global_batch: int, world_size: int) -> int:
    """``global_batch // world_size``; rejects a global batch that does not split evenly over the workers."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1.")
    if global_batch < 1 or global_batch % world_size:
        raise ValueError(
            f"global batch {global_batch} does not divide by the {world_size} workers; "
            f"choose a global batch that is a multiple of the worker count."
        )
    return global_batch // world_size


def epoch_permutation(seed: int, epoch: int, num_images: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: ``default_rng([seed, epoch]).permutation(num_images)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def position_of(
    step: int, rank: int, world_size: int, global_batch: int, steps_per_epoch: int
) -> tuple[int, np.ndarray]:
    """(epoch, positions (LB,)) that rank ``rank`` consumes at global step ``step`` (positions in the epoch)."""
    lb = local_batch_size(global_batch, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size}).")
    if step < 0:
        raise ValueError(f"step={step} must be non-negative.")
    epoch, k = divmod(step, steps_per_epoch)
    first = k * global_batch + rank * lb
    return epoch, np.arange(first, first + lb, dtype=np.int64)


def row_schedule(
    row_ids: np.ndarray, start_step: int, rank: int, local_batch: int, global_batch: int, steps_per_epoch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised row -> (step, epoch, position) of one rank's dataset whose row 0 is ``start_step``."""
    row_ids = np.asarray(row_ids, dtype=np.int64)
    step = start_step + row_ids // local_batch  # (n,)
    epoch = step // steps_per_epoch  # (n,)
    position = (step % steps_per_epoch) * global_batch + rank * local_batch + row_ids % local_batch  # (n,)
    return step, epoch, position


def sample_indices(
    step: int, rank: int, world_size: int, global_batch: int, num_images: int, seed: int
) -> np.ndarray:
    """Image indices (LB,) scheduled for rank ``rank`` at ``step`` (before any bad-file substitution)."""
    spe = schedule_info(num_images, global_batch)
    epoch, positions = position_of(step, rank, world_size, global_batch, spe)
    return epoch_permutation(seed, epoch, num_images)[positions]


# ------------------------------------------------------------------------------------- augmentation
def check_augmentation(data_cfg) -> None:
    """Reject crop/resize/flip settings the train augmentation cannot honour (the rules of transforms.py)."""
    check_train_augmentation(data_cfg.image_size, data_cfg.resize_min, data_cfg.resize_max, data_cfg.hflip_prob,
                             prefix="data.")


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The augmentation generator of one sample: a function of (seed, epoch, position) only."""
    return np.random.default_rng([int(seed), int(epoch), int(position), _AUG_STREAM])


def augment(
    img: Image.Image, rng: np.random.Generator, image_size: int, resize_min: int, resize_max: int, hflip_prob: float
) -> np.ndarray:
    """Spec section 6 train augmentation of an RGB PIL image -> uint8 (image_size, image_size, 3).

    Shorter side to a random integer in [resize_min, resize_max] (bicubic; PIL always antialiases, as the
    in-process ``transforms.train_transform`` does), random crop, horizontal flip with ``hflip_prob``. All four
    draws are always taken, in a fixed order, so the stream layout does not depend on the image or on p.
    """
    short = int(rng.integers(resize_min, resize_max + 1))
    w, h = img.size
    if w <= h:
        new_w, new_h = short, max(short, int(round(h * short / w)))
    else:
        new_w, new_h = max(short, int(round(w * short / h))), short
    top = int(rng.integers(0, new_h - image_size + 1))
    left = int(rng.integers(0, new_w - image_size + 1))
    flip = bool(rng.random() < hflip_prob)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    img = img.crop((left, top, left + image_size, top + image_size))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    out = np.asarray(img, dtype=np.uint8)  # (S, S, 3)
    if out.shape != (image_size, image_size, 3):  # to_rgb guarantees RGB; this guards against PIL surprises
        raise RuntimeError(f"augmentation produced shape {out.shape}, expected ({image_size}, {image_size}, 3).")
    return out


def decode(path: str) -> Image.Image:
    """Read and fully decode the image file ``path`` as RGB, as training decodes a listed file (its bytes through
    ``reader.decode_bytes``); raises one of ``DECODE_ERRORS`` on a bad file. Training itself reads by listing item
    (:func:`load_sample`); this is for callers holding a path."""
    with open(path, "rb") as f:
        return decode_bytes(f.read())


def load_sample(reader: ByteReader, index: int, data_cfg, seed: int, epoch: int, position: int) -> np.ndarray:
    """Read + decode + augment listing item ``index`` (through ``reader``, a ``ByteReader`` of the listing) exactly
    as the pipeline does for (seed, epoch, position): uint8 (S, S, 3)."""
    return augment(
        load_rgb(reader, index),
        sample_rng(seed, epoch, position),
        data_cfg.image_size,
        data_cfg.resize_min,
        data_cfg.resize_max,
        data_cfg.hflip_prob,
    )


def to_model_input(batch_uint8: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> ``dtype`` (default float32) (B, 3, H, W) in [-1, 1]; call it after moving the uint8
    batch to the device."""
    import torch

    if batch_uint8.dim() != 4 or batch_uint8.shape[-1] != 3 or batch_uint8.dtype != torch.uint8:
        raise ValueError(
            f"to_model_input expects a uint8 (B, H, W, 3) batch, got {batch_uint8.dtype} "
            f"{tuple(batch_uint8.shape)}; pass the pipeline's 'image' column."
        )
    x = batch_uint8.permute(0, 3, 1, 2).to(torch.float32)  # (B, 3, H, W) in [0, 255]
    x = x.div(127.5).sub_(1.0)  # (B, 3, H, W) in [-1, 1], same arithmetic as folder.default_to_tensor
    return x.to(dtype or torch.float32).contiguous()  # (B, 3, H, W)
