"""Read an ImageNet-layout image folder as a torch Dataset (in-process; no Ray).

Layout: ``root/<split>/<wnid>/<file>.{JPEG,jpeg,jpg,png}`` with labels from a class index
(``root/class_index.json`` in the torchvision/Keras style ``{"0": ["n01440764", "tench"], ...}``), so label
numbers match the standard ImageNet-1k order rather than whatever folders happen to exist. Without a class
index the sorted folder names are the classes (name = wnid).

Every layout problem is reported before any image is opened, with one sentence naming the folder. At read
time an undecodable file (zero bytes, not an image, truncated) must not kill a multi-day training run: it is
skipped, the next good sample is returned instead and the path is recorded in ``dataset.skipped``.

Decoding (:func:`open_rgb`, shared with ``sources.py``) accepts only the formats in ``DECODE_FORMATS``, never
decodes a truncated file partially (PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False) and turns every
mode those formats produce into RGB (:func:`to_rgb`); a bad file raises :class:`BadImageError`, whose text
names the problem ("empty file (0 bytes)", "truncated image (...)", ...), the reason every skip list shows.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, NamedTuple

import numpy as np
from PIL import (BmpImagePlugin, GifImagePlugin, Image, ImageFile, JpegImagePlugin, PngImagePlugin,
                 UnidentifiedImageError, WebPImagePlugin)

from ideal_ray.storage import StorePath, is_uri

if TYPE_CHECKING:  # annotations only: torch is imported where it is used (the Ray decode actors run without it)
    import torch

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp")  # compared lower-case, so .JPEG (ImageNet) matches
CLASS_INDEX_FILE = "class_index.json"

# The decoders tried on every file, whatever its extension (ImageNet has PNG and CMYK data in .JPEG files).
# Naming them keeps rarely used plugins (TGA, PSD, TIFF, ...) away from bad bytes; JPEG includes MPO.
DECODE_FORMATS: tuple[str, ...] = tuple(
    m.format for m in (JpegImagePlugin.JpegImageFile, PngImagePlugin.PngImageFile, WebPImagePlugin.WebPImageFile,
                       GifImagePlugin.GifImageFile, BmpImagePlugin.BmpImageFile)
)
# What decoding a bad file raises: UnidentifiedImageError is an OSError; truncated data raises OSError on load;
# some corrupt headers raise SyntaxError / ValueError / struct.error / EOFError; bogus huge sizes
# DecompressionBombError.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError
)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # PNG 16-bit grayscale (older Pillow: "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def as_path(path: str | os.PathLike | StorePath) -> Path | StorePath:
    """Where a listing reads: a local :class:`~pathlib.Path` (``~`` expanded) or, for an object-store URI
    (``s3://bucket/imagenet``), a :class:`~ideal_ray.storage.StorePath` with the same methods; a ``StorePath`` stays
    itself (it keeps what its store listed so far)."""
    if isinstance(path, StorePath):
        return path
    return StorePath(os.fspath(path)) if is_uri(os.fspath(path)) else Path(path).expanduser()


def scandir(folder: Path | StorePath):
    """The entries of ``folder`` (``name``, ``is_dir()``, ``is_file()``): ``os.scandir`` of a local folder, the store's
    listing of a :class:`~ideal_ray.storage.StorePath`."""
    return folder.scandir() if isinstance(folder, StorePath) else os.scandir(folder)


def load_class_index(root_or_file: str | os.PathLike | StorePath) -> list[tuple[str, str]]:
    """Return ``[(wnid, name), ...]`` ordered by label from a class-index file or a dataset root.

    Accepts a directory (reads ``<dir>/class_index.json``), a JSON file ``{"0": [wnid, name], ...}`` (labels
    must be exactly 0..N-1) or a text file with one ``wnid name...`` per line in label order (the Kaggle
    ``LOC_synset_mapping.txt`` style).
    """
    path = as_path(root_or_file)
    if path.is_dir():
        path = path / CLASS_INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"class index {path} does not exist; pass a class_index.json file or its folder.")

    if path.suffix.lower() == ".txt":
        entries = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.strip().split(maxsplit=1)
            entries.append((parts[0], parts[1] if len(parts) > 1 else parts[0]))
        if not entries:
            raise ValueError(f"class index {path} has no entries; expected one 'wnid name' per line.")
        _check_unique(entries, path)
        return entries

    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"class index {path} is not valid JSON ({e}); expected {{\"0\": [wnid, name], ...}}.")
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"class index {path} must be a non-empty JSON object like {{\"0\": [wnid, name], ...}}.")
    try:
        by_label = {int(k): v for k, v in raw.items()}
    except ValueError:
        raise ValueError(f"class index {path} has a non-integer key; keys must be the labels \"0\", \"1\", ...")
    if sorted(by_label) != list(range(len(by_label))):
        raise ValueError(f"class index {path} labels must be exactly 0..{len(by_label) - 1} with no gaps.")
    entries = []
    for label in range(len(by_label)):
        v = by_label[label]
        if isinstance(v, str):  # {"0": "n01440764"} -- tolerated, name = wnid
            entries.append((v, v))
        elif isinstance(v, (list, tuple)) and len(v) >= 1 and all(isinstance(x, str) for x in v):
            entries.append((v[0], v[1] if len(v) > 1 else v[0]))
        else:
            raise ValueError(f"class index {path} entry {label} is {v!r}; expected [wnid, name].")
    _check_unique(entries, path)
    return entries


def _check_unique(entries: list[tuple[str, str]], path: Path) -> None:
    seen: set[str] = set()
    for wnid, _ in entries:
        if wnid in seen:
            raise ValueError(f"class index {path} lists wnid {wnid!r} twice; each class folder needs one label.")
        seen.add(wnid)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode of ``DECODE_FORMATS`` to RGB.

    Transparency (alpha channel, or a ``tRNS`` colour / palette entry) is composited over white, 16-bit
    grayscale is scaled to 8 bits (high byte, as Pillow does for 16-bit RGB) rather than clipped, CMYK / 1-bit /
    L / palette go through Pillow's conversions.
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(img).astype(np.int64)  # (H, W), 0..65535
        gray = np.clip(wide >> 8, 0, 255).astype(np.uint8)  # (H, W)
        trns = img.info.get("transparency")
        if isinstance(trns, int):
            gray[wide == trns] = 255
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")  # applies a tRNS colour / palette alpha as the alpha channel
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


class BadImageError(OSError):
    """A listed file that gives no image. Its text is a short phrase naming the problem, because that text is what
    a person reads in the logs and in ``skipped.tsv`` (PIL's own says e.g. ``cannot identify image file
    <_io.BytesIO object at 0x...>``): ``empty file (0 bytes)``, ``not an image (unrecognised format)``,
    ``truncated image (JPEG, 14 bytes not processed)``, ``corrupt image (PNG: ...)``, ``image too large (...)`` or
    ``unreadable: <the OS error>``. An ``OSError``, so it is one of ``DECODE_ERRORS``."""


def skip_reason(err: BaseException) -> str:
    """The phrase a skipped file is listed with: a :class:`BadImageError`'s own text, ``unreadable: ...`` for a
    failed read, else the exception's type and text."""
    if isinstance(err, BadImageError):
        return str(err)
    if isinstance(err, OSError):
        return f"unreadable: {err.strerror or err}"
    return f"{type(err).__name__}: {err}"


def _byte_size(source: str | os.PathLike | IO[bytes]) -> int | None:
    """Size of a path or a seekable file object in bytes (None when it cannot be told)."""
    try:
        if isinstance(source, (str, os.PathLike)):
            return os.path.getsize(source)
        return source.seek(0, os.SEEK_END)
    except (OSError, ValueError, AttributeError):
        return None


def _bad_image(err: BaseException, source: str | os.PathLike | IO[bytes], fmt: str | None) -> BadImageError:
    """What went wrong with ``source`` as one :class:`BadImageError` (looked at only once decoding failed)."""
    if isinstance(err, BadImageError):
        return err
    if isinstance(err, OSError) and err.errno is not None:  # the OS could not read it: missing, permissions, EIO
        return BadImageError(f"unreadable: {err.strerror or err}")
    if _byte_size(source) == 0:
        return BadImageError("empty file (0 bytes)")
    if isinstance(err, UnidentifiedImageError):
        return BadImageError("not an image (unrecognised format)")
    if isinstance(err, Image.DecompressionBombError):
        return BadImageError(f"image too large ({err})")
    text = str(err)
    if isinstance(err, EOFError) or "truncated" in text:
        detail = text.replace("image file is truncated", "").strip(" ()")
        return BadImageError(f"truncated image ({', '.join(x for x in (fmt, detail) if x) or 'no detail'})")
    return BadImageError(f"corrupt image ({fmt + ': ' if fmt else ''}{type(err).__name__}: {text})")


def open_rgb(source: str | os.PathLike | IO[bytes]) -> Image.Image:
    """Fully decode a file (path or binary file object) to RGB; raises :class:`BadImageError` (one of
    ``DECODE_ERRORS``) naming the problem on a bad file. The one decode of every reader: training, extraction,
    evaluation."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, so truncated files would decode "
            "partially; set it back to False (some import changed it)."
        )
    fmt = None
    try:
        with Image.open(source, formats=DECODE_FORMATS) as img:
            fmt = img.format
            img.load()  # PIL is lazy: decode now, inside the caller's error handling
            return to_rgb(img)
    except DECODE_ERRORS as e:
        raise _bad_image(e, source, fmt) from e


def default_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float (3, H, W) in [-1, 1] at the original size (used when no transform is given)."""
    from torchvision.transforms.v2 import functional as F

    x = F.pil_to_tensor(img)  # (3, H, W) uint8
    return x.float().div_(127.5).sub_(1.0)  # (3, H, W) in [-1, 1]


class FolderSplit(NamedTuple):
    """One split of an ImageNet-layout folder, listed: ``samples`` [(path, label)] in sorted order."""

    samples: list[tuple[str, int]]
    classes: list[str]  # wnid by label
    class_names: list[str]  # name by label
    class_index_path: Path | StorePath | None  # None: no class index, the sorted folder names are the classes


def resolve_class_index(
    root: str | os.PathLike | StorePath, class_index: str | os.PathLike = ""
) -> tuple[list[tuple[str, str]] | None, Path | StorePath | None]:
    """(entries, path) of the class index in force: ``class_index`` when given, else ``root/class_index.json``
    when it exists, else ``(None, None)`` (the caller derives the classes from the data)."""
    index_path = as_path(class_index) if str(class_index) else as_path(root) / CLASS_INDEX_FILE
    if str(class_index) or index_path.is_file():
        return load_class_index(index_path), index_path
    return None, None


def list_image_folder(
    root: str | os.PathLike | StorePath, split: str = "train", class_index: str | os.PathLike = ""
) -> FolderSplit:
    """List ``root/<split>/<wnid>/<image>`` in sorted (class folder, file name) order; labels from the class
    index (see :func:`resolve_class_index`). Every layout problem raises one clear error before any image
    is opened. ``root`` may be an object-store URI (:func:`as_path`): the split is then one recursive listing."""
    root = as_path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder; check data.root.")
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder {split_dir} does not exist; expected {root}/{split}/<wnid>/<images>.")
    class_dirs = sorted(e.name for e in scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not class_dirs:
        raise FileNotFoundError(f"split folder {split_dir} has no class folders; expected {split_dir}/<wnid>/<images>.")

    entries, index_path = resolve_class_index(root, class_index)
    if entries is None:  # no class index anywhere: sorted folder names are the classes
        entries = [(d, d) for d in class_dirs]
    class_to_idx = {wnid: i for i, (wnid, _) in enumerate(entries)}

    unknown = [d for d in class_dirs if d not in class_to_idx]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ValueError(
            f"class folder {split_dir / unknown[0]}{more} is not in the class index {index_path}; "
            f"remove the folder or add its wnid to the index."
        )

    samples: list[tuple[str, int]] = []
    for d in class_dirs:
        label = class_to_idx[d]
        files = sorted(
            e.name
            for e in scandir(split_dir / d)
            if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        )
        samples.extend((str(split_dir / d / f), label) for f in files)
    if not samples:
        raise FileNotFoundError(
            f"split folder {split_dir} has class folders but no image files ({', '.join(IMAGE_EXTENSIONS)})."
        )
    return FolderSplit(samples, [w for w, _ in entries], [n for _, n in entries], index_path)


class ImageFolderDataset:
    """ImageNet-layout folder ``root/<split>/<wnid>/*`` as (image_tensor, label) samples: a map-style dataset for
    ``torch.utils.data.DataLoader`` (``__len__`` + ``__getitem__``; this module does not import torch, so the Ray
    decode actors that use its readers start without it).

    Attributes: ``samples`` [(path, label)], ``targets`` [label], ``classes`` [wnid by label], ``class_names``
    [name by label], ``class_to_idx`` {wnid: label}, ``skipped`` (paths that failed to decode, in the order met;
    per process -- each DataLoader worker has its own copy) and ``num_skipped``.

    ``transform`` takes an RGB PIL image; without one the image becomes a float (3, H, W) tensor in [-1, 1].
    ``return_path=True`` makes samples ``(image, label, path)`` (the path is the sample id).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        class_index: str | os.PathLike = "",
        return_path: bool = False,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.transform = transform
        self.return_path = return_path
        listed = list_image_folder(self.root, split, class_index)
        self.samples: list[tuple[str, int]] = listed.samples
        self.classes = listed.classes
        self.class_names = listed.class_names
        self.class_index_path: Path | None = listed.class_index_path
        self.class_to_idx = {wnid: i for i, wnid in enumerate(self.classes)}
        self.targets = [label for _, label in self.samples]
        self.skipped: list[str] = []
        self._bad: set[int] = set()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        """Decode sample ``index`` to an RGB PIL image; raises on an undecodable file."""
        return open_rgb(self.samples[index][0])

    def __getitem__(self, index: int):
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for a dataset of {n} images.")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            path, label = self.samples[i]
            try:
                img = self.load_image(i)
            except DECODE_ERRORS as e:
                self._bad.add(i)
                self.skipped.append(path)
                log.warning("skipping undecodable image %s (%s)", path, skip_reason(e))
                continue
            x = self.transform(img) if self.transform is not None else default_to_tensor(img)
            return (x, label, path) if self.return_path else (x, label)
        raise RuntimeError(f"no image under {self.root / self.split} could be decoded; check the files.")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
            f"classes={self.num_classes}, skipped={self.num_skipped})"
        )
