"""jobs/sample.py and ideal_ray.pipelines.sample_local: tiny random GPT + tiny tokenizer, on CPU."""
import os

import numpy as np
import pytest
from PIL import Image

from conftest import random_sampling_models, ray_connected
from ideal_ray.config import ConfigError, RunConfig, SampleConfig, SampleJobConfig
from ideal_ray.pipelines.sample_local import GRID_COLUMNS, grid_image, sample_images, sample_seed

OUT = 16  # saved image size: small, the resize path is the same


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return random_sampling_models(tmp_path_factory.mktemp("ckpts"), num_classes=4)


def _cfg(**kw):
    base = dict(cfg_scale=2.0, per_class=3, batch_size=4, seed=7, out_size=OUT, top_k=50)
    base.update(kw)
    return SampleConfig(**base)


def _job(ckpts, out, classes=(), tracking_uri="", run=None, **kw):
    """The SampleJobConfig of a run on CPU; ``tracking_uri`` "" = no MLflow."""
    return SampleJobConfig(gpt=ckpts[0], tokenizer=ckpts[1], out=str(out), sample=_cfg(**kw), classes=tuple(classes),
                           run=run or RunConfig(in_process=True, device="cpu"), tracking_uri=tracking_uri)


def _run(ckpts, out, classes=(), tracking_uri="", **kw):
    return sample_images(_job(ckpts, out, classes, tracking_uri, **kw), log=lambda m: None)


def test_npz_grid_and_summary(ckpts, tmp_path):
    s = _run(ckpts, tmp_path / "a")
    with np.load(s["samples"]) as z:
        arr, labels = z["arr_0"], z["labels"]
    assert arr.shape == (12, OUT, OUT, 3) and arr.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    cols = min(GRID_COLUMNS, 3)
    with Image.open(s["grid"]) as im:
        assert im.size == (cols * OUT + (cols + 1) * 2, 4 * OUT + 5 * 2)
    assert s["num_images"] == 12 and s["images_per_s"] > 0
    assert not [f for f in os.listdir(tmp_path / "a") if f.startswith(".tmp")]


def test_seed_reproducible_and_subset_consistent(ckpts, tmp_path):
    a = _run(ckpts, tmp_path / "a")
    b = _run(ckpts, tmp_path / "b")
    c = _run(ckpts, tmp_path / "c", classes=[3, 1])
    with np.load(a["samples"]) as za, np.load(b["samples"]) as zb, np.load(c["samples"]) as zc:
        xa, xb, xc, lc = za["arr_0"], zb["arr_0"], zc["arr_0"], zc["labels"]
    np.testing.assert_array_equal(xa, xb)
    assert lc.tolist() == [3, 3, 3, 1, 1, 1]
    np.testing.assert_array_equal(xc[:3], xa[9:12])  # class 3 in both runs: same seeds -> same images
    np.testing.assert_array_equal(xc[3:], xa[3:6])  # class 1
    assert not np.array_equal(xa[0:3], xa[3:6])  # different classes/seeds differ


def test_refuses_to_overwrite(ckpts, tmp_path):
    _run(ckpts, tmp_path / "a", classes=[0], per_class=1)
    before = os.path.getmtime(tmp_path / "a" / "samples.npz")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        _run(ckpts, tmp_path / "a", classes=[0], per_class=1)
    assert os.path.getmtime(tmp_path / "a" / "samples.npz") == before


def test_bad_classes(ckpts, tmp_path):
    with pytest.raises(ValueError, match="outside"):
        _run(ckpts, tmp_path / "a", classes=[4])
    assert not (tmp_path / "a" / "samples.npz").exists()


def test_config_is_validated_before_any_work(ckpts, tmp_path):
    """sample_images starts with validate_stage: one sentence naming the key, nothing written."""
    with pytest.raises(ConfigError, match="classes=1,1 names a class twice"):
        _run(ckpts, tmp_path / "a", classes=[1, 1])
    with pytest.raises(ConfigError, match="sample.top_p=0.0 must be in"):
        _run(ckpts, tmp_path / "a", top_p=0.0)
    with pytest.raises(ConfigError, match="out is empty"):
        sample_images(_job(ckpts, ""), log=lambda m: None)
    assert not (tmp_path / "a").exists()


def test_grid_image_layout():
    imgs = np.stack([np.full((2, 2, 3), k, np.uint8) for k in range(6)])
    g = grid_image(imgs, 2, 3, pad=1)
    assert g.shape == (7, 10, 3)
    assert g[1, 1, 0] == 0 and g[4, 7, 0] == 5 and g[0, 0, 0] == 255
    assert sample_seed(1, 2, 3, 1) == 1_000_003 + 7


