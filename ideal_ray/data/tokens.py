"""Token shards: the Parquet format of the offline codes (issues 4 and 5) and the AR training readers.

Format (``TOKEN_SCHEMA``), one row per (image, view):

* ``image_id`` string -- the image's path relative to the data root (``train/n01440764/x.JPEG``);
* ``view_id`` int16 -- which crop (``crops.view_names(views)[view_id]``);
* ``label`` int32 -- the class;
* ``tokens`` list<uint16> -- the ``grid * grid`` code indices in raster order (codebooks up to 65536).

Layout contract (the writers keep it, :func:`verify_shards` proves it, the readers rely on it): inside a shard the
rows are grouped by image, each image's ``V`` views contiguous and in view order, images in the order of the sorted
folder listing; shard ``k`` of the manifest continues where shard ``k - 1`` stopped. So "image i, view v" is plain
arithmetic on the manifest's per-shard image counts -- no id index is ever loaded.

Folder: ``tokens-00000.parquet, ...`` plus ``manifest.json`` (:func:`read_manifest`): format, grid, vocab, view
set and count, image size, tokenizer path + sha256, data root/split + a hash of the listing, one entry per finished
shard (file, first listed image, images, rows, bytes, skipped files) and ``complete``. Shards are written atomically
(temporary file, fsync, no-clobber link) and never replaced silently; the manifest is rewritten after each shard.

Readers for the AR stage, both "one random view per image per epoch" with the schedule of ``ray_pipeline``
(epoch permutation of the IMAGES, drop-last steps, contiguous per-rank slices); the view of image ``i`` in epoch
``e`` comes from a generator seeded by ``(seed, e, i)`` only (:func:`view_of`), so it does not depend on the world
size, the batch or a restart:

* :func:`ar_rank_datasets` -- per-rank Ray datasets in exact consumption order (rows ``tokens`` int64 (N,),
  ``label``, ``step``), resumable at any step;
* :class:`TokenShardDataset` -- everything in memory, for tests and small runs, with :meth:`step_batch` giving
  exactly the rows the Ray reader yields.

Why the Ray reader reads row groups on demand (and not something else). ImageNet x 20 views is 25.6M rows of
1.15 KB (~29 GB of tokens; ~35 GB of zstd Parquet, since Parquet stores uint16 as INT32); an epoch needs one view
of each image (~1.5 GB) in a random order. Loading every view into each actor (or the object store) costs 29 GB per
node; gathering the epoch's chosen views up front costs a full scan per epoch and a stall at every epoch boundary.
Instead each actor computes, for its step, which (shard, row) every sample lives in (arithmetic, above), sorts the
reads by (shard, row group), reads each needed row group once (three columns, ``image_id`` skipped) and keeps
every shard's parsed footer (open files are a small LRU reopened with that footer). Memory stays at one step's row
groups plus the footers (~80 bytes per image at the default row group of 4 images: ~0.1 GB per actor for all of
ImageNet). The price is read amplification: a row group of ``row_group_images`` x V rows is decoded to use one
row (4 x 20 rows = 92 KB of tokens per sample by default). Measured on one CPU core from the page cache: ~1.7k
random samples/s at 4 images per row group, ~1.1k at 8, ~2.3k at 2 (vs the paper's ~400 sequences/s per GPU) --
so stage the shards on local disk (or a page cache that holds them), not on a network filesystem.
``row_group_images`` is an argument of the writer: smaller groups cut the amplification and grow the footers.
"""

from __future__ import annotations

import collections
import glob
import json
import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ideal_ray.config import ARTrainConfig, ConfigError
from ideal_ray.errors import InputError
from ideal_ray.io import TMP_SUFFIX, atomic_write_json, publish  # noqa: F401  (TMP_SUFFIX: half-written files)

if TYPE_CHECKING:  # annotations only: torch is imported where it is used (the Ray decode actors run without it)
    import torch

from ideal_ray.data.ray_pipeline import (
    PermutationCache,
    epoch_permutation,
    local_batch_size,
    position_of,
    row_schedule,
    schedule_info,
)

