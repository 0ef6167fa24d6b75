"""Ablation sweeps (ideal_ray.tune.ablation and its trial, ideal_ray.tune.ablation_trial; jobs/sweep_ablation.py) on
real local Ray, Ray Train + DeepSpeed and MLflow SQLite, tiny preset; a sweep's settings are an
``AblationSweepConfig``.

Planning properties and the job's settings are checked without Ray. The slow test runs a 2-trial fusion ablation
through the CLI, interrupts it (SIGINT, as Ctrl-C) once the first trial has finished, resumes it in-process with the
same settings as a config, then reruns the finished sweep: the first trial is never trained or evaluated again, each
trial has exactly one child run under the one parent, and a changed setting is refused. ~2.5 minutes on 2 cores.
"""
import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ctrl_c_reaches_it, ray_connected
from ideal_ray.config import AblationSweepConfig, ConfigError, load_stage_config
from ideal_ray.io import SettingsChangedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["fusion-attention", "fusion-none"]
TINY = ["schedule.log_every=1", "schedule.ckpt_every=2", "schedule.vis_every=100", "data.loader_workers=1"]


def sweep_config(name: str, storage: str, train=(), preset: str = "tiny", **settings) -> AblationSweepConfig:
    """The ``preset`` sweep config with ``settings``; ``train``: every trial's training overrides (given whole, as the
    job passes its ``train.`` overrides). Not validated here: plan_sweep and sweep_ablation validate it."""
    return dataclasses.replace(load_stage_config(AblationSweepConfig, preset), name=name, storage_path=storage,
                               train_overrides=tuple(train), **settings)


def test_each_trial_differs_from_the_base_only_by_its_variant_and_runs_in_its_own_folder(data_root, tmp_path,
                                                                                        monkeypatch):
    from ideal_ray.tune.ablation import plan_sweep

    monkeypatch.chdir(tmp_path)
    relative_root = os.path.relpath(data_root, tmp_path)
    plan = plan_sweep(sweep_config("fus", "sweeps", [f"data.root={relative_root}", *TINY], study="fusion", steps=3))
    cfgs = {v: plan.trial_config(v) for v in plan.variants}
    assert list(cfgs) == ["fusion-attention", "fusion-linear", "fusion-none"]
    for v, cfg in cfgs.items():
        assert cfg.model.fusion.mode == v.split("-")[1]
        assert cfg.schedule.steps == 3 and cfg.dist.num_workers == 1 and not cfg.dist.use_gpu
        assert cfg.data.root == data_root  # absolute: Tune runs every trial in its own folder
        assert cfg.dist.storage_path == cfg.output_dir == str(tmp_path / "sweeps" / "fus" / "train")
    assert len({cfg.name for cfg in cfgs.values()}) == 3
    flat = [cfg.flat() for cfg in cfgs.values()]
    differing = {k for k in flat[0] if len({str(f[k]) for f in flat}) > 1}
    assert differing == {"model.fusion.mode", "name", "preset"}
    assert plan.probe_train_images == 0
    assert not os.path.exists(plan.path)  # planning writes nothing

    probe = plan_sweep(sweep_config("lp", "sweeps", [f"data.root={data_root}"], study="custom",
                                    variants=("layer-probe",)))
    assert probe.trial_config("layer-probe").model.vfm.single_layer and probe.probe_train_images > 0
    with pytest.raises(ConfigError, match="eval_images=100 must be in \\[2, 8\\]"):
        plan_sweep(sweep_config("x", "sweeps", [f"data.root={data_root}"], study="fusion", eval_images=100))


def test_bad_sweeps_are_refused_before_anything_starts(data_root, tmp_path, offline):
    import ray

    from ideal_ray.tune.ablation import plan_sweep, sweep_ablation

    root = [f"data.root={data_root}"]
    with pytest.raises(ConfigError, match="vit_large_patch14_dinov2.*model.safetensors"):
        sweep_ablation(sweep_config("dino", str(tmp_path), root, preset="paper", study="custom",
                                    variants=("backbone-dinov2",)))
    with pytest.raises(ConfigError, match="model.fusion.mode, which ablation variant 'fusion-attention' varies"):
        plan_sweep(sweep_config("x", str(tmp_path), [*root, "model.fusion.mode=none"], study="fusion"))
    with pytest.raises(ConfigError, match="study 'layer' names 24-block"):
        plan_sweep(sweep_config("x", str(tmp_path), root, study="layer"))
    with pytest.raises(ConfigError, match="asha_metric 'rfid' must be a training metric"):
        plan_sweep(sweep_config("x", str(tmp_path), root, study="fusion", scheduler="asha", asha_metric="rfid"))
    with pytest.raises(ConfigError, match="evaluation cannot run on this machine: No local weights for the FID"):
        plan_sweep(sweep_config("x", str(tmp_path), root, study="fusion"))
    with pytest.raises(ConfigError, match="unknown part 'fusion-bogus'"):
        plan_sweep(sweep_config("x", str(tmp_path), root, study="custom", variants=("fusion-bogus",)))
    assert not ray.is_initialized() and os.listdir(tmp_path) == []  # nothing written, no Ray started


