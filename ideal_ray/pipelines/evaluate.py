"""Evaluation with one pinned protocol (spec section 8), on Ray Data actor pools.

``evaluate_recon`` -- the tokenizer on a validation split::

    range(images) -> map_batches(_CenterCrop)  CPU actor pool: read + decode (reader.ByteReader), ADM center crop
                                               to the tokenizer's size -> uint8 (S, S, 3); bad files: ok=False
                  -> map_batches(_ReconEval)   one actor per GPU: encode -> decode -> uint8; both resized to 256
                                               (PIL bicubic); per image PSNR, SSIM, the codes, Inception features
                                               of the reconstruction (and of the real crop while the reference
                                               statistics are not cached yet), the zero-shot top-5 of the MAP-pooled
                                               reconstructed and frozen-VFM deep features
                  -> driver                    rFID / sFID / precision / recall (and rIS when the Inception weights
                                               have logits), PSNR, SSIM, usage, entropy, zero-shot top-1/5, a
                                               per-class table, a reconstruction grid; one MLflow run

The reference statistics of the real crops are keyed by (listing hash, crop, size, evaluator) and cached
(``ideal_ray.eval.reference``): the second evaluation of the same split computes no real-image features.

``evaluate_gen`` -- samples (an ADM-format npz, e.g. from ``jobs/sample.py``) against a reference (ADM's
``VIRTUAL_imagenet256_labeled.npz`` or an image folder): gFID, sFID, IS (when available), ADM precision/recall, and
with ``classifier.data`` the class accuracy of the samples under a classifier fitted on real images of that data set
(``ideal_ray.eval.class_accuracy``).

Their settings are a ``ReconEvalConfig`` / ``GenEvalConfig`` (``ideal_ray.config``).

Every result holds a ``protocol`` dict saying how each number was made (reference and its hash, image counts,
resize rule, evaluator and weights hash) and is logged to MLflow (params, metrics, ``result.json``, tables).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
import zipfile
from typing import Any, Callable, Dict, Optional

import numpy as np

from ideal_ray import storage
from ideal_ray.cluster import process_device
from ideal_ray.config import ConfigError, GenEvalConfig, ReconEvalConfig, validate_stage
from ideal_ray.data import sources
from ideal_ray.data.folder import DECODE_ERRORS, skip_reason
from ideal_ray.data.reader import ByteReader, load_rgb
from ideal_ray.eval import recon as rc
from ideal_ray.io import atomic_write
from ideal_ray.tracking import run_tracker

log = logging.getLogger(__name__)

EXPERIMENT = "ideal-eval"
GRID_IMAGES = 8


# ------------------------------------------------------------------------------------- stages
class _CenterCrop:
    """CPU stage: rows ``{id}`` (position in ``indices``) -> ``index, label, ok, error, image (S, S, 3)``."""

    def __init__(self, packed: dict, indices: np.ndarray, image_size: int):
        self.reader = ByteReader(packed)
        self.labels = np.asarray(packed["labels"], dtype=np.int64)  # (N,)
        self.indices, self.size = indices, int(image_size)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        from ideal_ray.data.crops import center_crop_arr

        index = self.indices[np.asarray(batch["id"], dtype=np.int64)]  # (B,)
        n = len(index)
        images = np.zeros((n, self.size, self.size, 3), dtype=np.uint8)
        ok = np.ones(n, dtype=bool)
        error = np.full(n, "", dtype=object)
        for j, i in enumerate(index.tolist()):
            try:
                images[j] = np.asarray(center_crop_arr(load_rgb(self.reader, i), self.size))
            except DECODE_ERRORS as e:
                ok[j], error[j] = False, skip_reason(e)
        return {"index": index, "label": self.labels[index], "ok": ok, "error": error, "image": images}


class _ReconEval:
    """Encoder/decoder + Inception (+ zero-shot head) on one device; per-image scores and features."""

    def __init__(self, tokenizer_ckpt: str, device: str, precision: str, real_features: bool, class_names,
                 inception_weights: str, return_images: bool, pooled: bool = False, metrics: bool = True):
        import torch

        from ideal_ray.checkpoint import load_tokenizer
        from ideal_ray.eval.inception import load_inception
        from ideal_ray.eval.semantics import build_zero_shot_head
        from ideal_ray.cluster import use_actor_threads

        use_actor_threads(device)
        self.dev = torch.device(device)
        self.amp = torch.bfloat16 if precision == "bf16" else None
        self.tok = load_tokenizer(tokenizer_ckpt, device=str(self.dev))
        self.inception = load_inception(inception_weights, device=str(self.dev))
        self.head = None
        if class_names:
            with torch.random.fork_rng(devices=[]):  # random-weight (tiny) text towers: the same on every run
                torch.manual_seed(0)
                self.head = build_zero_shot_head(self.tok.cfg.vfm, class_names, device=self.dev)
        self.real_features, self.return_images, self.pooled, self.metrics = real_features, return_images, pooled, metrics
        has_map = getattr(self.tok.vfm.trunk, "attn_pool", None) is not None
        self.pool = self.tok.vfm.pool if has_map else (lambda tokens: tokens.mean(1))  # (B, N, C) -> (B, C)
        self.pool_kind = "map" if has_map else "mean"

    def _features(self, images_256: np.ndarray, prefix: str) -> Dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(images_256).permute(0, 3, 1, 2).contiguous().to(self.dev)  # (B, 3, 256, 256) uint8
        return {f"{prefix}_{k}": v.float().cpu().numpy() for k, v in self.inception(x).items()}

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch

        from ideal_ray.data.augment import to_model_input

        ok = np.asarray(batch["ok"], dtype=bool)
        real = np.ascontiguousarray(np.asarray(batch["image"])[ok])  # (b, S, S, 3) uint8
        out: Dict[str, np.ndarray] = {"index": np.asarray(batch["index"])[ok], "label": np.asarray(batch["label"])[ok]}
        with torch.inference_mode(), torch.autocast(self.dev.type, dtype=self.amp, enabled=self.amp is not None):
            x = to_model_input(torch.from_numpy(real).to(self.dev))  # (b, 3, S, S) in [-1, 1]
            shallow_raw, deep = self.tok.vfm.trunk_features(x)
            codes = self.tok.encode_from_trunk(shallow_raw, deep)  # (b, g, g)
            recon = rc.to_uint8(self.tok.decode(codes).float().clamp(-1, 1))  # (b, S, S, 3) uint8
            if self.head is not None or self.pooled:
                deep_rec = self.tok.decode_features(codes)  # (b, N, C)
                for name, feats in (("recon", deep_rec), ("vfm", deep)):
                    pooled = self.pool(feats).float()  # (b, C')
                    if self.pooled:
                        out[f"pooled_{name}"] = pooled.cpu().numpy()
                    if self.head is not None:
                        logits = self.head.logits(pooled)  # (b, K)
                        out[f"top5_{name}"] = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu().numpy()
        if not (self.metrics or self.return_images):  # probe features only
            return out
        real_s, recon_s = rc.resize_256(real), rc.resize_256(recon)  # (b, 256, 256, 3) uint8
        if self.return_images:
            out["real_256"], out["recon_256"] = real_s, recon_s
        if not self.metrics:  # images only (the grid)
            return out
        out["psnr"], out["ssim"] = rc.psnr(real_s, recon_s), rc.ssim(real_s, recon_s)
        out["codes"] = codes.flatten(1).to(torch.int32).cpu().numpy()  # (b, g*g)
        out.update(self._features(recon_s, "recon"))
        if self.real_features:
            out.update(self._features(real_s, "real"))
        return out


# ------------------------------------------------------------------------------------- helpers


def _per_class_csv(labels: np.ndarray, class_names, columns: Dict[str, np.ndarray]) -> str:
    """One row per class present: count and the mean of each per-image column."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["label", "class", "n"] + list(columns))
    for k in np.unique(labels):
        m = labels == k
        name = class_names[k] if class_names is not None and k < len(class_names) else str(k)
        w.writerow([int(k), name, int(m.sum())] + [f"{float(np.mean(v[m])):.6g}" for v in columns.values()])
    return buf.getvalue()