FORMAT = "ideal-ray/tokens/v1"
MANIFEST_FILE = "manifest.json"
SHARD_GLOB = "tokens-*.parquet"
MAX_TOKEN = np.iinfo(np.uint16).max  # codebooks of up to 65536 entries fit uint16

TOKEN_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("view_id", pa.int16(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("tokens", pa.list_(pa.uint16()), nullable=False),
    ]
)

AR_COLUMNS = ("tokens", "label", "step")


def __getattr__(name: str):
    """``AR_TORCH_DTYPES`` (iter_torch_batches(dtypes=...) must name every column) is made on first use: the
    shard-reader actors import this module without torch, which they do not need."""
    if name == "AR_TORCH_DTYPES":
        import torch

        return {c: torch.int64 for c in AR_COLUMNS}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Last word of the view seed, so [seed, e, i, tag] never equals the permutation seed [seed, e] or ray_pipeline's
# augmentation stream [seed, e, position, "augm"].
_VIEW_STREAM = 0x76696577  # "view"


class TokenShardError(InputError, ValueError):
    """The token shards do not prove rows = images x views with no duplicates (see ``summary['problems']``)."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``tokens-00042.parquet``."""
    return f"tokens-{int(index):05d}.parquet"


# ------------------------------------------------------------------------------------- writing
def _tokens_array(tokens: np.ndarray) -> pa.ListArray:
    """(R, L) integer array -> list<uint16> column, one list of L codes per row."""
    rows, length = tokens.shape
    offsets = pa.array(np.arange(0, (rows + 1) * length, length, dtype=np.int32))  # (R + 1,)
    values = pa.array(np.ascontiguousarray(tokens, dtype=np.uint16).reshape(-1), type=pa.uint16())  # (R * L,)
    return pa.ListArray.from_arrays(offsets, values)


def shard_table(image_ids: Sequence[str], view_ids, labels, tokens) -> pa.Table:
    """Validate one shard's columns and build its Arrow table (``TOKEN_SCHEMA``)."""
    tokens = np.asarray(tokens)
    n = len(image_ids)
    if tokens.ndim != 2 or tokens.shape[0] != n:
        raise ValueError(f"tokens must be an (rows, grid*grid) array with one row per image id; got shape "
                         f"{tokens.shape} for {n} ids.")
    view_ids, labels = np.asarray(view_ids), np.asarray(labels)
    if view_ids.shape != (n,) or labels.shape != (n,):
        raise ValueError(f"view_ids {view_ids.shape} and labels {labels.shape} must both have shape ({n},), one "
                         f"entry per row.")
    for name, a in (("tokens", tokens), ("view_ids", view_ids), ("labels", labels)):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got dtype {a.dtype}.")
    if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN):
        raise ValueError(f"tokens span [{tokens.min()}, {tokens.max()}], outside uint16 [0, {MAX_TOKEN}]; the "
                         f"shard format holds codebooks of at most 65536 entries.")
    if view_ids.size and (view_ids.min() < 0 or view_ids.max() > np.iinfo(np.int16).max):
        raise ValueError(f"view ids span [{view_ids.min()}, {view_ids.max()}], outside int16 (and below 0).")
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
        raise ValueError(f"labels span [{labels.min()}, {labels.max()}]; labels must be non-negative int32.")
    if any(not isinstance(i, str) or not i for i in image_ids):
        raise ValueError("every image id must be a non-empty string (the path relative to the data root).")
    return pa.Table.from_arrays(
        [
            pa.array(list(image_ids), type=pa.string()),
            pa.array(view_ids.astype(np.int16), type=pa.int16()),
            pa.array(labels.astype(np.int32), type=pa.int32()),
            _tokens_array(tokens),
        ],
        schema=TOKEN_SCHEMA,
    )


