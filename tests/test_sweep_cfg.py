"""jobs/sweep_cfg.py + ideal_ray.tune.cfg_sweep on real local Ray Tune and a real MLflow SQLite store.

A tiny random GPT + tiny tokenizer, a 2-scale sweep run one trial at a time. The sweep is first interrupted for
real (SIGINT to the job after trial 1 finished, while trial 2 runs), then rerun with the same name in this process:
the restore must finish trial 2 without rerunning trial 1 (same child run, same output files), leaving two
FINISHED child runs under one parent; jobs/compare.py must then list both trials.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ctrl_c_reaches_it, random_sampling_models, ray_connected
from ideal_ray.checkpoint import CheckpointError
from ideal_ray.io import SettingsChangedError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALES = ("1.0", "2.0")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fid_inception):
    from ideal_ray.data.synthetic import make_synthetic_imagenet

    d = tmp_path_factory.mktemp("sweep")
    gpt_path, tok_path = random_sampling_models(d, num_classes=2)
    make_synthetic_imagenet(str(d / "data"), num_classes=2, train_per_class=3, val_per_class=4, size=40, seed=1)
    return {"dir": d, "gpt": gpt_path, "tok": tok_path, "ref": str(d / "data" / "val"), "data": str(d / "data"),
            "storage": str(d / "sweeps"), "cache": str(d / "refs")}


def _overrides(setup):
    """Every run's settings beyond the paths: 3 images per class, CPU trials one at a time, class accuracy."""
    return ["sample.per_class=3", "sample.batch_size=6", "sample.out_size=32", f"fid.cache_dir={setup['cache']}",
            "max_concurrent_trials=1", f"classifier.data={setup['data']}", "gpus_per_trial=0", "verbose=0"]


def _cfg(setup, name, storage, scales=SCALES, gpt=None, tok=None, **fields):
    """The sweep's CfgSweepConfig as jobs/sweep_cfg.py builds it (preset paper, the same overrides), then ``fields``
    replaced (values the config would refuse reach sweep_cfg this way)."""
    from ideal_ray.config import CfgSweepConfig, load_stage_config

    cfg = load_stage_config(CfgSweepConfig, "paper", [
        f"gpt={gpt or setup['gpt']}", f"tokenizer={tok or setup['tok']}", f"reference={setup['ref']}", f"name={name}",
        f"storage_path={storage}", f"cfg_scales={','.join(scales)}", *_overrides(setup)])
    return dataclasses.replace(cfg, **fields)


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _children(uri, parent):
    from ideal_ray.tune.common import child_runs

    return child_runs(uri, parent)


@pytest.fixture(scope="module")
def interrupted(setup):
    """Run the job in a subprocess; SIGINT it once trial 1's child run is FINISHED and trial 2's is RUNNING."""
    name = "cfg"
    cmd = [sys.executable, os.path.join(REPO, "jobs", "sweep_cfg.py"), "--gpt", setup["gpt"], "--tokenizer",
           setup["tok"], "--reference", setup["ref"], "--name", name, "--storage-path", setup["storage"],
           "--cfg-scales", ",".join(SCALES), *_overrides(setup)]
    path = os.path.join(setup["storage"], name)
    uri = f"sqlite:///{path}/mlflow.db"
    env = dict(os.environ, MLFLOW_TRACKING_URI="")
    logf = open(setup["dir"] / "interrupted.log", "w")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            preexec_fn=ctrl_c_reaches_it)
    seen = None
    t0 = time.time()
    try:  # waits for an event; the 30-minute limit only guards against a hang (a trial takes ~20 s)
        while time.time() - t0 < 1800 and proc.poll() is None:
            time.sleep(0.2)
            # open the store only once trial 1 has written its results: by then the job has created the tables
            # (two processes creating them at once break MLflow's migration)
            done = os.path.join(path, "trial_outputs")
            if not (os.path.isdir(done) and any(os.path.exists(os.path.join(done, k, "eval", "result.json"))
                                                for k in os.listdir(done))):
                continue
            try:
                runs = [r for r in _client(uri).search_runs(["1"]) if "mlflow.parentRunId" in r.data.tags]
            except Exception:  # the job is still creating the tables
                continue
            if sorted(r.info.status for r in runs) == ["FINISHED", "RUNNING"]:
                seen = {r.info.status: r for r in runs}
                proc.send_signal(signal.SIGINT)
                break
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        logf.close()
    log = (setup["dir"] / "interrupted.log").read_text()
    assert seen is not None, (f"the job never had one finished and one running trial (waited {time.time() - t0:.0f} s "
                              f"for trial 1's result.json and both child runs):\n{log[-3000:]}")
    first = seen["FINISHED"]
    key = f"cfg_scale={float(first.data.params['cfg_scale']):g}"
    outputs = os.path.join(path, "trial_outputs", key)
    stamps = {f: os.stat(os.path.join(outputs, f)).st_mtime_ns for f in ("samples.npz", "eval/result.json")}
    return {"name": name, "path": path, "uri": uri, "rc": rc, "log": log, "first": first, "outputs": outputs,
            "stamps": stamps, "parent": first.data.tags["mlflow.parentRunId"]}


