"""The AR stage's readers of token shards (the format: ``ideal_ray.data.tokens``).

Readers for the AR stage, both "one random view per image per epoch" with the schedule of ``augment``
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
so stage the shards on local disk (or a page cache that holds them), not on a network filesystem. A URI
``shard_dir`` (``s3://bucket/tokens/x``) is read in place through :mod:`ideal_ray.storage`: each process opens its
own file system on first use (a Ray actor with the environment it inherited), and a row group is one ranged read.
``row_group_images`` is an argument of the writer: smaller groups cut the amplification and grow the footers.
"""

from __future__ import annotations

import collections
import os
import posixpath
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ideal_ray.data.augment import (
    PermutationCache,
    epoch_permutation,
    local_batch_size,
    position_of,
    row_schedule,
    schedule_info,
)
from ideal_ray import storage
from ideal_ray.data.tokens import (_require_complete, open_shard, read_manifest, read_shard, shard_image_counts,
                                   tokens_to_numpy)

if TYPE_CHECKING:  # annotations only: torch is imported where it is used (the shard-reader actors run without it)
    import torch


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
        self._fs = None  # (file system, folder) of a URI shard_dir, made on first use in the process that reads

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _open=collections.OrderedDict(), _fs=None)  # open files stay with their process

    def _path(self, shard: int) -> str:
        return storage.join(self.shard_dir, self.files[shard])

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
        if storage.is_uri(self.shard_dir):
            if self._fs is None:
                self._fs = storage.filesystem(self.shard_dir)
            fs, root = self._fs
            pf = open_shard(posixpath.join(root, self.files[shard]), metadata=meta[0] if meta else None, fs=fs)
        else:
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
        fn_constructor_args=(storage.absolute(os.fspath(shard_dir)), m, int(seed), int(start_step), int(rank),
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
            t = read_shard(storage.join(self.shard_dir, s["file"]))
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