def test_mlflow_logs_grid(ckpts, tmp_path):
    from ideal_ray.tracking import find_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = _run(ckpts, tmp_path / "a", classes=[0, 2], per_class=2, tracking_uri=uri)
    (run,) = find_runs(uri, "ideal-sample")
    assert run["run_id"] == s["mlflow_run_id"] and run["status"] == "FINISHED"
    assert run["params"]["sample.cfg_scale"] == "2.0" and run["params"]["classes"] == "0,2"
    assert run["metrics"]["images_per_s"] > 0
    from mlflow import MlflowClient

    arts = [f.path for f in MlflowClient(uri).list_artifacts(s["mlflow_run_id"], "samples")]
    assert arts == ["samples/grid.png"]


def test_default_tracking_store_is_beside_the_samples(ckpts, tmp_path, monkeypatch):
    """tracking_uri None: $MLFLOW_TRACKING_URI, else <out>/mlflow.db."""
    from ideal_ray.tracking import find_runs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s = _run(ckpts, tmp_path / "a", classes=[1], per_class=1, tracking_uri=None)
    (run,) = find_runs(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", "ideal-sample")
    assert run["run_id"] == s["mlflow_run_id"] and run["params"]["classes"] == "1"


def test_cli(ckpts, tmp_path, capsys, monkeypatch):
    import json
    import sys

    from ideal_ray.tracking import find_runs

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from jobs.sample import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "cli"
    settings = ["classes=1,2", "sample.per_class=2", "sample.batch_size=4", f"sample.out_size={OUT}", "sample.seed=3",
                "sample.cfg_scale=2.0", "sample.top_k=50", "run.device=cpu"]
    rc = main(["--gpt", ckpts[0], "--tokenizer", ckpts[1], "--out", str(out), "--in-process", "--mlflow", *settings])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_images"] == 4 and summary["device"] == "cpu"
    (run,) = find_runs(f"sqlite:///{out / 'mlflow.db'}", "ideal-sample")  # --mlflow: the default store
    assert run["run_id"] == summary["mlflow_run_id"] and run["params"]["sample.per_class"] == "2"
    ref = _run(ckpts, tmp_path / "ref", classes=[1, 2], per_class=2, seed=3)  # the overrides are these settings
    with np.load(summary["samples"]) as a, np.load(ref["samples"]) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    with pytest.raises(SystemExit) as refused:  # the samples are there: refused, exit code 2, one sentence
        main(["--gpt", ckpts[0], "--tokenizer", ckpts[1], "--out", str(out), "--in-process", "run.device=cpu"])
    assert refused.value.code == 2 and "refusing to overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # a wrong value: refused before anything, naming the key
        main(["--gpt", ckpts[0], "--tokenizer", ckpts[1], "--out", str(tmp_path / "bad"), "sample.cfg_scale=-1"])
    assert refused.value.code == 2 and "sample.cfg_scale" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # the old flags are overrides now
        main(["--gpt", ckpts[0], "--tokenizer", ckpts[1], "--out", str(tmp_path / "bad"), "--per-class", "2"])
    assert refused.value.code == 2
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_ray_actor_pool_writes_the_same_samples(ckpts, tmp_path, ray_head):
    """Two sampler actors share the work; every (class, seed) image equals the in-process one."""
    from ideal_ray.pipelines.sample_ray import sample_images_ray

    with ray_connected(ray_head):
        ref = _run(ckpts, tmp_path / "local", classes=[0, 2, 3], batch_size=3)
        s = sample_images_ray(_job(ckpts, tmp_path / "ray", [0, 2, 3], f"sqlite:///{tmp_path / 'mlflow.db'}",
                                   run=RunConfig(device="cpu", num_actors=2), batch_size=3), log=lambda m: None)
        with pytest.raises(FileExistsError, match="refusing to overwrite"):
            sample_images_ray(_job(ckpts, tmp_path / "ray", run=RunConfig(device="cpu")), log=lambda m: None)
        with pytest.raises(ValueError, match="run.device=cuda:1 is not one of auto, cpu, cuda"):
            sample_images_ray(_job(ckpts, tmp_path / "other", run=RunConfig(device="cuda:1")), log=lambda m: None)
    assert (s["num_images"], s["num_samplers"], s["batch_size"]) == (9, 2, 3)
    a, b = np.load(ref["samples"]), np.load(s["samples"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    assert Image.open(s["grid"]).size == Image.open(ref["grid"]).size and s["mlflow_run_id"]
    assert not (tmp_path / "other").exists()