@pytest.fixture(scope="module")
def ray_local(interrupted, ray_head):
    with ray_connected(ray_head) as ray:
        yield ray


@pytest.fixture(scope="module")
def resumed(setup, interrupted, ray_local):
    from ideal_ray.tune.cfg_sweep import sweep_cfg

    before = os.environ.get("MLFLOW_TRACKING_URI")
    out = sweep_cfg(_cfg(setup, interrupted["name"], setup["storage"], tracking_uri=interrupted["uri"]),
                    log=lambda m: None)
    # Ray's MLflow logger sets $MLFLOW_TRACKING_URI in this process; the sweep must not leak it to later runs
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    return out


def test_interrupt_leaves_a_resumable_sweep(interrupted):
    assert interrupted["rc"] == 130, interrupted["log"][-3000:]  # the job says: interrupted, not every trial finished
    assert "rerun the same command to resume" in interrupted["log"]
    parent = _client(interrupted["uri"]).get_run(interrupted["parent"])
    assert parent.info.status == "KILLED"
    with open(os.path.join(interrupted["path"], "sweep.json")) as f:
        settings = json.load(f)
    assert settings["grid"] == {"cfg_scale": [1.0, 2.0]}
    # the fixed sampling settings: the overrides given, the rest at SampleConfig's defaults (not recorded)
    assert settings["sample"] == {"per_class": 3, "batch_size": 6, "seed": 0, "out_size": 32, "top_p": 1.0}
    assert settings["classifier"]["per_class"] == 50 and settings["classes"] is None


def test_restore_finishes_the_sweep_without_rerunning_finished_trials(interrupted, resumed):
    assert resumed["parent_run_id"] == interrupted["parent"]
    assert (resumed["finished"], resumed["errored"], resumed["unfinished"]) == (2, 0, 0)
    children = _children(interrupted["uri"], interrupted["parent"])
    assert len(children) == 2  # one child per trial: the resumed trial logged into its own run again
    assert all(c["status"] == "FINISHED" for c in children)
    assert sorted(c["params"]["cfg_scale"] for c in children) == list(SCALES)
    assert all(math.isfinite(c["metrics"]["gfid"]) and "sfid" in c["metrics"] for c in children)
    for c in children:  # the class accuracy of the trial's samples, with its chance level (2 classes)
        assert 0.0 <= c["metrics"]["class_accuracy"] <= 1.0 and c["metrics"]["class_chance"] == 0.5
    first = next(c for c in children if c["run_id"] == interrupted["first"].info.run_id)
    assert first["metrics"]["gfid"] == interrupted["first"].data.metrics["gfid"]
    for f, stamp in interrupted["stamps"].items():  # trial 1 was not sampled or evaluated again
        assert os.stat(os.path.join(interrupted["outputs"], f)).st_mtime_ns == stamp
    parent = _client(interrupted["uri"]).get_run(interrupted["parent"])
    assert parent.info.status == "FINISHED"


