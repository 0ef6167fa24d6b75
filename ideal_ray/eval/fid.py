"""Generation metrics from one Inception pass: FID, sFID, Inception Score, ADM precision/recall (spec section 8).

One pass per image set (:func:`features`) gives every feature the metrics need: ``pool`` (pool_3, 2048-d) for FID
and precision/recall, unbiased ``logits`` for IS and ADM's ``spatial`` (mixed_6/conv, first 7 channels, 2023-d) for
sFID. Images go in as uint8 RGB at any size; the network resizes them to 299 itself (torch-fidelity's TF1 bilinear).

The formulas, pinned:
- FID / sFID: ``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)`` with ``mu`` the mean and ``S`` ``np.cov`` (N - 1)
  of the features, in float64 (torch-fidelity's and ADM's formula). ``tr sqrt(S1 S2)`` is taken from the eigenvalues
  of a symmetric PSD matrix with the same spectrum (``S1^1/2 S2 S1^1/2``; or ``R S R^T`` / the singular values of
  ``R1 R2^T`` when a set has fewer images than dimensions, ``S = R^T R``): the same number, cheaper and real-valued.
- IS: torch-fidelity's convention: softmax of the unbiased logits, rows shuffled with seed 2020, 10 splits,
  ``exp(mean KL(p(y|x) || p(y)))`` per split, mean and std over splits.
- Precision/recall: ADM's manifold estimator (Kynkaanniemi et al.) on the pool features: a reference image's
  manifold ball has the squared L2 distance to its k-th nearest reference neighbour (k = 3, the point itself
  excluded) as radius; precision = share of samples inside some reference ball, recall = share of references
  inside some sample ball. Distances are in float32 (ADM's TF code tries float16 first). torch-fidelity's ``prc``
  uses VGG16 features instead and is *not* this number.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch_fidelity.metric_isc import isc_features_to_metric

from ideal_ray.eval.inception import RESIZE_RULE, FidInception, load_inception

__all__ = [
    "Gaussian",
    "ReferenceStats",
    "adm_precision_recall",
    "compare",
    "features",
    "fid_from_features",
    "frechet_distance",
    "gaussian",
    "inception_score",
    "sfid",
]

ImageBatch = Union[np.ndarray, torch.Tensor]
Images = Union[ImageBatch, Iterable[ImageBatch]]
SPATIAL_DIM = 7 * 17 * 17  # 2023
IS_SPLITS, IS_SEED = 10, 2020
METRIC_NOTES = {
    "fid": "Frechet distance of Inception pool_3 (2048-d) Gaussians; the reference Gaussian is computed by this "
           "evaluator from the reference images",
    "sfid": "Frechet distance of ADM's spatial features (mixed_6/conv channels 0-6, 2023-d), reference as for fid",
    "inception_score": "torch-fidelity convention: unbiased logits, seed-2020 shuffle, 10 splits, mean (std) over "
                       "splits",
    "precision_recall": "ADM manifold estimator, k=3, squared L2 in float32 on Inception pool features (not "
                        "torch-fidelity's VGG16 prc)",
    "fid_adm_stats": "fid/sfid against the npz's own precomputed mu/sigma (ADM's TF evaluator over the whole "
                     "reference dataset): the number ADM's evaluator.py prints and papers report",
}


# ---------------------------------------------------------------------------------------------- features
def _batches(images: Images, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (N, H, W, 3) array/tensor, or an iterable of them -> uint8 (B, 3, H, W) tensors of <= batch_size."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    chunks = [images] if isinstance(images, (np.ndarray, torch.Tensor)) else images
    for chunk in chunks:
        x = torch.from_numpy(np.require(chunk, requirements=["C", "W"])) if isinstance(chunk, np.ndarray) else chunk
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
            what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"images must be uint8 RGB arrays (N, H, W, 3) (or an iterable of them), got {what}.")
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size].permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def features(images: Images, batch_size: int = 50, device: str = "cpu",
             extractor: Optional[FidInception] = None) -> Dict[str, np.ndarray]:
    """One Inception pass: ``{"pool": (N, 2048) float64, "spatial": (N, 2023) float32, "logits": (N, 1008)
    float32}`` (``logits`` only when the weights have the fc layer). ``extractor`` defaults to
    :func:`~ideal_ray.eval.inception.load_inception` on ``device``."""
    model = extractor if extractor is not None else load_inception(device=device)
    dev = next(model.parameters()).device
    parts: Dict[str, list] = {}
    for batch in _batches(images, batch_size):
        for key, value in model(batch.to(dev)).items():
            parts.setdefault(key, []).append(value.float().cpu().numpy())
    if not parts:
        raise ValueError("features() got no images (an empty array or iterable).")
    out = {key: np.concatenate(values) for key, values in parts.items()}
    out["pool"] = out["pool"].astype(np.float64)
    return out


# --------------------------------------------------------------------------------------------------- FID
@dataclass(frozen=True)
class Gaussian:
    """Mean ``mu`` (D,) and covariance ``sigma`` (D, D), float64; ``root`` (n, D) with ``sigma = root.T @ root``
    is kept when the set has fewer images than dimensions (n - 1 < D), which makes ``tr sqrt(S1 S2)`` cheap."""

    mu: np.ndarray
    sigma: np.ndarray
    root: Optional[np.ndarray] = None


def gaussian(feats: np.ndarray) -> Gaussian:
    """``np.mean`` and ``np.cov(rowvar=False)`` of features (N, D), N >= 2, in float64."""
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"FID needs features (N, D) with N >= 2 images, got shape {x.shape}.")
    mu = x.mean(axis=0)
    root = (x - mu) / np.sqrt(x.shape[0] - 1)  # (N, D)
    return Gaussian(mu, np.cov(x, rowvar=False), root if x.shape[0] - 1 < x.shape[1] else None)


def _sqrt_eigs_sum(sym: np.ndarray) -> float:
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(sym), 0.0, None)).sum())


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """``|mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr sqrt(S_a S_b)`` (see the module docstring for the trace)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"Frechet distance between features of different sizes: {a.mu.shape} vs {b.mu.shape}.")
    diff = a.mu - b.mu
    if a.root is not None and b.root is not None:
        tr_sqrt = float(np.linalg.svd(a.root @ b.root.T, compute_uv=False).sum())  # singular values of R_a R_b^T
    elif a.root is not None or b.root is not None:
        root, sigma = (a.root, b.sigma) if a.root is not None else (b.root, a.sigma)
        tr_sqrt = _sqrt_eigs_sum(root @ sigma @ root.T)  # (n, n), same nonzero spectrum as S_a S_b
    else:
        w, v = np.linalg.eigh(a.sigma)
        half = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S_a^1/2
        tr_sqrt = _sqrt_eigs_sum(half @ b.sigma @ half)
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_sqrt)


