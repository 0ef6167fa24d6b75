"""A small synthetic dataset in the ImageNet folder layout, for demos and tests.

Real ImageNet cannot ship with the project (and cannot be downloaded offline), but every data path of the
project -- the image-folder reader, the transforms, Ray Data ingestion, the tokenizer and generator training
loops -- expects the ImageNet layout:

    root/train/<wnid>/<wnid>_<i>.JPEG
    root/val/<wnid>/ILSVRC2012_val_<n>.JPEG
    root/class_index.json            {"0": ["n90000000", "red circle solid on dark"], ...}

This module writes such a folder with images that have *learnable* class structure: each class is a unique
combination of a shape (circle, square, ...), a colour, a texture (stripes, checker, ...) and a background
tone, drawn at a random position, scale and small rotation over a noisy background. A tokenizer can learn to
reconstruct them, a classifier can tell them apart and a class-conditional generator has something to learn.

Everything is deterministic given ``seed`` (numpy Generators seeded per image, fixed JPEG quality, no
timestamps in the files): the same parameters give byte-identical files on the same library versions.

Files are written atomically (temporary file + ``os.replace``) and a ``root/.complete`` marker holding the
parameters is written last, so a re-run with the same parameters returns at once and an interrupted run is
recognised and redone. A folder that holds anything else is never touched unless ``overwrite=True``.

CLI: ``python -m ideal_ray.data.synthetic --root DIR --classes 10 --train-per-class 100 --val-per-class 10``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from ideal_ray.io import atomic_write

FORMAT_VERSION = 1  # bump when the rendering changes, so old markers no longer match
JPEG_QUALITY = 90
COMPLETE_MARKER = ".complete"
PROGRESS_MARKER = ".synthetic_in_progress"
LOCK_FILE = ".synthetic.lock"
CLASS_INDEX_FILE = "class_index.json"
# Paths the generator owns inside root; only these are ever removed (overwrite=True or an interrupted run).
_OWNED = ("train", "val", CLASS_INDEX_FILE, COMPLETE_MARKER, PROGRESS_MARKER)

# Class attributes. The list lengths are pairwise coprime (11, 8, 7, 3), so class c -> (c % 11, c % 8,
# c % 7, c % 3) is a unique combination for every c < 11 * 8 * 7 * 3 = 1848 (Chinese remainder theorem), and
# neighbouring classes differ in *every* attribute, which keeps small class counts easy to tell apart.
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 40, 40)),
    ("green", (40, 190, 60)),
    ("blue", (40, 80, 230)),
    ("yellow", (235, 215, 40)),
    ("cyan", (40, 210, 220)),
    ("magenta", (215, 45, 200)),
    ("orange", (245, 135, 25)),
    ("purple", (120, 50, 170)),
    ("white", (240, 240, 240)),
    ("brown", (130, 80, 40)),
    ("pink", (250, 160, 190)),
)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "crescent")
TEXTURES: tuple[str, ...] = ("solid", "stripes", "checker", "dots", "noise", "gradient", "zigzag")
BACKGROUNDS: tuple[tuple[str, float], ...] = (("dark", 45.0), ("grey", 120.0), ("light", 195.0))
MAX_CLASSES = len(COLOURS) * len(SHAPES) * len(TEXTURES) * len(BACKGROUNDS)

_SUPERSAMPLE = 2  # shapes are rendered at 2x and box-filtered down for anti-aliased edges


def class_attributes(label: int) -> dict:
    """The (colour, shape, texture, background) combination of class ``label``; independent of the seed."""
    if not 0 <= label < MAX_CLASSES:
        raise ValueError(f"class label {label} is outside [0, {MAX_CLASSES}); use fewer synthetic classes.")
    colour_name, rgb = COLOURS[label % len(COLOURS)]
    bg_name, bg_level = BACKGROUNDS[label % len(BACKGROUNDS)]
    return {
        "colour": colour_name,
        "rgb": rgb,
        "shape": SHAPES[label % len(SHAPES)],
        "texture": TEXTURES[label % len(TEXTURES)],
        "background": bg_name,
        "background_level": bg_level,
    }


def class_wnid(label: int) -> str:
    """Synthetic WordNet-style id: 'n9' + 7 digits, so it never collides with a real ImageNet wnid (n0/n1...)."""
    return f"n9{label:07d}"


def class_name(label: int) -> str:
    """Readable class name, e.g. 'red circle solid on dark'."""
    a = class_attributes(label)
    return f"{a['colour']} {a['shape']} {a['texture']} on {a['background']}"


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit-size shape in its own (rotated, scaled) coordinates u, v (radius ~1)."""
    rho = np.hypot(u, v)
    if shape == "circle":
        return rho <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":  # apex at v = -1 (image up), base at v = 0.6
        return (v <= 0.6) & (v >= -1.0 + np.sqrt(3.0) * np.abs(u))
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "ring":
        return (rho <= 1.0) & (rho >= 0.55)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "star":
        phi = np.arctan2(v, u)
        return rho <= 0.55 + 0.45 * np.cos(5.0 * phi)
    if shape == "crescent":
        return (rho <= 1.0) & (np.hypot(u - 0.5, v) > 0.8)
    raise ValueError(f"unknown synthetic shape {shape!r}; expected one of {SHAPES}.")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Texture intensity in [0, 1] over the shape's own coordinates (it rotates and scales with the shape)."""
    phase = rng.uniform(0.0, 2.0 * np.pi)
    freq = rng.uniform(3.5, 5.0)
    if texture == "solid":
        return np.ones_like(u)
    if texture == "stripes":
        return (np.sin(freq * np.pi * u + phase) > 0).astype(np.float32)
    if texture == "checker":
        return ((np.sin(freq * np.pi * u + phase) > 0) ^ (np.sin(freq * np.pi * v + phase) > 0)).astype(np.float32)
    if texture == "dots":
        offset = phase / (2.0 * np.pi)
        gu = (u * freq * 0.5 + offset) % 1.0 - 0.5  # position inside a dot cell, in [-0.5, 0.5)
        gv = (v * freq * 0.5 + offset) % 1.0 - 0.5
        return (gu * gu + gv * gv < 0.09).astype(np.float32)
    if texture == "noise":
        return rng.uniform(0.0, 1.0, size=u.shape).astype(np.float32)
    if texture == "gradient":
        return np.clip(0.5 + 0.5 * (u * np.cos(phase) + v * np.sin(phase)), 0.0, 1.0)
    if texture == "zigzag":
        saw = np.abs(((u * freq * 0.5 + 0.25 * phase) % 1.0) - 0.5) * 2.0  # triangle wave in [0, 1]
        return (np.sin(freq * np.pi * (v + 0.35 * saw)) > 0).astype(np.float32)
    raise ValueError(f"unknown synthetic texture {texture!r}; expected one of {TEXTURES}.")


