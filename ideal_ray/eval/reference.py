"""Reference statistics for FID/sFID/precision-recall, computed once and cached (spec section 8).

A reference is an ADM reference batch (:class:`AdmNpzReference`, e.g. ``VIRTUAL_imagenet256_labeled.npz``) or an
image folder (:class:`ImageFolderReference`). :func:`reference_stats` runs the images through our Inception
(:func:`ideal_ray.eval.fid.features`) and caches the result under ``cache_dir`` (default
``~/.cache/ideal_ray/fid_refs``, or ``$IDEAL_RAY_FID_REFS``) in a file keyed by a sha256 of (reference identity,
crop, size, evaluator weights and layers); a second call loads the file (``ReferenceStats.from_cache`` is True).

ADM reference batches hold ``arr_0`` (10,000 uint8 images, N x 256 x 256 x 3 for ImageNet 256) and ADM's own
precomputed ``mu``/``sigma``/``mu_s``/``sigma_s`` (its TF evaluator over the whole dataset). Our ``fid``/``sfid``
come from our extractor on ``arr_0`` and the protocol says so; ADM's statistics are kept beside them so
:func:`~ideal_ray.eval.fid.compare` can also report ``fid_adm_stats`` (the number ADM's evaluator prints).
Image folders: each file is decoded (bad files are skipped, counted and named in the protocol), ADM-center-cropped
to ``crop`` (``ideal_ray.data.crops.center_crop_arr``) and, when ``size`` differs, PIL-bicubic resized to ``size``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np
from PIL import Image

from ideal_ray import storage
from ideal_ray.data.crops import center_crop_arr
from ideal_ray.data.folder import DECODE_ERRORS, IMAGE_EXTENSIONS, open_rgb
from ideal_ray.eval.fid import Gaussian, ReferenceStats, features
from ideal_ray.eval.inception import RESIZE_RULE, FidInception, file_sha256, load_inception
from ideal_ray.io import atomic_path

__all__ = [
    "ADM_STAT_KEYS",
    "AdmNpzReference",
    "FEATURES_VERSION",
    "ImageFolderReference",
    "cache_key",
    "cache_path",
    "load_cached",
    "store",
    "default_cache_dir",
    "read_adm_npz",
    "reference_source",
    "reference_stats",
]

log = logging.getLogger(__name__)

FEATURES_VERSION = 1  # bump when the feature layout (layers, order, dtype) changes: old cache entries then miss
ADM_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
CACHE_ENV = "IDEAL_RAY_FID_REFS"


def default_cache_dir() -> str:
    """``$IDEAL_RAY_FID_REFS`` if set, else ``~/.cache/ideal_ray/fid_refs`` (read at call time). A local or shared
    folder: an object-store URI there is a ConfigError (it would become a local folder named ``s3:``)."""
    from ideal_ray.config import ConfigError

    value = os.environ.get(CACHE_ENV)
    if value and storage.is_uri(value):
        raise ConfigError(f"{CACHE_ENV}={value} is an object-store URI, but the reference statistics are cached there "
                          f"as local files; set it to a local or shared folder.")
    return os.path.expanduser(value or "~/.cache/ideal_ray/fid_refs")


# ---------------------------------------------------------------------------------------------- ADM npz
@contextlib.contextmanager
def _open_binary(path: str) -> Iterator[Any]:
    """A seekable binary file of a local path or an object-store URI (``s3://bucket/refs/x.npz``; ranged reads)."""
    if storage.is_uri(path):
        fs, key = storage.filesystem(path)
        with fs.open_input_file(key) as f:
            yield f
    else:
        with open(path, "rb") as f:
            yield f


def _require_arr_0(members: List[str], path: str) -> None:
    """ValueError naming ``path`` and its keys unless the npz's ``members`` hold ``arr_0``, where an ADM reference
    batch stores its images."""
    if "arr_0.npy" not in members:
        raise ValueError(f"{path} has no arr_0 (keys: {sorted(n[:-4] for n in members)}); an ADM reference batch "
                         f"stores its images as arr_0.")


def read_adm_npz(path: str, batch_size: int = 500) -> Iterator[np.ndarray]:
    """Stream ``arr_0`` of an npz (a local path or an object-store URI) as uint8 batches (B, H, W, 3) without
    loading all of it (10k x 256^2 x 3 is 2 GB)."""
    with _open_binary(path) as raw, zipfile.ZipFile(raw) as archive:
        _require_arr_0(archive.namelist(), path)
        with archive.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                raise ValueError(f"{path}: arr_0 uses .npy format {version}; rewrite it with np.savez.")
            shape, fortran, dtype = readers[version](f)
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
                raise ValueError(f"{path}: arr_0 is {dtype} {shape}{' (Fortran order)' if fortran else ''}; "
                                 "expected C-order uint8 images (N, H, W, 3).")
            per_image = int(np.prod(shape[1:]))
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                data = f.read(count * per_image)
                if len(data) != count * per_image:
                    raise ValueError(f"{path}: arr_0 ends early at image {start + len(data) // per_image} of "
                                     f"{shape[0]}; the file is truncated, download it again.")
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])


