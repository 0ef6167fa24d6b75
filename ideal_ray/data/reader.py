"""Random access to the encoded bytes of a listed split, and their decode to RGB.

Any process reads item ``i`` of a :class:`~ideal_ray.data.sources.Listing` (or its ``pack()``, zero-copy out of
Ray's object store) with a :class:`ByteReader`: one ``open`` for a plain file, one seek + read for a tar member,
one cached row group for parquet. A listing whose root is an object-store URI reads the same bytes through the
store (:func:`ideal_ray.storage.filesystem`, made in the reading process, which has the endpoint and credentials in its
environment): one GET per plain file, one ranged read per tar member, the row groups of a Parquet object.
:func:`load_rgb` reads and decodes (:func:`decode_bytes`) an item into a fully
decoded RGB image or raises a :class:`~ideal_ray.data.folder.BadImageError` whose text names the problem ("empty
file (0 bytes)", "truncated image (...)", "not an image (unrecognised format)", "unreadable: ..."); the caller
skips and counts those, listing them with :func:`~ideal_ray.data.folder.skip_reason`.
"""

from __future__ import annotations

import errno
import io
import os
import posixpath
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
from PIL import Image

from ideal_ray import storage
from ideal_ray.data.folder import BadImageError, open_rgb
from ideal_ray.data.sources import FORMATS, Listing

__all__ = ["ByteReader", "decode_bytes", "load_rgb"]


