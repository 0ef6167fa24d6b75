"""Zero-shot and linear-probe evaluation on the tiny tokenizer: the text side equals open_clip's zero-shot
classifier, towers made to agree score 100% and a shuffled assignment scores exactly its fixed points, the image
features are the public tokenizer/VFM calls, the paper path fails fast offline, and the probe separates
separable features but not random labels."""
from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ideal_ray.config import VFMConfig, load_config
from ideal_ray.data.synthetic import class_name, class_wnid, render_image
from ideal_ray.eval.semantics import (IMAGENET_TEMPLATES, PooledFeatures, ZeroShotHead, build_zero_shot_head,
                                      extract_pooled_features, linear_probe, per_class_top1, text_class_embeddings,
                                      topk_accuracy, zero_shot, zero_shot_class_names)
from ideal_ray.models.tokenizer import IdealTokenizer
from ideal_ray.models.vfm import build_zero_shot_model, get_tokenizer
from ideal_ray.weights import MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_thread")
K = 12  # classes (and, for the agreement tests, images: one per class)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def tok(cfg):
    torch.manual_seed(0)
    return IdealTokenizer(cfg.model).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """One synthetic image per class, (K, 3, 64, 64) in [-1, 1]."""
    x = np.stack([render_image(k, 64, np.random.default_rng(k)) for k in range(K)])  # (K, 64, 64, 3) uint8
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def feats(tok, images) -> PooledFeatures:
    labels = torch.arange(K)
    return extract_pooled_features(tok, [(images[:5], labels[:5]), (images[5:], labels[5:], "extra")])


def names(k: int = K):
    return [class_name(i) for i in range(k)]


# ------------------------------------------------------------------------------------------- features
def test_pooled_features_are_the_public_calls(tok, images, feats):
    assert feats.recon.shape == feats.vfm.shape == (K, tok.vfm.width)
    assert feats.labels.tolist() == list(range(K))
    with torch.no_grad():
        recon = tok.vfm.pool(tok.decode_features(tok.encode(images)))  # (K, C)
        vfm = tok.vfm.pool(tok.vfm(images)[1])
    torch.testing.assert_close(feats.recon, recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats.vfm, vfm, rtol=1e-5, atol=1e-5)
    mean = extract_pooled_features(tok, [(images[:3], torch.arange(3))], pool="mean")
    torch.testing.assert_close(mean.vfm, tok.vfm(images[:3])[1].mean(1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pool='map'"):  # the text tower lives in the MAP head's space
        zero_shot(ZeroShotHead(F.normalize(mean.vfm, dim=-1), 10.0), mean)


def test_batches_without_labels_are_refused(tok, images):
    with pytest.raises(ValueError, match="labels"):
        extract_pooled_features(tok, [images[:2]])


# ------------------------------------------------------------------------------------------ text side
def test_class_embeddings_equal_open_clip_zero_shot_classifier(cfg):
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    torch.manual_seed(1)
    model = build_zero_shot_model(cfg.model.vfm)
    tokenizer = get_tokenizer(cfg.model.vfm)
    ours = text_class_embeddings(model, tokenizer, names(5), classes_per_batch=2)  # batching must not matter
    theirs = build_zero_shot_classifier(model, tokenizer, names(5), IMAGENET_TEMPLATES, num_classes_per_batch=None)
    assert len(IMAGENET_TEMPLATES) == 80 and ours.shape == (5, cfg.model.vfm.width)
    torch.testing.assert_close(ours, theirs.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(5))


def test_tiny_head_offline(cfg, offline):
    torch.manual_seed(2)
    head = build_zero_shot_head(cfg.model.vfm, names(), templates=IMAGENET_TEMPLATES[:4])
    torch.manual_seed(2)
    model = build_zero_shot_model(cfg.model.vfm)
    expected = text_class_embeddings(model, get_tokenizer(cfg.model.vfm), names(), IMAGENET_TEMPLATES[:4])
    torch.testing.assert_close(head.class_embeddings, expected)
    assert head.logit_scale == pytest.approx(float(model.logit_scale.exp()))
    assert head.logit_bias == pytest.approx(-10.0)  # the tiny config's init_logit_bias, as SigLIP's
    assert head.protocol["templates"] == "4 custom templates" and head.protocol["classes"] == K
    assert "ideal-tiny-vit (random weights)" in head.protocol["text_tower"]


# -------------------------------------------------------------------------------------------- scoring
def test_agreeing_towers_score_100_percent(feats):
    for side in ("vfm", "recon"):  # class k's "text" embedding = image k's own pooled feature
        head = ZeroShotHead(F.normalize(getattr(feats, side), dim=-1), logit_scale=10.0, logit_bias=-10.0)
        res = zero_shot(head, feats)
        assert res[f"{side}_top1"] == 1.0 and res[f"{side}_top5"] == 1.0
        assert res["n"] == K and res["skipped"] == 0


def test_shuffled_towers_score_their_fixed_points(feats):
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(3))  # class j's embedding: image perm[j]
    head = ZeroShotHead(F.normalize(feats.vfm[perm], dim=-1), logit_scale=10.0)
    fixed = int((perm == torch.arange(K)).sum())
    assert zero_shot(head, feats)["vfm_top1"] == pytest.approx(fixed / K)
    assert fixed / K < 0.25  # near chance: a random permutation has 1 fixed point on average


def test_zero_shot_is_cosine_logits_topk(feats):
    g = torch.Generator().manual_seed(4)
    head = ZeroShotHead(F.normalize(torch.randn(K, feats.vfm.shape[1], generator=g), dim=-1), 7.0, -3.0)
    res = zero_shot(head, feats)
    for side in ("vfm", "recon"):
        x = getattr(feats, side)
        logits = F.normalize(x, dim=-1) @ head.class_embeddings.T * 7.0 - 3.0
        torch.testing.assert_close(head.logits(x), logits)
        top5 = logits.topk(5, dim=1).indices
        assert res[f"{side}_top1"] == pytest.approx(float((logits.argmax(1) == feats.labels).float().mean()))
        assert res[f"{side}_top5"] == pytest.approx(float((top5 == feats.labels[:, None]).any(1).float().mean()))


def test_rows_outside_the_head_are_skipped_and_counted(feats):
    head = ZeroShotHead(F.normalize(feats.vfm[:6], dim=-1), logit_scale=10.0)  # classes 0..5 only
    labels = feats.labels.clone()
    labels[0] = -1  # a row with an unknown label
    res = zero_shot(head, dataclasses.replace(feats, labels=labels))
    assert res["n"] == 5 and res["skipped"] == K - 5 and res["vfm_top1"] == 1.0


def test_topk_and_per_class_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 2, 1, 2])
    assert topk_accuracy(logits, labels, (1, 2, 5)) == {"top1": 0.5, "top2": 0.75, "top5": 1.0}
    per_class = per_class_top1(torch.cat([logits, torch.zeros(4, 1)], 1), labels)  # a 4th class with no rows
    assert per_class[:3].tolist() == [1.0, 0.0, 0.5] and torch.isnan(per_class[3])