def _local_device(device: str) -> str:
    """This process's device for work the driver does itself: the actors' device type if this process has one."""
    import torch

    return "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"


def _check_out_dir(out_dir: str) -> str:
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(os.path.join(out_dir, "result.json")):
        raise FileExistsError(f"{out_dir} already holds an evaluation (result.json); choose a new --out.")
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def torch_tensor(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def _finite(d: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float, np.floating)) and math.isfinite(v)}


# ------------------------------------------------------------------------------------- reconstruction
def evaluate_recon(cfg: ReconEvalConfig, *, run_name: Optional[str] = None,
                   log_fn: Callable[[str], None] = print) -> Dict[str, Any]:
    """Reconstruction metrics of the tokenizer ``cfg.tokenizer`` on the split ``cfg.data`` (a ``ReconEvalConfig``).

    ``num_images``: evaluate an evenly spaced subset of the listing (None: all, e.g. ImageNet val's 50k);
    ``probe_train_images`` > 0 adds the linear probe (the paper's layer study): pooled reconstructed (and frozen-VFM)
    deep features of that many evenly spaced ``probe_split`` images train a logistic regression scored on the
    evaluated images; ``grid=False`` skips the reconstruction grid (one more actor pass; sweeps leave it out).
    ``run``: the Ray pool (``device`` auto / cpu / cuda, ``num_actors`` evaluation actors, ``decode_actors``,
    ``precision`` auto = bf16 on GPU); ``fid``: the Inception weights and the reference statistics' cache;
    ``tracking_uri``: "" = no MLflow, None = ``$MLFLOW_TRACKING_URI`` or ``<out>/mlflow.db``. Writes
    ``result.json``, ``per_class.csv`` and ``grid.png`` to ``cfg.out`` and one MLflow run (experiment
    ``ideal-eval``, named ``run_name`` or ``recon-<out folder>``). Returns the result dict.
    """
    import ray

    from ideal_ray.checkpoint import load_tokenizer
    from ideal_ray.eval import reference as ref_mod
    from ideal_ray.eval.fid import compare
    from ideal_ray.eval.inception import load_inception
    from ideal_ray.pipelines.extract_common import listing_sha256
    from ideal_ray.cluster import actor_cpus, actor_device, init_ray
    from ideal_ray.pipelines.sample_local import grid_image

    validate_stage(cfg)
    if cfg.run.in_process:
        raise ConfigError("run.in_process=true is not offered by the reconstruction evaluation (it runs on Ray actor "
                          "pools); leave it false, with run.device=cpu for CPU actors.")
    if cfg.run.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"run.device={cfg.run.device} is not one of auto, cpu, cuda (the evaluation actors take "
                          f"one GPU each).")
    data, fid = cfg.data, cfg.fid
    data_root, split, fmt, class_index = data.root, data.split, data.format, data.class_index
    num_images, batch_size, zero_shot, grid = cfg.num_images, cfg.batch_size, cfg.zero_shot, cfg.grid
    probe_train_images, probe_split = cfg.probe_train_images, cfg.probe_split
    device, num_actors, decode_actors = cfg.run.device, cfg.run.num_actors, cfg.run.decode_actors or 2
    precision = None if cfg.run.precision == "auto" else cfg.run.precision
    inception_weights, cache_dir = fid.inception_weights, fid.cache_dir
    t0 = time.perf_counter()
    tokenizer_ckpt = os.path.abspath(cfg.tokenizer)
    listing = sources.list_images(data_root, split=split, class_index=class_index, fmt=fmt,
                                  labels_file=data.labels_file)
    n_all = len(listing)
    n = n_all if num_images is None else int(num_images)
    if not 2 <= n <= n_all:
        raise ValueError(f"num_images={num_images} must be in [2, {n_all}] (the split's images).")
    indices = np.unique(np.linspace(0, n_all - 1, n).round().astype(np.int64))  # evenly spaced, sorted
    tok = load_tokenizer(tokenizer_ckpt, device="cpu")
    size, codebook = int(tok.cfg.image_size), int(tok.cfg.quantizer.codebook_size)
    class_names = None
    if zero_shot:
        from ideal_ray.eval.semantics import zero_shot_class_names

        class_names = zero_shot_class_names(list(zip(listing.classes, listing.class_names)))
    del tok
    extractor = load_inception(inception_weights, device="cpu")  # fails fast without weights; the evaluator's id
    evaluator = extractor.protocol()
    out_dir = _check_out_dir(cfg.out)

    identity = {"kind": "recon-real", "name": f"{os.path.basename(listing.root.rstrip('/'))}-{split}-{size}-256",
                "path": listing.root, "split": split,
                "sha256": listing_sha256([listing.ids[i] for i in indices], listing.labels[indices]),
                "sha256_of": "the evaluated listing (ids and labels)",
                "preprocess": f"ADM center crop to {size}, PIL bicubic to 256", "num_listed": int(len(indices))}
    cached = ref_mod.load_cached(identity, evaluator, cache_dir)

    init_ray(decode_actors + (num_actors or 1) + 1)  # decode pool + evaluation actors + Ray Data's own tasks
    device, num_actors, _, cluster_cpus = actor_device(device, num_actors)
    precision = precision or ("bf16" if device == "cuda" else "fp32")
    # on CPU the Inception and tokenizer passes are the work: each evaluation actor gets its share of the cores
    eval_cpus = actor_cpus(device, num_actors, cluster_cpus, others=decode_actors + 1)
    log_fn(f"reconstruction eval: {len(indices)} {split} images of {listing.root} on {num_actors} {device} actor(s); "
           f"reference statistics {'cached' if cached is not None else 'computed in this run'}")

    def run(idx: np.ndarray, real_features: bool, return_images: bool, zs, pooled: bool = False,
            metrics: bool = True, lst=listing) -> Dict[str, np.ndarray]:
        ds = ray.data.range(len(idx)).map_batches(
            _CenterCrop, fn_constructor_args=(lst.pack(), idx, size), batch_size=8, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=decode_actors), num_cpus=1)
        ds = ds.map_batches(
            _ReconEval, fn_constructor_args=(tokenizer_ckpt, device, precision, real_features, zs,
                                             inception_weights, return_images, pooled, metrics),
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=1 if device == "cuda" else 0, num_cpus=eval_cpus)
        from ideal_ray.console import progress

        cols: Dict[str, list] = {}
        bar = progress(len(idx), "evaluate", "img")
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k, v in b.items():
                cols.setdefault(k, []).append(v)
            bar.update(len(b["index"]))
        bar.close()
        got = {k: np.concatenate(v) for k, v in cols.items()}
        if not got or len(got.get("index", [])) == 0:
            raise RuntimeError("no image of the evaluation set could be read; check the split.")
        order = np.argsort(got["index"], kind="stable")
        return {k: v[order] for k, v in got.items()}

    rows = run(indices, cached is None, False, class_names, pooled=probe_train_images > 0)
    skipped = sorted(set(indices.tolist()) - set(rows["index"].tolist()))
    skipped_ids = [listing.ids[i] for i in skipped]
    if cached is None:
        cached = ref_mod.store(identity, evaluator, {"pool": rows["real_pool"].astype(np.float64),
                                                     "spatial": rows["real_spatial"]}, skipped_ids, cache_dir)
    sample = {"pool": rows["recon_pool"].astype(np.float64), "spatial": rows["recon_spatial"]}
    if "recon_logits" in rows:
        sample["logits"] = rows["recon_logits"]
    gen = compare(cached, sample, sample_name=f"reconstructions by {os.path.basename(tokenizer_ckpt)}")
    counts = rc.code_counts(rows["codes"], codebook)
    psnr = rows["psnr"]
    result: Dict[str, Any] = {
        "rfid": gen["fid"], "rsfid": gen["sfid"], "precision": gen["precision"], "recall": gen["recall"],
        "psnr": float(np.mean(psnr[np.isfinite(psnr)])) if np.isfinite(psnr).any() else float("inf"),
        "psnr_exact": int((~np.isfinite(psnr)).sum()), "ssim": float(np.mean(rows["ssim"])),
        "usage": rc.usage(counts), "entropy": rc.entropy(counts), "max_entropy": math.log(codebook),
        "n": int(len(rows["index"])), "skipped": len(skipped_ids), "skipped_files": skipped_ids[:50],
    }
    if "inception_score" in gen:
        result["ris"], result["ris_std"] = gen["inception_score"], gen["inception_score_std"]
    per_class = {"psnr": np.where(np.isfinite(psnr), psnr, np.nan), "ssim": rows["ssim"]}
    if zero_shot:
        labels = rows["label"]
        for name in ("recon", "vfm"):
            top5 = rows[f"top5_{name}"]
            hit1, hit5 = top5[:, 0] == labels, (top5 == labels[:, None]).any(1)
            result[f"zeroshot_{name}_top1"], result[f"zeroshot_{name}_top5"] = float(hit1.mean()), float(hit5.mean())
            per_class[f"zeroshot_{name}_top1"] = hit1.astype(np.float64)
    probe_proto = "off"
    if probe_train_images > 0:
        from ideal_ray.eval.semantics import linear_probe

        train_listing = sources.list_images(data_root, split=probe_split, class_index=class_index, fmt=fmt)
        m = min(int(probe_train_images), len(train_listing))
        train_idx = np.unique(np.linspace(0, len(train_listing) - 1, m).round().astype(np.int64))
        train = run(train_idx, False, False, None, pooled=True, metrics=False, lst=train_listing)
        k = len(listing.classes)
        for name in ("recon", "vfm"):
            res = linear_probe(torch_tensor(train[f"pooled_{name}"]), torch_tensor(train["label"]),
                               torch_tensor(rows[f"pooled_{name}"]), torch_tensor(rows["label"]), num_classes=k)
            result[f"probe_{name}_top1"] = res.top1
            probe_proto = res.protocol
        probe_proto = {"train": f"{len(train['label'])} evenly spaced {probe_split} images",
                       "eval": f"the {result['n']} evaluated images",
                       "features": "pooled decoded deep features (probe_recon) and the frozen VFM's own (probe_vfm)",
                       "classifier": probe_proto}
    ref_stats_reused = bool(cached.from_cache)
    result["protocol"] = {
        "reconstruction": {"crop": f"ADM center crop to {size} (the tokenizer's input)", **rc.protocol()},
        "fid": gen["protocol"], "reference_statistics": "reused from the cache" if ref_stats_reused else "computed",
        "zero_shot": ("decoded deep features and the frozen VFM's own deep features -> the VFM's MAP head -> "
                      "cosine against the text tower's class embeddings (80 templates)") if zero_shot else "off",
        "subset": f"{len(indices)} of {n_all} listed images, evenly spaced" if len(indices) < n_all else "all",
        "linear_probe": probe_proto,
        "tokenizer": tokenizer_ckpt, "precision": precision, "device": device,
    }
    result["seconds"] = round(time.perf_counter() - t0, 2)

    artifacts = ["result.json", "per_class.csv"]
    if grid:
        from PIL import Image

        # a handful of images: in this process on its own device (a second actor pass would reload every model)
        picks = indices[:GRID_IMAGES]
        crops = _CenterCrop(listing.pack(), picks, size)({"id": np.arange(len(picks))})
        grid_rows = _ReconEval(tokenizer_ckpt, _local_device(device), precision, False, None, inception_weights,
                               True, metrics=False)(crops)
        pairs = np.concatenate([grid_rows["real_256"], grid_rows["recon_256"]])
        Image.fromarray(grid_image(pairs, 2, len(grid_rows["real_256"]))).save(os.path.join(out_dir, "grid.png"))
        artifacts.append("grid.png")
    atomic_write(os.path.join(out_dir, "per_class.csv"), _per_class_csv(rows["label"], class_names, per_class))
    atomic_write(os.path.join(out_dir, "result.json"), json.dumps(result, indent=1, default=float))
    with run_tracker(cfg.tracking_uri, out_dir, EXPERIMENT, run_name or f"recon-{os.path.basename(out_dir)}") as tr:
        tr.log_params({"kind": "recon", "tokenizer": tokenizer_ckpt, "data_root": listing.root, "split": split,
                       "num_images": len(indices), "device": device, "precision": precision,
                       "evaluator_weights": evaluator["weights_file"]})
        tr.log_metrics(_finite({k: v for k, v in result.items() if k != "protocol"}), step=0)
        for name in artifacts:
            tr.log_artifact(os.path.join(out_dir, name), "eval")
        result["mlflow_run_id"] = getattr(tr, "run_id", None)
    result["out_dir"] = out_dir
    return result


