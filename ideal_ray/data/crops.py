"""Crop geometry of the offline token extraction (spec section 7): pure PIL/numpy, no torch, no Ray.

Two view sets, chosen by a string (``views=``):

* ``"llamagen"`` (the paper): LlamaGen's ten-crop. The image is ADM-center-cropped to a square of side
  ``int(image_size * crop_range)`` and cut into torchvision's ten crops of ``image_size`` -- four corners and the
  centre, then the same five of the horizontally flipped square. LlamaGen extracts this at ``crop_range`` 1.1 and a
  second set at 1.05 (its code loader picks either set with probability 1/2, then one of the ten crops, so every
  one of the 20 views is equally likely: we store all 20 and draw one uniformly per image per epoch).
  View ids: 0-9 = ten-crop at 1.1, 10-19 = ten-crop at 1.05; inside each ten: tl, tr, bl, br, center, then
  tl, tr, bl, br, center of the flipped square.
* ``"release"`` (the authors' release): the ADM center crop at ``image_size`` and its horizontal flip.
  View ids: 0 = center crop, 1 = its mirror image.

The ADM center crop (guided-diffusion, reused by LlamaGen and the release): while the short side is at least
twice the target, halve both sides (integer division) with a BOX filter; then one bicubic resize that maps the short
side to the target, each side ``round(side * target / short)``; then the floor-centred square crop. The corner and
centre boxes follow torchvision's ``five_crop``: the centre offset is ``int(round((side - size) / 2))`` (Python's
round, half to even), and the flipped five are cut from the flipped square, not mirrored boxes of the unflipped one.

Every function takes an RGB PIL image and returns uint8 arrays ``(V, S, S, 3)``: the encoder's input in [0, 255],
converted to [-1, 1] on the device (``augment.to_model_input``) like LlamaGen's ToTensor + Normalize(0.5, 0.5).

Split for pipelines (:func:`make_squares` on the CPU, :func:`views_from_squares` on the device): the views of a set
are pure slices and mirror images of one ADM square per scale, so a decode worker ships only the squares (ten-crop at
384: 2 squares = 1.0 MB per image instead of 20 views = 8.8 MB) and the encoder cuts the views where they are used.
``views_from_squares(make_squares(img))`` equals ``make_views(img)`` byte for byte (tested).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

# LlamaGen's two ten-crop scales, in view-id order (the first is its --crop-range default).
LLAMAGEN_CROP_RANGES: tuple[float, ...] = (1.1, 1.05)
FIVE_CROP_NAMES: tuple[str, ...] = ("tl", "tr", "bl", "br", "center")
VIEW_SETS: tuple[str, ...] = ("llamagen", "release")


def _check_size(image_size: int) -> None:
    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive integer (the tokenizer's input side).")


# ------------------------------------------------------------------------------------- geometry (pure)
def crop_size_at(image_size: int, crop_range: float) -> int:
    """Side of the ADM square before ten-crop: ``int(image_size * crop_range)`` (truncation, as LlamaGen does).

    E.g. 384 -> 422 at 1.1 and 403 at 1.05; 256 -> 281 and 268; 64 -> 70 and 67.
    """
    _check_size(image_size)
    if not crop_range >= 1.0:
        raise ValueError(f"crop_range={crop_range!r} must be at least 1.0 (the crops must fit in the square).")
    return int(image_size * crop_range)


def center_crop_plan(width: int, height: int, size: int) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """The ADM center crop of a ``width x height`` image to ``size``, as numbers only.

    Returns ``(halvings, (resized_w, resized_h), (left, top))``: how many BOX halvings run first, the size after the
    bicubic resize (short side == ``size``) and the top-left corner of the ``size x size`` crop in that image.
    """
    _check_size(size)
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} is empty; the image must have pixels.")
    halvings = 0
    w, h = int(width), int(height)
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        halvings += 1
    scale = size / min(w, h)
    rw, rh = round(w * scale), round(h * scale)
    return halvings, (rw, rh), ((rw - size) // 2, (rh - size) // 2)


def center_crop_arr(img: Image.Image, size: int) -> Image.Image:
    """ADM center crop of a PIL image to ``size x size`` (BOX halvings, one bicubic resize, floor-centred crop)."""
    halvings, (rw, rh), (left, top) = center_crop_plan(img.width, img.height, size)
    for _ in range(halvings):
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    img = img.resize((rw, rh), resample=Image.BICUBIC)  # PIL returns a copy when the size already matches
    return img.crop((left, top, left + size, top + size))


def five_crop_boxes(width: int, height: int, size: int) -> list[tuple[int, int, int, int]]:
    """torchvision ``five_crop`` boxes ``(left, top, right, bottom)`` in its order: tl, tr, bl, br, center."""
    _check_size(size)
    if size > width or size > height:
        raise ValueError(f"crop size {size} is larger than the image {width}x{height}; use a larger crop_range.")
    cl, ct = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    corners = [(0, 0), (width - size, 0), (0, height - size), (width - size, height - size), (cl, ct)]
    return [(x, y, x + size, y + size) for x, y in corners]


# ------------------------------------------------------------------------------------- views
def _as_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)  # (S, S, 3)


def ten_crop_views(img: Image.Image, image_size: int, crop_range: float) -> np.ndarray:
    """LlamaGen ten-crop of one image: uint8 (10, S, S, 3) = five crops, then five crops of the flipped square."""
    square = center_crop_arr(img, crop_size_at(image_size, crop_range))
    mirrored = square.transpose(Image.FLIP_LEFT_RIGHT)
    boxes = five_crop_boxes(square.width, square.height, image_size)
    views = [square.crop(b) for b in boxes] + [mirrored.crop(b) for b in boxes]
    return np.stack([_as_array(v) for v in views])  # (10, S, S, 3)


def llamagen_views(img: Image.Image, image_size: int) -> np.ndarray:
    """The paper's 20 views: ten-crop at 1.1 (ids 0-9), then ten-crop at 1.05 (ids 10-19): uint8 (20, S, S, 3)."""
    return np.concatenate([ten_crop_views(img, image_size, r) for r in LLAMAGEN_CROP_RANGES])


