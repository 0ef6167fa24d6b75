"""In-process token extraction: every listed image -> its crop views -> tokenizer codes -> Parquet shards.

No Ray here: the reference implementation for one machine and for tests (``extract_ray`` is the cluster version and
writes the same folder with the same manifest parameters, so either resumes the other). The steps:

1. list the split with :func:`ideal_ray.data.sources.list_images` (folder, flat val + labels file, Parquet or
   WebDataset shards; ids are paths relative to the data root);
2. plan shards of ``shard_images`` consecutive listed images (``tokens-00000.parquet``, ...);
3. for each shard not already finished: read + decode each image (undecodable files are skipped and recorded in the
   manifest and ``skipped.tsv``, never fatal), cut its ADM squares (``crops.make_squares``), cut the views and encode
   them on the device ``batch_size`` views at a time (:class:`~ideal_ray.pipelines.extract_common.ViewEncoder`),
   write the shard atomically, then record it in the manifest;
4. mark the manifest complete and run :func:`~ideal_ray.data.tokens.verify_shards`.

The settings are one :class:`~ideal_ray.config.ExtractConfig`, resolved as the Ray run resolves them
(:class:`~ideal_ray.pipelines.extract_common.Extraction`).

Resume: a rerun with the same settings keeps every shard the manifest records (file present, size as recorded),
deletes leftover ``.tmp`` files and shards the manifest does not know (a crash between the rename and the manifest
update) and redoes the rest. A folder holding tokens of other parameters (tokenizer file hash, view set, image
size, listing, shard size) is refused rather than mixed. One extraction per folder at a time (a lock file).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ideal_ray.cluster import process_device
from ideal_ray.config import ExtractConfig, validate_stage
from ideal_ray.data import crops
from ideal_ray.data.folder import DECODE_ERRORS, skip_reason
from ideal_ray.data.reader import ByteReader, load_rgb
from ideal_ray.pipelines.extract_common import Extraction, ViewEncoder

log = logging.getLogger(__name__)


class _ImageSquares(torch.utils.data.Dataset):
    """Listed image ``i`` -> (i, ADM squares [uint8 (s, s, 3)] or None, error text); decodes in loader workers."""

    def __init__(self, packed: dict, indices: np.ndarray, views: str, image_size: int):
        self.packed, self.indices, self.views, self.size = packed, indices, views, image_size
        self._reader = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        if self._reader is None:  # opened lazily: once per loader worker process
            self._reader = ByteReader(self.packed)
        i = int(self.indices[j])
        try:
            return i, crops.make_squares(load_rgb(self._reader, i), self.views, self.size), ""
        except DECODE_ERRORS as e:
            return i, None, skip_reason(e)


def _identity(x):
    return x


def _iter_squares(packed: dict, indices: np.ndarray, views: str, image_size: int, num_workers: int):
    ds = _ImageSquares(packed, indices, views, image_size)
    if num_workers <= 0:
        return (ds[j] for j in range(len(ds)))
    return iter(torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                            collate_fn=_identity, prefetch_factor=4))


def _encode_shard(encoder: ViewEncoder, listing, packed: dict, a: int, b: int, image_size: int, num_workers: int):
    """Encode listed images ``[a, b)`` -> (ids, labels, tokens uint16 (n, V, N), skipped [{image_id, error}])."""
    per_call = max(1, encoder.max_views // encoder.num_views)  # images per encoder call
    kept: list[int] = []
    skipped: list[dict] = []
    pending: list[list[np.ndarray]] = []
    out: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            out.append(encoder([np.stack(sq) for sq in zip(*pending)]))  # (n, V, N)
            pending.clear()

    for i, squares, err in _iter_squares(packed, np.arange(a, b), encoder.views, image_size, num_workers):
        if squares is None:
            skipped.append({"image_id": listing.ids[i], "error": err})
            log.warning("skipping undecodable image %s (%s)", listing.ids[i], err)
            continue
        kept.append(i)
        pending.append(squares)
        if len(pending) >= per_call:
            flush()
    flush()
    toks = np.concatenate(out) if out else np.zeros((0, encoder.num_views, encoder.num_tokens), np.uint16)
    return [listing.ids[i] for i in kept], listing.labels[kept], toks, skipped


def extract_tokens_local(cfg: ExtractConfig) -> dict:
    """Encode every ``data.split`` image's views with the tokenizer ``cfg.tokenizer`` into shards under ``cfg.out``,
    in this process (``cfg``: :class:`~ideal_ray.config.ExtractConfig`; ``run.in_process`` is not consulted).

    ``views``: ``llamagen`` (20 views) or ``release`` (2); ``image_size`` defaults to the tokenizer's; ``batch_size``
    counts views per encoder forward (default 512 on a GPU, 64 on the CPU); ``data.format``/``data.labels_file`` pick
    the input format (see :mod:`ideal_ray.data.sources`); ``num_workers`` > 0 decodes in DataLoader worker processes;
    ``run.device``: ``auto`` (this process's GPU if it has one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``;
    ``run.precision``: ``bf16`` runs the encoder under autocast, ``fp32`` is exact, ``auto`` is bf16 on a GPU and
    fp32 on the CPU; ``max_shards`` stops after writing that many shards (the rest stay to do; a rerun continues); a
    shard with more than ``max_skip_fraction`` of its images (and more than 10) unreadable stops the run unwritten.
    A config with a wrong or missing value is refused first (:class:`~ideal_ray.config.ConfigError`). Returns a
    summary (images, rows, shards written/kept, skipped files, images/s, the verification summary).
    """
    validate_stage(cfg)
    dev = torch.device(process_device(cfg.run.device))
    ex = Extraction(cfg, tokenizer_device=str(dev))
    ex.settle(gpu=dev.type == "cuda")
    packed = ex.listing.pack()
    encoder = ViewEncoder(ex.tok, cfg.views, ex.size, dev, ex.precision, max_views=ex.batch_size)
    written = 0
    with ex.plan() as plan:
        shards = ex.shards(plan)
        for n_done, k in enumerate(shards, 1):
            t_shard = time.perf_counter()
            a, b = plan.images(k)
            ids, labels, toks, skipped = _encode_shard(encoder, ex.listing, packed, a, b, ex.size, cfg.num_workers)
            entry = plan.write(k, ids, labels, toks, skipped)
            written += entry["images"]
            dt = time.perf_counter() - t_shard
            log.info("shard %s: %d images x %d views in %.1fs (%.1f images/s); %d/%d shards this run",
                     entry["file"], entry["images"], plan.num_views, dt, entry["images"] / max(dt, 1e-9), n_done,
                     len(shards))
        return ex.result(plan, shards, written)
