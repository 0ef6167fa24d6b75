"""Write a folder split (``root/<split>/<wnid>/<image>``) in the other source formats of ``sources.py``.

Used by tests and demos to get the same images as ``flat``, ``parquet`` and ``webdataset`` sources. Every
writer copies the encoded bytes unchanged and keeps the folder's order, writes ``out_root/class_index.json``
(the folder's classes, so labels mean the same), builds its output under a temporary name and renames it into
place only when complete, and refuses to overwrite anything that is already there.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ideal_ray.data.folder import CLASS_INDEX_FILE, FolderSplit, list_image_folder, load_class_index
from ideal_ray.data.sources import LABEL_FILE_NAMES

__all__ = ["folder_to_parquet", "folder_to_webdataset", "folder_to_flat"]


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target``, renamed to it on success and removed on failure."""
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target} already exists; refusing to overwrite it: remove it or pick another out_root.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    _remove(tmp)  # a leftover of an interrupted run of this process id
    try:
        yield tmp
        os.rename(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_class_index(listed: FolderSplit, out_root: Path) -> None:
    """``out_root/class_index.json`` with the folder's classes; an existing one must list the same classes."""
    entries = list(zip(listed.classes, listed.class_names))
    target = out_root / CLASS_INDEX_FILE
    if target.exists():
        if load_class_index(target) != entries:
            raise FileExistsError(f"{target} already exists with other classes; refusing to overwrite it: remove "
                                  f"it or pick another out_root.")
        return
    with _staged(target) as tmp:
        index = {str(i): [wnid, name] for i, (wnid, name) in enumerate(entries)}
        tmp.write_text(json.dumps(index, indent=1) + "\n")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _chunks(n: int, parts: int, what: str) -> list[np.ndarray]:
    if not 1 <= parts <= n:
        raise ValueError(f"{what}={parts} must be between 1 and the split's {n} images.")
    return np.array_split(np.arange(n), parts)


def folder_to_parquet(
    root: str | os.PathLike,
    split: str,
    out_root: str | os.PathLike,
    files: int = 2,
    struct: bool = True,
    wnid_labels: bool = False,
    row_group_size: int = 64,
) -> list[Path]:
    """Write ``out_root/<split>/<split>-KKKKK-of-NNNNN.parquet`` (``files`` contiguous parts); returns the files.

    Columns: ``image`` (``struct<bytes, path>`` with the file name as path, HuggingFace style, or plain binary
    when ``struct=False``) and ``label`` (int64, or the wnid string when ``wnid_labels``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    listed = list_image_folder(root, split)
    out_root = Path(out_root).expanduser()
    parts = _chunks(len(listed.samples), files, "files")
    names = [f"{split}-{k:05d}-of-{files:05d}.parquet" for k in range(files)]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if struct else pa.binary()
    with _staged(out_root / split) as tmp:
        tmp.mkdir()
        for name, part in zip(names, parts):
            samples = [listed.samples[i] for i in part]
            data = [_read(p) for p, _ in samples]
            images = [{"bytes": d, "path": os.path.basename(p)} for d, (p, _) in zip(data, samples)] if struct else data
            labels = [listed.classes[y] if wnid_labels else y for _, y in samples]
            table = pa.table({
                "image": pa.array(images, type=image_type),
                "label": pa.array(labels, type=pa.string() if wnid_labels else pa.int64()),
            })
            pq.write_table(table, tmp / name, row_group_size=row_group_size)
    _write_class_index(listed, out_root)
    return [out_root / split / n for n in names]


def folder_to_webdataset(
    root: str | os.PathLike, split: str, out_root: str | os.PathLike, shards: int = 2
) -> list[Path]:
    """Write ``out_root/<split>/<split>-KKKKK.tar`` shards of ``<wnid>/<stem>.<ext>`` + ``<wnid>/<stem>.cls``."""
    listed = list_image_folder(root, split)
    out_root = Path(out_root).expanduser()
    parts = _chunks(len(listed.samples), shards, "shards")
    names = [f"{split}-{k:05d}.tar" for k in range(shards)]
    split_dir = Path(root).expanduser() / split
    with _staged(out_root / split) as tmp:
        tmp.mkdir()
        for name, part in zip(names, parts):
            with tarfile.open(tmp / name, "w", format=tarfile.USTAR_FORMAT) as tf:
                for i in part:
                    path, label = listed.samples[i]
                    rel = Path(path).relative_to(split_dir)
                    stem, ext = os.path.splitext(rel.name)
                    if "." in stem:
                        raise ValueError(f"image {path} has a dot in its stem, which webdataset would read as part "
                                         f"of the extension; rename it.")
                    key = (rel.parent / stem).as_posix()
                    _add_member(tf, f"{key}{ext.lower()}", _read(path))
                    _add_member(tf, f"{key}.cls", str(label).encode())
    _write_class_index(listed, out_root)
    return [out_root / split / n for n in names]


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # no timestamps: identical input, identical shard
    tf.addfile(info, io.BytesIO(data))


def folder_to_flat(root: str | os.PathLike, split: str, out_root: str | os.PathLike, labels: str = "csv") -> Path:
    """Copy the images to ``out_root/<split>/<file>`` with a labels file; returns the labels file.

    ``labels="csv"``: Kaggle ``LOC_<split>_solution.csv`` (``ImageId`` = file stem, wnid + a dummy box);
    ``"txt"``: ``<split>_labels.txt`` of ``<file name> <int label>`` lines.
    """
    if labels not in ("csv", "txt"):
        raise ValueError(f"labels={labels!r} must be 'csv' (Kaggle solution file) or 'txt' (<file> <label>).")
    listed = list_image_folder(root, split)
    out_root = Path(out_root).expanduser()
    names = [os.path.basename(p) for p, _ in listed.samples]
    stems = [os.path.splitext(n)[0] for n in names]
    keys = stems if labels == "csv" else names
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise ValueError(f"two images of {Path(root) / split} are named {dup!r}; a flat folder needs unique names.")
    label_name = LABEL_FILE_NAMES[0 if labels == "csv" else 1].format(split=split)
    if labels == "csv":
        lines = ["ImageId,PredictionString"] + [f"{s},{listed.classes[y]} 0 0 1 1" for s, (_, y) in
                                                zip(stems, listed.samples)]
    else:
        lines = [f"{n} {y}" for n, (_, y) in zip(names, listed.samples)]
    if (out_root / label_name).exists():
        raise FileExistsError(f"{out_root / label_name} already exists; refusing to overwrite it: remove it or "
                              f"pick another out_root.")
    with _staged(out_root / split) as tmp_dir:
        tmp_dir.mkdir()
        for name, (path, _) in zip(names, listed.samples):
            shutil.copyfile(path, tmp_dir / name)
        with _staged(out_root / label_name) as tmp_labels:
            tmp_labels.write_text("\n".join(lines) + "\n")
    _write_class_index(listed, out_root)
    return out_root / label_name