def _as_gaussian(x: Union[np.ndarray, Gaussian]) -> Gaussian:
    return x if isinstance(x, Gaussian) else gaussian(x)


def fid_from_features(ref: Union[np.ndarray, Gaussian], sample: Union[np.ndarray, Gaussian]) -> float:
    """FID between two feature sets (N, D) (or their :class:`Gaussian`)."""
    return frechet_distance(_as_gaussian(ref), _as_gaussian(sample))


def sfid(ref: Union[np.ndarray, Gaussian], sample: Union[np.ndarray, Gaussian]) -> float:
    """sFID: the Frechet distance of ADM's 2023-d spatial features (``features(...)["spatial"]``)."""
    a, b = _as_gaussian(ref), _as_gaussian(sample)
    if a.mu.shape != (SPATIAL_DIM,) or b.mu.shape != (SPATIAL_DIM,):
        raise ValueError(f"sFID takes the {SPATIAL_DIM}-d spatial features, got {a.mu.shape} and {b.mu.shape}.")
    return frechet_distance(a, b)


# ---------------------------------------------------------------------------------------------------- IS
def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> Tuple[float, float]:
    """(mean, std) Inception Score of unbiased logits (N, 1008) in torch-fidelity's convention (N >= splits)."""
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if x.dim() != 2 or x.shape[0] < splits:
        raise ValueError(f"inception_score needs logits (N, C) with N >= {splits} (one per split), "
                         f"got shape {tuple(x.shape)}.")
    out = isc_features_to_metric(x, splits=splits, shuffle=True, rng_seed=IS_SEED)
    return out["inception_score_mean"], out["inception_score_std"]


