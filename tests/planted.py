"""Planted files: every awkward kind of image file (zero bytes, truncated, not an image, CMYK, 16-bit, alpha,
palette transparency, a PNG named .JPEG), for the robust-decoding tests. Test fixtures: they live with the tests,
not in the product (``ideal_ray.data.synthetic`` makes the data sets themselves)."""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from ideal_ray.data.synthetic import _encode_jpeg, _image_rng, render_image
from ideal_ray.io import atomic_write


_PLANT_SIZE = 16  # side of every planted image; halves of 8 px are whole JPEG blocks, so JPEG colours stay exact


def _halves(left, right, dtype=np.uint8) -> np.ndarray:
    """(16, 16[, C]) array: ``left`` in columns 0-7, ``right`` in 8-15."""
    left, right = np.asarray(left, dtype=dtype), np.asarray(right, dtype=dtype)
    out = np.empty((_PLANT_SIZE, _PLANT_SIZE) + left.shape, dtype=dtype)
    out[:, : _PLANT_SIZE // 2], out[:, _PLANT_SIZE // 2 :] = left, right
    return out


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_16bit_rgb(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG of (H, W, 3) uint16 (Pillow cannot write this mode)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16-bit depth, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def planted_files() -> dict[str, tuple[str, bytes, np.ndarray | None]]:
    """name -> (file name, bytes, expected RGB (16, 16, 3) uint8 or None when the file must fail to decode).

    JPEG kinds decode to their expected colours within +-3 (lossy), PNG kinds exactly.
    """
    red, green, blue, white = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
    photo = _encode_jpeg(render_image(0, 64, _image_rng(0, "train", 0, 0)))
    png = _encode(Image.fromarray(render_image(1, 64, _image_rng(0, "train", 1, 0))), "PNG")
    palette = Image.fromarray(_halves(0, 1), mode="P")
    palette.putpalette(list(green) + list(red) + [0] * 762)
    gray16 = _halves(0x8000, 0xFFFF, np.uint16)  # 16-bit -> 8-bit keeps the high byte: 128, 255
    rgb16 = _halves((0xFFFF, 0x8000, 0x0000), (0x1234, 0xABCD, 0x7F00), np.uint16)
    files: dict[str, tuple[str, bytes, np.ndarray | None]] = {
        "zero_bytes": ("planted_zero_bytes.JPEG", b"", None),
        "truncated_jpeg": ("planted_truncated_jpeg.JPEG", photo[: len(photo) // 2], None),
        "truncated_png": ("planted_truncated_png.png", png[: len(png) // 2], None),
        "not_an_image": ("planted_not_an_image.JPEG", b"<html><body>404 Not Found</body></html>\n", None),
        "cmyk_jpeg": ("planted_cmyk_jpeg.JPEG",
                      _encode(Image.fromarray(_halves((0, 255, 255, 0), (255, 0, 255, 0)), mode="CMYK"), "JPEG",
                              quality=95), _halves(red, green)),
        "gray_jpeg": ("planted_gray_jpeg.JPEG", _encode(Image.fromarray(_halves(77, 200), mode="L"), "JPEG",
                                                        quality=95), _halves((77,) * 3, (200,) * 3)),
        "bitonal_png": ("planted_bitonal_png.png", _encode(Image.fromarray(_halves(False, True, bool)), "PNG"),
                        _halves((0,) * 3, white)),
        "gray16_png": ("planted_gray16_png.png", _encode(Image.fromarray(gray16), "PNG"),
                       _halves((128,) * 3, white)),
        "rgb16_png": ("planted_rgb16_png.png", _png_16bit_rgb(rgb16), _halves((255, 128, 0), (0x12, 0xAB, 0x7F))),
        "rgba_png": ("planted_rgba_png.png",
                     _encode(Image.fromarray(_halves((0, 0, 255, 255), (255, 0, 0, 0)), mode="RGBA"), "PNG"),
                     _halves(blue, white)),
        "la_png": ("planted_la_png.png", _encode(Image.fromarray(_halves((60, 255), (60, 0)), mode="LA"), "PNG"),
                   _halves((60,) * 3, white)),
        "palette_trns_png": ("planted_palette_trns_png.png", _encode(palette, "PNG", transparency=1),
                             _halves(green, white)),
        "gray_trns_png": ("planted_gray_trns_png.png",
                          _encode(Image.fromarray(_halves(40, 100), mode="L"), "PNG", transparency=100),
                          _halves((40,) * 3, white)),
        "png_named_jpeg": ("planted_png_named_jpeg.JPEG",
                           _encode(Image.fromarray(_halves((10, 20, 30), (200, 100, 50)), mode="RGB"), "PNG"),
                           _halves((10, 20, 30), (200, 100, 50))),
    }
    return files


def plant_bad_files(root: str | os.PathLike, split: str = "train") -> dict[str, dict]:
    """Add one file of every kind of :func:`planted_files` to the class folders of ``root/<split>`` (round robin
    over the sorted folders) and return name -> ``{"id": path relative to root, "good": bool, "expected":
    RGB (16, 16, 3) uint8 or None}``. Deterministic: the same call writes the same bytes to the same paths."""
    split_dir = Path(root).expanduser() / split
    class_dirs = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")) \
        if split_dir.is_dir() else []
    if not class_dirs:
        raise FileNotFoundError(f"{split_dir} has no class folders to plant files in; create the dataset first.")
    out: dict[str, dict] = {}
    for k, (name, (file_name, data, expected)) in enumerate(planted_files().items()):
        wnid = class_dirs[k % len(class_dirs)]
        atomic_write(str(split_dir / wnid / file_name), data)
        out[name] = {"id": f"{split}/{wnid}/{file_name}", "good": expected is not None, "expected": expected}
    return out