def write_shard(
    path: str | os.PathLike,
    image_ids: Sequence[str],
    view_ids,
    labels,
    tokens,
    *,
    row_group_rows: int | None = None,
) -> dict:
    """Write one Parquet shard atomically; returns ``{"file", "rows", "bytes"}``.

    ``tokens``: (rows, grid*grid) integers in [0, 65535]. ``row_group_rows`` sets the row-group size (the Ray
    reader's read unit; keep whole images per group). The data goes to ``<path>.tmp`` first, is fsynced and then
    linked into place; an existing ``path`` raises FileExistsError (a finished shard is never replaced silently).
    """
    path = os.fspath(path)
    table = shard_table(image_ids, view_ids, labels, tokens)
    if os.path.exists(path):
        raise FileExistsError(f"shard {path} already exists; refusing to overwrite it (delete it to redo it).")
    if row_group_rows is not None and row_group_rows < 1:
        raise ValueError(f"row_group_rows={row_group_rows} must be at least 1.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + TMP_SUFFIX
    try:
        pq.write_table(
            table,
            tmp,
            row_group_size=row_group_rows or max(1, table.num_rows),
            compression="zstd",
            use_dictionary=["image_id"],  # each id repeats once per view; codes are high-entropy
            write_statistics=["view_id", "label"],  # keeps footers small (many small row groups)
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        publish(tmp, path, f"shard {path} already exists; refusing to overwrite it (delete it to redo it).")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"file": os.path.basename(path), "rows": table.num_rows, "bytes": os.path.getsize(path)}


def read_shard(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a whole shard (all or some columns); checks the schema against ``TOKEN_SCHEMA``."""
    pf = pq.ParquetFile(os.fspath(path))
    _check_schema(pf.schema_arrow, path)
    return pf.read(columns=list(columns) if columns is not None else None)


def _check_schema(schema: pa.Schema, path) -> None:
    if not schema.equals(TOKEN_SCHEMA, check_metadata=False):
        raise ValueError(f"{path} does not have the token shard schema ({schema}); expected {TOKEN_SCHEMA}.")


def tokens_to_numpy(column, num_tokens: int) -> np.ndarray:
    """list<uint16> column (Array or ChunkedArray) -> uint16 (rows, num_tokens); rejects rows of another length."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)  # (R,)
    if len(lengths) and (lengths.min() != num_tokens or lengths.max() != num_tokens):
        raise ValueError(f"token lists have lengths in [{lengths.min()}, {lengths.max()}], expected {num_tokens} "
                         f"(grid * grid); the shard does not match its manifest.")
    flat = column.flatten().to_numpy(zero_copy_only=False)  # (R * N,) honours slicing offsets
    return flat.astype(np.uint16, copy=False).reshape(len(lengths), num_tokens)


# ------------------------------------------------------------------------------------- manifest
def manifest_path(shard_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(shard_dir), MANIFEST_FILE)


def write_manifest(shard_dir: str | os.PathLike, manifest: dict) -> str:
    """Atomically (re)write ``manifest.json`` (temporary file + rename; the manifest is meant to be updated)."""
    return atomic_write_json(manifest_path(shard_dir), manifest, sort_keys=True)


def read_manifest(shard_dir: str | os.PathLike) -> dict:
    """Load ``manifest.json`` of a token shard folder (clear errors for a missing or foreign file)."""
    path = manifest_path(shard_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; {shard_dir} is not a token shard folder (run "
                                f"jobs/extract_tokens.py to make one).")
    with open(path) as f:
        try:
            m = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); rerun the extraction into a new folder.")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{path} is not a token manifest of format {FORMAT!r}; rerun the extraction.")
    return m


def check_shards(cfg: ARTrainConfig) -> dict:
    """The AR run's token shards (``data.shards``), checked against its model before any worker starts (or torch is
    imported: the train_ar job calls it first); returns the manifest."""
    if not os.path.isfile(os.path.join(cfg.data.shards, "manifest.json")):
        raise ConfigError(f"No token shards at data.shards={cfg.data.shards} (no manifest.json); write them first "
                          f"with jobs/extract_tokens.py.")
    manifest = read_manifest(cfg.data.shards)
    if not manifest.get("complete"):
        raise ConfigError(f"The token shards at {cfg.data.shards} are incomplete; rerun jobs/extract_tokens.py with "
                          f"the same arguments to finish them.")
    if manifest["vocab"] > cfg.model.vocab_size or manifest["grid"] != cfg.model.grid:
        raise ConfigError(f"The shards at {cfg.data.shards} hold {manifest['grid']}x{manifest['grid']} codes from a "
                          f"{manifest['vocab']}-entry codebook; set model.grid={manifest['grid']} and "
                          f"model.vocab_size={manifest['vocab']}.")
    if manifest["num_images"] < cfg.data.global_batch:
        raise ConfigError(f"The shards hold {manifest['num_images']} images, fewer than one global batch of "
                          f"{cfg.data.global_batch}.")
    return manifest


def _require_complete(m: dict, shard_dir) -> None:
    if not m.get("complete"):
        raise ValueError(f"the token shards in {shard_dir} are incomplete (manifest complete=false); rerun "
                         f"jobs/extract_tokens.py with the same arguments to finish them.")


def shard_image_counts(m: dict) -> np.ndarray:
    """Images per shard (int64 (S,)) in manifest order: the reader's whole index."""
    return np.asarray([int(s["images"]) for s in m["shards"]], dtype=np.int64)


# ------------------------------------------------------------------------------------- verification
def verify_shards(shard_dir: str | os.PathLike, check_tokens: bool = True, raise_on_error: bool = True) -> dict:
    """Prove that the shards hold every image exactly ``V`` times (views 0..V-1), nothing more, in reader layout.

    Reads ``image_id``/``view_id``/``label`` of every shard (and ``tokens`` when ``check_tokens``: lengths and
    the vocabulary range). Checks: every manifest shard exists with its recorded row count and the schema; no
    (image_id, view_id) pair twice (also across shards); no image with a missing view; view ids in [0, V); one
    label per image; rows of an image contiguous and in view order; no stray shard or temporary file; and, for a
    complete manifest, ``rows == images x views == num_images x views``. Returns a summary dict (``ok``,
    ``images``, ``rows``, ``views``, ``duplicates``, ``missing``, ``problems`` ...); with ``raise_on_error`` a
    failed check raises :class:`TokenShardError` carrying it.
    """
    shard_dir = os.fspath(shard_dir)
    m = read_manifest(shard_dir)
    v, n_tok, vocab = int(m["num_views"]), int(m["grid"]) ** 2, int(m["vocab"])
    problems: list[str] = []
    global_ids: dict[str, int] = {}
    counts = np.zeros((0, v), dtype=np.int64)  # (images, V): how often each (image, view) occurs
    rows_total = bad_views = 0
    listed = {s["file"] for s in m["shards"]}

    for s in m["shards"]:
        path = os.path.join(shard_dir, s["file"])
        if not os.path.isfile(path):
            problems.append(f"shard {s['file']} is in the manifest but missing on disk")
            continue
        try:
            pf = pq.ParquetFile(path)
            _check_schema(pf.schema_arrow, path)
        except Exception as e:  # unreadable footer or foreign schema: report it, keep checking the others
            problems.append(f"shard {s['file']} cannot be read as a token shard ({type(e).__name__}: {e})")
            continue
        rows = pf.metadata.num_rows
        rows_total += rows
        if rows != int(s["rows"]):
            problems.append(f"shard {s['file']} has {rows} rows, the manifest says {s['rows']}")
        t = pf.read(columns=["image_id", "view_id", "label"])
        ids = t.column("image_id").combine_chunks()
        views = t.column("view_id").to_numpy().astype(np.int64)  # (R,)
        labels = t.column("label").to_numpy().astype(np.int64)  # (R,)
        enc = pc.dictionary_encode(ids)
        local = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)  # (R,) index into enc.dictionary
        gid_of_local = np.asarray([global_ids.setdefault(x, len(global_ids))
                                   for x in enc.dictionary.to_pylist()], dtype=np.int64)
        gid = gid_of_local[local]  # (R,) image number across all shards
        ok_view = (views >= 0) & (views < v)
        bad_views += int((~ok_view).sum())
        if len(global_ids) > counts.shape[0]:
            counts = np.concatenate([counts, np.zeros((len(global_ids) - counts.shape[0], v), np.int64)])
        np.add.at(counts, (gid[ok_view], views[ok_view]), 1)
        # Reader layout: groups of V rows, one image each, views 0..V-1, one label.
        k = rows // v
        if rows % v:  # a shard whose every image was undecodable has 0 rows, which is fine
            problems.append(f"shard {s['file']} has {rows} rows, not a multiple of the {v} views")
        elif rows and not (np.all(views.reshape(k, v) == np.arange(v))
                           and np.all(gid.reshape(k, v) == gid[::v, None])):
            problems.append(f"shard {s['file']} breaks the layout (each image's {v} views contiguous, in order)")
        elif int(s.get("images", k)) != k:
            problems.append(f"shard {s['file']} holds {k} images, the manifest says {s['images']}")
        if rows and rows % v == 0 and np.any(labels.reshape(-1, v) != labels[::v, None]):
            problems.append(f"shard {s['file']} gives one image two different labels")
        if check_tokens and rows:
            for batch in pf.iter_batches(batch_size=8192, columns=["tokens"]):
                col = batch.column(0)
                lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
                if lengths.min() != n_tok or lengths.max() != n_tok:
                    problems.append(f"shard {s['file']} has token lists of length {lengths.min()}..{lengths.max()}, "
                                    f"expected {n_tok}")
                    break
                top = pc.max(col.flatten()).as_py()
                if top is not None and top >= vocab:
                    problems.append(f"shard {s['file']} has code {top}, outside the vocabulary of {vocab}")
                    break

    duplicates = int(np.maximum(counts - 1, 0).sum())
    missing = int((counts == 0).sum())
    images = len(global_ids)
    if duplicates:
        problems.append(f"{duplicates} duplicate (image_id, view_id) rows")
    if missing:
        problems.append(f"{missing} (image, view) pairs missing")
    if bad_views:
        problems.append(f"{bad_views} rows with a view id outside [0, {v})")
    if rows_total != images * v:
        problems.append(f"{rows_total} rows != {images} images x {v} views")
    if m.get("complete") and "num_shards" in m and int(m["num_shards"]) != len(m["shards"]):
        problems.append(f"the manifest lists {len(m['shards'])} shards of the {m['num_shards']} planned")
    if m.get("complete") and int(m.get("num_images", -1)) != images:
        problems.append(f"{images} distinct images in the shards, the manifest says {m.get('num_images')}")
    for path in sorted(glob.glob(os.path.join(shard_dir, SHARD_GLOB))):
        if os.path.basename(path) not in listed:
            problems.append(f"stray shard {os.path.basename(path)} is not in the manifest")
    for path in sorted(glob.glob(os.path.join(shard_dir, "*" + TMP_SUFFIX))):
        problems.append(f"leftover temporary file {os.path.basename(path)}")

    summary = {
        "ok": not problems,
        "complete": bool(m.get("complete")),
        "shards": len(m["shards"]),
        "images": images,
        "views": v,
        "rows": rows_total,
        "duplicates": duplicates,
        "missing": missing,
        "problems": problems,
    }
    if problems and raise_on_error:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise TokenShardError(f"token shards in {shard_dir} failed verification: {'; '.join(problems[:3])}{more}; "
                              f"delete the bad shards and rerun the extraction to redo them.", summary)
    return summary


