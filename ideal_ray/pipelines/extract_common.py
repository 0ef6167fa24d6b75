"""What the in-process and the Ray token extraction share: the encoder math and the output folder's bookkeeping.

Both write the same folder (``tokens-*.parquet`` + ``manifest.json``, format in :mod:`ideal_ray.data.tokens`) with
the same manifest parameters, so either can resume what the other started.

* :class:`ViewEncoder` -- the tokenizer's encoder (VFM + fusion + quantizer) on a device, fed the ADM squares of a
  batch of images (``crops.make_squares``): it cuts the views on the device (``crops.views_from_squares``) and
  encodes them ``max_views`` at a time -> codes uint16 ``(B, V, N)``.
* :class:`ShardPlan` -- the output folder: lock, manifest parameters (a folder made with other parameters is
  refused, a folder without a manifest is never written into), crash leftovers removed, the shards still to do,
  one call per finished shard (written atomically, then recorded), the final verification. The folder may be an
  object-store URI (``out=s3://bucket/tokens/x``): the same bookkeeping through :mod:`ideal_ray.storage`, each
  shard uploaded whole from a local staging folder.
* :class:`Extraction` -- one run's settings from its :class:`~ideal_ray.config.ExtractConfig`: the listing, the
  tokenizer, crop size, batch size and precision on the device, the manifest parameters, the plan, the shards this
  run writes (``max_shards``) and the summary at the end.

Shard ``k`` holds the listed images ``[k * shard_images, (k + 1) * shard_images)`` that decoded, each with all its
views in view order; the undecodable ones are listed in the shard's manifest entry (``skipped``), and a shard none
of whose images decoded is a shard of 0 rows (recorded, resumed and verified like the others).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import posixpath
import shutil
import time
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:  # annotations only: torch is imported where it is used (the Ray decode actors run without it)
    import torch

from ideal_ray import storage
from ideal_ray.config import ExtractConfig, SourceConfig
from ideal_ray.data import crops, sources
from ideal_ray.data import tokens as tk
from ideal_ray.data.augment import to_model_input
from ideal_ray.data.skipped import MAX_SKIP_FRACTION, SKIPPED_FILE, skip_fraction_error, too_many_skipped, write_skipped

log = logging.getLogger(__name__)

LOCK_FILE = ".extract.lock"
PRECISIONS = {"fp32": None, "bf16": "bfloat16"}  # autocast dtype (torch attribute) by name; fp32: none
# A shard with more than MAX_SKIP_FRACTION of its images unreadable (and more than 10) stops the run, the rule of
# ideal_ray.data.skipped that training applies to its batches too; SKIPPED_FILE (image_id <TAB> error, one per line)
# is written next to the shards at the end.


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed (the tokenizer checkpoint's identity in the manifest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def listing_sha256(ids: Sequence[str], labels: np.ndarray) -> str:
    """Identity of a listing: sha256 over ``id <TAB> label`` lines in order."""
    h = hashlib.sha256()
    for i, y in zip(ids, np.asarray(labels).tolist()):
        h.update(f"{i}\t{y}\n".encode())
    return h.hexdigest()


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {sorted(PRECISIONS)}.")
    return precision


# ------------------------------------------------------------------------------------- the encoder
class ViewEncoder:
    """A tokenizer's encoder on ``device``: ADM squares of B images -> codes uint16 ``(B, V, grid * grid)``."""

    def __init__(self, tokenizer, views: str, image_size: int, device: torch.device | str, precision: str = "fp32",
                 max_views: int = 64):
        if max_views < 1:
            raise ValueError(f"max_views={max_views} must be at least 1 (views per encoder forward).")
        import torch  # here, not at the top: the decode actors import this module's neighbours without torch

        self.tok, self.views, self.size = tokenizer.eval(), crops.check_views(views), int(image_size)
        self.device = torch.device(device)
        amp = PRECISIONS[check_precision(precision)]
        self.amp = getattr(torch, amp) if amp else None
        self.max_views = int(max_views)
        self.num_views = crops.num_views(views)
        self.num_tokens = int(tokenizer.grid) ** 2

    def __call__(self, squares: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
        """``squares[k]`` uint8 ``(B, s_k, s_k, 3)`` (``crops.square_sizes`` order) -> uint16 ``(B, V, N)``."""
        import torch

        with torch.inference_mode():
            return self._encode(squares)

    def _encode(self, squares: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
        import torch

        on_dev = [torch.as_tensor(s).to(self.device, non_blocking=True) for s in squares]
        views = crops.views_from_squares(on_dev, self.views, self.size)  # (B, V, S, S, 3) uint8 on the device
        b = views.shape[0]
        flat = views.reshape(b * self.num_views, self.size, self.size, 3)  # (B*V, S, S, 3)
        out = []
        for a in range(0, len(flat), self.max_views):
            x = to_model_input(flat[a:a + self.max_views])  # (b, 3, S, S) in [-1, 1]
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out.append(self.tok.encode(x).flatten(1))  # (b, N)
        codes = torch.cat(out) if out else torch.zeros(0, self.num_tokens, dtype=torch.long, device=self.device)
        return codes.to("cpu").numpy().astype(np.uint16).reshape(b, self.num_views, self.num_tokens)


# ------------------------------------------------------------------------------------- the output folder
@contextlib.contextmanager
def _locked(lock_dir: str, out_dir: str) -> Iterator[None]:
    """Hold ``lock_dir``'s lock file for the extraction into ``out_dir`` (the same folder, or a URI's staging
    folder)."""
    fd = os.open(os.path.join(lock_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another extraction is writing to {out_dir}; wait for it or choose another out_dir.")
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _refuse_foreign(out_dir: str) -> None:
    """A folder (or a URI's prefix) with files but no manifest is someone else's: never write into it."""
    import pyarrow.fs

    fs, root = storage.filesystem(out_dir)
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory or tk.has_manifest(out_dir):
        return
    from ideal_ray.console import LOG_FILE  # the extraction job's own log (jobs/extract_tokens.py) is no data

    names = [i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(root))]  # files and folders
    foreign = [n for n in names if n not in (LOCK_FILE, LOG_FILE) and not n.endswith(tk.TMP_SUFFIX)]
    if foreign:
        shown = ", ".join(sorted(foreign)[:5])
        raise FileExistsError(f"{out_dir} is not empty and has no {tk.MANIFEST_FILE} (it holds: {shown}); extract "
                              f"into an empty or new folder.")


def _prepare(out_dir: str, params: dict) -> dict:
    """The manifest to continue from (new, or a matching unfinished/finished one); refuses other parameters."""
    if tk.has_manifest(out_dir):
        m = tk.read_manifest(out_dir)
        theirs = {k: m.get(k) for k in params}
        if theirs != params:
            diff = sorted(k for k in params if theirs[k] != params[k])
            raise FileExistsError(
                f"{out_dir} holds token shards made with other parameters ({', '.join(diff)} differ); choose a new "
                f"out_dir or delete that folder to start over."
            )
        return m
    m = dict(params, format=tk.FORMAT, complete=False, shards=[])
    tk.write_manifest(out_dir, m)
    return m


def _clean(out_dir: str, m: dict) -> list[dict]:
    """Drop leftovers of a crash; return the manifest's shard entries that are really finished (present with the
    recorded size). A shard the manifest does not know was written (or, in a store, uploaded) by a run that died
    before recording it: it is deleted and redone, so every row is kept exactly once."""
    fs, root = storage.filesystem(out_dir)
    present = storage.list_files(fs, root)  # {name: size}
    for name in storage.glob_names(present, "*" + tk.TMP_SUFFIX):
        log.warning("removing the leftover temporary file %s of an interrupted run", storage.join(out_dir, name))
        fs.delete_file(posixpath.join(root, name))
    done, removed = [], set()
    for s in m["shards"]:
        if present.get(s["file"]) == s["bytes"]:
            done.append(s)
        else:
            log.warning("shard %s is missing or changed since it was recorded; it will be redone", s["file"])
            if s["file"] in present:
                fs.delete_file(posixpath.join(root, s["file"]))
                removed.add(s["file"])
    known = {s["file"] for s in done}
    for name in storage.glob_names(present, tk.SHARD_GLOB):
        if name not in known and name not in removed:  # written, but the crash came before the manifest update
            log.warning("shard %s is not in the manifest (interrupted run); it will be redone",
                        storage.join(out_dir, name))
            fs.delete_file(posixpath.join(root, name))
    return done


def _clean_staging(staging: str) -> None:
    """Remove what a killed writer left in a URI's staging folder (half-written local shards; held under the
    lock, so no live writer's)."""
    for name in os.listdir(staging):
        if name.startswith("shard-") or name.endswith(tk.TMP_SUFFIX):
            log.warning("removing the leftover staging file %s of an interrupted run", os.path.join(staging, name))
            path = os.path.join(staging, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


class ShardPlan:
    """The output folder of one extraction, held under its lock file (use as a context manager).

    ``params`` are what must match for a rerun to continue the folder (view set, sizes, tokenizer hash, listing
    hash, shard size, precision). ``todo`` lists the shard indices still to write, ``images(k)`` the listed range of
    shard ``k``; :meth:`write` stores one finished shard, :meth:`finish` completes the manifest and verifies.

    ``out_dir`` may be an object-store URI (``s3://bucket/tokens/x``; endpoint and credentials from the environment,
    :func:`ideal_ray.storage.filesystem`). Then every shard is written whole to this machine's staging folder
    (:func:`ideal_ray.storage.staging_dir`) and uploaded with one write, so it appears only whole (a writer killed
    midway leaves no object); the manifest follows its shard, and resume, cleaning and verification are the same
    as for a folder (a shard object the manifest does not know, or of another size than recorded, is deleted and
    redone). What keeps two writers apart: a store has no lock files (and no no-clobber write through pyarrow), so
    the lock is the staging folder's, which stops a second extraction into the same URI from this machine only.
    Two machines writing one URI are not detected: give each extraction its own ``out`` (one Ray extraction is one
    writer, its driver).
    """

    def __init__(self, out_dir: str, params: dict, num_listed: int, extra: dict | None = None,
                 max_skip_fraction: float = MAX_SKIP_FRACTION):
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction={max_skip_fraction} must be in [0, 1].")
        self.max_skip_fraction = float(max_skip_fraction)
        self.out_dir = storage.absolute(out_dir)
        self.uri = storage.is_uri(self.out_dir)
        self.staging: str | None = None  # a URI's local staging folder (set on entering)
        self.params, self.extra = params, dict(extra or {})
        self.shard_images = int(params["shard_images"])
        self.num_views = int(params["num_views"])
        self.num_tokens = int(params["grid"]) ** 2
        self.num_listed = int(num_listed)
        self.num_shards = math.ceil(self.num_listed / self.shard_images)
        self._lock = None

    def __enter__(self) -> "ShardPlan":
        _refuse_foreign(self.out_dir)  # before the lock file is created in it
        if self.uri:
            self.staging = storage.staging_dir(self.out_dir)
        else:
            os.makedirs(self.out_dir, exist_ok=True)
        self._lock = _locked(self.staging or self.out_dir, self.out_dir)
        self._lock.__enter__()
        try:
            if self.staging:
                _clean_staging(self.staging)
            m = _prepare(self.out_dir, self.params)
            m.update(self.extra)
            self._by_file = {s["file"]: s for s in _clean(self.out_dir, m)}
            self.todo = [k for k in range(self.num_shards) if tk.shard_name(k) not in self._by_file]
            m["num_shards"] = self.num_shards
            if self.todo:
                m["complete"] = False
            self.manifest = m
            self._save()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self._lock.__exit__(*exc)
        return False

    def images(self, k: int) -> tuple[int, int]:
        """Listed image range ``[a, b)`` of shard ``k``."""
        return k * self.shard_images, min(self.num_listed, (k + 1) * self.shard_images)

    def _save(self) -> None:
        names = [tk.shard_name(i) for i in range(self.num_shards)]
        self.manifest["shards"] = [self._by_file[n] for n in names if n in self._by_file]
        tk.write_manifest(self.out_dir, self.manifest)

    def write(self, k: int, ids: Sequence[str], labels: np.ndarray, tokens: np.ndarray,
              skipped: list[dict]) -> dict:
        """Store shard ``k``: ``ids``/``labels`` of its decoded images, ``tokens`` uint16 ``(images, V, N)``.

        A shard none of whose images decoded (and which the skip rule lets pass) is written as a shard of 0 rows:
        the manifest, resume, the verification and the readers then treat it like any other, and its files are
        listed in ``skipped``."""
        a, b = self.images(k)
        n = len(ids)
        if too_many_skipped(len(skipped), b - a, self.max_skip_fraction):
            first = skipped[0]
            raise skip_fraction_error(len(skipped), b - a, f"images of shard {k}", first["image_id"], first["error"],
                                      f"max_skip_fraction={self.max_skip_fraction:g}", "Nothing of this shard was "
                                      "written; fix the input and rerun (finished shards are kept).")
        if tokens.shape != (n, self.num_views, self.num_tokens) or n + len(skipped) != b - a:
            raise RuntimeError(f"shard {k} got {n} images + {len(skipped)} skipped with tokens {tokens.shape}, "
                               f"expected {b - a} listed images x {self.num_views} views x {self.num_tokens} "
                               f"tokens.")
        rows_ids = [i for i in ids for _ in range(self.num_views)]
        view_ids = np.tile(np.arange(self.num_views, dtype=np.int16), n)
        row_labels = np.repeat(np.asarray(labels), self.num_views)
        info = tk.write_shard(storage.join(self.out_dir, tk.shard_name(k)), rows_ids, view_ids, row_labels,
                              tokens.reshape(n * self.num_views, self.num_tokens),  # (rows, N), also for 0 rows
                              row_group_rows=int(self.params["row_group_images"]) * self.num_views,
                              staging=self.staging)
        entry = dict(info, index=k, first=a, listed=b - a, images=n, skipped=list(skipped))
        self._by_file[entry["file"]] = entry
        self._save()
        return entry

    def finish(self, verify: bool = True) -> dict | None:
        """Mark the manifest complete (every shard written), write ``skipped.tsv``; verify unless told not to."""
        missing = [k for k in range(self.num_shards) if tk.shard_name(k) not in self._by_file]
        if missing:
            raise RuntimeError(f"shards {missing[:5]} of {self.out_dir} were not written; rerun to finish them.")
        m = self.manifest
        self._save()
        m["num_images"] = int(sum(s["images"] for s in m["shards"]))
        m["num_rows"] = int(sum(s["rows"] for s in m["shards"]))
        m["num_skipped"] = int(sum(len(s["skipped"]) for s in m["shards"]))
        m["complete"] = True
        tk.write_manifest(self.out_dir, m)
        write_skipped(self.local_skipped_file, self.skipped())
        if self.uri:  # written here, uploaded whole next to the shards
            fs, key = storage.filesystem(storage.join(self.out_dir, SKIPPED_FILE))
            storage.upload_file(self.local_skipped_file, fs, key)
        return tk.verify_shards(self.out_dir) if verify else None

    def skipped(self) -> list[dict]:
        return [x for s in self.manifest["shards"] for x in s["skipped"]]

    @property
    def local_skipped_file(self) -> str:
        """This machine's ``skipped.tsv`` (the output folder's; for a URI, the staging folder's copy of the one
        uploaded), e.g. for an MLflow artifact."""
        return os.path.join(self.staging or self.out_dir, SKIPPED_FILE)

    @property
    def local_dir(self) -> str:
        """A local folder for what belongs next to the output on this machine (the default MLflow store, a log):
        the output folder itself, or a URI's staging folder."""
        return self.staging or self.out_dir


def extraction_params(tokenizer_ckpt: str, tokenizer, listing, views: str, image_size: int, split: str,
                      shard_images: int, row_group_images: int, precision: str) -> dict:
    """The manifest parameters a rerun must match (``listing``: ids + labels of the split, in order)."""
    return {
        "views": views,
        "num_views": crops.num_views(views),
        "view_names": crops.view_names(views),
        "image_size": int(image_size),
        "grid": int(tokenizer.grid),
        "vocab": int(tokenizer.cfg.quantizer.codebook_size),
        "tokenizer_sha256": file_sha256(tokenizer_ckpt),
        "split": split,
        "num_listed": len(listing.ids),
        "listing_sha256": listing_sha256(listing.ids, listing.labels),
        "shard_images": int(shard_images),
        "row_group_images": int(row_group_images),
        "precision": precision,
    }


def list_split(data: SourceConfig):
    """The listing of ``data`` (:func:`ideal_ray.data.sources.list_images`): ids, labels and where each image is."""
    return sources.list_images(data.root, split=data.split, class_index=data.class_index, fmt=data.format,
                               labels_file=data.labels_file)


class Extraction:
    """One extraction's settings resolved from its :class:`~ideal_ray.config.ExtractConfig`, the same way for the
    in-process and the Ray run (so either resumes the other's folder):

    * on construction: an object-store ``out`` checked writable (:func:`ideal_ray.storage.check_store`, before
      anything is listed or loaded), the tokenizer file (absolute), the split's listing, the tokenizer model (on
      ``tokenizer_device``) and the crop size (``image_size``, default the tokenizer's);
    * :meth:`settle` once the device is known: the batch size (``batch_size``, default 512 views on a GPU, 64 on the
      CPU), the precision (``run.precision=auto``: bf16 on a GPU, fp32 on the CPU) and the manifest parameters;
    * :meth:`plan`: the output folder's :class:`ShardPlan`; :meth:`shards`: the shards this run writes (all still
      to do, or the first ``max_shards``); :meth:`result`: finish (complete + verify) or stop early, the summary.

    The config is expected valid (:func:`ideal_ray.config.validate_stage`, which both entry points call first).
    """

    def __init__(self, cfg: ExtractConfig, tokenizer_device: str = "cpu"):
        from ideal_ray.checkpoint import load_tokenizer

        self.cfg = cfg
        self.t0 = time.perf_counter()
        storage.check_store("out", cfg.out)
        self.tokenizer_path = os.path.abspath(os.path.expanduser(cfg.tokenizer))
        self.listing = list_split(cfg.data)
        self.tok = load_tokenizer(self.tokenizer_path, device=str(tokenizer_device))
        self.size = int(cfg.image_size) if cfg.image_size is not None else int(self.tok.cfg.image_size)
        if self.size != self.tok.cfg.image_size:
            log.warning("extracting at image_size=%d, the tokenizer was trained at %d", self.size,
                        self.tok.cfg.image_size)
        self.batch_size: int | None = None
        self.precision: str | None = None
        self.params: dict | None = None

    def settle(self, gpu: bool) -> dict:
        """Batch size, precision and manifest parameters for an encoder on a GPU (``gpu``) or the CPU."""
        cfg = self.cfg
        self.batch_size = int(cfg.batch_size) if cfg.batch_size is not None else (512 if gpu else 64)
        precision = cfg.run.precision if cfg.run.precision != "auto" else ("bf16" if gpu else "fp32")
        self.precision = check_precision(precision)
        self.params = extraction_params(self.tokenizer_path, self.tok, self.listing, cfg.views, self.size,
                                        cfg.data.split, cfg.shard_images, cfg.row_group_images, self.precision)
        return self.params

    def plan(self) -> ShardPlan:
        """The output folder ``out`` (enter it: lock, manifest, crash leftovers removed, the shards to do)."""
        if self.params is None:
            raise RuntimeError("Extraction.settle() comes before Extraction.plan().")
        extra = {"tokenizer_path": self.tokenizer_path, "data_root": self.listing.root, "format_in": self.listing.fmt}
        return ShardPlan(self.cfg.out, self.params, len(self.listing), extra, self.cfg.max_skip_fraction)

    def shards(self, plan: ShardPlan) -> list[int]:
        """The shards this run writes: every one still to do, or the first ``max_shards`` of them."""
        m = self.cfg.max_shards
        return plan.todo if m is None else plan.todo[:max(0, int(m))]

    def result(self, plan: ShardPlan, shards: list[int], written_images: int) -> dict:
        """After ``shards`` were written: a run that wrote every shard still to do completes the manifest (and
        verifies with ``verify``); one stopped by ``max_shards`` leaves the rest to a rerun (``stopped_early``)."""
        if len(shards) < len(plan.todo):
            plan.todo = shards
            return summary(plan, self.t0, written_images, None, stopped_early=True)
        return summary(plan, self.t0, written_images, plan.finish(self.cfg.verify))


def summary(plan: ShardPlan, t0: float, written_images: int, check: dict | None, **extra) -> dict:
    """The JSON summary both extractions return."""
    m = plan.manifest
    seconds = time.perf_counter() - t0
    return dict({
        "out_dir": plan.out_dir,
        "views": plan.params["views"],
        "num_views": plan.num_views,
        "image_size": plan.params["image_size"],
        "shards": plan.num_shards,
        "shards_written": len(plan.todo),
        "shards_kept": plan.num_shards - len(plan.todo),
        "images": int(sum(s["images"] for s in m["shards"])),
        "rows": int(sum(s["rows"] for s in m["shards"])),
        "complete": bool(m["complete"]),
        "skipped": plan.skipped(),
        "skipped_file": storage.join(plan.out_dir, SKIPPED_FILE),
        "seconds": round(seconds, 3),
        "images_per_s": round(written_images / seconds, 2) if seconds > 0 else None,
        "verify": check,
    }, **extra)
