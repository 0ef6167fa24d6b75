"""In-process token extraction: every train image -> its crop views -> tokenizer codes -> Parquet shards.

No Ray here (issue 5 adds the GPU actor-pool version writing the same format). The steps:

1. list the split with the folder reader (sorted, labels from the class index); ids are paths relative to the
   data root;
2. plan shards of ``shard_images`` consecutive listed images (``tokens-00000.parquet``, ...);
3. for each shard not already finished: decode each image (undecodable files are skipped and recorded in the
   manifest, never fatal), cut its views (``crops.make_views``), encode them ``batch_size`` views at a time with
   ``IdealTokenizer.encode`` and write the shard atomically, then record it in the manifest;
4. mark the manifest complete and run :func:`~ideal_ray.data.tokens.verify_shards`.

Resume: a rerun with the same arguments keeps every shard the manifest records (file present, row count as
recorded), deletes leftover ``.tmp`` files and shards the manifest does not know (a crash between the rename and the
manifest update) and redoes the rest. A folder holding tokens of other parameters (tokenizer file hash, view set,
image size, listing, shard size) is refused rather than mixed. One extraction per folder at a time (a lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ideal_ray.data import crops
from ideal_ray.data import tokens as tk
from ideal_ray.data.folder import _DECODE_ERRORS, ImageFolderDataset
from ideal_ray.data.ray_pipeline import decode, to_model_input

log = logging.getLogger(__name__)

LOCK_FILE = ".extract.lock"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed (the tokenizer checkpoint's identity in the manifest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


@contextlib.contextmanager
def _locked(out_dir: str) -> Iterator[None]:
    fd = os.open(os.path.join(out_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another extraction is writing to {out_dir}; wait for it or choose another out_dir.")
        yield
    finally:
        os.close(fd)  # closing releases the lock


def list_images(data_root: str, split: str = "train", class_index: str = "") -> tuple[list[str], list[str], np.ndarray]:
    """(absolute paths, image ids relative to ``data_root``, labels int64) of a split in the folder reader's order."""
    ds = ImageFolderDataset(data_root, split=split, class_index=class_index)
    root = Path(data_root).expanduser().resolve()
    paths = [p for p, _ in ds.samples]
    ids = [Path(p).resolve().relative_to(root).as_posix() for p in paths]
    return paths, ids, np.asarray(ds.targets, dtype=np.int64)


def _listing_sha256(ids: list[str], labels: np.ndarray) -> str:
    h = hashlib.sha256()
    for i, y in zip(ids, labels.tolist()):
        h.update(f"{i}\t{y}\n".encode())
    return h.hexdigest()


class _ImageViews(torch.utils.data.Dataset):
    """One listed image -> (position, views uint8 (V, S, S, 3) or None, error text); decodes in loader workers."""

    def __init__(self, paths: list[str], views: str, image_size: int):
        self.paths, self.views, self.image_size = paths, views, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, crops.make_views(decode(self.paths[i]), self.views, self.image_size), ""
        except _DECODE_ERRORS as e:
            return i, None, f"{type(e).__name__}: {e}"


def _identity(x):
    return x


def _iter_views(paths: list[str], views: str, image_size: int, num_workers: int):
    ds = _ImageViews(paths, views, image_size)
    if num_workers <= 0:
        return (ds[i] for i in range(len(ds)))
    return iter(torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                            collate_fn=_identity, prefetch_factor=4))