# ------------------------------------------------------------------------------------- AR schedule (pure)
def view_of(seed: int, epoch: int, image_index: int, num_views: int) -> int:
    """The view of image ``image_index`` in epoch ``epoch``: a draw of its own generator ``(seed, epoch, index)``."""
    if num_views == 1:
        return 0
    rng = np.random.default_rng([int(seed), int(epoch), int(image_index), _VIEW_STREAM])
    return int(rng.integers(num_views))


def views_of(seed: int, epochs, indices, num_views: int) -> np.ndarray:
    """Vectorised :func:`view_of` over matching (epoch, image index) arrays -> int64 (n,)."""
    return np.asarray([view_of(seed, e, i, num_views) for e, i in zip(np.asarray(epochs).tolist(),
                                                                      np.asarray(indices).tolist())],
                      dtype=np.int64)


def ar_step_plan(
    step: int, rank: int, world_size: int, global_batch: int, num_images: int, num_views: int, seed: int
) -> tuple[int, np.ndarray, np.ndarray]:
    """(epoch, image indices (LB,), view ids (LB,)) rank ``rank`` consumes at global ``step``."""
    spe = schedule_info(num_images, global_batch)
    epoch, positions = position_of(step, rank, world_size, global_batch, spe)
    indices = epoch_permutation(seed, epoch, num_images)[positions]  # (LB,)
    return epoch, indices, views_of(seed, np.full(len(indices), epoch), indices, num_views)