def test_report_best_table_and_plots(interrupted, resumed):
    children = _children(interrupted["uri"], interrupted["parent"])
    best = min(children, key=lambda c: c["metrics"]["gfid"])
    assert resumed["best"]["run_id"] == best["run_id"]
    assert resumed["best"]["config"] == {"cfg_scale": best["params"]["cfg_scale"]}
    lines = resumed["table"].splitlines()
    assert lines[0].startswith("| run | cfg_scale | gfid") and "class_accuracy" in lines[0]
    assert "class_accuracy" in resumed["best"]["metrics"] and resumed["best"]["metrics"]["class_chance"] == 0.5
    assert best["run_name"] in lines[2]  # sorted by gFID, best first
    for key in ("table_md", "table_csv", "fid_vs_cfg", "best"):
        assert os.path.getsize(resumed["files"][key]) > 0
    # the Inception weights installed here have no logits: precision vs recall stands in for IS vs FID
    assert "is_vs_fid" in resumed["files"] or "precision_vs_recall" in resumed["files"]
    arts = {a.path for a in _client(interrupted["uri"]).list_artifacts(interrupted["parent"], "sweep")}
    assert {"sweep/cfg_table.md", "sweep/cfg_table.csv", "sweep/fid_vs_cfg.png", "sweep/best.json"} <= arts


def test_compare_cli_lists_every_trial(interrupted, resumed, tmp_path, capsys):
    sys.path.insert(0, REPO)
    from jobs.compare import main

    assert main(["--sweep", interrupted["path"], "--out", str(tmp_path), "--sort-by", "gfid"]) == 0
    out = capsys.readouterr().out
    children = _children(interrupted["uri"], interrupted["parent"])
    md = (tmp_path / "comparison.md").read_text()
    csv_text = (tmp_path / "comparison.csv").read_text()
    for c in children:
        assert c["run_name"] in out and c["run_name"] in md and c["run_name"] in csv_text
    assert csv_text.splitlines()[0].split(",")[:3] == ["run", "cfg_scale", "gfid"]
    assert "time_total_s" not in csv_text and "config/" not in csv_text  # Tune's bookkeeping is not compared
    assert (tmp_path / "comparison.png").stat().st_size > 0


