"""Token extraction on Ray Data: CPU actors decode and crop, a GPU actor pool encodes, the driver writes shards.

The pipeline (one streaming Ray dataset over the images of the shards still to do)::

    range(images to do)
      -> map_batches(_DecodeSquares)  CPU actor pool (autoscaling 1..decode_actors): read the bytes (folder file,
                                      Parquet row or tar member, via ``reader.ByteReader``), decode to RGB (CMYK,
                                      gray, 16-bit, alpha converted), the view set's ADM squares (``make_squares``);
                                      an undecodable file becomes a row with ok=False and its error text
      -> map_batches(_EncodeViews)    one actor per GPU (``num_gpus=1``; on a CPU cluster ``run.num_actors`` actors):
                                      the tokenizer's encoder (VFM + fusion + quantizer) cuts the views from the
                                      squares on the device and encodes them ``batch_size`` views per forward
      -> driver                       collects rows per shard; a shard whose images have all arrived is written
                                      atomically and recorded in the manifest (``ShardPlan``)

Why squares: the views are slices and mirror images of one ADM square per crop scale, so the object store carries
2 squares per image (1.0 MB at 384) instead of 20 views (8.8 MB) -- the decode side does the expensive part (JPEG
decode, the BOX/bicubic resizes) and the GPU side the cheap one.

Why the driver writes: shards are the unit of resume (a shard is either recorded in the manifest, complete, or
redone), the manifest has one writer, and tokens are small (20 views x 576 codes x 2 bytes = 23 KB per image at
384, ~70 MB/s at 3k images/s). The heavy data (pixels) never reaches the driver.

Resume and crash safety are :class:`~ideal_ray.pipelines.extract_common.ShardPlan`'s: a rerun keeps finished shards
and redoes the rest; the final check proves rows = images x views with no duplicates. Ray Data retries failed tasks
and restarts dead actors (a lost encoder actor's batches are recomputed), and the driver keeps whatever arrives once
per image: a duplicate delivery of a row is dropped and counted, never written twice.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from ideal_ray.data import crops
from ideal_ray.data.folder import DECODE_ERRORS, skip_reason
from ideal_ray.data.reader import ByteReader, load_rgb
from ideal_ray.cluster import actor_device, init_ray, use_actor_threads
from ideal_ray.config import ConfigError, ExtractConfig, validate_stage
from ideal_ray.pipelines.extract_common import Extraction, ShardPlan
from ideal_ray.tracking import run_tracker

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


# ------------------------------------------------------------------------------------- the two stages
class _DecodeSquares:
    """CPU stage: rows ``{id}`` (position in the to-do list) -> ``index, ok, error, square0[, square1]``."""

    def __init__(self, packed_ref, todo_ref, views: str, image_size: int):
        import ray

        self.reader = ByteReader(ray.get(packed_ref))
        self.todo = ray.get(todo_ref)  # (T,) int64 listed indices to encode
        self.views, self.size = views, int(image_size)
        self.sides = crops.square_sizes(views, image_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = self.todo[np.asarray(batch["id"], dtype=np.int64)]  # (B,)
        n = len(index)
        squares = [np.zeros((n, s, s, 3), dtype=np.uint8) for s in self.sides]  # (B, s, s, 3) each
        ok = np.ones(n, dtype=bool)
        error = np.full(n, "", dtype=object)
        for j, i in enumerate(index.tolist()):
            try:
                for k, sq in enumerate(crops.make_squares(load_rgb(self.reader, i), self.views, self.size)):
                    squares[k][j] = sq
            except DECODE_ERRORS as e:
                ok[j], error[j] = False, skip_reason(e)
        out = {"index": index, "ok": ok, "error": error}
        out.update({f"square{k}": sq for k, sq in enumerate(squares)})
        return out


class _EncodeViews:
    """Encoder stage: one tokenizer per actor on its device; squares -> ``index, ok, error, tokens (B, V, N)``."""

    def __init__(self, tokenizer_ckpt: str, views: str, image_size: int, device: str, precision: str,
                 max_views: int):
        from ideal_ray.checkpoint import load_tokenizer
        from ideal_ray.pipelines.extract_common import ViewEncoder

        use_actor_threads(device)
        tok = load_tokenizer(tokenizer_ckpt, device=device)
        self.encoder = ViewEncoder(tok, views, image_size, device, precision, max_views=max_views)
        self.num_squares = len(crops.square_sizes(views, image_size))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], dtype=bool)  # (B,)
        enc = self.encoder
        tokens = np.zeros((len(ok), enc.num_views, enc.num_tokens), dtype=np.uint16)  # (B, V, N)
        if ok.any():
            tokens[ok] = enc([np.asarray(batch[f"square{k}"])[ok] for k in range(self.num_squares)])
        return {"index": batch["index"], "ok": ok, "error": batch["error"], "tokens": tokens}


# ------------------------------------------------------------------------------------- driver
def _resources(device: str, decode_actors: int | None, num_encoders: int | None) -> tuple[str, int, int]:
    """(device, encoder actors, max decode actors) from the arguments and the cluster's resources."""
    explicit = num_encoders is not None
    device, num_encoders, gpus, cpus = actor_device(device, num_encoders)
    if device == "cuda" and explicit and num_encoders > gpus:
        raise ValueError(f"run.num_actors={num_encoders} needs one GPU each, the cluster has {gpus}.")
    if decode_actors is None:
        encoder_cpus = num_encoders if device == "cpu" else 0
        decode_actors = max(1, cpus - encoder_cpus - 1)
    return device, int(num_encoders), int(decode_actors)