class _Encoder:
    """The tokenizer's encoder on a device: uint8 views (B, S, S, 3) -> codes uint16 (B, N)."""

    def __init__(self, tokenizer, device: torch.device, precision: str):
        self.tok, self.device, self.amp = tokenizer, device, PRECISIONS[precision]

    def __call__(self, views: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(views).to(self.device, non_blocking=True)  # (B, S, S, 3) uint8
        x = to_model_input(x)  # (B, 3, S, S) in [-1, 1]
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            codes = self.tok.encode(x)  # (B, g, g)
        return codes.flatten(1).to("cpu").numpy().astype(np.uint16)  # (B, N)


def _encode_shard(encoder: _Encoder, paths, ids, labels, views: str, image_size: int, batch_size: int,
                  num_views: int, num_tokens: int, num_workers: int):
    """Encode one shard's images -> (ids, view ids, labels, tokens (rows, N), skipped [{image_id, error}])."""
    kept: list[int] = []
    skipped: list[dict] = []
    pending: list[np.ndarray] = []  # view arrays (V, S, S, 3) waiting for the encoder
    pending_views = 0
    out: list[np.ndarray] = []

    def flush(force: bool) -> None:
        nonlocal pending, pending_views
        if not pending:
            return
        stacked = np.concatenate(pending)  # (P, S, S, 3)
        cut = len(stacked) if force else (len(stacked) // batch_size) * batch_size
        for a in range(0, cut, batch_size):
            out.append(encoder(stacked[a:a + batch_size]))
        pending = [stacked[cut:]] if cut < len(stacked) else []
        pending_views = len(stacked) - cut

    for j, arr, err in _iter_views(paths, views, image_size, num_workers):
        if arr is None:
            skipped.append({"image_id": ids[j], "error": err})
            log.warning("skipping undecodable image %s (%s)", paths[j], err)
            continue
        kept.append(j)
        pending.append(arr)
        pending_views += len(arr)
        if pending_views >= batch_size:
            flush(force=False)
    flush(force=True)
    toks = np.concatenate(out) if out else np.zeros((0, num_tokens), np.uint16)  # (rows, N)
    rows_ids = [ids[j] for j in kept for _ in range(num_views)]
    view_ids = np.tile(np.arange(num_views, dtype=np.int16), len(kept))
    row_labels = np.repeat(np.asarray(labels)[kept], num_views)
    return rows_ids, view_ids, row_labels, toks, skipped


def _refuse_foreign(out_dir: str) -> None:
    """A folder with files but no manifest is someone else's: never write into it."""
    if not os.path.isdir(out_dir) or os.path.isfile(tk.manifest_path(out_dir)):
        return
    foreign = [n for n in os.listdir(out_dir) if n != LOCK_FILE and not n.endswith(tk.TMP_SUFFIX)]
    if foreign:
        shown = ", ".join(sorted(foreign)[:5])
        raise FileExistsError(f"{out_dir} is not empty and has no {tk.MANIFEST_FILE} (it holds: {shown}); extract "
                              f"into an empty or new folder.")


def _prepare_out_dir(out_dir: str, params: dict) -> dict:
    """The manifest to continue from (new, or a matching unfinished/finished one); refuses foreign folders."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isfile(tk.manifest_path(out_dir)):
        m = tk.read_manifest(out_dir)
        theirs = {k: m.get(k) for k in params}
        if theirs != params:
            diff = sorted(k for k in params if theirs[k] != params[k])
            raise FileExistsError(
                f"{out_dir} holds token shards made with other parameters ({', '.join(diff)} differ); choose a new "
                f"out_dir or delete that folder to start over."
            )
        return m
    _refuse_foreign(out_dir)
    m = dict(params, format=tk.FORMAT, complete=False, shards=[])
    tk.write_manifest(out_dir, m)
    return m


def _clean(out_dir: str, m: dict) -> list[dict]:
    """Drop leftovers of a crash; return the manifest's shard entries that are really finished."""
    for tmp in glob.glob(os.path.join(out_dir, "*" + tk.TMP_SUFFIX)):
        log.warning("removing the leftover temporary file %s of an interrupted run", tmp)
        os.remove(tmp)
    done = []
    for s in m["shards"]:
        path = os.path.join(out_dir, s["file"])
        if os.path.isfile(path) and os.path.getsize(path) == s["bytes"]:
            done.append(s)
        else:
            log.warning("shard %s is missing or changed since it was recorded; it will be redone", s["file"])
            if os.path.exists(path):
                os.remove(path)
    known = {s["file"] for s in done}
    for path in glob.glob(os.path.join(out_dir, tk.SHARD_GLOB)):
        if os.path.basename(path) not in known:  # written, but the crash came before the manifest update
            log.warning("shard %s is not in the manifest (interrupted run); it will be redone", path)
            os.remove(path)
    return done


def extract_tokens_local(
    tokenizer_ckpt: str,
    data_root: str,
    out_dir: str,
    views: str = "llamagen",
    image_size: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    *,
    split: str = "train",
    class_index: str = "",
    shard_images: int = 4096,
    row_group_images: int = 4,
    num_workers: int = 0,
    precision: str = "fp32",
    verify: bool = True,
) -> dict:
    """Encode every ``split`` image's views with the tokenizer at ``tokenizer_ckpt`` into shards under ``out_dir``.

    ``views``: ``"llamagen"`` (20 views) or ``"release"`` (2); ``image_size`` defaults to the tokenizer's
    ``cfg.image_size``; ``batch_size`` counts views per encoder call; ``num_workers`` > 0 decodes and crops in
    DataLoader worker processes; ``precision`` ``"bf16"`` runs the encoder under autocast (the release's default
    on GPU), ``"fp32"`` is exact. Returns a summary (images, rows, shards written/kept, skipped files, images/s,
    the verification summary).
    """
    from ideal_ray.checkpoint import load_tokenizer

    crops.check_views(views)
    if batch_size < 1 or shard_images < 1 or row_group_images < 1:
        raise ValueError(f"batch_size={batch_size}, shard_images={shard_images} and row_group_images="
                         f"{row_group_images} must all be at least 1.")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {sorted(PRECISIONS)}.")
    t0 = time.perf_counter()
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    tokenizer_ckpt = os.path.abspath(os.path.expanduser(tokenizer_ckpt))
    dev = torch.device(device)
    tok = load_tokenizer(tokenizer_ckpt, device=str(dev))
    size = int(image_size) if image_size is not None else int(tok.cfg.image_size)
    if size != tok.cfg.image_size:
        log.warning("extracting at image_size=%d, the tokenizer was trained at %d", size, tok.cfg.image_size)
    paths, ids, labels = list_images(data_root, split, class_index)
    nv = crops.num_views(views)
    params = {
        "views": views,
        "num_views": nv,
        "view_names": crops.view_names(views),
        "image_size": size,
        "grid": int(tok.grid),
        "vocab": int(tok.cfg.quantizer.codebook_size),
        "tokenizer_sha256": file_sha256(tokenizer_ckpt),
        "split": split,
        "num_listed": len(ids),
        "listing_sha256": _listing_sha256(ids, labels),
        "shard_images": int(shard_images),
        "row_group_images": int(row_group_images),
        "precision": precision,
    }
    _refuse_foreign(out_dir)  # before the lock file is created in it
    os.makedirs(out_dir, exist_ok=True)
    with _locked(out_dir):
        m = _prepare_out_dir(out_dir, params)
        m.update(tokenizer_path=tokenizer_ckpt, data_root=str(Path(data_root).expanduser().resolve()))
        done = _clean(out_dir, m)
        m["shards"] = done
        num_shards = math.ceil(len(ids) / shard_images)
        m["num_shards"] = num_shards
        by_file = {s["file"]: s for s in done}
        todo = [k for k in range(num_shards) if tk.shard_name(k) not in by_file]
        if todo:
            m["complete"] = False
        tk.write_manifest(out_dir, m)

        encoder = _Encoder(tok, dev, precision)
        written_images = 0
        for n_done, k in enumerate(todo, 1):
            t_shard = time.perf_counter()
            a, b = k * shard_images, min(len(ids), (k + 1) * shard_images)
            rows_ids, view_ids, row_labels, toks, skipped = _encode_shard(
                encoder, paths[a:b], ids[a:b], labels[a:b], views, size, batch_size, nv, params["grid"] ** 2,
                num_workers)
            info = tk.write_shard(os.path.join(out_dir, tk.shard_name(k)), rows_ids, view_ids, row_labels,
                                  toks, row_group_rows=row_group_images * nv)
            entry = dict(info, index=k, first=a, listed=b - a, images=len(rows_ids) // nv, skipped=skipped)
            by_file[entry["file"]] = entry
            m["shards"] = [by_file[tk.shard_name(i)] for i in range(num_shards) if tk.shard_name(i) in by_file]
            tk.write_manifest(out_dir, m)
            written_images += entry["images"]
            dt = time.perf_counter() - t_shard
            log.info("shard %s: %d images x %d views in %.1fs (%.1f images/s); %d/%d shards this run",
                     entry["file"], entry["images"], nv, dt, entry["images"] / max(dt, 1e-9), n_done, len(todo))

        m["shards"] = [by_file[tk.shard_name(i)] for i in range(num_shards)]
        m["num_images"] = int(sum(s["images"] for s in m["shards"]))
        m["num_rows"] = int(sum(s["rows"] for s in m["shards"]))
        m["num_skipped"] = int(sum(len(s["skipped"]) for s in m["shards"]))
        m["complete"] = True
        tk.write_manifest(out_dir, m)
        check = tk.verify_shards(out_dir) if verify else None

    seconds = time.perf_counter() - t0
    return {
        "out_dir": out_dir,
        "views": views,
        "num_views": nv,
        "image_size": size,
        "shards": num_shards,
        "shards_written": len(todo),
        "shards_kept": num_shards - len(todo),
        "images": m["num_images"],
        "rows": m["num_rows"],
        "skipped": [x for s in m["shards"] for x in s["skipped"]],
        "seconds": round(seconds, 3),
        "images_per_s": round(written_images / seconds, 2) if seconds > 0 else None,
        "verify": check,
    }