@dataclass
class AdmNpzReference:
    """An ADM reference batch (a local path or an object-store URI): images ``arr_0`` used as stored, plus ADM's
    precomputed statistics if present."""

    path: str
    skipped: List[str] = field(default_factory=list)  # an npz has no per-image failures; kept for the protocol

    def identity(self) -> Dict[str, Any]:
        with _open_binary(self.path) as f:
            with np.load(f) as npz:
                keys = sorted(npz.files)
            f.seek(0)
            sha256 = file_sha256(f)
        return {"kind": "adm-npz", "name": os.path.basename(self.path), "path": storage.absolute(self.path),
                "sha256": sha256, "sha256_of": "the file", "keys": keys,
                "preprocess": "none: arr_0 images used as stored"}

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        return read_adm_npz(self.path, batch_size)

    def adm_stats(self) -> Dict[str, np.ndarray]:
        with _open_binary(self.path) as f, np.load(f) as npz:
            if not set(ADM_STAT_KEYS) <= set(npz.files):
                return {}
            return {key: np.asarray(npz[key], dtype=np.float64) for key in ADM_STAT_KEYS}


# ------------------------------------------------------------------------------------------ image folder
def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


@dataclass
class ImageFolderReference:
    """Every image file under ``root`` (a local folder or an object-store URI such as ``s3://bucket/imagenet/val``;
    recursive, sorted; hidden entries ignored), ADM-center-cropped to ``crop`` and PIL-bicubic resized to ``size``.
    The folder is listed once (a snapshot: every file with its byte size, one paginated listing in a bucket).
    Decoding uses ``workers`` threads; undecodable files go to ``skipped``."""

    root: str
    crop: int = 256
    size: int = 256
    workers: int = 4
    skipped: List[str] = field(default_factory=list)
    _sizes: Optional[Dict[str, int]] = field(default=None, init=False, repr=False, compare=False)
    _store: Any = field(default=None, init=False, repr=False, compare=False)  # (file system, folder) of a URI

    def _listed(self) -> Dict[str, int]:
        """{relative path (``/``-separated): byte size} of the image files."""
        if self._sizes is None:
            image = lambda rel: rel.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(rel)  # noqa: E731
            if storage.is_uri(self.root):
                if not storage.StorePath(self.root).is_dir():
                    raise FileNotFoundError(f"reference folder {self.root} does not exist; pass a folder of images.")
                self._store = fs, path = storage.filesystem(self.root)
                found = {rel: size for rel, size in storage.list_files(fs, path, recursive=True).items() if image(rel)}
            else:
                if not os.path.isdir(self.root):
                    raise FileNotFoundError(f"reference folder {self.root} does not exist; pass a folder of images.")
                found = {}
                for folder, dirs, names in os.walk(self.root):
                    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                    for n in names:
                        rel = os.path.relpath(os.path.join(folder, n), self.root)
                        if image(rel):
                            found[rel] = os.path.getsize(os.path.join(folder, n))
            if not found:
                raise ValueError(f"reference folder {self.root} has no image files ({', '.join(IMAGE_EXTENSIONS)}).")
            self._sizes = found
        return self._sizes

    def files(self) -> List[str]:
        """Relative paths of the image files, sorted."""
        return sorted(self._listed())

    def identity(self) -> Dict[str, Any]:
        sizes = self._listed()
        listing = "".join(f"{rel}\t{sizes[rel]}\n" for rel in self.files())
        return {"kind": "image-folder", "name": os.path.basename(os.path.normpath(self.root)),
                "path": storage.absolute(self.root), "sha256": hashlib.sha256(listing.encode()).hexdigest(),
                "sha256_of": "the listing: relative path and byte size of each image file, sorted",
                "num_files": len(sizes),
                "preprocess": f"ADM center crop to {self.crop} (BOX halvings, bicubic), "
                              f"then PIL bicubic to {self.size}" if self.size != self.crop else
                              f"ADM center crop to {self.crop} (BOX halvings, bicubic)"}

    def _load(self, rel: str) -> Optional[np.ndarray]:
        where = storage.join(self.root, rel)
        try:
            if self._store is not None:  # the object's bytes, decoded as a file's
                fs, folder = self._store
                img = open_rgb(io.BytesIO(storage.read_bytes(fs, f"{folder}/{rel}")))
            else:
                img = open_rgb(where)
            img = center_crop_arr(img, self.crop)
        except DECODE_ERRORS as err:
            log.warning("skipping reference image %s: %s", where, err)
            return None
        if self.size != self.crop:
            img = img.resize((self.size, self.size), Image.BICUBIC)
        return np.asarray(img)  # (size, size, 3) uint8

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        files = self.files()
        self.skipped = []
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            for start in range(0, len(files), batch_size):
                chunk = files[start:start + batch_size]
                images = list(pool.map(self._load, chunk))
                self.skipped += [rel for rel, img in zip(chunk, images) if img is None]
                good = [img for img in images if img is not None]
                if good:
                    yield np.stack(good)
        if len(self.skipped) == len(files):
            raise ValueError(f"none of the {len(files)} image files in {self.root} could be decoded "
                             f"(first: {self.skipped[0]}); check the folder.")

    def adm_stats(self) -> Dict[str, np.ndarray]:
        return {}