# ------------------------------------------------------------------------------------- random-access reader
class TokenShardReader:
    """Reads (image index, view) rows of a complete shard folder, a few row groups at a time.

    The index is arithmetic on the manifest (see the module docstring). Every shard's footer is parsed once and
    kept (``FileMetaData``, ~80 bytes per image); open files are an LRU of ``max_open_files`` (reopened with the
    kept footer, so a reopen costs no footer read), which bounds file descriptors whatever the shard count.
    """

    def __init__(self, shard_dir: str | os.PathLike, manifest: dict | None = None, max_open_files: int = 64):
        self.shard_dir = os.fspath(shard_dir)
        m = manifest if manifest is not None else read_manifest(self.shard_dir)
        _require_complete(m, self.shard_dir)
        self.files = [s["file"] for s in m["shards"]]
        counts = shard_image_counts(m)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (S + 1,)
        self.num_images = int(self.starts[-1])
        self.num_views = int(m["num_views"])
        self.num_tokens = int(m["grid"]) ** 2
        self.max_open_files = max(1, int(max_open_files))
        self._meta: dict[int, tuple[pq.FileMetaData, np.ndarray]] = {}
        self._open: collections.OrderedDict[int, pq.ParquetFile] = collections.OrderedDict()

    def _path(self, shard: int) -> str:
        return os.path.join(self.shard_dir, self.files[shard])

    def _row_groups(self, shard: int) -> np.ndarray:
        """First row of every row group of ``shard`` (int64 (G + 1,)), from its footer (read once)."""
        hit = self._meta.get(shard)
        if hit is not None:
            return hit[1]
        pf = self._file(shard)
        md = pf.metadata
        rg_starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])  # (G + 1,)
        expected = (self.starts[shard + 1] - self.starts[shard]) * self.num_views
        if rg_starts[-1] != expected:
            raise ValueError(f"shard {self._path(shard)} has {rg_starts[-1]} rows, the manifest implies {expected}; "
                             f"run verify_shards on {self.shard_dir}.")
        self._meta[shard] = (md, rg_starts)
        return rg_starts

    def _file(self, shard: int) -> pq.ParquetFile:
        pf = self._open.get(shard)
        if pf is not None:
            self._open.move_to_end(shard)
            return pf
        while len(self._open) >= self.max_open_files:
            self._open.popitem(last=False)[1].close()
        meta = self._meta.get(shard)
        pf = pq.ParquetFile(self._path(shard), metadata=meta[0] if meta else None)
        self._open[shard] = pf
        return pf

    def read(self, indices, views) -> tuple[np.ndarray, np.ndarray]:
        """Tokens uint16 (n, N) and labels int64 (n,) of image ``indices[j]``, view ``views[j]``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        views = np.asarray(views, dtype=np.int64)
        n = len(indices)
        if n and (indices.min() < 0 or indices.max() >= self.num_images):
            raise IndexError(f"image indices must be in [0, {self.num_images}).")
        if n and (views.min() < 0 or views.max() >= self.num_views):
            raise IndexError(f"view ids must be in [0, {self.num_views}).")
        shard = np.searchsorted(self.starts, indices, side="right") - 1  # (n,)
        row = (indices - self.starts[shard]) * self.num_views + views  # (n,) row inside the shard
        tokens = np.empty((n, self.num_tokens), dtype=np.uint16)
        labels = np.empty(n, dtype=np.int64)
        # Group the reads by (shard, row group): each needed row group is read once per call.
        groups: dict[tuple[int, int], list[int]] = {}
        for j in range(n):
            s = int(shard[j])
            g = int(np.searchsorted(self._row_groups(s), row[j], side="right") - 1)
            groups.setdefault((s, g), []).append(j)
        for (s, g), js in sorted(groups.items()):
            rg_starts = self._row_groups(s)
            t = self._file(s).read_row_group(g, columns=["view_id", "label", "tokens"])
            take = pa.array(row[js] - rg_starts[g])
            got_views = t.column("view_id").take(take).to_numpy()
            if np.any(got_views != views[js]):
                raise ValueError(f"shard {self.files[s]} breaks the layout (row of view {views[js][0]} holds another "
                                 f"view); run verify_shards on {self.shard_dir}.")
            labels[js] = t.column("label").take(take).to_numpy()
            tokens[js] = tokens_to_numpy(t.column("tokens").take(take), self.num_tokens)
        return tokens, labels


class _ARTokenRows:
    """Callable class of the Ray actor pool: row ids of one rank's dataset -> that step's tokens."""

    def __init__(self, shard_dir: str, manifest: dict, seed: int, start_step: int, rank: int, local_batch: int,
                 global_batch: int, max_open_files: int) -> None:
        self.reader = TokenShardReader(shard_dir, manifest, max_open_files=max_open_files)
        self.n, self.v = self.reader.num_images, self.reader.num_views
        self.seed, self.start_step, self.rank = int(seed), int(start_step), int(rank)
        self.lb, self.gb = int(local_batch), int(global_batch)
        self.spe = schedule_info(self.n, self.gb)
        self._perm = PermutationCache(self.seed, self.n)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        step, epoch, position = row_schedule(batch["id"], self.start_step, self.rank, self.lb, self.gb, self.spe)
        index = np.empty(len(step), dtype=np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            index[sel] = self._perm(int(e))[position[sel]]
        views = views_of(self.seed, epoch, index, self.v)  # (n,)
        tokens, labels = self.reader.read(index, views)  # (n, N) uint16, (n,)
        return {"tokens": tokens.astype(np.int64), "label": labels, "step": step}


def ar_rank_dataset(
    shard_dir: str | os.PathLike,
    global_batch: int,
    world_size: int,
    rank: int,
    start_step: int,
    num_steps: int,
    seed: int,
    *,
    manifest: dict | None = None,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    steps_per_block: int = 1,
    max_open_files: int = 64,
):
    """Rank ``rank``'s Ray dataset: ``num_steps * LB`` rows for steps ``[start_step, start_step + num_steps)``.

    Row ``i`` is step ``start_step + i // LB``; columns ``tokens`` int64 (N,), ``label`` int64, ``step`` int64.
    Hand it to Ray Train with ``ray_pipeline.train_data_config()`` (order preserved, nothing split) and read it
    with ``iter_torch_batches(batch_size=LB, dtypes=AR_TORCH_DTYPES)``: one batch = one step.
    """
    import ray

    m = manifest if manifest is not None else read_manifest(shard_dir)
    _require_complete(m, shard_dir)
    local_batch = local_batch_size(global_batch, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size}).")
    if start_step < 0 or num_steps < 0:
        raise ValueError(f"start_step={start_step} and num_steps={num_steps} must be non-negative.")
    if num_actors < 1 or steps_per_block < 1:
        raise ValueError(f"num_actors={num_actors} and steps_per_block={steps_per_block} must be at least 1.")
    schedule_info(int(shard_image_counts(m).sum()), global_batch)  # at least one global batch of images
    ds = ray.data.range(num_steps * local_batch).repartition(target_num_rows_per_block=steps_per_block * local_batch)
    ds = ds.map_batches(
        _ARTokenRows,
        fn_constructor_args=(os.path.abspath(os.fspath(shard_dir)), m, int(seed), int(start_step), int(rank),
                             int(local_batch), int(global_batch), int(max_open_files)),
        batch_size=local_batch,
        batch_format="numpy",
        zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=int(num_actors)),
        num_cpus=cpus_per_actor,
    )
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    return ds


def ar_rank_datasets(
    shard_dir: str | os.PathLike,
    global_batch: int,
    world_size: int,
    start_step: int,
    num_steps: int,
    seed: int,
    **kwargs: Any,
) -> list:
    """One dataset per rank (list index = rank), the manifest read once; keywords as in :func:`ar_rank_dataset`."""
    m = kwargs.pop("manifest", None) or read_manifest(shard_dir)
    return [ar_rank_dataset(shard_dir, global_batch, world_size, r, start_step, num_steps, seed, manifest=m, **kwargs)
            for r in range(world_size)]


# ------------------------------------------------------------------------------------- in-process dataset
class TokenShardDataset:
    """Every view of every image in memory (uint16): for tests and small runs, not for ImageNet x 20 views. A
    map-style dataset for ``torch.utils.data.DataLoader``.

    One item per IMAGE: ``(tokens int64 (N,), label int64)`` of the view :func:`view_of` picks for the current
    epoch (:meth:`set_epoch`). Attributes: ``tokens`` uint16 (images, V, N), ``labels`` int64 (images,),
    ``image_ids`` (list, listing order), ``manifest``.
    """

    def __init__(self, shard_dir: str | os.PathLike, seed: int = 0, epoch: int = 0):
        self.shard_dir = os.fspath(shard_dir)
        self.manifest = m = read_manifest(self.shard_dir)
        _require_complete(m, self.shard_dir)
        self.num_views, self.num_tokens = int(m["num_views"]), int(m["grid"]) ** 2
        v = self.num_views
        tokens, labels, ids = [], [], []
        for s in m["shards"]:
            t = read_shard(os.path.join(self.shard_dir, s["file"]))
            views = t.column("view_id").to_numpy()
            if t.num_rows % v or np.any(views.reshape(-1, v) != np.arange(v)):
                raise ValueError(f"shard {s['file']} breaks the layout; run verify_shards on {self.shard_dir}.")
            tokens.append(tokens_to_numpy(t.column("tokens"), self.num_tokens).reshape(-1, v, self.num_tokens))
            labels.append(t.column("label").to_numpy()[::v].astype(np.int64))
            ids.extend(t.column("image_id").to_pylist()[::v])
        self.tokens = np.concatenate(tokens) if tokens else np.zeros((0, v, self.num_tokens), np.uint16)
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.image_ids: list[str] = ids
        self.seed, self.epoch = int(seed), int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def view(self, index: int, view_id: int) -> np.ndarray:
        """uint16 (N,) tokens of one stored view."""
        return self.tokens[index, view_id]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        v = view_of(self.seed, self.epoch, index, self.num_views)
        return (torch.from_numpy(self.tokens[index, v].astype(np.int64)),  # (N,)
                torch.tensor(self.labels[index], dtype=torch.int64))

    def step_batch(self, step: int, rank: int = 0, world_size: int = 1, global_batch: int | None = None
                   ) -> dict[str, np.ndarray]:
        """The rows the Ray reader yields for (step, rank): ``tokens`` int64 (LB, N), ``label``, ``step``."""
        gb = global_batch if global_batch is not None else len(self)
        _, idx, views = ar_step_plan(step, rank, world_size, gb, len(self), self.num_views, self.seed)
        return {
            "tokens": self.tokens[idx, views].astype(np.int64),  # (LB, N)
            "label": self.labels[idx],
            "step": np.full(len(idx), step, dtype=np.int64),
        }