# ------------------------------------------------------------------------------------- generation
def evaluate_gen(cfg: GenEvalConfig, *, run_name: Optional[str] = None,
                 log_fn: Callable[[str], None] = print) -> Dict[str, Any]:
    """gFID, sFID, IS (when the Inception weights have logits) and ADM precision/recall of the samples in
    ``cfg.samples`` (ADM format: ``arr_0`` uint8 (N, H, W, 3)) against ``cfg.reference`` (an ADM reference npz such as
    ``VIRTUAL_imagenet256_labeled.npz``, or a folder of images: ADM center crop + resize to the samples' size), in
    this process on ``cfg.device`` (auto = its GPU when it has one, else cpu), ``cfg.fid.batch_size`` images per
    Inception batch.

    ``cfg.classifier.data`` (a data set root; '' = off) adds the class accuracy (``ideal_ray.eval.class_accuracy``):
    a classifier of ``classifier.kind`` (``probe``: linear on Inception features; ``cnn``: a convnet trained on the
    pixels) fitted on ``classifier.per_class`` real images of each class of its ``classifier.split`` (default 50,
    0 = all) scores the samples against their ``labels`` (the npz must hold them): ``class_accuracy``,
    ``class_chance`` (1 / classes), ``class_accuracy_real`` (the classifier's held-out top-1 on real images).
    Writes ``result.json`` to ``cfg.out`` and one MLflow run (``cfg.tracking_uri``: "" = none, None =
    ``$MLFLOW_TRACKING_URI`` or ``<out>/mlflow.db``; named ``run_name`` or ``gen-<out folder>``). The reference
    statistics and the classifier are cached (``cfg.fid.cache_dir``); the samples' features are not."""
    from ideal_ray.eval import class_accuracy as ca
    from ideal_ray.eval import reference as ref_mod
    from ideal_ray.eval.fid import compare, features
    from ideal_ray.eval.inception import load_inception

    validate_stage(cfg)
    samples_npz, reference, fid, c = cfg.samples, cfg.reference, cfg.fid, cfg.classifier
    batch_size, inception_weights, cache_dir = fid.batch_size, fid.inception_weights, fid.cache_dir
    device = process_device(cfg.device)
    t0 = time.perf_counter()
    if not os.path.isfile(samples_npz):
        raise FileNotFoundError(f"samples file {samples_npz} does not exist; make one with jobs/sample.py.")
    try:
        z = np.load(samples_npz)
    except (OSError, ValueError, zipfile.BadZipFile):  # not an npz archive (numpy would offer to unpickle it)
        raise ValueError(f"samples file {samples_npz} is not an npz archive; pass an ADM-format npz (arr_0 and "
                         f"labels), as jobs/sample.py writes.") from None
    if not hasattr(z, "files"):  # a plain .npy array
        raise ValueError(f"samples file {samples_npz} is one array, not an npz archive; pass an ADM-format npz "
                         f"(arr_0 and labels), as jobs/sample.py writes.")
    with z:
        if "arr_0" not in z.files:
            raise ValueError(f"{samples_npz} has no arr_0; it must be an ADM-format npz (jobs/sample.py writes one).")
        images = z["arr_0"]
        sample_labels = z["labels"] if "labels" in z.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{samples_npz} arr_0 is {images.dtype} {images.shape}; expected uint8 (N, H, W, 3).")
    source = ref_mod.reference_source(reference, images.shape[1])  # a local path or an object-store URI
    cls_data = None
    if c.data:  # checked before any image is read: the split exists, the samples' labels fit its classes
        cls_data = ca.classifier_data(c.data, c.split, c.per_class, kind=c.kind)
        if sample_labels is None:
            raise ValueError(f"{samples_npz} has no labels; class accuracy needs the class of each sample "
                             f"(jobs/sample.py writes them next to arr_0).")
        sample_labels = ca.check_sample_labels(sample_labels, len(images), cls_data.num_classes, samples_npz,
                                               cls_data.where)
    out_dir = _check_out_dir(cfg.out)
    extractor = load_inception(inception_weights, device=device)
    ref = ref_mod.reference_stats(source, extractor, cache_dir, batch_size=batch_size)
    clf = None if cls_data is None else ca.real_classifier(cls_data, images.shape[1], extractor, cache_dir,
                                                           batch_size=batch_size)
    log_fn(f"generation eval: {len(images)} samples vs {ref.protocol['reference']['name']} "
           f"({ref.protocol['num_reference_images']} images, statistics {'cached' if ref.from_cache else 'computed'})")
    feats = features(images, batch_size=batch_size, extractor=extractor)
    gen = compare(ref, feats, extractor, sample_name=os.path.abspath(samples_npz), device=device)
    result: Dict[str, Any] = {"gfid": gen["fid"], "sfid": gen["sfid"], "precision": gen["precision"],
                              "recall": gen["recall"], "n": int(len(images))}
    if "inception_score" in gen:
        result["is"], result["is_std"] = gen["inception_score"], gen["inception_score_std"]
    for key in ("fid_adm_stats", "sfid_adm_stats"):
        if key in gen:
            result[key] = gen[key]
    if clf is not None:
        result.update(ca.class_accuracy(clf, feats["pool"], sample_labels, images))
        real = result.get("class_accuracy_real")
        log_fn(f"class accuracy: {result['class_accuracy']:.1%} of {len(images)} samples (chance "
               f"{result['class_chance']:.1%}" + ("" if real is None else f"; held-out real images: {real:.1%}") + ")")
    result["protocol"] = dict(gen["protocol"], reference_statistics="reused from the cache" if ref.from_cache
                              else "computed")
    result["protocol"]["class_accuracy"] = "off (no classifier data set)" if clf is None else {
        "metric": clf.metric_note, **clf.protocol, "classifier_cache": "reused" if clf.from_cache else "computed"}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write(os.path.join(out_dir, "result.json"), json.dumps(result, indent=1, default=float))
    with run_tracker(cfg.tracking_uri, out_dir, EXPERIMENT, run_name or f"gen-{os.path.basename(out_dir)}") as tr:
        tr.log_params({"kind": "gen", "samples": os.path.abspath(samples_npz), "reference": storage.absolute(reference),
                       "num_images": len(images), "evaluator_weights": result["protocol"]["evaluator"]["weights_file"],
                       "classifier_data": cls_data.where if cls_data is not None else "",
                       "classifier_per_class": cls_data.per_class if cls_data is not None else 0,
                       "classifier_kind": cls_data.kind if cls_data is not None else ""})
        tr.log_metrics(_finite({k: v for k, v in result.items() if k != "protocol"}), step=0)
        tr.log_artifact(os.path.join(out_dir, "result.json"), "eval")
        result["mlflow_run_id"] = getattr(tr, "run_id", None)
    result["out_dir"] = out_dir
    return result


def protocol_line(result: Dict[str, Any]) -> str:
    """One line naming how a result's numbers were made (for tables and logs)."""
    p = result["protocol"]
    fid = p.get("fid", p)
    ref = fid["reference"]
    ev = fid["evaluator"]
    return (f"reference {ref['name']} ({fid['num_reference_images']} images, sha256 {str(ref['sha256'])[:12]}), "
            f"{fid['num_sample_images']} images, {fid['resize']}, torch-fidelity {ev['torch_fidelity']} "
            f"{ev['weights_file']} (sha256 {ev['weights_sha256'][:12]})")