def build_dataset(packed_ref, todo_ref, num_todo: int, tokenizer_ckpt: str, views: str, image_size: int,
                  device: str, precision: str, batch_size: int, num_encoders: int, decode_actors: int,
                  decode_batch: int):
    """The streaming dataset of encoded images (rows ``index, ok, error, tokens``), in no particular order."""
    import ray

    images_per_call = max(1, batch_size // crops.num_views(views))
    ds = ray.data.range(num_todo)
    ds = ds.map_batches(
        _DecodeSquares,
        fn_constructor_args=(packed_ref, todo_ref, views, int(image_size)),
        batch_size=decode_batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=decode_actors),
        num_cpus=1,
    )
    gpu = device == "cuda"
    ds = ds.map_batches(
        _EncodeViews,
        fn_constructor_args=(tokenizer_ckpt, views, int(image_size), device, precision, int(batch_size)),
        batch_size=images_per_call,
        batch_format="numpy",
        zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=num_encoders),
        num_gpus=1 if gpu else 0,
        num_cpus=1,
    )
    return ds


class _ShardCollector:
    """Rows of many shards arriving in any order -> complete shards, each handed to ``plan.write`` once."""

    def __init__(self, plan: ShardPlan, listing, shards: list[int]):
        self.plan, self.listing = plan, listing
        self.expect = {k: plan.images(k)[1] - plan.images(k)[0] for k in shards}
        self.parts: dict[int, dict[str, list]] = {k: {"index": [], "tokens": [], "skipped": []} for k in shards}
        self.seen: set[int] = set()
        self.duplicates = 0
        self.written: list[dict] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        index = np.asarray(batch["index"], dtype=np.int64)
        shard = index // self.plan.shard_images
        ok = np.asarray(batch["ok"], dtype=bool)
        for j, i in enumerate(index.tolist()):
            if i in self.seen:  # a retried task delivered this image again
                self.duplicates += 1
                continue
            self.seen.add(i)
            part = self.parts[int(shard[j])]
            if ok[j]:
                part["index"].append(i)
                part["tokens"].append(batch["tokens"][j])
            else:
                part["skipped"].append({"image_id": self.listing.ids[i], "error": str(batch["error"][j])})
                log.warning("skipping undecodable image %s (%s)", self.listing.ids[i], batch["error"][j])
        for k in sorted(set(shard.tolist())):
            part = self.parts.get(k)
            if part is not None and len(part["index"]) + len(part["skipped"]) == self.expect[k]:
                self._write(k, self.parts.pop(k))

    def _write(self, k: int, part: dict[str, list]) -> None:
        order = np.argsort(part["index"], kind="stable")
        idx = np.asarray(part["index"], dtype=np.int64)[order]
        toks = np.stack(part["tokens"])[order] if len(idx) else np.zeros((0, self.plan.num_views,
                                                                          self.plan.num_tokens), np.uint16)
        first = self.plan.images(k)[0]
        skipped = sorted(part["skipped"], key=lambda x: x["image_id"])
        entry = self.plan.write(k, [self.listing.ids[i] for i in idx], self.listing.labels[idx], toks, skipped)
        self.written.append(entry)
        log.info("shard %s written: %d images (%d skipped), first listed image %d", entry["file"], entry["images"],
                 len(skipped), first)

    @property
    def pending(self) -> list[int]:
        return sorted(self.parts)