def release_views(img: Image.Image, image_size: int) -> np.ndarray:
    """The release's 2 views: the ADM center crop (id 0) and its horizontal flip (id 1): uint8 (2, S, S, 3)."""
    crop = _as_array(center_crop_arr(img, image_size))  # (S, S, 3)
    return np.stack([crop, crop[:, ::-1]])  # (2, S, S, 3)


_VIEW_FNS: dict[str, Callable[[Image.Image, int], np.ndarray]] = {
    "llamagen": llamagen_views,
    "release": release_views,
}


def check_views(views: str) -> str:
    """Return ``views`` if it names a view set, else raise one sentence naming the choices."""
    if views not in _VIEW_FNS:
        raise ValueError(f"views={views!r} is not a view set; choose one of {', '.join(VIEW_SETS)}.")
    return views


def num_views(views: str) -> int:
    """Views stored per image: 20 for ``llamagen``, 2 for ``release``."""
    return len(view_names(views))


def view_names(views: str) -> list[str]:
    """Human-readable name of every view id, e.g. ``crop1.10/tl`` or ``crop1.05/flip/center`` or ``center/flip``."""
    check_views(views)
    if views == "release":
        return ["center", "center/flip"]
    names = []
    for r in LLAMAGEN_CROP_RANGES:
        for flip in ("", "flip/"):
            names.extend(f"crop{r:.2f}/{flip}{n}" for n in FIVE_CROP_NAMES)
    return names


def square_sizes(views: str, image_size: int) -> list[int]:
    """Side of each ADM square a view set is cut from: ``[422, 403]`` for llamagen at 384, ``[384]`` for release."""
    _check_size(image_size)
    if check_views(views) == "release":
        return [int(image_size)]
    return [crop_size_at(image_size, r) for r in LLAMAGEN_CROP_RANGES]


def make_squares(img: Image.Image, views: str, image_size: int) -> list[np.ndarray]:
    """The ADM center-crop squares of one RGB image, one per :func:`square_sizes` entry: uint8 ``(s, s, 3)`` each."""
    return [_as_array(center_crop_arr(img, s)) for s in square_sizes(views, image_size)]


def views_from_squares(squares, views: str, image_size: int):
    """Cut a batch's views from its squares: ``squares[k]`` uint8 ``(B, s_k, s_k, 3)`` -> ``(B, V, S, S, 3)``.

    Works on torch tensors (on any device; numpy arrays are wrapped) with slicing and ``flip`` only, so it is exact.
    """
    import torch

    sizes = square_sizes(views, image_size)
    if len(squares) != len(sizes):
        raise ValueError(f"views={views!r} needs {len(sizes)} squares per image, got {len(squares)}.")
    S = int(image_size)
    out = []
    for sq, side in zip(squares, sizes):
        if isinstance(sq, np.ndarray) and not sq.flags.writeable:
            sq = sq.copy()  # torch refuses to wrap read-only memory (PIL arrays, Ray batches) without a warning
        sq = torch.as_tensor(sq)
        if sq.dim() != 4 or tuple(sq.shape[1:]) != (side, side, 3):
            raise ValueError(f"a square batch must be (B, {side}, {side}, 3) for views={views!r} at {S}, "
                             f"got {tuple(sq.shape)}.")
        if views == "release":
            out += [sq, sq.flip(2)]  # center, its mirror image
            continue
        boxes = five_crop_boxes(side, side, S)
        mirrored = sq.flip(2)  # (B, s, s, 3) flipped along the width
        out += [sq[:, t:b, l:r] for l, t, r, b in boxes] + [mirrored[:, t:b, l:r] for l, t, r, b in boxes]
    return torch.stack(out, dim=1)  # (B, V, S, S, 3)


def make_views(img: Image.Image, views: str, image_size: int) -> np.ndarray:
    """All views of one RGB image for the named view set: uint8 (V, S, S, 3) in view-id order."""
    _check_size(image_size)
    return _VIEW_FNS[check_views(views)](img, image_size)
