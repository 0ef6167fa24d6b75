"""Token shards: the Parquet format of the offline codes (issues 4 and 5): writing, the manifest, verification.

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

The folder may be an object-store URI (``s3://bucket/tokens/x``, through :mod:`ideal_ray.storage`): a shard is
written whole to a local staging file and uploaded with one write (the store shows the object only once its upload
completes, so a writer killed midway leaves none), the manifest likewise; reading, checking and verifying go
through the same file system calls as for a folder.

The AR stage reads them with ``ideal_ray.data.ar_reader``.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ideal_ray import storage
from ideal_ray.config import ARTrainConfig, ConfigError
from ideal_ray.errors import InputError
from ideal_ray.io import TMP_SUFFIX, atomic_write_json, publish  # noqa: F401  (TMP_SUFFIX: half-written files)


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
    staging: str | None = None,
) -> dict:
    """Write one Parquet shard atomically; returns ``{"file", "rows", "bytes"}``.

    ``tokens``: (rows, grid*grid) integers in [0, 65535]. ``row_group_rows`` sets the row-group size (the Ray
    reader's read unit; keep whole images per group). The data goes to ``<path>.tmp`` first, is fsynced and then
    linked into place; an existing ``path`` raises FileExistsError (a finished shard is never replaced silently).
    A URI ``path`` is written so in the local folder ``staging`` (default: the system's temporary folder) and then
    uploaded whole (:func:`ideal_ray.storage.upload_file`); there the existing object is refused by a look before
    the upload (a store offers no no-clobber write: one writer per folder, see ``extract_common.ShardPlan``).
    """
    path = os.fspath(path)
    if storage.is_uri(path):
        return _upload_shard(path, staging, image_ids, view_ids, labels, tokens, row_group_rows=row_group_rows)
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


def _upload_shard(uri: str, staging: str | None, *columns, row_group_rows: int | None) -> dict:
    """:func:`write_shard` to an object-store URI: refused if the object exists, written whole to a local file in
    ``staging``, uploaded with one write, the local file removed."""
    fs, key = storage.filesystem(uri)
    name = posixpath.basename(key)
    if storage.file_size(fs, key) is not None:
        raise FileExistsError(f"shard {uri} already exists; refusing to overwrite it (delete it to redo it).")
    folder = tempfile.mkdtemp(prefix="shard-", dir=staging)
    local = os.path.join(folder, name)
    try:
        info = write_shard(local, *columns, row_group_rows=row_group_rows)
        size = storage.upload_file(local, fs, key)
    finally:
        if os.path.exists(local):
            os.remove(local)
        os.rmdir(folder)
    return dict(info, bytes=size)


def open_shard(path: str | os.PathLike, metadata: pq.FileMetaData | None = None, fs=None) -> pq.ParquetFile:
    """The Parquet file of a shard at a local path or URI (``fs``: the file system of ``path`` when already known,
    which ``path`` is then a path of); ``metadata``: its footer, when already parsed."""
    path = os.fspath(path)
    if fs is None and storage.is_uri(path):
        fs, path = storage.filesystem(path)
    return pq.ParquetFile(path, metadata=metadata, filesystem=fs)


def read_shard(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a whole shard (all or some columns; a local path or a URI); checks the schema against
    ``TOKEN_SCHEMA``."""
    pf = open_shard(path)
    try:
        _check_schema(pf.schema_arrow, path)
        return pf.read(columns=list(columns) if columns is not None else None)
    finally:
        pf.close()


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
    return storage.join(os.fspath(shard_dir), MANIFEST_FILE)


def has_manifest(shard_dir: str | os.PathLike) -> bool:
    """Whether the folder or URI ``shard_dir`` holds a ``manifest.json`` (a store that cannot be reached raises
    its OSError)."""
    fs, path = storage.filesystem(manifest_path(shard_dir))
    return storage.file_size(fs, path) is not None


def write_manifest(shard_dir: str | os.PathLike, manifest: dict) -> str:
    """Atomically (re)write ``manifest.json`` (temporary file + rename; the manifest is meant to be updated); in an
    object store, one whole upload that replaces the previous object only once it completes."""
    path = manifest_path(shard_dir)
    if not storage.is_uri(path):
        return atomic_write_json(path, manifest, sort_keys=True)
    fs, key = storage.filesystem(path)
    storage.upload_bytes(fs, key, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return path


def read_manifest(shard_dir: str | os.PathLike) -> dict:
    """Load ``manifest.json`` of a token shard folder or URI (clear errors for a missing or foreign file)."""
    path = manifest_path(shard_dir)
    fs, key = storage.filesystem(path)
    if storage.file_size(fs, key) is None:
        raise FileNotFoundError(f"{path} does not exist; {shard_dir} is not a token shard folder (run "
                                f"jobs/extract_tokens.py to make one).")
    try:
        m = json.loads(storage.read_bytes(fs, key))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rerun the extraction into a new folder.")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{path} is not a token manifest of format {FORMAT!r}; rerun the extraction.")
    return m


def check_shards(cfg: ARTrainConfig) -> dict:
    """The AR run's token shards (``data.shards``), checked against its model before any worker starts (or torch is
    imported: the train_ar job calls it first); returns the manifest."""
    try:
        found = has_manifest(cfg.data.shards)
    except OSError as e:  # a store that cannot be read (no bucket, no credentials, unreachable)
        why = " ".join(str(e).split())
        raise ConfigError(f"data.shards={cfg.data.shards} cannot be read ({why}); check the URI and the store's "
                          f"AWS_* environment.")
    if not found:
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
    fs, root = storage.filesystem(shard_dir)
    present = storage.list_files(fs, root)  # {name: size}
    v, n_tok, vocab = int(m["num_views"]), int(m["grid"]) ** 2, int(m["vocab"])
    problems: list[str] = []
    global_ids: dict[str, int] = {}
    counts = np.zeros((0, v), dtype=np.int64)  # (images, V): how often each (image, view) occurs
    rows_total = bad_views = 0
    listed = {s["file"] for s in m["shards"]}

    for s in m["shards"]:
        path = storage.join(shard_dir, s["file"])
        if s["file"] not in present:
            problems.append(f"shard {s['file']} is in the manifest but missing on disk")
            continue
        try:
            pf = open_shard(posixpath.join(root, s["file"]), fs=fs)
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
        pf.close()

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
    for name in storage.glob_names(present, SHARD_GLOB):
        if name not in listed:
            problems.append(f"stray shard {name} is not in the manifest")
    for name in storage.glob_names(present, "*" + TMP_SUFFIX):
        problems.append(f"leftover temporary file {name}")

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
