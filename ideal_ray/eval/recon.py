"""Reconstruction metrics with one pinned protocol (spec section 8): PSNR, SSIM, codebook usage and entropy.

Protocol, the one tokenizer papers use:
- Real and reconstructed images are uint8 RGB (N, H, W, 3). Both are resized to 256 x 256 with PIL's
  ``Image.resize(..., Image.BICUBIC)`` on uint8 -- PIL widens the bicubic kernel by the scale factor when it
  shrinks, so this is the antialiased bicubic resize -- and every metric (and the FID features, which the caller
  computes from the arrays :meth:`ReconAccumulator.update` returns) is taken on those 256-px uint8 arrays.
- PSNR: per image over the [0, 255] range, ``10 log10(255^2 / MSE)`` with the MSE over all pixels and channels,
  then the mean over images. An exactly reconstructed image has PSNR +inf (no clipping, no epsilon).
- SSIM: as ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=255, channel_axis=-1)``: an 11 x 11 Gaussian window (sigma 1.5, truncated at 3.5 sigma, normalized),
  K1 = 0.01, K2 = 0.03, the SSIM map averaged over the pixels whose window lies inside the image (a 5-pixel border
  is cropped), per channel, then the channel mean; per image, then the mean over images. The same scipy
  ``gaussian_filter`` in float64 as skimage, so the numbers agree to ~1e-15 (about 30 ms per 256-px image).
- Float inputs are taken as images in [0, 1] and scaled by 255 (the same numbers as uint8 with data range 255).
- Codebook usage is the fraction of the K codes used at least once; entropy is the Shannon entropy, in nats, of
  the code frequencies (at most ``log K``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Optional, Tuple, Union

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from ideal_ray.data.transforms import to_uint8  # noqa: F401  (the protocol's [-1, 1] -> uint8, re-exported here)

if TYPE_CHECKING:  # annotations only: torch is imported where it is used (the Ray decode actors run without it)
    import torch

__all__ = [
    "EVAL_SIZE",
    "ReconAccumulator",
    "code_counts",
    "entropy",
    "protocol",
    "psnr",
    "resize_256",
    "ssim",
    "to_uint8",
    "usage",
]

EVAL_SIZE = 256
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # skimage's (scipy's) Gaussian support: radius int(3.5 * 1.5 + 0.5) = 5 -> 11 x 11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03

ArrayLike = Union[np.ndarray, "torch.Tensor"]  # torch is imported where it is used (decode actors skip it)


# ------------------------------------------------------------------------------------------- conversion
def _as_numpy(x: ArrayLike) -> np.ndarray:
    return np.asarray(x) if isinstance(x, np.ndarray) or not hasattr(x, "detach") else x.detach().cpu().numpy()


def _pair(x: ArrayLike, y: ArrayLike) -> Tuple[np.ndarray, np.ndarray, float]:
    """Two image batches (N, H, W, 3), both uint8 or both float in [0, 1] -> (x, y, scale to [0, 255])."""
    a, b = _as_numpy(x), _as_numpy(y)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"Expected two image batches of one shape (N, H, W, 3), got {a.shape} and {b.shape}.")
    if (a.dtype == np.uint8) != (b.dtype == np.uint8):
        raise ValueError(f"Both batches must be uint8 or both float in [0, 1], got {a.dtype} and {b.dtype}; "
                         f"convert one of them.")
    return a, b, (1.0 if a.dtype == np.uint8 else 255.0)


def resize_256(images: np.ndarray, size: int = EVAL_SIZE) -> np.ndarray:
    """uint8 images (N, H, W, 3) -> uint8 (N, size, size, 3) with PIL's bicubic resize (antialiased when shrinking,
    the protocol's reference). Images already at ``size`` are returned unchanged."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"resize_256 expects uint8 images (N, H, W, 3), got {images.dtype} {images.shape}; "
                         f"convert with to_uint8 first.")
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((images.shape[0], size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    return out


# -------------------------------------------------------------------------------------------- PSNR / SSIM
def psnr(x: ArrayLike, y: ArrayLike) -> np.ndarray:
    """Per-image PSNR in dB over [0, 255] of two batches (N, H, W, 3) (uint8, or float in [0, 1]) -> (N,) float64;
    +inf where the images are identical."""
    a, b, scale = _pair(x, y)
    if scale == 1.0:
        d = a.astype(np.int32) - b  # exact integer differences
        mse = (d * d).reshape(len(d), -1).mean(1)  # (N,)
    else:
        d = (a.astype(np.float64) - b) * scale
        mse = (d * d).reshape(len(d), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0 ** 2 / mse)


def ssim(x: ArrayLike, y: ArrayLike, batch_size: int = 16) -> np.ndarray:
    """Per-image SSIM of two batches (N, H, W, 3) (uint8, or float in [0, 1]) -> (N,) float64; the convention is
    skimage's Gaussian SSIM (module docstring), computed with the same scipy filter in float64."""
    a_all, b_all, scale = _pair(x, y)
    n, h, w = a_all.shape[:3]
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5: the window is 11 x 11
    if min(h, w) < 2 * radius + 1:
        raise ValueError(f"SSIM needs images of at least {2 * radius + 1}x{2 * radius + 1} pixels, got {h}x{w}.")
    c1, c2 = (SSIM_K1 * 255.0) ** 2, (SSIM_K2 * 255.0) ** 2
    sigma = (0.0, SSIM_SIGMA, SSIM_SIGMA, 0.0)  # filter H and W only: every image and channel on its own

    def blur(t: np.ndarray) -> np.ndarray:  # (B, H, W, 3) -> (B, H - 2r, W - 2r, 3), windows inside the image
        return gaussian_filter(t, sigma, truncate=SSIM_TRUNCATE, mode="reflect")[:, radius:-radius, radius:-radius]

    out = np.empty(n, dtype=np.float64)
    for s in range(0, n, batch_size):
        a = a_all[s:s + batch_size].astype(np.float64) * scale  # (B, H, W, 3) in [0, 255]
        b = b_all[s:s + batch_size].astype(np.float64) * scale
        mu_a, mu_b = blur(a), blur(b)
        var_a = blur(a * a) - mu_a * mu_a  # population (co)variances: use_sample_covariance=False
        var_b = blur(b * b) - mu_b * mu_b
        cov = blur(a * b) - mu_a * mu_b
        s_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
        out[s:s + batch_size] = s_map.mean(axis=(1, 2)).mean(1)  # per channel, then the channel mean
    return out


# ------------------------------------------------------------------------------------------- codebook
def code_counts(indices: ArrayLike, codebook_size: int) -> np.ndarray:
    """How often each code occurs in ``indices`` (any shape) -> (K,) int64. Indices outside [0, K) are an error."""
    idx = _as_numpy(indices).reshape(-1).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= codebook_size):
        raise ValueError(f"Code indices span [{idx.min()}, {idx.max()}], outside [0, {codebook_size}); "
                         f"check codebook_size ({codebook_size}) against the tokenizer's quantizer.codebook_size.")
    return np.bincount(idx, minlength=codebook_size).astype(np.int64)


def usage(counts: np.ndarray) -> float:
    """Fraction of the K codes used at least once, from :func:`code_counts`."""
    return float((np.asarray(counts) > 0).mean())


def entropy(counts: np.ndarray) -> float:
    """Shannon entropy in nats of the code frequencies, from :func:`code_counts` (0 for no codes, ``log K`` at most)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total == 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------------------------ accumulator
class ReconAccumulator:
    """Streams batches of (real uint8, reconstruction uint8, code indices) through the protocol.

    :meth:`update` resizes both to ``size`` (PIL bicubic), scores them, counts the codes and returns the resized
    arrays, which the caller feeds to the FID/IS extractor (``ideal_ray.eval.fid``). :meth:`result` gives
    ``{psnr, ssim, usage, entropy, max_entropy, psnr_exact, n}`` -- ``psnr`` is +inf when any image was
    reconstructed exactly, and ``psnr_exact`` says how many were.
    """

    def __init__(self, codebook_size: int, size: int = EVAL_SIZE):
        self.codebook_size = codebook_size
        self.size = size
        self.counts = np.zeros(codebook_size, dtype=np.int64)
        self._psnr: list = []
        self._ssim: list = []

    def update(self, real: np.ndarray, recon: np.ndarray,
               indices: Optional[ArrayLike] = None) -> Tuple[np.ndarray, np.ndarray]:
        """real, recon: uint8 (B, H, W, 3); indices: the codes of this batch, any shape (None: no codebook figures
        for it). Returns (real, recon) resized to uint8 (B, size, size, 3)."""
        if real.shape != recon.shape:
            raise ValueError(f"real {real.shape} and reconstructed {recon.shape} batches differ in shape; "
                             f"pass the reconstructions of exactly these images.")
        real_s, recon_s = resize_256(real, self.size), resize_256(recon, self.size)
        self._psnr.append(psnr(real_s, recon_s))
        self._ssim.append(ssim(real_s, recon_s))
        if indices is not None:
            self.counts += code_counts(indices, self.codebook_size)
        return real_s, recon_s

    @property
    def n(self) -> int:
        return int(sum(len(p) for p in self._psnr))

    def result(self) -> Dict[str, float]:
        if self.n == 0:
            raise ValueError("ReconAccumulator has no images; call update() with at least one batch first.")
        p, s = np.concatenate(self._psnr), np.concatenate(self._ssim)
        return {
            "psnr": float(p.mean()),
            "ssim": float(s.mean()),
            "usage": usage(self.counts),
            "entropy": entropy(self.counts),
            "max_entropy": math.log(self.codebook_size),
            "psnr_exact": int(np.isinf(p).sum()),
            "n": self.n,
        }


def protocol(size: int = EVAL_SIZE) -> Dict[str, object]:
    """How the numbers of :class:`ReconAccumulator` were made, to store next to them."""
    return {
        "resize": f"PIL Image.resize BICUBIC on uint8 to {size}x{size} (real and reconstruction)",
        "psnr": "per image over [0, 255], 10 log10(255^2 / MSE), then the mean; +inf for an exact image",
        "ssim": (f"per image: Gaussian window sigma {SSIM_SIGMA} truncated at {SSIM_TRUNCATE} sigma (11x11), "
                 f"K1 {SSIM_K1}, K2 {SSIM_K2}, population covariance, 5-px border cropped, channel mean "
                 f"(= skimage structural_similarity gaussian_weights=True, use_sample_covariance=False, "
                 f"data_range=255); then the mean"),
        "usage": "codes used at least once / codebook size",
        "entropy": "Shannon entropy of the code frequencies, nats",
    }