def test_class_names():
    synthetic = [(class_wnid(i), class_name(i)) for i in range(3)]
    assert zero_shot_class_names(synthetic) == [class_name(i) for i in range(3)]
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    fake_imagenet = [("n01440764", "tench")] + [(f"n02{i:06d}", f"c{i}") for i in range(2, 1000)]
    fake_imagenet.append(("n15075141", "toilet tissue"))
    assert zero_shot_class_names(fake_imagenet) == list(IMAGENET_CLASSNAMES)


# ------------------------------------------------------------------------------------- paper, offline
def _fails_fast(exc_type, needles):
    # fast: nothing downloaded or retried (under `offline` a connection raises AssertionError)
    with pytest.raises(exc_type) as info:
        build_zero_shot_head(VFMConfig(), ["tench", "goldfish"])
    for needle in needles:
        assert needle in str(info.value)


def test_paper_head_without_tokenizer_file_fails_fast(offline):
    _fails_fast(MissingWeightsError, ["tokenizer.json", "timm/ViT-L-16-SigLIP2-384", "HF_HOME"])


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_paper_head_without_transformers_names_the_package(offline):
    repo = offline / "hf" / "hub" / "models--timm--ViT-L-16-SigLIP2-384"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "open_clip_config.json"):
        (repo / "snapshots" / commit / name).write_text("{}")
    _fails_fast(RuntimeError, ["transformers", "pip install transformers"])


# --------------------------------------------------------------------------------------- linear probe
def blobs(n_per_class: int, k: int, dim: int, seed: int, spread: float = 0.3):
    """Gaussian blobs around well-separated class centres: (k * n, dim) features, (k * n,) labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=torch.Generator().manual_seed(100)) * 3.0  # shared by every split
    y = torch.arange(k).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_probe_separates_separable_features():
    tx, ty = blobs(40, 4, 16, seed=0)
    ex, ey = blobs(25, 4, 16, seed=1)
    res = linear_probe(tx, ty, ex, ey, max_iter=50)
    assert res.top1 >= 0.99 and res.n_train == 160 and res.n_eval == 100 and res.skipped == 0
    assert set(res.val_top1) == {10.0 ** e for e in range(-6, 0)} and res.weight_decay in res.val_top1
    again = linear_probe(tx, ty, ex, ey, max_iter=50)
    assert again == res  # deterministic
    assert "L-BFGS" in res.protocol["classifier"] and "held-out" in res.protocol["weight_decay"]


def test_probe_cannot_learn_random_labels():
    g = torch.Generator().manual_seed(5)
    tx, ex = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    ty, ey = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (400,), generator=g)
    res = linear_probe(tx, ty, ex, ey, weight_decays=(1e-4, 1e-2), max_iter=50)
    assert res.top1 < 0.36  # chance is 0.25; 400 rows put 0.36 five standard deviations above it


def test_probe_skips_and_counts_bad_rows():
    tx, ty = blobs(20, 3, 8, seed=2)
    ex, ey = blobs(10, 3, 8, seed=3)
    tx[0, 0] = float("nan")
    ty[1] = -1
    ey[0] = 7  # not a class the probe knows (num_classes 3)
    res = linear_probe(tx, ty, ex, ey, num_classes=3, weight_decays=(1e-3,), max_iter=50)
    assert res.skipped == 3 and res.n_train == 58 and res.n_eval == 29 and res.top1 >= 0.99
    assert res.val_top1 == {} and res.weight_decay == 1e-3  # one decay: nothing to choose