def test_official_checkpoints_sweep_to_the_same_result(setup, interrupted, resumed, tmp_path):
    """The sweep over LlamaGen's GPT file (no args: its grid comes from the tokenizer) and the authors' release
    tokenizer file holding the same weights gives the trial the exports gave: the same samples, the same gFID."""
    import numpy as np
    import torch

    from conftest import release_layout
    from ideal_ray.checkpoint import load_gpt, load_tokenizer
    from ideal_ray.checkpoint import to_llamagen_state_dict
    from ideal_ray.tune.cfg_sweep import sweep_cfg

    gpt, tok = str(tmp_path / "c2i.pt"), str(tmp_path / "ideal_tokenizer.pth")
    torch.save({"model": to_llamagen_state_dict(load_gpt(setup["gpt"]).state_dict())}, gpt)
    torch.save({"model": release_layout(load_tokenizer(setup["tok"]))}, tok)
    out = sweep_cfg(_cfg(setup, "official", str(tmp_path), SCALES[1:], gpt=gpt, tok=tok,
                         tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), log=lambda m: None)
    assert (out["finished"], out["errored"]) == (1, 0)
    ours = next(c for c in _children(interrupted["uri"], interrupted["parent"])
                if c["params"]["cfg_scale"] == SCALES[1])
    assert out["best"]["metrics"]["gfid"] == pytest.approx(ours["metrics"]["gfid"], rel=1e-6)
    key = f"cfg_scale={float(SCALES[1]):g}"
    a = np.load(os.path.join(interrupted["path"], "trial_outputs", key, "samples.npz"))
    b = np.load(os.path.join(str(tmp_path), "official", "trial_outputs", key, "samples.npz"))
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_changed_settings_and_bad_input_are_refused_before_ray_work(setup, interrupted, resumed):
    from ideal_ray.config import ConfigError
    from ideal_ray.tune.cfg_sweep import sweep_cfg

    def run(name=interrupted["name"], scales=SCALES, **fields):
        return sweep_cfg(_cfg(setup, name, setup["storage"], scales, tracking_uri=interrupted["uri"], **fields),
                         log=lambda m: None)

    base = _cfg(setup, "other", setup["storage"])
    with pytest.raises(SettingsChangedError, match="already exists at .* with a different grid"):
        run(scales=("1.0", "3.0"))
    with pytest.raises(SettingsChangedError, match="already exists at .* with a different sample"):
        run(sample=dataclasses.replace(base.sample, temperature=0.9))  # a fixed sampling setting changed
    with pytest.raises(ConfigError, match="cfg_scales is empty"):  # sweep_cfg validates its config first
        run(name="other", cfg_scales=())
    with pytest.raises(ValueError, match="lists a value twice"):
        run(name="other", scales=("1.5", "1.5"))
    with pytest.raises(ConfigError, match="temperature"):
        run(name="other", temperatures=(-1.0,))
    with pytest.raises(ConfigError, match="cfg_intervals=0.5 must be start,end pairs"):
        run(name="other", cfg_intervals=(0.5,))
    with pytest.raises(ConfigError, match="precision=bf16 runs on CUDA only"):  # the trials sample on CPU
        run(name="other", precision="bf16")
    with pytest.raises(CheckpointError, match="No GPT file at .*missing.pt"):
        run(name="other", gpt=str(setup["dir"] / "missing.pt"))
    with pytest.raises(ValueError, match="outside"):
        run(name="other", classes=(5,))
    with pytest.raises(FileNotFoundError, match="class accuracy needs labelled real images"):
        run(name="other", classifier=dataclasses.replace(base.classifier, split="test"))
    assert not os.path.exists(os.path.join(setup["storage"], "other"))
    assert len(_children(interrupted["uri"], interrupted["parent"])) == 2


def test_fixed_sample_and_the_swept_grid(setup):
    """Every trial keeps cfg.sample's values but the swept ones; sweep.json records a non-swept value only when it
    is not SampleConfig's default (so sweeps at the defaults keep their record)."""
    from ray import tune

    from ideal_ray.tune.cfg_sweep import fixed_sample, param_space

    cfg = _cfg(setup, "x", setup["storage"], sample=dataclasses.replace(
        _cfg(setup, "x", setup["storage"]).sample, temperature=0.9, top_k=7, cfg_interval=(0.5, 1.0)))
    assert fixed_sample(cfg) == {"per_class": 3, "batch_size": 6, "seed": 0, "out_size": 32, "top_p": 1.0,
                                 "temperature": 0.9, "top_k": 7, "cfg_interval": (0.5, 1.0)}
    swept = dataclasses.replace(cfg, top_ks=(0, 100), cfg_intervals=(0.0, 1.0, 0.5, 1.0))
    assert "top_k" not in fixed_sample(swept) and "cfg_interval" not in fixed_sample(swept)
    space = param_space([1.0], [(0.0, 1.0), (0.5, 1.0)], None, [0, 100])
    assert space["cfg_interval"] == tune.grid_search([[0.0, 1.0], [0.5, 1.0]])
    assert space["top_k"] == tune.grid_search([0, 100]) and "temperature" not in space


def test_job_cfg_scales_take_ranges(capsys):
    sys.path.insert(0, REPO)
    from jobs.sweep_cfg import main, scales

    assert scales("1.0:2.0:0.25") == "1,1.25,1.5,1.75,2"
    assert scales("1.0, 1.75,0.1:0.3:0.1") == "1,1.75,0.1,0.2,0.3"
    with pytest.raises(SystemExit) as refused:
        main(["--cfg-scales", "3:1:0.5"])
    assert refused.value.code == 2 and "needs STEP > 0 and STOP >= START" in capsys.readouterr().err
