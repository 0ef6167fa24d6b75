"""Class-conditional sampling over every GPU of a Ray cluster: a Ray Data actor pool of samplers.

Same settings (a ``SampleJobConfig``) and outputs as :func:`~ideal_ray.pipelines.sample_local.sample_images`
(``samples.npz`` in ADM format and ``grid.png``), byte for byte on the same device type: sample ``i`` of class ``c``
uses the same per-sample seed whichever actor draws it (the sampler's noise is a counter hash of the seed), so the
set does not depend on how many GPUs share the work.

    range(N) -> map_batches(_SampleBatch)  one actor per GPU (num_gpus=1; on CPU ``run.num_actors`` actors): GPT +
                                           Sampler (static KV cache, CUDA graph) + tokenizer decoder, built once
                                           per actor; rows (index) -> (index, image uint8 (S, S, 3))
             -> driver                     places each image at its index; writes the npz and the grid atomically

50k images at 256 px are 9.8 GB of uint8: the driver holds them once (as the ADM npz needs them in one array).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Dict

import numpy as np

from ideal_ray.config import SampleConfig, SampleJobConfig, validate_stage
from ideal_ray.pipelines.sample_local import (
    EXPERIMENT,
    GRID_FILE,
    SAMPLES_FILE,
    _resolve_classes,
    plan_samples,
    write_samples,
)


class _SampleBatch:
    """Actor: one GPT + Sampler + tokenizer on its device; rows ``id`` -> ``index``, ``image`` (B, S, S, 3)."""

    def __init__(self, gpt_path: str, tokenizer_path: str, grid: int, sample_cfg: dict, labels: np.ndarray,
                 seeds: np.ndarray, device: str, precision: str, batch_size: int):
        import torch

        from ideal_ray.checkpoint import load_gpt, load_tokenizer
        from ideal_ray.cluster import use_actor_threads
        from ideal_ray.pipelines.sample_local import _gpt_dtype
        from ideal_ray.sampling import Sampler

        dev = torch.device(device)
        use_actor_threads(dev.type)
        self.cfg = SampleConfig(**sample_cfg)
        gpt = load_gpt(gpt_path, device="cpu", grid=grid).to(device=dev, dtype=_gpt_dtype(precision, dev)).eval()
        self.tok = load_tokenizer(tokenizer_path, device=str(dev))
        self.sampler = Sampler(gpt, batch_size, self.cfg)
        self.labels, self.seeds, self.dev = labels, seeds, dev

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch

        from ideal_ray.sampling import decode_to_uint8

        index = np.asarray(batch["id"], dtype=np.int64)  # (B,)
        tokens = self.sampler(torch.from_numpy(self.labels[index]), self.seeds[index].tolist())  # (B, N)
        images = decode_to_uint8(self.tok.decode, tokens, self.cfg.out_size)  # (B, S, S, 3) uint8
        return {"index": index, "image": images.cpu().numpy()}


def sample_images_ray(cfg: SampleJobConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Sample ``cfg.sample.per_class`` images of each of ``cfg.classes`` (empty = every class of the GPT) on a Ray
    actor pool; write ``samples.npz`` + ``grid.png`` to ``cfg.out``.

    ``cfg.run.device``: ``auto`` (GPUs when the cluster has them), ``cuda`` or ``cpu``; ``cfg.run.num_actors``: the
    sampler actors (default every GPU, or 1 on CPU); ``cfg.run.precision``: the GPT's dtype (auto = bf16 on CUDA);
    ``cfg.tracking_uri``: "" = no MLflow, None = ``$MLFLOW_TRACKING_URI`` or ``<out>/mlflow.db``. Returns the
    summary of the in-process version plus ``num_samplers``.
    """
    import ray

    from ideal_ray.checkpoint import GPT, TOKENIZER, check_models
    from ideal_ray.cluster import actor_cpus, actor_device, init_ray

    validate_stage(cfg)  # the sampling settings (per_class, batch_size, out_size >= 1 ...), classes, run, paths
    sample_cfg, out_dir, device, num_samplers = cfg.sample, cfg.out, cfg.run.device, cfg.run.num_actors
    precision, classes = cfg.run.precision, list(cfg.classes) or None
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"run.device={device} is not one of auto, cpu, cuda (a Ray pool; cuda:N runs in one "
                         f"process: run.in_process=true).")
    npz_path, grid_path = os.path.join(out_dir, SAMPLES_FILE), os.path.join(out_dir, GRID_FILE)
    for p in (npz_path, grid_path):
        if os.path.exists(p):
            raise FileExistsError(f"{p} exists; refusing to overwrite earlier samples (choose a new --out).")
    gpt_path, tokenizer_path = os.path.abspath(cfg.gpt), os.path.abspath(cfg.tokenizer)
    models = check_models(gpt_path, tokenizer_path, classes)  # on the driver, before any actor starts
    cls_list = _resolve_classes(classes, models[GPT].num_classes)
    labels, seeds = plan_samples(cls_list, sample_cfg.per_class, sample_cfg.seed)
    n, s = len(labels), sample_cfg.out_size

    init_ray((num_samplers or 1) + 2)  # the sampler actors + Ray Data's own tasks
    device, num_samplers, _, cluster_cpus = actor_device(device, num_samplers)
    bs = min(sample_cfg.batch_size, -(-n // num_samplers))  # no actor gets only padding
    log(f"sampling {n} images ({len(cls_list)} classes x {sample_cfg.per_class}) at cfg {sample_cfg.cfg_scale} on "
        f"{num_samplers} {device} sampler actor(s), batch {bs}")

    t0 = time.perf_counter()
    ds = ray.data.range(n).map_batches(
        _SampleBatch,
        fn_constructor_args=(gpt_path, tokenizer_path, models[TOKENIZER].grid, dataclasses.asdict(sample_cfg),
                             labels, seeds, device, precision, bs),
        batch_size=bs,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_samplers),
        num_gpus=1 if device == "cuda" else 0,
        num_cpus=actor_cpus(device, num_samplers, cluster_cpus),
    )
    images = np.empty((n, s, s, 3), dtype=np.uint8)  # (N, S, S, 3)
    filled = np.zeros(n, dtype=bool)
    from ideal_ray.console import progress

    bar = progress(n, "sample", "img")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        images[batch["index"]] = batch["image"]
        filled[batch["index"]] = True
        bar.update(len(batch["index"]))
    bar.close()
    if not filled.all():
        raise RuntimeError(f"{int((~filled).sum())} of {n} samples never arrived from the sampler actors; rerun.")
    total = time.perf_counter() - t0

    write_samples(npz_path, grid_path, images, labels, len(cls_list), sample_cfg.per_class)
    summary: Dict[str, Any] = {
        "samples": os.path.abspath(npz_path), "grid": os.path.abspath(grid_path), "num_images": int(n),
        "num_classes": len(cls_list), "per_class": int(sample_cfg.per_class), "image_size": int(s),
        "batch_size": int(bs), "device": device, "num_samplers": num_samplers, "seconds": round(total, 4),
        "images_per_s": round(n / total, 4) if total > 0 else float("inf"), "mlflow_run_id": None,
    }
    from ideal_ray.tracking import run_tracker

    # "" = no MLflow (a tracker that does nothing), None = the default store beside the samples
    with run_tracker(cfg.tracking_uri, out_dir, EXPERIMENT, os.path.basename(os.path.abspath(out_dir))) as tr:
        params = {f"sample.{k}": v for k, v in dataclasses.asdict(sample_cfg).items()}
        params.update({"gpt": gpt_path, "tokenizer": tokenizer_path, "device": device,
                       "num_samplers": num_samplers, "precision": precision,
                       "classes": "all" if classes is None else ",".join(map(str, cls_list))})
        tr.log_params(params)
        tr.log_metrics({k: summary[k] for k in ("images_per_s", "seconds", "num_images")}, step=0)
        tr.log_image(grid_path, "samples")
        summary["mlflow_run_id"] = tr.run_id
    log(f"wrote {npz_path} and {grid_path}: {summary['images_per_s']} images/s on {num_samplers} actor(s)")
    return summary