def extract_tokens_ray(cfg: ExtractConfig, *, experiment: str = "extract", run_name: str | None = None) -> dict:
    """Encode every ``data.split`` image's views into token shards under ``cfg.out`` on the current (or a new local)
    Ray cluster (``cfg``: :class:`~ideal_ray.config.ExtractConfig`; ``run.in_process`` is not consulted). Settings as
    :func:`~ideal_ray.pipelines.extract_local.extract_tokens_local`, plus:

    ``run.device``: ``auto`` (GPUs when the cluster has them), ``cuda`` or ``cpu``; ``run.num_actors``: encoder
    actors (default: every GPU, or 1 on CPU); ``run.decode_actors``: the decode pool's upper bound (default: the
    cluster's CPUs minus one and the CPU encoders); ``decode_batch``: images per decode task; ``tracking_uri``: MLflow
    store for the run's params, metrics and ``skipped.tsv`` artifact (None: ``$MLFLOW_TRACKING_URI`` or
    ``<out>/mlflow.db``, for a URI ``out`` its local staging folder's
    (``ShardPlan.local_dir``); ``""`` disables tracking), the run ``run_name`` (default ``extract-<out folder name>``) in
    ``experiment``. A config with a wrong or missing value is refused first (:class:`~ideal_ray.config.ConfigError`).
    Returns the summary (``images_per_s``, ``skipped``, ``duplicates_dropped`` ...).
    """
    validate_stage(cfg)
    if cfg.run.device not in DEVICES:
        raise ConfigError(f"run.device={cfg.run.device} is not a device of a Ray run; use one of "
                          f"{', '.join(DEVICES)} (a Ray run places its encoders itself), or run.in_process=true "
                          f"for one process on {cfg.run.device}.")
    import ray

    ex = Extraction(cfg, tokenizer_device="cpu")  # the manifest's grid/vocab; actors load their own copy
    init_ray((cfg.run.decode_actors or 1) + (cfg.run.num_actors or 1) + 1)  # decode pool + encoders + Ray Data's
    device, num_encoders, decode_actors = _resources(cfg.run.device, cfg.run.decode_actors, cfg.run.num_actors)
    params = ex.settle(gpu=device == "cuda")
    ex.tok = None
    batch_size, precision, listing = ex.batch_size, ex.precision, ex.listing

    with ex.plan() as plan:
        shards = ex.shards(plan)
        tracker = run_tracker(cfg.tracking_uri, plan.local_dir, experiment,  # a URI's default store: its staging
                              run_name or f"extract-{os.path.basename(plan.out_dir)}")
        try:
            tracker.log_params(dict(params, device=device, num_encoders=num_encoders, decode_actors=decode_actors,
                                    batch_size=batch_size, data_root=listing.root, out_dir=plan.out_dir,
                                    format_in=listing.fmt, tokenizer_path=ex.tokenizer_path))
            collector = _ShardCollector(plan, listing, shards)
            todo = np.concatenate([np.arange(*plan.images(k)) for k in shards]) if shards else np.zeros(0, np.int64)
            log.info("extracting %d images in %d shards (%d kept) on %s: %d encoder actor(s), up to %d decode "
                     "actors, %d views per forward, %s", len(todo), len(shards), plan.num_shards - len(plan.todo),
                     device, num_encoders, decode_actors, batch_size, precision)
            t_run = time.perf_counter()
            if len(todo):
                ds = build_dataset(ray.put(listing.pack()), ray.put(todo.astype(np.int64)), len(todo),
                                   ex.tokenizer_path, cfg.views, ex.size, device, precision, batch_size, num_encoders,
                                   decode_actors, cfg.decode_batch)
                from ideal_ray.console import progress

                bar = progress(len(todo), "extract", "img")
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                    collector.add(batch)
                    bar.update(len(batch["index"]))
                bar.close()
            if collector.pending:
                raise RuntimeError(f"the pipeline ended with shards {collector.pending[:5]} incomplete; rerun to "
                                   f"redo them (finished shards are kept).")
            written = int(sum(e["images"] for e in collector.written))
            run_seconds = time.perf_counter() - t_run
            result = ex.result(plan, shards, written)
            if not result.get("stopped_early"):
                tracker.log_artifact(plan.local_skipped_file)
            result.update(duplicates_dropped=collector.duplicates, device=device, num_encoders=num_encoders,
                          pipeline_seconds=round(run_seconds, 3),
                          images_per_s_per_encoder=round(written / run_seconds / num_encoders, 2)
                          if run_seconds > 0 and written else None)
            tracker.log_metrics({"images": result["images"], "rows": result["rows"],
                                 "skipped": len(result["skipped"]), "images_per_s": result["images_per_s"] or 0.0,
                                 "duplicates_dropped": collector.duplicates}, step=0)
            tracker.log_dict(result, "summary.json")
            tracker.finish("FINISHED")
        except BaseException:
            tracker.finish("FAILED")
            raise
    return result
