"""Training pieces and the in-process run: lr schedule, weight-decay groups, EMA; then the tokenizer stage trained
in this process (``train_tokenizer(in_process=True)``: the stage, loop, checkpoints, MLflow and export of a Ray run,
no Ray) on both engine backends. Real DeepSpeed and MLflow, tiny preset, CPU, a few steps per run."""
import math
import os

import pytest
import torch
import torch.nn as nn

from ideal_ray.config import ConfigError, load_config
from ideal_ray.losses.reconstruction import perceptual_weight
from ideal_ray.train.ema import EMA
from ideal_ray.train.optim import decay_groups
from ideal_ray.train.schedule import lr_at, scaled_lr

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lr_schedule_warmup_then_cosine():
    kw = dict(peak_lr=1e-4, warmup_steps=10, decay_steps=100, warmup_start_lr=1e-5, min_lr=1e-5)
    assert lr_at(0, **kw) == pytest.approx(1e-5)
    assert lr_at(5, **kw) == pytest.approx(1e-5 + 0.5 * 9e-5)
    assert lr_at(10, **kw) == pytest.approx(1e-4)
    assert lr_at(60, **kw) == pytest.approx(1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **kw) == pytest.approx(1e-5) and lr_at(10_000, **kw) == pytest.approx(1e-5)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert scaled_lr(1e-4, 512, 256) == pytest.approx(2e-4)


def test_lr_schedule_object_matches_the_config():
    from ideal_ray.config import OptimConfig
    from ideal_ray.train.schedule import LRSchedule

    o = OptimConfig(lr=1e-4, base_batch=256, warmup_epochs=1, epochs=10, warmup_start_lr=1e-5, min_lr=1e-5)
    s = LRSchedule.from_config(o, global_batch=512, steps_per_epoch=10)
    assert s.peak_lr == pytest.approx(2e-4) and s.warmup_steps == 10 and s.decay_steps == 100
    assert s(0) == pytest.approx(1e-5) and s(10) == pytest.approx(2e-4) and s(110) == pytest.approx(1e-5)
    const = LRSchedule.from_config(OptimConfig(lr=1e-4, base_batch=512, warmup_epochs=0, lr_schedule="constant"),
                                   global_batch=512, steps_per_epoch=10)
    assert {const(i) for i in (0, 5, 10_000)} == {1e-4}


def test_perceptual_warmup():
    assert perceptual_weight(0, 1.0, 10) == 0.0
    assert perceptual_weight(5, 1.0, 10) == pytest.approx(0.5)
    assert perceptual_weight(50, 1.0, 10) == 1.0
    assert perceptual_weight(0, 1.0, 0) == 1.0


def test_weight_decay_only_on_matrices():
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(2, 2, 3))
    m[1].weight.requires_grad_(False)
    decay, no_decay = decay_groups(m.named_parameters(), 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2, 4}
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert all(p is not m[1].weight for p in no_decay["params"])  # frozen parameters are left out


def test_ema_tracks_trainable_parameters_only():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    m[1].requires_grad_(False)
    ema = EMA(m, decay=0.5)
    assert set(ema.shadow) == {"0.weight", "0.bias"}
    start = m[0].weight.detach().clone()
    with torch.no_grad():
        m[0].weight.add_(2.0)
    ema.update(m)
    torch.testing.assert_close(ema.shadow["0.weight"], start + 1.0)
    copy = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    ema.copy_to(copy)
    torch.testing.assert_close(copy[0].weight, start + 1.0)
    restored = EMA(m, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.shadow["0.weight"], ema.shadow["0.weight"])
    with pytest.raises(KeyError):
        restored.load_state_dict({})


# ------------------------------------------------------------------------------------------ in-process runs
ENGINES = ("torch", "deepspeed")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("runs"))


def tiny(data_root, runs_dir, name, steps, *overrides):
    """A 1-rank tiny run whose discriminator takes part from step 1 (data_root: 32 images, 8 steps per epoch)."""
    return load_config("tiny", [f"data.root={data_root}", f"output_dir={runs_dir}", f"name={name}",
                                f"schedule.steps={steps}", "schedule.ckpt_every=2", "schedule.log_every=1",
                                "schedule.vis_every=2",
                                "loss.use_discriminator=true", "loss.disc_start=1", "dist.num_workers=1",
                                "data.global_batch=4", *overrides])


def train(cfg, runs_dir, lines=None):
    from ideal_ray.train.ray_trainer import train_tokenizer

    return train_tokenizer(cfg, log=(lines.append if lines is not None else lambda line: None),
                           tracking_uri=f"sqlite:///{runs_dir}/mlflow.db", in_process=True)


def states(ckpt_dir):
    """{"generator", "discriminator", "ema"}: the module states and the EMA of a checkpoint directory."""
    from ideal_ray.train.engines import load_module_state

    return {"generator": load_module_state(ckpt_dir, "generator"),
            "discriminator": load_module_state(ckpt_dir, "discriminator"),
            "ema": torch.load(f"{ckpt_dir}/ema.pt", weights_only=True)}