class ByteReader:
    """Random access to the encoded bytes of a listing's items, for one process (not thread-safe).

    Containers open lazily and the last ``max_open`` stay open; parquet reads the whole row group holding the
    row (image column only) and keeps the last ``max_row_groups``, so reading in listing order decodes every
    row group once.
    """

    def __init__(self, listing: Listing | dict, max_open: int = 8, max_row_groups: int = 2) -> None:
        packed = listing.pack() if isinstance(listing, Listing) else listing
        self.root = os.fsdecode(packed["root"].item())
        self.fmt = packed["fmt"].item().decode()
        if self.fmt not in FORMATS:
            raise ValueError(f"packed listing has format {self.fmt!r}; expected one of {FORMATS}.")
        self.image_column = packed["image_column"].item().decode()
        self._files: np.ndarray = packed["files"]  # (F,) bytes, relative to root
        self._file_index: np.ndarray = packed["file_index"]  # (N,) int32
        self._offset: np.ndarray = packed["offset"]  # (N,) int64
        self._size: np.ndarray = packed["size"]  # (N,) int64
        self._max_open, self._max_groups = max(1, max_open), max(1, max_row_groups)
        self._handles: OrderedDict[int, Any] = OrderedDict()  # file number -> open file / ParquetFile
        self._group_starts: dict[int, np.ndarray] = {}  # file number -> first row of each row group
        self._groups: OrderedDict[tuple[int, int], Any] = OrderedDict()  # (file, group) -> binary array
        self._store = None  # (pyarrow file system, root's path in it) of a URI root, made on the first read

    def _store_path(self, k: int) -> tuple[Any, str]:
        """(file system, path in it) of container ``k`` of a URI root; the file system is made in this process."""
        if self._store is None:
            fs, base = storage.filesystem(self.root)
            self._store = (fs, base.rstrip("/"))
        fs, base = self._store
        return fs, posixpath.join(base, os.fsdecode(bytes(self._files[k])))

    def __len__(self) -> int:
        return len(self._file_index)

    def path(self, i: int) -> str:
        """The file that holds item ``i`` (the image itself for folder/flat)."""
        return storage.join(self.root, os.fsdecode(bytes(self._files[self._file_index[i]])))

    def read(self, i: int) -> bytes:
        """The encoded image bytes of item ``i``; an ``OSError`` when its file is missing or unreadable."""
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"item {i} is out of range for a listing of {n} images.")
        k = int(self._file_index[i])
        if self.fmt in ("folder", "flat"):
            if storage.is_uri(self.root):
                fs, path = self._store_path(k)
                with self._opened(k, lambda: fs.open_input_stream(path)) as f:
                    return f.read()
            with open(self.path(i), "rb") as f:
                return f.read()
        if self.fmt == "webdataset":
            return self._read_member(k, int(self._offset[i]), int(self._size[i]))
        return self._read_row(k, int(self._offset[i]))

    def _handle(self, k: int, opener: Callable[[str], Any]) -> Any:
        h = self._handles.get(k)
        if h is None:
            h = opener(self.path_of_file(k))
            self._handles[k] = h
            while len(self._handles) > self._max_open:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(k)
        return h

    def path_of_file(self, k: int) -> str:
        """Absolute path or URI of container ``k`` (``Listing.files[k]``)."""
        return storage.join(self.root, os.fsdecode(bytes(self._files[k])))

    def _opened(self, k: int, opener: Callable[[], Any]) -> Any:
        """``opener()`` of container ``k`` of a URI root; a missing object raises the ``FileNotFoundError`` a
        missing local file raises (so its skip reason reads the same: ``unreadable: No such file or directory``)."""
        try:
            return opener()
        except FileNotFoundError as e:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.path_of_file(k)) from e

    def _read_member(self, k: int, offset: int, size: int) -> bytes:
        if storage.is_uri(self.root):  # one ranged read of the member's bytes
            fs, path = self._store_path(k)
            data = self._handle(k, lambda _: self._opened(k, lambda: fs.open_input_file(path))).read_at(size, offset)
        else:
            f = self._handle(k, lambda p: open(p, "rb"))
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"shard {self.path_of_file(k)} ends {size - len(data)} bytes into the member at offset "
                          f"{offset}; the tar is truncated, re-copy it.")
        return data

    def _read_row(self, k: int, row: int) -> bytes:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.path_of_file(k)
        try:
            if storage.is_uri(self.root):
                fs, store_path = self._store_path(k)
                pf = self._handle(k, lambda _: self._opened(k, lambda: pq.ParquetFile(store_path, filesystem=fs)))
            else:
                pf = self._handle(k, pq.ParquetFile)
            starts = self._group_starts.get(k)
            if starts is None:
                md = pf.metadata
                sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
                starts = self._group_starts[k] = np.cumsum([0] + sizes)
            g = int(np.searchsorted(starts, row, side="right")) - 1
            values = self._groups.get((k, g))
            if values is None:
                values = self._load_group(pf, g)
                self._groups[(k, g)] = values
                while len(self._groups) > self._max_groups:
                    self._groups.popitem(last=False)
            else:
                self._groups.move_to_end((k, g))
            value = values[row - int(starts[g])]
        except pa.ArrowException as e:
            if isinstance(e, OSError):
                raise
            raise OSError(f"parquet file {path} row {row} cannot be read ({type(e).__name__}: {e}).") from e
        except IndexError as e:
            raise OSError(f"parquet file {path} has no row {row}; it changed since it was listed.") from e
        return value.as_py() or b""  # a null image reads as no bytes: it fails to decode and is counted

    def _load_group(self, pf, g: int):
        """The image column of row group ``g`` as a binary array (struct columns: their ``bytes`` field)."""
        import pyarrow as pa

        if pa.types.is_struct(pf.schema_arrow.field(self.image_column).type):
            col = pf.read_row_group(g, columns=[f"{self.image_column}.bytes"]).column(0).combine_chunks()
            return col.flatten()[0]  # flatten applies the struct's nulls to its bytes
        return pf.read_row_group(g, columns=[self.image_column]).column(0).combine_chunks()

    def close(self) -> None:
        """Close every open container (the reader reopens them on the next read)."""
        while self._handles:
            self._handles.popitem()[1].close()
        self._groups.clear()

    def __enter__(self) -> "ByteReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode_bytes(data: bytes) -> Image.Image:
    """Encoded bytes -> fully loaded RGB image; raises :class:`~ideal_ray.data.folder.BadImageError` naming the
    problem (a truncated file never decodes)."""
    return open_rgb(io.BytesIO(data))


def load_rgb(reader: ByteReader, i: int) -> Image.Image:
    """Item ``i`` of ``reader`` as a fully loaded RGB image; raises :class:`~ideal_ray.data.folder.BadImageError`
    (one of ``DECODE_ERRORS``) naming the problem when it cannot be read or decoded."""
    try:
        data = reader.read(i)
    except OSError as e:
        raise BadImageError(f"unreadable: {e.strerror or e}") from e
    return decode_bytes(data)