Reference = Union[AdmNpzReference, ImageFolderReference]


def reference_source(reference: str, size: int) -> Reference:
    """The reference at ``reference``, a local path or an object-store URI: an ADM reference npz (a file), or a
    folder of images, ADM-center-cropped and resized to ``size`` (the samples' size). FileNotFoundError naming what
    to pass when nothing is there, ValueError for a file that is not an npz archive holding ``arr_0``."""
    if storage.is_uri(reference):
        where = storage.StorePath(reference)  # a store that cannot be read: one sentence naming the URI
        is_dir, is_file = where.is_dir(), where.is_file()
    else:
        is_dir, is_file = os.path.isdir(reference), os.path.isfile(reference)
    if is_dir:
        return ImageFolderReference(reference, crop=size, size=size)
    if is_file:  # an npz archive holding arr_0 (its directory only: a few ranged reads in a bucket)
        try:
            with _open_binary(reference) as raw, zipfile.ZipFile(raw) as archive:
                members = archive.namelist()
        except zipfile.BadZipFile:
            raise ValueError(f"reference {reference} is not an npz archive; pass ADM's VIRTUAL_imagenet256_labeled.npz "
                             f"or a folder of reference images.") from None
        _require_arr_0(members, reference)
        return AdmNpzReference(reference)
    raise FileNotFoundError(f"reference {reference} does not exist; pass ADM's VIRTUAL_imagenet256_labeled.npz or a "
                            f"folder of reference images.")


