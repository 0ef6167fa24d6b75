"""In-process class-conditional sampling: GPT tokens -> tokenizer decode -> ADM ``samples.npz`` + a PNG grid.

One device, no Ray (``sample_ray`` is the actor-pool version writing the same files); the settings are a
``SampleJobConfig`` (``ideal_ray.config``). Why it is shaped this way:

- **Per-sample seeds.** Sample ``i`` of class ``c`` uses ``sample_seed(cfg.sample.seed, c, per_class, i)``,
  independent of which other classes or batches are in the run, so a (class, seed) pair gives the same image whether
  the run covers all classes or a subset (the sampler's noise is a counter hash of the seed, see
  ``ideal_ray.sampling``).
- **One Sampler for the whole run.** Its KV cache (and on GPU its CUDA-graphed decode step) is built
  once; every batch of ``cfg.sample.batch_size`` reuses it (the last, smaller batch is padded internally).
- **ADM format.** ``samples.npz`` holds ``arr_0`` uint8 (N, H, W, 3) -- what the ADM evaluation suite reads --
  and ``labels`` int64 (N,), in class order then sample order.
- **Never overwrite.** Both files are written to a temporary name and hard-linked into place, which fails if a
  file of that name appeared meanwhile; an ``out`` that already holds either file is refused before any work.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ideal_ray.cluster import process_device
from ideal_ray.config import SampleJobConfig, validate_stage
from ideal_ray.io import atomic_path

__all__ = ["sample_images", "sample_seed", "plan_samples", "grid_image",
           "SAMPLES_FILE", "GRID_FILE", "EXPERIMENT", "GRID_COLUMNS"]

SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"
EXPERIMENT = "ideal-sample"
GRID_COLUMNS = 8  # the grid shows the first 8 samples of each class
_SEED_STRIDE = 1_000_003  # a prime, so different base seeds do not share per-sample seeds for per_class < it


def sample_seed(base_seed: int, cls: int, per_class: int, i: int) -> int:
    """The seed of sample ``i`` of class ``cls``: a pure function of (base seed, class, per_class, i)."""
    return int(base_seed) * _SEED_STRIDE + int(cls) * int(per_class) + int(i)


def plan_samples(classes: Sequence[int], per_class: int, base_seed: int):
    """labels (N,) int64 and seeds (N,) int64 for ``per_class`` samples of each class, class-major."""
    labels = np.repeat(np.asarray(classes, dtype=np.int64), per_class)  # (N,)
    idx = np.tile(np.arange(per_class, dtype=np.int64), len(classes))  # (N,)
    seeds = np.asarray([sample_seed(base_seed, c, per_class, i) for c, i in zip(labels, idx)], dtype=np.int64)
    if (seeds < 0).any():
        raise ValueError(f"seed {base_seed} gives negative per-sample seeds; use a non-negative seed.")
    return labels, seeds


def grid_image(images: np.ndarray, rows: int, cols: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """images (rows * cols, H, W, 3) uint8, row-major -> one (rows*H + (rows+1)*pad, cols*W + (cols+1)*pad, 3)
    uint8 picture with ``pad`` pixels of ``pad_value`` around every cell."""
    n, h, w, c = images.shape
    if n != rows * cols:
        raise ValueError(f"grid_image got {n} images for a {rows}x{cols} grid; pass exactly rows * cols images.")
    out = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, c), pad_value, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[y: y + h, x: x + w] = images[k]
    return out


def _write_atomic(path: str, write: Callable[[Any], None]) -> str:
    """``write(file)`` into a temporary file, published as ``path`` only if nothing is there (never replaced)."""
    with atomic_path(path, overwrite=False,
                     exists=f"{path} exists; refusing to overwrite earlier samples (choose a new --out).") as tmp:
        with open(tmp, "wb") as f:
            write(f)
    return path


def write_samples(npz_path: str, grid_path: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
                  per_class: int) -> None:
    """The ADM npz (``arr_0`` (N, S, S, 3) uint8, ``labels``) and the grid PNG (first samples of each class, one row
    per class), each written atomically and never over an existing file."""
    os.makedirs(os.path.dirname(os.path.abspath(npz_path)), exist_ok=True)
    _write_atomic(npz_path, lambda f: np.savez(f, arr_0=images, labels=labels))
    cols = min(GRID_COLUMNS, per_class)
    picks = np.concatenate([np.arange(cols) + r * per_class for r in range(num_classes)])
    grid = grid_image(images[picks], num_classes, cols)

    def write_png(f):
        from PIL import Image

        Image.fromarray(grid).save(f, format="PNG")

    _write_atomic(grid_path, write_png)


def _resolve_classes(classes: Optional[Sequence[int]], num_classes: int) -> List[int]:
    if classes is None:
        return list(range(num_classes))
    out = [int(c) for c in classes]
    if not out:
        raise ValueError("classes is empty; pass at least one class id or None for all classes.")
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes {bad[:5]} are outside the GPT's [0, {num_classes}); pass ids of trained classes.")
    if len(set(out)) != len(out):
        raise ValueError("classes lists a class more than once; list each class id once.")
    return out


def _gpt_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision '{precision}' is unknown; use auto, fp32 or bf16.")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def sample_images(cfg: SampleJobConfig, log: Callable[[str], None] = print,
                  compile: Optional[bool] = None) -> Dict[str, Any]:
    """Sample ``cfg.sample.per_class`` images of each of ``cfg.classes`` (empty = every class of the GPT) in this
    process on ``cfg.run.device`` (auto = cuda when this process has a GPU, else cpu) and write ``samples.npz`` +
    ``grid.png`` to ``cfg.out``.

    Returns a summary dict: paths, counts, seconds (total, sampling, decoding), images_per_s (all images over
    the whole loop, compile/capture of the first batch included), images_per_s_steady (batches after the first)
    and the MLflow run id when tracking (``cfg.tracking_uri``: "" = off, None = ``$MLFLOW_TRACKING_URI`` or
    ``<out>/mlflow.db``; experiment "ideal-sample": sample settings as params, speed as metrics, the grid as an
    artifact). ``cfg.run.precision``: the GPT's dtype (auto = bf16 on CUDA, fp32 else). ``compile``: the
    Sampler's torch.compile of its decode step (None = its default).
    """
    from ideal_ray.checkpoint import GPT, TOKENIZER, check_models, load_gpt, load_tokenizer
    from ideal_ray.sampling import Sampler, decode_to_uint8

    validate_stage(cfg)  # the sampling settings (per_class, batch_size, out_size >= 1 ...), classes, run, paths
    sample_cfg, out_dir, gpt_path, tokenizer_path = cfg.sample, cfg.out, cfg.gpt, cfg.tokenizer
    classes = list(cfg.classes) or None
    npz_path = os.path.join(out_dir, SAMPLES_FILE)
    grid_path = os.path.join(out_dir, GRID_FILE)
    for p in (npz_path, grid_path):
        if os.path.exists(p):
            raise FileExistsError(f"{p} exists; refusing to overwrite earlier samples (choose a new --out).")
    dev = torch.device(process_device(cfg.run.device))
    models = check_models(gpt_path, tokenizer_path, classes)  # the pair fits, before any weights are read
    cls_list = _resolve_classes(classes, models[GPT].num_classes)
    gpt = load_gpt(gpt_path, device="cpu", grid=models[TOKENIZER].grid)
    gpt = gpt.to(device=dev, dtype=_gpt_dtype(cfg.run.precision, dev)).eval()
    tok = load_tokenizer(tokenizer_path, device=str(dev))
    labels, seeds = plan_samples(cls_list, sample_cfg.per_class, sample_cfg.seed)
    n, s = len(labels), sample_cfg.out_size
    bs = min(sample_cfg.batch_size, n)
    log(f"sampling {n} images ({len(cls_list)} classes x {sample_cfg.per_class}) at cfg {sample_cfg.cfg_scale}, "
        f"batch {bs}, on {dev}")

    sampler = Sampler(gpt, bs, sample_cfg, compile=compile)
    images = np.empty((n, s, s, 3), dtype=np.uint8)  # (N, S, S, 3), filled batch by batch

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t_sample = t_decode = first = 0.0
    t_all = time.perf_counter()
    for b0 in range(0, n, bs):
        t0 = time.perf_counter()
        lab = torch.from_numpy(labels[b0: b0 + bs])
        tokens = sampler(lab, seeds[b0: b0 + bs].tolist())  # (b, N_tok)
        sync()
        t1 = time.perf_counter()
        imgs = decode_to_uint8(tok.decode, tokens, s)  # (b, S, S, 3)
        images[b0: b0 + len(lab)] = imgs.cpu().numpy()
        t2 = time.perf_counter()
        t_sample, t_decode = t_sample + (t1 - t0), t_decode + (t2 - t1)
        if b0 == 0:
            first = t2 - t0
        log(f"  {min(b0 + bs, n)}/{n} images")
    total = time.perf_counter() - t_all

    write_samples(npz_path, grid_path, images, labels, len(cls_list), sample_cfg.per_class)

    rest = n - min(bs, n)
    summary: Dict[str, Any] = {
        "samples": os.path.abspath(npz_path),
        "grid": os.path.abspath(grid_path),
        "num_images": int(n),
        "num_classes": len(cls_list),
        "per_class": int(sample_cfg.per_class),
        "image_size": int(s),
        "batch_size": int(bs),
        "device": str(dev),
        "seconds": round(total, 4),
        "sample_seconds": round(t_sample, 4),
        "decode_seconds": round(t_decode, 4),
        "images_per_s": round(n / total, 4) if total > 0 else float("inf"),
        "images_per_s_steady": round(rest / (total - first), 4) if rest and total > first else None,
        "mlflow_run_id": None,
    }
    from ideal_ray.tracking import run_tracker

    # "" = no MLflow (a tracker that does nothing), None = the default store beside the samples
    with run_tracker(cfg.tracking_uri, out_dir, EXPERIMENT, os.path.basename(os.path.abspath(out_dir))) as tr:
        params = {f"sample.{k}": v for k, v in dataclasses.asdict(sample_cfg).items()}
        params.update({"gpt": os.path.abspath(gpt_path), "tokenizer": os.path.abspath(tokenizer_path),
                       "classes": "all" if classes is None else ",".join(map(str, cls_list)),
                       "device": str(dev), "precision": str(gpt.tok_embed.weight.dtype)})
        tr.log_params(params)
        tr.log_metrics({k: summary[k] for k in ("images_per_s", "seconds", "sample_seconds", "decode_seconds",
                                               "num_images")}, step=0)
        tr.log_image(grid_path, "samples")
        summary["mlflow_run_id"] = tr.run_id
    log(f"wrote {npz_path} and {grid_path}: {summary['images_per_s']} images/s")
    return summary
