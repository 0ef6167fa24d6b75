"""Class accuracy of samples (ideal_ray.eval.class_accuracy through evaluate_gen and jobs/evaluate.py gen).

The real FID Inception network on a tiny synthetic set (3 classes). Known answers: a classifier fitted on real train
images scores the real val images far above chance; a "samples" file made of real val images with their own labels
scores high, the same images with every label moved to another class score at or below chance; the classifier is
cached beside the reference statistics and reused; bad input stops with one clear error.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64


# ------------------------------------------------------------------------------------------ no network needed
def test_select_per_class_takes_evenly_spaced_items_of_every_class():
    from ideal_ray.eval.class_accuracy import select_per_class

    labels = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
    assert select_per_class(labels, 2).tolist() == [0, 4, 5, 6, 7, 9]
    assert select_per_class(labels, 0).tolist() == list(range(10))  # 0 = every image
    assert select_per_class(labels, 9).tolist() == list(range(10))  # a class with fewer images gives all it has
    with pytest.raises(ValueError, match="per_class"):
        select_per_class(labels, -1)


def test_fitted_classifier_round_trips_through_arrays():
    from ideal_ray.eval.probe import LinearClassifier, fit_linear_classifier

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 3
    y = torch.arange(3).repeat_interleave(10)
    x = centres[y] + 0.3 * torch.randn(30, 8, generator=g)
    clf = fit_linear_classifier(x, y, num_classes=3, max_iter=50)
    again = LinearClassifier.from_arrays(clf.to_arrays(), clf.protocol)
    assert torch.equal(clf.predict(x), again.predict(x)) and (clf.predict(x) == y).all()
    assert again.val_top1 == clf.val_top1 and again.weight_decay == clf.weight_decay and again.num_classes == 3


def test_convnet_learns_real_images_and_round_trips_through_arrays():
    from ideal_ray.data.synthetic import render_image
    from ideal_ray.eval.convnet import ConvClassifier, fit_conv_classifier

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    images = np.stack([render_image(int(k), 20, rng) for k in labels])  # (30, 20, 20, 3): size 16 * 5 / 4
    clf = fit_conv_classifier(images, labels, 3, 16, epochs=15)
    assert clf.real_top1 is not None and clf.n_train == 24  # a seeded fifth of each class held out and scored
    crops = images[:, 2:18, 2:18]
    assert np.mean(clf.predict(crops) == labels) >= 0.9  # chance is 1/3
    again = ConvClassifier.from_arrays(clf.to_arrays(), 3, clf.protocol)
    assert np.array_equal(again.predict(crops), clf.predict(crops)) and again.real_top1 == clf.real_top1
    same = fit_conv_classifier(images, labels, 3, 16, epochs=15)
    assert np.array_equal(same.predict(crops), clf.predict(crops))  # seeded: the same fit twice
    big = np.repeat(np.repeat(crops, 4, axis=1), 4, axis=2)  # the same images at 64 px: resized back to 16
    assert np.mean(clf.predict(big) == labels) >= 0.9
    with pytest.raises(ValueError, match="uint8 RGB images"):
        clf.predict(crops[..., :1])
    with pytest.raises(ValueError, match="20x20"):
        fit_conv_classifier(crops, labels, 3, 16)


# ------------------------------------------------------------------------------------------ the real network
@pytest.fixture(scope="module")
def setup(tmp_path_factory, fid_inception):
    from ideal_ray.data.synthetic import make_synthetic_imagenet
    from ideal_ray.eval.reference import ImageFolderReference

    base = tmp_path_factory.mktemp("class_acc")
    root = base / "data"
    make_synthetic_imagenet(root, num_classes=3, train_per_class=6, val_per_class=4, size=SIZE, seed=3)
    val = np.concatenate(list(ImageFolderReference(str(root / "val"), crop=SIZE, size=SIZE).batches(50)))
    labels = np.repeat(np.arange(3), 4)  # the folder reference lists the val images class folder by class folder
    return {"base": base, "root": str(root), "val_dir": str(root / "val"), "val": val, "labels": labels,
            "cache": str(base / "cache")}


def _samples(setup, name, images, **arrays):
    path = setup["base"] / f"{name}.npz"
    np.savez(path, arr_0=images, **arrays)
    return str(path)


def _gen(setup, npz, out, **classifier):
    """evaluate_gen on CPU with the classifier settings ``classifier`` (ClassifierConfig fields; data: the set)."""
    from ideal_ray.config import ClassifierConfig, FIDConfig, GenEvalConfig
    from ideal_ray.pipelines.evaluate import evaluate_gen

    classifier.setdefault("data", setup["root"])
    cfg = GenEvalConfig(samples=npz, reference=setup["val_dir"], out=str(setup["base"] / out), device="cpu",
                        fid=FIDConfig(cache_dir=setup["cache"]), classifier=ClassifierConfig(**classifier),
                        tracking_uri="")
    return evaluate_gen(cfg, log_fn=lambda m: None)


def test_classifier_fitted_on_real_train_images_scores_real_val_far_above_chance(setup):
    from ideal_ray.eval import class_accuracy as ca
    from ideal_ray.eval.fid import features
    from ideal_ray.eval.inception import load_inception

    ext = load_inception()
    clf = ca.real_classifier(ca.classifier_data(setup["root"], "train", 0), SIZE, ext, str(setup["base"] / "c0"))
    assert not clf.from_cache and clf.num_classes == 3 and clf.protocol["real_images"]["num_images"] == 18
    res = ca.class_accuracy(clf, features(setup["val"], extractor=ext)["pool"], setup["labels"])
    assert res["class_chance"] == pytest.approx(1 / 3)
    assert res["class_accuracy"] >= 0.9  # chance is 1/3
    assert set(res["class_accuracy_per_class"]) == {"0", "1", "2"}
    again = ca.real_classifier(ca.classifier_data(setup["root"], "train", 0), SIZE, ext, str(setup["base"] / "c0"))
    assert again.from_cache and again.path == clf.path
    assert np.array_equal(again.classifier.w.numpy(), clf.classifier.w.numpy())


def test_real_images_with_their_labels_score_high_and_moved_labels_do_not(setup):
    right = _gen(setup, _samples(setup, "right", setup["val"], labels=setup["labels"]), "g-right", per_class=4)
    moved = _gen(setup, _samples(setup, "moved", setup["val"], labels=(setup["labels"] + 1) % 3), "g-moved",
                 per_class=4)
    assert right["class_accuracy"] >= 0.9 and right["class_chance"] == pytest.approx(1 / 3)
    assert moved["class_accuracy"] <= 1 / 3  # every label is another class: at most what the classifier gets wrong
    assert right["gfid"] == pytest.approx(moved["gfid"], abs=1e-4)  # the labels change nothing else
    saved = json.load(open(os.path.join(right["out_dir"], "result.json")))
    assert saved["class_accuracy"] == right["class_accuracy"]
    proto = saved["protocol"]["class_accuracy"]
    assert proto["classifier_cache"] == "computed" and proto["real_images"]["num_images"] == 12
    assert proto["real_images"]["selection"] == "4 evenly spaced images per class"
    assert "real images only" in proto["metric"]
    assert json.load(open(os.path.join(moved["out_dir"], "result.json")))["protocol"]["class_accuracy"][
        "classifier_cache"] == "reused"
    off = _gen(setup, _samples(setup, "nolabels", setup["val"]), "g-off", data="")
    assert "class_accuracy" not in off and off["protocol"]["class_accuracy"].startswith("off")


def test_cli_reports_class_accuracy(setup, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_job", os.path.join(os.path.dirname(__file__), "..",
                                                                               "jobs", "evaluate.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    npz = _samples(setup, "cli", setup["val"], labels=setup["labels"])
    assert job.main(["gen", "--samples", npz, "--reference", setup["val_dir"], "--out", str(setup["base"] / "cli"),
                     f"classifier.data={setup['root']}", "classifier.per_class=4", f"fid.cache_dir={setup['cache']}",
                     "tracking_uri=", "device=cpu"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["class_accuracy"] >= 0.9 and shown["class_chance"] == pytest.approx(1 / 3)


def test_cnn_classifier_scores_real_images_high_and_moved_labels_low(setup):
    right = _gen(setup, _samples(setup, "cnn-right", setup["val"], labels=setup["labels"]), "g-cnn-right",
                 per_class=0, kind="cnn")
    moved = _gen(setup, _samples(setup, "cnn-moved", setup["val"], labels=(setup["labels"] + 1) % 3), "g-cnn-moved",
                 per_class=0, kind="cnn")
    assert right["class_accuracy"] >= 0.9 and moved["class_accuracy"] <= 1 / 3
    proto = json.load(open(os.path.join(right["out_dir"], "result.json")))["protocol"]["class_accuracy"]
    assert proto["classifier_kind"] == "cnn" and proto["classifier_cache"] == "computed"
    assert "convnet" in proto["metric"] and proto["real_images"]["num_images"] == 18
    assert json.load(open(os.path.join(moved["out_dir"], "result.json")))["protocol"]["class_accuracy"][
        "classifier_cache"] == "reused"
    with pytest.raises(ValueError, match="classifier.kind 'svm' is unknown"):  # validate_stage, before any work
        _gen(setup, _samples(setup, "cnn-bad", setup["val"], labels=setup["labels"]), "b-cnn", kind="svm")
    assert not os.path.exists(setup["base"] / "b-cnn")


def test_bad_input_gets_one_clear_error(setup, tmp_path):
    good = _samples(setup, "bad-good", setup["val"], labels=setup["labels"])
    with pytest.raises(FileNotFoundError, match="class accuracy needs labelled real images"):
        _gen(setup, good, "b1", data=str(tmp_path))  # no train split there
    with pytest.raises(FileNotFoundError, match="class accuracy needs labelled real images"):
        _gen(setup, good, "b2", split="test")
    with pytest.raises(ValueError, match="has no labels"):
        _gen(setup, _samples(setup, "bad-nolabels", setup["val"]), "b3")
    with pytest.raises(ValueError, match=r"labels \[3, 7\] outside the 3 classes"):
        _gen(setup, _samples(setup, "bad-range", setup["val"], labels=np.array([0, 1, 2, 3] * 2 + [7] * 4)), "b4")
    with pytest.raises(ValueError, match="one integer class id per image"):
        _gen(setup, _samples(setup, "bad-shape", setup["val"], labels=np.zeros(5, np.int64)), "b5")
    assert not any(os.path.exists(setup["base"] / f"b{i}") for i in range(1, 6))  # refused before any output