# ---------------------------------------------------------------------------------------------- caching
def cache_key(identity: Dict[str, Any], evaluator: Dict[str, Any]) -> str:
    doc = {"kind": identity["kind"], "sha256": identity["sha256"], "preprocess": identity["preprocess"],
           "torch_fidelity": evaluator["torch_fidelity"], "weights_sha256": evaluator["weights_sha256"],
           "layers": evaluator["layers"], "resize": evaluator["resize"], "features_version": FEATURES_VERSION}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def _save(path: str, stats: ReferenceStats) -> None:
    arrays = {"mu": stats.pool.mu, "sigma": stats.pool.sigma, "mu_s": stats.spatial.mu,
              "sigma_s": stats.spatial.sigma, "pool_features": stats.pool_features,
              "protocol": np.array(json.dumps(stats.protocol))}
    arrays.update({f"adm_{key}": value for key, value in stats.adm_stats.items()})
    save_npz(path, arrays)


def save_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to the npz ``path`` atomically (temporary file + ``os.replace``): a cache entry another
    process reads is whole or absent."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _load(path: str) -> Optional[ReferenceStats]:
    try:
        with np.load(path, allow_pickle=False) as z:
            adm = {key[4:]: z[key] for key in z.files if key.startswith("adm_")}
            return ReferenceStats(Gaussian(z["mu"], z["sigma"]), Gaussian(z["mu_s"], z["sigma_s"]),
                                  z["pool_features"], json.loads(str(z["protocol"])), adm, from_cache=True)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        log.warning("ignoring unreadable reference cache %s (%s); recomputing it", path, err)
        return None


def cache_path(identity: Dict[str, Any], evaluator: Dict[str, Any], cache_dir: str = "") -> str:
    """Where the statistics of this reference under this evaluator live in ``cache_dir`` (default: see module)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", identity["name"])[:64]
    return os.path.join(cache_dir or default_cache_dir(), f"{name}-{cache_key(identity, evaluator)}.npz")


def load_cached(identity: Dict[str, Any], evaluator: Dict[str, Any], cache_dir: str = "") -> Optional[ReferenceStats]:
    """The cached statistics of this reference and evaluator, or None (never computed, or unreadable)."""
    path = cache_path(identity, evaluator, cache_dir)
    return _load(path) if os.path.isfile(path) else None


def store(identity: Dict[str, Any], evaluator: Dict[str, Any], feats: Dict[str, np.ndarray], skipped: List[str],
          cache_dir: str = "", adm_stats: Optional[Dict[str, np.ndarray]] = None) -> ReferenceStats:
    """Statistics of reference features computed elsewhere (e.g. by evaluation actors), cached like
    :func:`reference_stats` caches its own."""
    count = int(len(feats["pool"]))
    if count < 2:
        raise ValueError(f"reference {identity.get('path', identity['name'])} gave {count} readable image(s) "
                         f"({len(skipped)} skipped); FID needs at least 2.")
    reference = {**identity, "num_images": count, "skipped": len(skipped), "skipped_files": list(skipped)[:20]}
    protocol = {"reference": reference, "num_reference_images": count, "resize": RESIZE_RULE,
                "evaluator": evaluator, "cache_key": cache_key(identity, evaluator)}
    stats = ReferenceStats.from_features(feats, protocol, adm_stats)
    path = cache_path(identity, evaluator, cache_dir)
    _save(path, stats)
    log.info("reference statistics of %s (%d images) cached at %s", identity["name"], count, path)
    return stats


def reference_stats(source: Reference, extractor: Optional[FidInception] = None, cache_dir: str = "",
                    batch_size: int = 50, device: str = "cpu") -> ReferenceStats:
    """The reference's :class:`~ideal_ray.eval.fid.ReferenceStats`, loaded from ``cache_dir`` when this reference,
    preprocessing and evaluator were seen before, else computed (one Inception pass) and cached."""
    model = extractor if extractor is not None else load_inception(device=device)
    identity, evaluator = source.identity(), model.protocol()
    cached = load_cached(identity, evaluator, cache_dir)
    if cached is not None:
        return cached
    feats = features(source.batches(batch_size), batch_size=batch_size, extractor=model)
    return store(identity, evaluator, feats, source.skipped, cache_dir, source.adm_stats())