def mlflow_run(runs_dir, name):
    from ideal_ray.tracking import find_runs

    return {r["run_name"]: r for r in find_runs(f"sqlite:///{runs_dir}/mlflow.db", "ideal-tokenizer")}[name]


@pytest.fixture(scope="module")
def straight(data_root, runs_dir):
    """4 uninterrupted steps on each engine backend: {engine: (config, summary, log lines)}."""
    out = {}
    for engine in ENGINES:
        cfg, lines = tiny(data_root, runs_dir, f"{engine}-4", 4, f"dist.engine={engine}"), []
        out[engine] = cfg, train(cfg, runs_dir, lines), lines
    return out


@pytest.mark.slow
def test_in_process_run_keeps_the_record_of_a_ray_run(straight, runs_dir):
    """Checkpoints (the Ray run's files, in the run folder), the MLflow run (same experiment, params, metrics,
    tags, reconstruction grids) and the export (tokenizer_step<N>.pt)."""
    import json

    from ideal_ray.checkpoint import load_tokenizer

    cfg, result, lines = straight["torch"]
    ckpt = result["checkpoint"]
    assert result["steps"] == 4 and ckpt == os.path.join(runs_dir, "torch-4", "checkpoint_00000004")
    for part in ("generator/mp_rank_00_model_states.pt", "discriminator/mp_rank_00_model_states.pt", "ema.pt",
                 "loop_state.json", "lecam_rank0.pt", "config.json"):
        assert os.path.exists(os.path.join(ckpt, part)), part
    with open(os.path.join(ckpt, "config.json")) as f:
        assert json.load(f)["data_position"] == {"step": 4, "epoch": 0, "step_in_epoch": 4, "steps_per_epoch": 8}
    assert sorted(os.listdir(os.path.join(runs_dir, "torch-4"))) == [
        "checkpoint_00000002", "checkpoint_00000004", "ideal_config.json", "skipped.tsv", "tokenizer_step4.pt"]
    assert open(os.path.join(runs_dir, "torch-4", "skipped.tsv")).read() == "image_id\terror\n"  # no bad file
    run = mlflow_run(runs_dir, "torch-4")
    assert run["status"] == "FINISHED" and run["params"]["dist.engine"] == "torch"
    assert len(run["params"]) == len(cfg.flat()) and run["tags"]["stage"] == "tokenizer"
    for key in ("g_loss", "d_loss", "lr", "grad_norm_g", "grad_norm_d", "usage", "samples_per_s", "nonfinite_steps"):
        assert key in run["metrics"], key
    assert run["metrics"]["data/skipped_files"] == result["skipped_files"] == 0 and result["images"] == 32
    assert run["tags"]["final_checkpoint"] == ckpt and run["tags"]["inference_export"] == result["export"]
    pngs = os.listdir(os.path.join(run["artifact_uri"].replace("file://", ""), "reconstructions"))
    assert len([p for p in pngs if p.endswith(".png")]) == 2  # vis_every=2
    assert result["export"].endswith("tokenizer_step4.pt")
    assert load_tokenizer(result["export"]).encode(torch.zeros(1, 3, 64, 64)).shape == (1, 8, 8)
    assert any("step 4/4" in line for line in lines)