def _job():
    """jobs/sweep_ablation.py as a module (its main(argv), its _sweep)."""
    spec = importlib.util.spec_from_file_location("sweep_ablation_job", os.path.join(REPO, "jobs", "sweep_ablation.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_the_job_reads_the_sweep_settings_and_gives_train_overrides_whole_to_every_trial(data_root, tmp_path,
                                                                                         monkeypatch, capsys):
    from ideal_ray.tune.ablation import plan_sweep

    job = _job()
    seen = []
    monkeypatch.setattr(job, "_sweep", lambda cfg: seen.append(cfg) or 0)  # the settings, no Ray
    storage = str(tmp_path / "sweeps")
    argv = ["--study", "custom", "--name", "mix", "--storage", storage, "--steps", "4",
            "variants=fusion-linear,fusion-linear+shallow-align-off", "scheduler=asha", "asha_mode=max",
            "grace_period=2", "reduction_factor=2", "workers_per_trial=2", "eval_images=4",
            f"train.data.root={data_root}", "train.optim.betas=0.5,0.9"]
    assert job.main(argv) == 0
    (cfg,) = seen
    assert cfg.preset == cfg.train_preset == "tiny"  # the job's default preset
    assert (cfg.study, cfg.variants, cfg.name, cfg.storage_path) == (
        "custom", ("fusion-linear", "fusion-linear+shallow-align-off"), "mix", storage)
    assert (cfg.steps, cfg.scheduler, cfg.asha_metric, cfg.asha_mode, cfg.grace_period, cfg.reduction_factor,
            cfg.workers_per_trial, cfg.eval_images) == (4, "asha", "train_rec_mse", "max", 2, 2, 2, 4)
    assert cfg.train_overrides == (f"data.root={data_root}", "optim.betas=0.5,0.9")  # whole: its comma kept
    plan = plan_sweep(cfg)
    for v in cfg.variants:
        trial = plan.trial_config(v)
        assert trial.optim.betas == (0.5, 0.9) and trial.data.root == data_root and trial.schedule.steps == 4
        assert trial.dist.num_workers == 2
    assert (plan.asha_mode, plan.grace_period, plan.reduction_factor) == ("max", 2, 2)

    assert job.main(["--preset", "paper", "--name", "p", "--storage", storage, f"train.data.root={data_root}"]) == 0
    assert seen[-1].train_preset == "paper" and seen[-1].study == "fusion"

    refused = {  # one sentence each (exit code 2), before anything is written
        "data.root=/x": "data.root is a setting of the trials' training config, not of the sweep; pass it as "
                        "train.data.root=/x.",
        "train.data.root=" + str(tmp_path / "gone"): "the trials' training config (the train.* overrides): No "
                                                     "ImageNet-layout folder at data.root=" + str(tmp_path / "gone"),
        "variants=fusion-linear": "study 'fusion' has fixed variants",
        "scheduler=hyperband": "scheduler 'hyperband' is unknown",
    }
    capsys.readouterr()
    for override, said in refused.items():
        with pytest.raises(SystemExit) as e:
            job.main(["--name", "bad", "--storage", storage, f"train.data.root={data_root}", override])
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err and err.count("\n") == 1, (override, err)
    assert not os.path.exists(os.path.join(storage, "bad")) and len(seen) == 2


# ------------------------------------------------------------------------------------------- the real sweep
def _finished_trial(sweep: str, trial: str) -> bool:
    """The trial's child run is FINISHED (the store is only opened once the trial's evaluation is written: opening
    a SQLite store while another process creates it races)."""
    from mlflow.tracking import MlflowClient

    if not os.path.exists(os.path.join(sweep, "eval", trial, "result.json")):
        return False
    client = MlflowClient(f"sqlite:///{sweep}/mlflow.db")
    exp = client.get_experiment_by_name("ideal-ablation")
    return exp is not None and bool(client.search_runs(
        [exp.experiment_id], filter_string=f"tags.trial_name = '{trial}' and attributes.status = 'FINISHED'"))


def _outputs(sweep: str, variant: str):
    """(mtime of every file a trial wrote: exports, checkpoints, evaluation; its training runs in MLflow)."""
    from ideal_ray.tracking import find_runs

    run_dir = os.path.join(sweep, "train", f"abl.{variant}")
    files = {}
    for folder in (run_dir, os.path.join(sweep, "eval", variant)):
        for dirpath, _, names in os.walk(folder):
            files.update({os.path.join(dirpath, n): os.path.getmtime(os.path.join(dirpath, n)) for n in names
                          if not n.startswith("mlflow.db")})
    return files, len(find_runs(f"sqlite:///{run_dir}/mlflow.db", "ideal-tokenizer"))


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(data_root, tmp_path, monkeypatch, ray_head):
    from mlflow.tracking import MlflowClient

    from ideal_ray.tune.ablation import sweep_ablation
    from ideal_ray.tune.common import child_runs

    monkeypatch.setenv("IDEAL_RAY_FID_REFS", str(tmp_path / "fid-refs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage, sweep = str(tmp_path / "sweeps"), str(tmp_path / "sweeps" / "abl")
    overrides = [f"data.root={data_root}", *TINY]
    cli = [sys.executable, os.path.join(REPO, "jobs", "sweep_ablation.py"), "--preset", "tiny", "--study", "custom",
           "--name", "abl", "--storage", storage, "--steps", "2", "variants=" + ",".join(VARIANTS),
           *[f"train.{o}" for o in overrides]]
    proc = subprocess.Popen(cli, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=ctrl_c_reaches_it)
    try:
        # wait for the event (the first trial's evaluation on disk), not for a time: the trial takes ~1-2 minutes on 2
        # idle cores and several times that on a loaded machine; the guard only catches a hang (>10x the normal time)
        deadline = time.time() + 1800
        while not _finished_trial(sweep, VARIANTS[0]):
            assert proc.poll() is None, (f"the sweep ended before its first trial finished:\n"
                                         f"{proc.stdout.read()[-3000:]}")
            assert time.time() < deadline, (f"hang: trial {VARIANTS[0]}'s evaluation did not appear under {sweep} in "
                                            f"30 minutes")
            time.sleep(1)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the sweep's state and stops the running trial
        out, _ = proc.communicate(timeout=600)  # a hang guard: stopping takes seconds
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "| fusion-attention |" in out and "evaluated" in out and "interrupted" in out
    first = _outputs(sweep, VARIANTS[0])
    assert first[1] == 1 and any(p.endswith("result.json") for p in first[0])
    client = MlflowClient(f"sqlite:///{sweep}/mlflow.db")
    (parent,) = client.search_runs([client.get_experiment_by_name("ideal-ablation").experiment_id],
                                   "tags.`ideal.sweep` != ''")
    assert parent.info.status == "KILLED"

    cfg = sweep_config("abl", storage, overrides, study="custom", variants=tuple(VARIANTS), steps=2)  # the CLI's
    with ray_connected(ray_head, DS_ACCELERATOR="cpu"):  # resumed on a running cluster (the job ran on its own)
        resumed = sweep_ablation(cfg)
        both = [_outputs(sweep, v) for v in VARIANTS]
        again = sweep_ablation(cfg)
    assert not resumed["interrupted"]
    assert [t["variant"] for t in resumed["trials"]] == VARIANTS
    for t in resumed["trials"]:
        assert t["error"] is None and {"rfid", "psnr", "usage", "train_rec_mse"} <= set(t["metrics"]), t
    assert _outputs(sweep, VARIANTS[0]) == first  # not trained, exported or evaluated again

    assert resumed["parent_run_id"] == parent.info.run_id  # the same parent, now FINISHED
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    children = child_runs(resumed["tracking_uri"], resumed["parent_run_id"])
    assert sorted(c["params"]["variant"] for c in children) == VARIANTS  # one child per trial, resumed or not
    for c in children:
        assert c["status"] == "FINISHED" and c["run_name"] == c["params"]["variant"]
        assert c["params"]["base_preset"] == "tiny" and "schedule.log_every=1" in c["params"]["overrides"]
        assert {"rfid", "psnr", "train_rec_mse"} <= set(c["metrics"])
    first_child = next(c for c in children if c["params"]["variant"] == VARIANTS[0])
    # every logged training step reached Tune (and the child run), the last one with the evaluation
    assert [m.value for m in client.get_metric_history(first_child["run_id"], "step")] == [1.0, 2.0]

    assert [_outputs(sweep, v) for v in VARIANTS] == both  # a finished sweep reruns nothing
    assert [t["metrics"]["rfid"] for t in again["trials"]] == [t["metrics"]["rfid"] for t in resumed["trials"]]
    assert len(child_runs(again["tracking_uri"], again["parent_run_id"])) == 2
    with pytest.raises(SettingsChangedError, match="already exists .* with a different steps"):
        sweep_ablation(dataclasses.replace(cfg, steps=3))