@functools.lru_cache(maxsize=8)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-0.5, 0.5] (cached: the same for every image of a size)."""
    t = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    ys, xs = np.meshgrid(t, t, indexing="ij")  # (size, size) each
    ys.flags.writeable = False
    xs.flags.writeable = False
    return ys, xs


def render_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one (size, size, 3) uint8 image of class ``label`` with the randomness of ``rng``."""
    attrs = class_attributes(label)
    hi = size * _SUPERSAMPLE

    # Background: class tone + a random linear colour gradient (drawn at full resolution later) + noise.
    bg_level = attrs["background_level"] + rng.uniform(-15.0, 15.0)
    bg_tint = rng.uniform(-12.0, 12.0, size=3)
    grad_dir = rng.uniform(0.0, 2.0 * np.pi)
    grad_amp = rng.uniform(0.0, 25.0, size=3)

    # Object: random centre, scale, small rotation, colour jitter.
    cx, cy = rng.uniform(0.3, 0.7, size=2) * hi
    radius = rng.uniform(0.2, 0.32) * hi
    angle = np.deg2rad(rng.uniform(-20.0, 20.0))
    colour = np.clip(np.asarray(attrs["rgb"]) + rng.uniform(-20.0, 20.0, size=3), 0, 255).astype(np.float32)

    # Shape mask + texture on the supersampled grid, in the shape's own coordinates. Every shape lies within
    # 1.2 radii of its centre, so only that box (clipped to the image) is rendered: ~2.5x faster.
    s = _SUPERSAMPLE
    reach = 1.2 * radius
    x0, x1 = max(int((cx - reach) // s), 0), min(int(np.ceil((cx + reach) / s)), size)  # output pixels
    y0, y1 = max(int((cy - reach) // s), 0), min(int(np.ceil((cy + reach) / s)), size)
    h, w = y1 - y0, x1 - x0
    yy = (np.arange(y0 * s, y1 * s, dtype=np.float32) + 0.5)[:, None]  # (h*s, 1)
    xx = (np.arange(x0 * s, x1 * s, dtype=np.float32) + 0.5)[None, :]  # (1, w*s)
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = ca * dx + sa * dy  # (h*s, w*s)
    v = -sa * dx + ca * dy  # (h*s, w*s)
    box_mask = _shape_mask(attrs["shape"], u, v).astype(np.float32)  # (h*s, w*s)
    tex = _texture(attrs["texture"], u, v, rng)  # (h*s, w*s) in [0, 1]
    box_shade = 0.45 + 0.55 * tex  # textured object: dark and bright parts of the class colour

    # Box-filter down to the output size (anti-aliasing) and paste into full-size maps.
    mask = np.zeros((size, size), dtype=np.float32)
    shade = np.ones((size, size), dtype=np.float32)
    mask[y0:y1, x0:x1] = box_mask.reshape(h, s, w, s).mean(axis=(1, 3))  # (h, w)
    shade[y0:y1, x0:x1] = box_shade.reshape(h, s, w, s).mean(axis=(1, 3))  # (h, w)

    ys, xs = _unit_grid(size)  # (size, size) each, in [-0.5, 0.5]
    ramp = xs * np.float32(np.cos(grad_dir)) + ys * np.float32(np.sin(grad_dir))  # (size, size)
    # The background carries a faint cast of the class colour (more class signal in the global statistics).
    cast = 0.2 * (np.asarray(attrs["rgb"], dtype=np.float64) - np.mean(attrs["rgb"]))  # (3,)
    tone = (bg_level + bg_tint + cast).astype(np.float32)  # (3,)
    background = tone + ramp[..., None] * grad_amp.astype(np.float32)  # (size, size, 3)
    background += rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(8.0)
    obj = colour * shade[..., None]  # (size, size, 3)
    obj += rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(5.0)
    m = mask[..., None]  # (size, size, 1)
    img = background + m * (obj - background)  # (size, size, 3)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _image_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    """Independent stream per image, so any image can be regenerated alone and order does not matter."""
    return np.random.default_rng([seed, 0 if split == "train" else 1, label, index])


def _encode_jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # No EXIF, no timestamps, fixed quality and subsampling: identical bytes for identical pixels.
    Image.fromarray(img, mode="RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(str(path), data)


# ---------------------------------------------------------------------------------------------------------
# Folder management
# ---------------------------------------------------------------------------------------------------------


def _params(num_classes: int, train_per_class: int, val_per_class: int, size: int, seed: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "num_classes": int(num_classes),
        "train_per_class": int(train_per_class),
        "val_per_class": int(val_per_class),
        "size": int(size),
        "seed": int(seed),
        "jpeg_quality": JPEG_QUALITY,
    }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive lock on root, so concurrent callers (e.g. several workers) generate once and others wait."""
    with open(root / LOCK_FILE, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _summary(root: Path, params: dict, created: bool, seconds: float) -> dict:
    n = params["num_classes"]
    return {
        "root": str(root),
        **params,
        "train_images": n * params["train_per_class"],
        "val_images": n * params["val_per_class"],
        "class_index": str(root / CLASS_INDEX_FILE),
        "created": created,
        "seconds": round(seconds, 3),
    }


def is_synthetic_root(root: str | os.PathLike) -> bool:
    """True when ``root`` holds a complete synthetic dataset (any parameters)."""
    marker = _read_json(Path(root) / COMPLETE_MARKER)
    return marker is not None and "format_version" in marker


def make_synthetic_imagenet(
    root: str | os.PathLike,
    num_classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 10,
    size: int = 96,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write (or reuse) a synthetic ImageNet-layout dataset under ``root`` and return a summary dict.

    Returns ``{"root", "num_classes", "train_per_class", "val_per_class", "size", "seed", "train_images",
    "val_images", "class_index", "created", "seconds", ...}``; ``created`` is False when a complete dataset
    with the same parameters was already there (then nothing is read or written besides the marker).

    ``overwrite=True`` removes only what the generator owns (``train/``, ``val/``, ``class_index.json`` and
    its markers) before writing; any other file in ``root`` is left alone.
    """
    t0 = time.perf_counter()
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes={num_classes} must be in [1, {MAX_CLASSES}] for the synthetic dataset.")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(
            f"train_per_class={train_per_class} and val_per_class={val_per_class} must both be at least 1."
        )
    if size < 8:
        raise ValueError(f"size={size} is too small for a synthetic image; use at least 8 pixels.")

    root = Path(root).expanduser().resolve()
    params = _params(num_classes, train_per_class, val_per_class, size, seed)

    # Fast path without creating anything: complete with the same parameters.
    if not overwrite and _read_json(root / COMPLETE_MARKER) == params:
        return _summary(root, params, created=False, seconds=time.perf_counter() - t0)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"synthetic dataset root {root} exists and is not a directory; pass another root.")

    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        marker = _read_json(root / COMPLETE_MARKER)
        if marker == params and not overwrite:  # another process finished it while we waited
            return _summary(root, params, created=False, seconds=time.perf_counter() - t0)
        contents = sorted(p.name for p in root.iterdir() if p.name != LOCK_FILE)
        ours_interrupted = _read_json(root / PROGRESS_MARKER) is not None and marker is None
        if contents and not overwrite and not ours_interrupted:
            if marker is not None:
                raise FileExistsError(
                    f"{root} already holds a synthetic dataset with other parameters ({marker}); "
                    f"pass overwrite=True (--overwrite) to regenerate it or choose another root."
                )
            shown = ", ".join(contents[:5]) + (", ..." if len(contents) > 5 else "")
            raise FileExistsError(
                f"{root} is not empty and is not a synthetic dataset (it holds: {shown}); refusing to write "
                f"into it -- choose an empty or new root, or pass overwrite=True to replace train/, val/ "
                f"and class_index.json there."
            )
        for name in _OWNED:  # clear only what the generator owns (overwrite or an interrupted run)
            p = root / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()

        _atomic_write(root / PROGRESS_MARKER, json.dumps(params, sort_keys=True).encode())
        _generate(root, params)
        _atomic_write(root / COMPLETE_MARKER, (json.dumps(params, sort_keys=True, indent=1) + "\n").encode())
        (root / PROGRESS_MARKER).unlink()
    return _summary(root, params, created=True, seconds=time.perf_counter() - t0)


def _generate(root: Path, params: dict) -> None:
    n, size, seed = params["num_classes"], params["size"], params["seed"]
    n_train, n_val = params["train_per_class"], params["val_per_class"]
    wnids = [class_wnid(c) for c in range(n)]
    index = {str(c): [wnids[c], class_name(c)] for c in range(n)}
    _atomic_write(root / CLASS_INDEX_FILE, (json.dumps(index, indent=1) + "\n").encode())

    # Val numbers are shuffled across classes like the real ILSVRC2012 val set (1-based, 8 digits).
    numbers = np.random.default_rng([seed, 2]).permutation(n * n_val) + 1
    file_name = {"train": lambda c, i: f"{wnids[c]}_{i}.JPEG",
                 "val": lambda c, i: f"ILSVRC2012_val_{int(numbers[c * n_val + i]):08d}.JPEG"}
    for split, per_class in (("train", n_train), ("val", n_val)):
        for c, wnid in enumerate(wnids):
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = render_image(c, size, _image_rng(seed, split, c, i))
                _atomic_write(d / file_name[split](c, i), _encode_jpeg(img))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write a synthetic dataset and print its summary as JSON."""
    ap = argparse.ArgumentParser(
        prog="python -m ideal_ray.data.synthetic", description="Write a synthetic ImageNet-layout dataset."
    )
    ap.add_argument("--root", required=True, help="output folder (created; must be empty or a synthetic set)")
    ap.add_argument("--classes", type=int, default=10, help="number of classes")
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--val-per-class", type=int, default=10)
    ap.add_argument("--size", type=int, default=96, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace train/, val/ and class_index.json")
    args = ap.parse_args(argv)
    try:
        summary = make_synthetic_imagenet(
            args.root,
            num_classes=args.classes,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            size=args.size,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