@pytest.mark.slow
def test_deepspeed_and_torch_engines_reach_the_same_parameters(straight, runs_dir):
    """fp32 on the CPU, same seed and batches, the discriminator on from step 1: the two backends take the same
    steps (AdamW, weight-decay groups and global-norm clipping are the same math), to float rounding.

    Compared after 2 steps (the runs' first checkpoint): past that, rounding differences in near-zero gradients
    (the discriminator heads' conv biases sit before a batch norm: their gradient is zero up to rounding, which
    Adam scales up to ~lr) grow step by step, to ~1e-3 of the generator's weights by step 4. The logged losses of
    all 4 steps still agree to 1e-3."""
    import mlflow

    a, b = (states(os.path.join(runs_dir, f"{engine}-4", "checkpoint_00000002")) for engine in ENGINES)
    for part in a:
        assert a[part].keys() == b[part].keys()
        atol = 1e-4 if part == "discriminator" else 1e-5  # generator and EMA agree to ~2e-6, D's biases to ~3e-5
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=1e-4, atol=atol, msg=f"{part}.{k}")
    client = mlflow.MlflowClient(f"sqlite:///{runs_dir}/mlflow.db")
    for key in ("g_loss", "d_loss", "rec_mse"):
        curves = [{m.step: m.value for m in client.get_metric_history(mlflow_run(runs_dir, f"{e}-4")["run_id"], key)}
                  for e in ENGINES]
        assert set(curves[0]) == set(curves[1]) == {1, 2, 3, 4}
        for step, value in curves[0].items():
            assert curves[1][step] == pytest.approx(value, rel=1e-3), (key, step)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_resume_equals_uninterrupted(straight, data_root, runs_dir, engine):
    """2 steps, then a rerun of the same name to 4 (schedule.steps may change): the parameters, EMA and
    discriminator of 4 uninterrupted steps, bit for bit, in one MLflow run."""
    import mlflow

    name = f"{engine}-resumed"
    train(tiny(data_root, runs_dir, name, 2, f"dist.engine={engine}"), runs_dir)
    lines = []
    result = train(tiny(data_root, runs_dir, name, 4, f"dist.engine={engine}"), runs_dir, lines)
    assert any("resumed at step 2" in line for line in lines)
    got, want = states(result["checkpoint"]), states(straight[engine][1]["checkpoint"])
    for part in want:
        for k in want[part]:
            assert torch.equal(got[part][k], want[part][k]), f"{part}.{k}"
    run = mlflow_run(runs_dir, name)
    history = mlflow.MlflowClient(f"sqlite:///{runs_dir}/mlflow.db").get_metric_history(run["run_id"], "g_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4] and run["status"] == "FINISHED"


@pytest.mark.slow
def test_a_run_resumes_only_the_way_it_started(straight, data_root, runs_dir):
    from ideal_ray.config import ConfigError
    from ideal_ray.io import SettingsChangedError
    from ideal_ray.train.ray_trainer import train_tokenizer
    from ideal_ray.train.run_storage import check_or_record_config

    cfg = straight["torch"][0]
    with pytest.raises(ConfigError, match="was trained in one process .* rerun it in one process"):
        check_or_record_config(cfg, "ray")
    with pytest.raises(SettingsChangedError, match="already exists .* dist.engine"):
        train(tiny(data_root, runs_dir, "torch-4", 6, "dist.engine=deepspeed"), runs_dir)
    with pytest.raises(ConfigError, match="an in-process run does not have"):
        train_tokenizer(tiny(data_root, runs_dir, "in-data", 2, "dist.vfm_placement=data"), in_process=True)


@pytest.mark.slow
def test_nan_guard_stops_an_in_process_run_with_the_last_good_checkpoint(data_root, runs_dir):
    from ideal_ray.train.loop import NonFiniteLossError

    cfg = tiny(data_root, runs_dir, "diverges", 10, "dist.engine=torch", "optim.lr=1e30", "optim.warmup_epochs=0",
               "optim.min_lr=1e29", "optim.warmup_start_lr=1e29", "schedule.ckpt_every=1", "dist.max_bad_steps=2")
    with pytest.raises(NonFiniteLossError, match="non-finite losses in a row") as e:
        train(cfg, runs_dir)
    step = int(str(e.value).split("latest good checkpoint (step ")[1].split(")")[0])
    assert 1 <= step < 10
    assert mlflow_run(runs_dir, "diverges")["status"] == "FAILED"


@pytest.mark.slow
def test_demo_in_process_trains_then_reports(data_root, tmp_path, capsys):
    """``jobs/demo.py --in-process``: the in-process stage, then the untrained / trained table from its export."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "jobs"))
    from demo import main

    code = main(["--in-process", f"data.root={data_root}", f"output_dir={tmp_path}", "schedule.steps=2",
                 "dist.engine=torch", "data.global_batch=4"])
    out = capsys.readouterr().out
    assert code in (0, 1) and "trained (EMA)" in out and "beats the untrained one" in out  # 2 steps: either answer
    assert (tmp_path / "ideal-demo-in-process" / "tokenizer_step2.pt").is_file()  # its own fixed folder


def test_real_data_root_must_exist(tmp_path):
    from ideal_ray.train.ray_trainer import prepare_data

    cfg = load_config("paper", [f"data.root={tmp_path / 'imagenet'}"])
    with pytest.raises(ConfigError, match="data.root"):
        prepare_data(cfg)


def test_a_mistyped_tiny_data_root_is_refused_not_filled_with_invented_images(tmp_path):
    from ideal_ray.train.ray_trainer import prepare_data

    typo = tmp_path / "synthtic"
    with pytest.raises(ConfigError, match=r"data.root=.*synthtic.*data.make_synthetic=true"):
        prepare_data(load_config("tiny", [f"data.root={typo}"]))
    assert not typo.exists()  # nothing made
    asked = load_config("tiny", [f"data.root={typo}", "data.make_synthetic=true", "data.synthetic_classes=2",
                                 "data.synthetic_train_per_class=4", "data.synthetic_val_per_class=1",
                                 "data.synthetic_size=40"])
    listing = prepare_data(asked)
    assert len(listing) == 8 and listing.fmt == "folder" and sorted(set(int(k) for k in listing.labels)) == [0, 1]


def test_jobs_report_config_errors_in_one_line(capsys):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "jobs"))
    from demo import main

    with pytest.raises(SystemExit) as e:
        main(["model.vfm.deep_layer=9"])
    assert e.value.code == 2  # refused input: exit code 2, one sentence on stderr
    assert "config error: model.vfm.deep_layer 9 is beyond the backbone's depth 4" in capsys.readouterr().err
    from train_tokenizer import main as train_main

    with pytest.raises(SystemExit) as e:
        train_main(["--in-process", "--num-workers", "2"])
    assert e.value.code == 2 and "config error: --in-process trains one rank" in capsys.readouterr().err
