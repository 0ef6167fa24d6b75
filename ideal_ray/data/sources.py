"""One listing of a split for every image source format (reading its items: :mod:`ideal_ray.data.reader`).

Formats (``FORMATS``), all under ``root/<split>``:

* ``folder``: ``<wnid>/<image>`` class folders (the listing of :func:`folder.list_image_folder`);
* ``flat``: the official ImageNet val layout, ``<image>`` files in one folder plus a labels file: the Kaggle
  ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first token of the prediction is the wnid) or a
  text file of ``<filename> <wnid-or-int-label>`` lines;
* ``parquet``: ``*.parquet`` files (or the single file ``root/<split>.parquet``) of encoded images, the image
  column binary or HuggingFace's ``struct<bytes, path>``, the label an int ``label`` column or a wnid string
  column (``label`` or ``wnid``);
* ``webdataset``: uncompressed ``*.tar`` shards of ``<key>.<jpg|jpeg|png|webp>`` + ``<key>.cls`` (int label).

``root`` may be an object-store URI (``s3://bucket/imagenet``, endpoint and credentials from the environment:
:mod:`ideal_ray.storage`): the same listing, read through pyarrow file systems (:class:`~ideal_ray.storage.StorePath`;
a split is one recursive listing, tar headers and Parquet metadata are ranged reads), gives the same ids, labels,
order and errors as a local copy of the same files; the listing keeps the URI as its root.

Labels always go through one class index (:func:`folder.resolve_class_index`: the ``class_index`` argument or
``root/class_index.json``). Without one the classes come from the data: the folder names or the wnids seen
(sorted), or ``"0".."max"`` for int labels.

A :class:`Listing` is built once on the driver (it reads no image bytes: parquet metadata and id/label
columns, tar headers) and travels through the object store as :meth:`Listing.pack` (numpy arrays only). Any
process then reads item ``i`` with a :class:`~ideal_ray.data.reader.ByteReader` of it.

Layout problems (missing split, unknown wnid, an image without a label, a label without an image, ...) raise one
clear error at listing time, before any image is decoded.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ideal_ray import storage
from ideal_ray.data.folder import IMAGE_EXTENSIONS, as_path, list_image_folder, resolve_class_index, scandir
from ideal_ray.storage import StorePath

__all__ = ["FORMATS", "Listing", "list_images", "detect_format"]

FORMATS = ("folder", "flat", "parquet", "webdataset")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Looked up in root when no labels_file is given to a flat split (``{split}`` is filled in).
LABEL_FILE_NAMES = ("LOC_{split}_solution.csv", "{split}_labels.txt", "{split}_labels.csv")
PARQUET_ID_COLUMNS = ("id", "image_id", "path")
PARQUET_WNID_COLUMNS = ("label", "wnid")
_CSV_HEADER = ("ImageId", "PredictionString")
TAR_READ_AHEAD = 1 << 20  # bytes per ranged read of a tar shard in a store while its headers are listed


# ------------------------------------------------------------------------------------------------ listing
@dataclass(frozen=True, eq=False)
class Listing:
    """The images of one split in a fixed order; item ``i`` is ``ids[i]`` with label ``labels[i]``.

    ``files[file_index[i]]`` holds item ``i``: the image file itself (folder, flat; ``offset`` -1), a tar
    shard (``offset``/``size``: the member's data) or a parquet file (``offset``: the row in that file).
    """

    root: str  # an absolute local folder or an object-store URI
    split: str
    fmt: str
    files: list[str]  # absolute container paths or URIs (plain image files for folder/flat)
    ids: list[str]  # stable, unique ids (paths relative to root for folder/flat)
    labels: np.ndarray  # int64 (N,)
    file_index: np.ndarray  # int32 (N,) -> files
    offset: np.ndarray  # int64 (N,) -1 plain file | tar member data offset | parquet row in file
    size: np.ndarray  # int64 (N,) tar member size else -1
    classes: list[str]  # wnid by label
    class_names: list[str]  # name by label
    image_column: str = ""  # parquet: the encoded-image column

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in ("labels", "file_index", "offset", "size"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"Listing.{name} has shape {getattr(self, name).shape}, expected ({n},).")

    def __len__(self) -> int:
        return len(self.ids)

    def sha256(self) -> str:
        """Hex digest over (ids, labels) in order: two listings with equal digests name the same items."""
        h = hashlib.sha256(len(self.ids).to_bytes(8, "little"))
        h.update(b"".join(len(b).to_bytes(4, "little") + b for b in map(os.fsencode, self.ids)))
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        return h.hexdigest()

    def pack(self) -> dict[str, np.ndarray]:
        """Numpy-only form (fixed-width bytes arrays; files relative to root): zero-copy out of Ray's store."""
        sep = "/" if storage.is_uri(self.root) else os.sep
        cut = len(self.root.rstrip(sep)) + 1
        prefix = self.root.rstrip(sep) + sep
        rel = [f[cut:] if f.startswith(prefix) else f for f in self.files]  # an absolute one stays absolute
        return {
            "root": np.array(os.fsencode(self.root)),
            "split": np.array(self.split.encode()),
            "fmt": np.array(self.fmt.encode()),
            "image_column": np.array(self.image_column.encode()),
            "files": _bytes_array([os.fsencode(f) for f in rel]),
            "ids": _bytes_array([os.fsencode(i) for i in self.ids]),
            "labels": np.ascontiguousarray(self.labels, dtype=np.int64),
            "file_index": np.ascontiguousarray(self.file_index, dtype=np.int32),
            "offset": np.ascontiguousarray(self.offset, dtype=np.int64),
            "size": np.ascontiguousarray(self.size, dtype=np.int64),
            "classes": _bytes_array([c.encode() for c in self.classes]),
            "class_names": _bytes_array([c.encode() for c in self.class_names]),
        }

    @staticmethod
    def unpack(d: dict[str, np.ndarray]) -> "Listing":
        """Inverse of :meth:`pack`."""
        root = os.fsdecode(d["root"].item())
        return Listing(
            root=root,
            split=d["split"].item().decode(),
            fmt=d["fmt"].item().decode(),
            files=[storage.join(root, os.fsdecode(f)) for f in d["files"].tolist()],
            ids=[os.fsdecode(i) for i in d["ids"].tolist()],
            labels=np.asarray(d["labels"], dtype=np.int64),
            file_index=np.asarray(d["file_index"], dtype=np.int32),
            offset=np.asarray(d["offset"], dtype=np.int64),
            size=np.asarray(d["size"], dtype=np.int64),
            classes=[c.decode() for c in d["classes"].tolist()],
            class_names=[c.decode() for c in d["class_names"].tolist()],
            image_column=d["image_column"].item().decode(),
        )


def _bytes_array(items: Sequence[bytes]) -> np.ndarray:
    return np.array(items, dtype=np.bytes_) if items else np.zeros(0, dtype="S1")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def detect_format(root: str | os.PathLike | StorePath, split: str = "train") -> str:
    """The format of ``root/<split>`` from its contents (see the module docstring); one clear error otherwise."""
    root = as_path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        if (root / f"{split}.parquet").is_file():
            return "parquet"
        raise FileNotFoundError(
            f"split folder {split_dir} does not exist (nor {split_dir}.parquet); check the root and the split."
        )
    found: dict[str, int] = {"flat": 0, "parquet": 0, "webdataset": 0}
    subdirs = 0
    for e in scandir(split_dir):
        if _is_hidden(e.name):
            continue
        if e.is_dir():
            subdirs += 1
            continue
        ext = os.path.splitext(e.name)[1].lower()
        if ext in IMAGE_EXTENSIONS:
            found["flat"] += 1
        elif ext == ".parquet":
            found["parquet"] += 1
        elif ext == ".tar":
            found["webdataset"] += 1
    kinds = [k for k, n in found.items() if n]
    if not kinds and subdirs:
        return "folder"
    if len(kinds) == 1 and not subdirs:
        return kinds[0]
    if not kinds:
        raise FileNotFoundError(
            f"split folder {split_dir} is empty: no class folders, images, .parquet or .tar files found."
        )
    what = ", ".join(f"{found[k]} {k} file(s)" for k in kinds) + (f", {subdirs} sub-folder(s)" if subdirs else "")
    raise ValueError(f"cannot tell the format of {split_dir}: it holds {what}; pass data.format= one of {FORMATS}.")


def list_images(
    root: str | os.PathLike,
    split: str = "train",
    class_index: str | os.PathLike = "",
    fmt: str = "auto",
    labels_file: str | os.PathLike = "",
) -> Listing:
    """List ``root/<split>`` in ``fmt`` (``"auto"``: :func:`detect_format`); reads no image bytes. ``root``: a local
    folder or an object-store URI (the listing's root is then the URI)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown image source format {fmt!r}; use 'auto' or one of {FORMATS}.")
    root_path = (as_path(root) if isinstance(root, StorePath) or storage.is_uri(str(root))
                 else Path(os.path.abspath(Path(root).expanduser())))
    if not root_path.is_dir():
        raise FileNotFoundError(f"dataset root {root_path} does not exist or is not a folder; check data.root.")
    if fmt == "auto":
        fmt = detect_format(root_path, split)
    if str(labels_file) and fmt != "flat":
        raise ValueError(f"labels_file={labels_file!s} applies only to the flat format, but {root_path / split} "
                         f"is read as {fmt!r}; drop data.labels_file or pass data.format=flat.")
    if fmt == "folder":
        return _list_folder(root_path, split, class_index)
    if fmt == "flat":
        return _list_flat(root_path, split, class_index, labels_file)
    if fmt == "parquet":
        return _list_parquet(root_path, split, class_index)
    return _list_webdataset(root_path, split, class_index)


def _plain_listing(
    root: Path | StorePath, split: str, fmt: str, paths: list[str], labels: np.ndarray, classes: list[str],
    names: list[str],
) -> Listing:
    n = len(paths)
    cut = len(str(root)) + 1
    return Listing(
        root=str(root), split=split, fmt=fmt, files=paths, ids=[p[cut:] for p in paths], labels=labels,
        file_index=np.arange(n, dtype=np.int32), offset=np.full(n, -1, dtype=np.int64),
        size=np.full(n, -1, dtype=np.int64), classes=classes, class_names=names,
    )


def _list_folder(root: Path | StorePath, split: str, class_index: str | os.PathLike) -> Listing:
    listed = list_image_folder(root, split, class_index)
    paths = [p for p, _ in listed.samples]
    labels = np.array([label for _, label in listed.samples], dtype=np.int64)
    return _plain_listing(root, split, "folder", paths, labels, listed.classes, listed.class_names)


# ------------------------------------------------------------------------------------------------ labels
def _map_labels(
    tokens: Sequence[int | str], describe: Callable[[int], str], root: Path | StorePath, class_index: str | os.PathLike
) -> tuple[np.ndarray, list[str], list[str]]:
    """Labels int64 (N,) + (classes, class names) for int labels and/or wnids, through the class index."""
    entries, index_path = resolve_class_index(root, class_index)
    if entries is None:
        wnids = sorted({t for t in tokens if isinstance(t, str)})
        if wnids and any(isinstance(t, int) for t in tokens):
            first = next(i for i, t in enumerate(tokens) if isinstance(t, int))
            raise ValueError(f"{describe(first)} has an int label while others are wnids; without a class index "
                             f"the two cannot be matched: pass class_index= (or put class_index.json in {root}).")
        entries = [(w, w) for w in wnids] if wnids else [(str(i), str(i)) for i in range(max(tokens) + 1)]
        where = "the classes found in the data"
    else:
        where = f"the class index {index_path}"
    to_label = {wnid: i for i, (wnid, _) in enumerate(entries)}
    n_classes = len(entries)
    labels = np.empty(len(tokens), dtype=np.int64)
    for i, t in enumerate(tokens):
        if isinstance(t, str):
            label = to_label.get(t)
            if label is None:
                raise ValueError(f"wnid {t!r} of {describe(i)} is not in {where}; fix the label or add the wnid.")
            labels[i] = label
        elif 0 <= t < n_classes:
            labels[i] = t
        else:
            raise ValueError(f"label {t} of {describe(i)} is outside [0, {n_classes}) of {where}; fix the label.")
    return labels, [w for w, _ in entries], [name for _, name in entries]


def _token(text: str) -> int | str:
    """An int label (``"65"``) or a wnid (``"n01751748"``)."""
    return int(text) if text.isdigit() else text


# ------------------------------------------------------------------------------------------------ flat
def _find_labels_file(root: Path | StorePath, split: str, labels_file: str | os.PathLike) -> Path | StorePath:
    if str(labels_file):
        path = as_path(labels_file)
        if not path.is_file():
            raise FileNotFoundError(f"labels file {path} does not exist; pass the flat split's label file.")
        return path
    names = [n.format(split=split) for n in LABEL_FILE_NAMES]
    for name in names:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"flat split {root / split} needs a labels file: pass labels_file= or put one of {', '.join(names)} in "
        f"{root}."
    )


def _read_labels_file(path: Path | StorePath) -> list[tuple[str, int | str, int]]:
    """[(image name or stem, label token, line number)] of a Kaggle CSV or a ``<filename> <label>`` text file."""
    lines = path.read_text().splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    out: list[tuple[str, int | str, int]] = []
    if tuple(c.strip() for c in first.split(",")[:2]) == _CSV_HEADER:
        reader = csv.reader(lines)
        next(reader)
        for n, row in enumerate(reader, 2):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2 or not row[1].split():
                raise ValueError(f"labels file {path} line {n} is {','.join(row)!r}; expected 'ImageId,<wnid> ...'.")
            out.append((row[0].strip(), _token(row[1].split()[0]), n))
        return out
    if path.suffix.lower() == ".csv":
        raise ValueError(f"labels file {path} starts with {first[:60]!r}; a CSV labels file needs the Kaggle "
                         f"header 'ImageId,PredictionString'.")
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"labels file {path} line {n} is {line!r}; expected '<filename> <wnid or int label>' "
                             f"(a devkit ground-truth file without file names is not supported).")
        out.append((posixpath.basename(parts[0]), _token(parts[1]), n))
    return out


def _list_flat(
    root: Path | StorePath, split: str, class_index: str | os.PathLike, labels_file: str | os.PathLike
) -> Listing:
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder {split_dir} does not exist; expected {split_dir}/<images>.")
    names = sorted(
        e.name for e in scandir(split_dir)
        if e.is_file() and not _is_hidden(e.name) and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
    )
    if not names:
        raise FileNotFoundError(f"flat split {split_dir} has no image files ({', '.join(IMAGE_EXTENSIONS)}).")
    path = _find_labels_file(root, split, labels_file)
    entries = _read_labels_file(path)
    by_key: dict[str, tuple[int | str, int]] = {}
    for key, token, line in entries:
        if key in by_key:
            raise ValueError(f"labels file {path} lists {key!r} twice (lines {by_key[key][1]} and {line}); "
                             f"keep one label per image.")
        by_key[key] = (token, line)

    tokens: list[int | str] = []
    line_of: list[int] = []
    used: set[str] = set()
    missing: list[str] = []
    for name in names:
        key = name if name in by_key else os.path.splitext(name)[0]  # text files name the file, the CSV its stem
        if key not in by_key:
            missing.append(name)
            continue
        if key in used:
            raise ValueError(f"images {split_dir}/{key}.* share the label entry {key!r} of {path}; rename one.")
        used.add(key)
        tokens.append(by_key[key][0])
        line_of.append(by_key[key][1])
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"image {split_dir / missing[0]}{more} has no label in {path}; add it to the labels file "
                         f"or remove the image.")
    orphans = [(k, line) for k, (_, line) in by_key.items() if k not in used]
    if orphans:
        more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
        raise ValueError(f"labels file {path} line {orphans[0][1]} names {orphans[0][0]!r}{more} but there is no "
                         f"such image in {split_dir}; restore the image or use a labels file for this subset.")

    paths = [str(split_dir / n) for n in names]
    labels, classes, class_names = _map_labels(
        tokens, lambda i: f"image {names[i]} (labels file {path} line {line_of[i]})", root, class_index
    )
    return _plain_listing(root, split, "flat", paths, labels, classes, class_names)


# ------------------------------------------------------------------------------------------------ parquet
def _parquet_files(root: Path | StorePath, split: str) -> list[Path | StorePath]:
    split_dir = root / split
    if split_dir.is_dir():
        files = sorted((p for p in split_dir.glob("*.parquet") if p.is_file() and not _is_hidden(p.name)), key=str)
        if not files:
            raise FileNotFoundError(f"split folder {split_dir} has no .parquet files.")
        return files
    single = root / f"{split}.parquet"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"split folder {split_dir} does not exist (nor {single}); check the root and the split.")


def _image_column(schema, path: Path | StorePath) -> tuple[str, bool]:
    """(name, is_struct) of the encoded-image column: binary, or a struct with a binary ``bytes`` field."""
    import pyarrow as pa

    def binary(t) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    found: list[tuple[str, bool]] = []
    for f in schema:
        if binary(f.type):
            found.append((f.name, False))
        elif pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0:
            if binary(f.type.field("bytes").type):
                found.append((f.name, True))
    if len(found) > 1:
        found = [c for c in found if c[0] == "image"] or found
    if len(found) != 1:
        what = "none" if not found else ", ".join(c[0] for c in found)
        raise ValueError(f"parquet file {path} needs exactly one encoded-image column (binary or struct<bytes, "
                         f"path>, preferably named 'image'); found {what}.")
    return found[0]


def _label_column(schema, path: Path | StorePath) -> tuple[str, bool]:
    """(name, is_wnid) of the label column: int ``label``, or a wnid string column ``label`` / ``wnid``."""
    import pyarrow as pa

    for name in PARQUET_WNID_COLUMNS:
        i = schema.get_field_index(name)
        if i < 0:
            continue
        t = schema.field(i).type
        if pa.types.is_integer(t) and name == "label":
            return name, False
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return name, True
    raise ValueError(f"parquet file {path} has no label column: expected an int 'label' column or a wnid string "
                     f"column 'label' / 'wnid' (columns: {', '.join(schema.names)}).")


def _list_parquet(root: Path | StorePath, split: str, class_index: str | os.PathLike) -> Listing:
    import pyarrow as pa

    paths = _parquet_files(root, split)
    image_col = ""
    tokens: list[int | str] = []
    ids: list[str] = []
    struct_paths: list[str | None] = []
    file_index: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    where: list[tuple[int, str]] = []  # (first item, file rel) for error messages
    has_id = False
    for k, path in enumerate(paths):
        rel = str(path)[len(str(root)) + 1:]
        try:
            with _parquet_file(path) as pf:
                schema = pf.schema_arrow
                name, is_struct = _image_column(schema, path)
                label_col, is_wnid = _label_column(schema, path)
                id_col = next((c for c in PARQUET_ID_COLUMNS if c in schema.names), "")
                columns = [label_col, id_col] if id_col else [label_col]
                if is_struct and not id_col:
                    columns.append(f"{name}.path")  # a leaf of the struct: its bytes stay unread
                table = pf.read(columns=columns)  # only these leaf columns are read, never the image bytes
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"parquet file {path} cannot be read ({e}); replace or remove it.") from e
        if image_col and name != image_col:
            raise ValueError(f"parquet file {path} has image column {name!r} but {paths[0]} has {image_col!r}; "
                             f"every file of a split needs the same columns.")
        image_col = name
        if k and bool(id_col) != has_id:
            raise ValueError(f"parquet file {path} and {paths[0]} differ in having an id column "
                             f"({', '.join(PARQUET_ID_COLUMNS)}); every file of a split needs the same columns.")
        has_id = bool(id_col)
        n = table.num_rows
        labels_arr = table.column(label_col)
        if labels_arr.null_count:
            row = int(np.flatnonzero(labels_arr.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"parquet file {path} row {row} has no label; fix or drop the row.")
        where.append((len(tokens), rel))
        values = labels_arr.to_pylist()
        tokens.extend(values if is_wnid else [int(v) for v in values])
        if id_col:
            col = table.column(id_col)
            if col.null_count:
                row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                raise ValueError(f"parquet file {path} row {row} has no {id_col!r}; fill the id column or drop it.")
            ids.extend(str(v) for v in col.to_pylist())
        else:
            ids.extend(f"{rel}#{r}" for r in range(n))
            if is_struct:
                struct_paths.extend(table.column(name).combine_chunks().field("path").to_pylist())
        file_index.append(np.full(n, k, dtype=np.int32))
        rows.append(np.arange(n, dtype=np.int64))
    if not tokens:
        raise FileNotFoundError(f"the parquet files of {root / split} hold no rows; the split is empty.")
    if not has_id and len(struct_paths) == len(ids) and all(struct_paths) and len(set(struct_paths)) == len(ids):
        ids = [str(p) for p in struct_paths]  # the struct's own file names, when they name every row uniquely
    _check_unique(ids, f"the parquet files of {root / split}")

    starts = [s for s, _ in where]

    def describe(i: int) -> str:
        j = int(np.searchsorted(starts, i, side="right")) - 1
        return f"row {i - starts[j]} of {root / where[j][1]}"

    labels, classes, class_names = _map_labels(tokens, describe, root, class_index)
    n_total = len(ids)
    return Listing(
        root=str(root), split=split, fmt="parquet", files=[str(p) for p in paths], ids=ids, labels=labels,
        file_index=np.concatenate(file_index), offset=np.concatenate(rows), size=np.full(n_total, -1, np.int64),
        classes=classes, class_names=class_names, image_column=image_col,
    )


def _parquet_file(path: Path | StorePath):
    """A ``pyarrow.parquet.ParquetFile`` of a local file or of an object in a store (closing it closes the file)."""
    import pyarrow.parquet as pq

    if isinstance(path, StorePath):
        return pq.ParquetFile(path.path, filesystem=path.fs)
    return pq.ParquetFile(path)


def _check_unique(ids: list[str], where: str) -> None:
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"{where} name the image id {dup!r} more than once; ids must be unique.")


# ------------------------------------------------------------------------------------------------ webdataset
@contextlib.contextmanager
def _open_tar(path: Path | StorePath):
    """An uncompressed tar shard opened for its headers: a local file, or an object in a store read through a
    buffer of :data:`TAR_READ_AHEAD` bytes (seeks to a header inside the buffer cost no request)."""
    if isinstance(path, StorePath):
        with io.BufferedReader(path.open_input_file(), TAR_READ_AHEAD) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            yield tf
    else:
        with tarfile.open(path, mode="r:") as tf:
            yield tf


def _list_webdataset(root: Path | StorePath, split: str, class_index: str | os.PathLike) -> Listing:
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder {split_dir} does not exist; expected {split_dir}/<shard>.tar.")
    tars = sorted((p for p in split_dir.glob("*.tar") if p.is_file() and not _is_hidden(p.name)), key=str)
    if not tars:
        raise FileNotFoundError(f"split folder {split_dir} has no .tar shards.")
    ids: list[str] = []
    tokens: list[int | str] = []
    file_index: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    for k, tar in enumerate(tars):
        rel = str(tar)[len(str(root)) + 1:]
        images: dict[str, tarfile.TarInfo] = {}  # key -> image member, in tar order
        labels: dict[str, int] = {}
        try:
            with _open_tar(tar) as tf:
                for m in tf:
                    if not m.isreg():
                        continue
                    dirname, base = posixpath.split(m.name)
                    stem, _, ext = base.partition(".")  # webdataset: the extension starts at the first dot
                    key, ext = posixpath.join(dirname, stem), ext.lower()
                    if ext in WDS_IMAGE_EXTENSIONS:
                        if key in images:
                            raise ValueError(f"shard {tar} holds two images for key {key!r} ({images[key].name}, "
                                             f"{m.name}); keep one image per key.")
                        images[key] = m
                    elif ext == "cls":
                        text = tf.extractfile(m).read().decode(errors="replace").strip()
                        if not text.lstrip("-").isdigit():
                            raise ValueError(f"shard {tar} member {m.name} holds {text[:40]!r}; a .cls member "
                                             f"must hold an int label.")
                        labels[key] = int(text)
        except tarfile.TarError as e:
            raise ValueError(f"{tar} is not a readable uncompressed tar ({e}); webdataset shards must be plain "
                             f".tar files.") from e
        unlabelled = [key for key in images if key not in labels]
        if unlabelled:
            more = f" (and {len(unlabelled) - 1} more)" if len(unlabelled) > 1 else ""
            raise ValueError(f"image {images[unlabelled[0]].name} in shard {tar}{more} has no {unlabelled[0]}.cls "
                             f"label; add the label or remove the image.")
        orphans = [key for key in labels if key not in images]
        if orphans:
            more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
            raise ValueError(f"label {orphans[0]}.cls in shard {tar}{more} has no image "
                             f"({'/'.join(WDS_IMAGE_EXTENSIONS)}); add the image or remove the label.")
        for key, m in images.items():
            ids.append(f"{rel}/{key}")
            tokens.append(labels[key])
            file_index.append(k)
            offsets.append(m.offset_data)
            sizes.append(m.size)
    if not ids:
        raise FileNotFoundError(f"the shards of {split_dir} hold no images; the split is empty.")
    labels_arr, classes, class_names = _map_labels(tokens, lambda i: f"sample {ids[i]}", root, class_index)
    return Listing(
        root=str(root), split=split, fmt="webdataset", files=[str(t) for t in tars], ids=ids, labels=labels_arr,
        file_index=np.array(file_index, dtype=np.int32), offset=np.array(offsets, dtype=np.int64),
        size=np.array(sizes, dtype=np.int64), classes=classes, class_names=class_names,
    )