# -------------------------------------------------------------------------------------- precision/recall
def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances (n, m) between rows of a (n, D) and b (m, D), clamped at 0 (ADM's expansion)."""
    return ((a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]).clamp_min_(0.0)


def _radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """(N,) squared distance of each row to its k-th nearest other row (index k of the sorted row, self at 0)."""
    return torch.cat([_sq_dists(x[i:i + batch_size], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, x.shape[0], batch_size)])


def adm_precision_recall(ref_pool: np.ndarray, sample_pool: np.ndarray, k: int = 3, batch_size: int = 1024,
                         device: str = "cpu") -> Dict[str, float]:
    """ADM's precision and recall of ``sample_pool`` (M, D) against ``ref_pool`` (N, D), both with more than ``k``
    rows. Distances are computed ``batch_size`` rows at a time (memory ~ batch_size * max(N, M) floats)."""
    ref = torch.as_tensor(np.asarray(ref_pool), dtype=torch.float32, device=device)
    smp = torch.as_tensor(np.asarray(sample_pool), dtype=torch.float32, device=device)
    if ref.dim() != 2 or smp.dim() != 2 or ref.shape[1] != smp.shape[1] or min(len(ref), len(smp)) <= k:
        raise ValueError(f"adm_precision_recall needs two feature sets (N, D) with the same D and more than k={k} "
                         f"rows each, got {tuple(ref.shape)} and {tuple(smp.shape)}.")
    ref_radii, smp_radii = _radii(ref, k, batch_size), _radii(smp, k, batch_size)  # (N,), (M,)
    smp_in = torch.zeros(len(smp), dtype=torch.bool, device=device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    for i in range(0, len(smp), batch_size):
        d = _sq_dists(smp[i:i + batch_size], ref)  # (b, N)
        smp_in[i:i + batch_size] = (d <= ref_radii[None, :]).any(dim=1)
        ref_in |= (d <= smp_radii[i:i + batch_size, None]).any(dim=0)
    return {"precision": float(smp_in.double().mean()), "recall": float(ref_in.double().mean())}


# --------------------------------------------------------------------------------------------- compare
@dataclass
class ReferenceStats:
    """What a reference set contributes: pool and spatial Gaussians, pool features (N, 2048) float32 for
    precision/recall, the ``protocol`` that made them, ADM's own precomputed ``mu``/``sigma``/``mu_s``/``sigma_s``
    when the reference npz has them, and whether they were read from the cache."""

    pool: Gaussian
    spatial: Gaussian
    pool_features: np.ndarray
    protocol: Dict[str, Any]
    adm_stats: Dict[str, np.ndarray] = field(default_factory=dict)
    from_cache: bool = False

    @classmethod
    def from_features(cls, feats: Dict[str, np.ndarray], protocol: Dict[str, Any],
                      adm_stats: Optional[Dict[str, np.ndarray]] = None) -> "ReferenceStats":
        return cls(gaussian(feats["pool"]), gaussian(feats["spatial"]), feats["pool"].astype(np.float32),
                   protocol, dict(adm_stats or {}))


def compare(ref: ReferenceStats, sample: Dict[str, np.ndarray], extractor: Optional[FidInception] = None,
            sample_name: str = "samples", k: int = 3, device: str = "cpu") -> Dict[str, Any]:
    """Every metric of ``sample`` (the output of :func:`features`) against ``ref``, plus ``protocol``.

    Keys: ``fid``, ``sfid``, ``precision``, ``recall``; ``inception_score`` and ``inception_score_std`` when the
    sample has logits; ``fid_adm_stats`` and ``sfid_adm_stats`` when the reference npz has ADM's statistics. Pass
    the ``extractor`` that made ``sample`` to check it is the reference's evaluator.
    """
    evaluator = ref.protocol["evaluator"]
    if extractor is not None and extractor.weights.sha256 != evaluator["weights_sha256"]:
        raise ValueError(f"the samples' Inception weights (sha256 {extractor.weights.sha256[:12]}...) are not the "
                         f"reference's ({evaluator['weights_sha256'][:12]}...); recompute the reference with them.")
    pool, spatial = gaussian(sample["pool"]), gaussian(sample["spatial"])
    out: Dict[str, Any] = {"fid": frechet_distance(ref.pool, pool), "sfid": frechet_distance(ref.spatial, spatial)}
    out.update(adm_precision_recall(ref.pool_features, sample["pool"], k=k, device=device))
    notes = {key: METRIC_NOTES[key] for key in ("fid", "sfid", "precision_recall")}
    if "logits" in sample:
        out["inception_score"], out["inception_score_std"] = inception_score(sample["logits"])
        notes["inception_score"] = METRIC_NOTES["inception_score"]
    if {"mu", "sigma", "mu_s", "sigma_s"} <= set(ref.adm_stats):
        adm = ref.adm_stats
        out["fid_adm_stats"] = frechet_distance(Gaussian(adm["mu"], adm["sigma"]), pool)
        out["sfid_adm_stats"] = frechet_distance(Gaussian(adm["mu_s"], adm["sigma_s"]), spatial)
        notes["fid_adm_stats"] = METRIC_NOTES["fid_adm_stats"]
    out["protocol"] = {
        "reference": ref.protocol["reference"],
        "samples": sample_name,
        "num_reference_images": ref.protocol["num_reference_images"],
        "num_sample_images": int(len(sample["pool"])),
        "resize": RESIZE_RULE,
        "evaluator": evaluator,
        "metrics": notes,
    }
    return out
