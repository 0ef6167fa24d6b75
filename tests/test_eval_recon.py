"""Reconstruction metrics against hand-computed values: PSNR of identical images and of a constant offset, SSIM
against a direct numpy evaluation of its formula, codebook usage/entropy of known index sets, the protocol's
PIL bicubic resize, and the streaming accumulator."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ideal_ray.eval.recon import (ReconAccumulator, code_counts, entropy, psnr, resize_256, ssim, to_uint8,
                                  usage)


def rand_images(n=2, h=24, w=21, lo=0, hi=256, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, (n, h, w, 3), dtype=np.uint8)


def noisy(x: np.ndarray, amp: int, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-amp, amp + 1, x.shape)
    return np.clip(x.astype(np.int64) + noise, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- PSNR
def test_psnr_identical_images_is_inf_without_warnings():
    x = rand_images()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = psnr(x, x)
        pf = psnr(x / 255.0, x / 255.0)
    assert p.shape == (2,) and np.isposinf(p).all() and np.isposinf(pf).all()


@pytest.mark.parametrize("d", [1, 5, 17])
def test_psnr_constant_offset(d):
    x = rand_images(hi=256 - d)  # room for +d without clipping
    y = x + np.uint8(d)
    expected = 20 * math.log10(255 / d)
    np.testing.assert_allclose(psnr(x, y), expected, rtol=1e-12)
    np.testing.assert_allclose(psnr(y, x), expected, rtol=1e-12)
    np.testing.assert_allclose(psnr(x / 255.0, y / 255.0), expected, rtol=1e-12)  # float [0, 1], same numbers


def test_psnr_is_per_image():
    x = np.zeros((2, 4, 4, 3), np.uint8)
    y = x.copy()
    y[1, 0, 0, 0] = 255  # one channel of one pixel off by 255: MSE = 255^2 / 48
    p = psnr(x, y)
    assert np.isposinf(p[0])
    assert p[1] == pytest.approx(10 * math.log10(48))


def test_mismatched_inputs_are_rejected():
    x = rand_images()
    with pytest.raises(ValueError, match="both float"):
        psnr(x, x / 255.0)
    with pytest.raises(ValueError, match="one shape"):
        ssim(x, x[:1])


# ----------------------------------------------------------------------------------------------- SSIM
def ssim_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """The SSIM formula written out, window by window: 11x11 Gaussian (sigma 1.5), population statistics,
    C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, mean over the positions whose window fits, then over channels."""
    t = np.arange(-5, 6)
    g = np.exp(-t ** 2 / (2 * 1.5 ** 2))
    win = np.outer(g, g) / np.outer(g, g).sum()  # (11, 11)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    h, w, _ = x.shape
    per_channel = []
    for c in range(3):
        a, b = x[..., c].astype(np.float64), y[..., c].astype(np.float64)
        vals = []
        for i in range(h - 10):
            for j in range(w - 10):
                pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
                ma, mb = (win * pa).sum(), (win * pb).sum()
                va, vb = (win * (pa - ma) ** 2).sum(), (win * (pb - mb) ** 2).sum()
                cov = (win * (pa - ma) * (pb - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def test_ssim_matches_the_formula():
    x = rand_images(n=2, h=19, w=16, seed=3)
    y = noisy(x, 60)
    got = ssim(x, y)
    assert got.shape == (2,)
    expected = [ssim_numpy(a, b) for a, b in zip(x, y)]
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ssim(x / 255.0, y / 255.0), expected, rtol=1e-10, atol=1e-12)


def test_ssim_identical_is_one_and_falls_with_noise():
    x = rand_images(n=1, h=32, w=32, seed=4)
    np.testing.assert_allclose(ssim(x, x), 1.0, rtol=0, atol=1e-12)
    values = [float(ssim(x, noisy(x, amp))[0]) for amp in (4, 16, 64)]
    assert 1.0 > values[0] > values[1] > values[2]


def test_ssim_rejects_images_smaller_than_the_window():
    x = rand_images(h=10, w=30)
    with pytest.raises(ValueError, match="11x11"):
        ssim(x, x)


# ------------------------------------------------------------------------------------------- codebook
def test_usage_and_entropy_of_known_index_sets():
    counts = code_counts(torch.tensor([[0, 1], [1, 3]]), 8)
    assert counts.tolist() == [1, 2, 0, 1, 0, 0, 0, 0]
    assert usage(counts) == 3 / 8
    assert entropy(counts) == pytest.approx(1.5 * math.log(2))  # p = (1/4, 1/2, 1/4)

    uniform = code_counts(np.tile(np.arange(16), 3), 16)
    assert usage(uniform) == 1.0 and entropy(uniform) == pytest.approx(math.log(16))
    single = code_counts(np.full(100, 5), 16)
    assert usage(single) == 1 / 16 and entropy(single) == 0.0
    assert entropy(code_counts(np.array([], dtype=np.int64), 4)) == 0.0


def test_out_of_range_codes_are_an_error():
    with pytest.raises(ValueError, match="outside"):
        code_counts(np.array([0, 8]), 8)


# ------------------------------------------------------------------------------------- resize, uint8
def test_resize_256_is_pil_bicubic():
    x = rand_images(n=2, h=384, w=384, seed=5)
    out = resize_256(x)
    assert out.shape == (2, 256, 256, 3) and out.dtype == np.uint8
    for a, b in zip(x, out):
        np.testing.assert_array_equal(b, np.asarray(Image.fromarray(a).resize((256, 256), Image.BICUBIC)))
    assert resize_256(out) is out  # already at the protocol size: untouched
    with pytest.raises(ValueError, match="uint8"):
        resize_256(x / 255.0)


def test_to_uint8_maps_minus_one_one_to_0_255():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, 1.0 - 4 / 255]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = to_uint8(x)
    assert out.shape == (1, 1, 6, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 253]


# ---------------------------------------------------------------------------------------- accumulator
def test_accumulator_streams_the_protocol():
    acc = ReconAccumulator(codebook_size=8)
    reals, recons, all_idx = [], [], []
    for seed in range(2):
        real = rand_images(n=2, h=300, w=300, seed=seed)
        recon = noisy(real, 30, seed=seed + 10)
        idx = np.random.default_rng(seed).integers(0, 4, (2, 3, 3))
        r256, c256 = acc.update(real, recon, idx)
        assert r256.shape == c256.shape == (2, 256, 256, 3) and r256.dtype == np.uint8
        np.testing.assert_array_equal(r256, resize_256(real))
        reals.append(r256), recons.append(c256), all_idx.append(idx)
    res = acc.result()
    real, recon = np.concatenate(reals), np.concatenate(recons)
    counts = code_counts(np.concatenate(all_idx), 8)
    assert res["n"] == 4 and res["psnr_exact"] == 0
    assert res["psnr"] == pytest.approx(psnr(real, recon).mean())
    assert res["ssim"] == pytest.approx(ssim(real, recon).mean())
    assert res["usage"] == usage(counts) <= 0.5 and res["entropy"] == pytest.approx(entropy(counts))
    assert res["max_entropy"] == pytest.approx(math.log(8))


def test_accumulator_exact_reconstruction_and_errors():
    acc = ReconAccumulator(codebook_size=4, size=32)
    with pytest.raises(ValueError, match="no images"):
        acc.result()
    x = rand_images(n=3, h=32, w=32)
    acc.update(x, x, None)  # no indices: PSNR/SSIM only
    res = acc.result()
    assert math.isinf(res["psnr"]) and res["psnr_exact"] == 3 and res["ssim"] == pytest.approx(1.0)
    assert res["usage"] == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        acc.update(x, x[:2])
