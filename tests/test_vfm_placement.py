"""``dist.vfm_placement=data``: the frozen VFM trunk runs in a Ray Data actor pool and trainers receive its features.

Properties: the split ``FrozenVFM`` (``trunk_features`` then ``finish``) is the old forward, and the tokenizer's
``*_from_trunk`` paths equal the image paths; the actor stage's features are the trainer's own (fp32: exact) and
its bf16 wire is exactly the bf16 rounding; the data order is unchanged; training with the VFM in the data pipeline
reaches the weights and losses of training with it in the trainer, and a resumed run may switch placement; bad
settings are one-sentence errors. Beside the 1-worker reference run: the same config trained in this process
(no Ray) equals it. Real Ray, tiny preset, CPU, one train worker; the training runs are slow
(~30 s each on 2 cores).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from ideal_ray.config import ConfigError, load_ar_config, load_config
from ideal_ray.io import SettingsChangedError
from ideal_ray.data import augment as ag
from ideal_ray.data import ray_pipeline as rp
from ideal_ray.train.tokenizer_stage import vfm_stage
from ideal_ray.train.tokenizer_step import TokenizerSystem

pytestmark = pytest.mark.usefixtures("one_thread")


def images(b: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


@pytest.fixture(scope="module")
def system() -> TokenizerSystem:
    """The trainer's networks for the tiny preset, built the way TokenizerStage builds them (seed, then system)."""
    cfg = load_config("tiny", ["loss.use_discriminator=true"])
    torch.manual_seed(cfg.optim.seed)
    return TokenizerSystem(cfg).train()


# ------------------------------------------------------------------------------------- the split, no Ray
def test_forward_is_trunk_features_then_finish(system):
    vfm, x = system.tokenizer.vfm, images()
    shallow_raw, deep_raw = vfm.trunk_features(x)
    assert not shallow_raw.requires_grad and not deep_raw.requires_grad  # the frozen part keeps no graph
    shallow, deep = vfm.finish(shallow_raw, deep_raw)
    assert shallow.requires_grad and deep is deep_raw  # only the shallow norm learns; deep passes through
    ref_shallow, ref_deep = vfm(x)
    assert torch.equal(shallow, ref_shallow) and torch.equal(deep, ref_deep)
    with pytest.raises(ValueError, match="needs the shallow block output"):
        vfm.finish(None, deep_raw)


def test_from_trunk_paths_equal_the_image_paths(system):
    tok, x = system.tokenizer, images(seed=1)
    feats = tok.vfm.trunk_features(x)
    torch.manual_seed(3)  # the same dropout draws for both
    a = tok(x)
    torch.manual_seed(3)
    b = tok.forward_from_trunk(*feats)
    for name in ("recon", "deep_target", "shallow_target", "deep_pred", "shallow_pred"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    tok.eval()
    assert torch.equal(tok.encode(x), tok.encode_from_trunk(*feats))
    tok.train()


def test_g_loss_from_trunk_equals_g_loss(system):
    x = images(seed=2)
    feats = system.tokenizer.vfm.trunk_features(x)
    results = []
    step = system.cfg.loss.disc_start + 10  # past disc_start: the adversarial term takes part
    for from_trunk in (False, True):
        torch.manual_seed(5)
        gen = torch.Generator().manual_seed(5)
        if from_trunk:
            loss, metrics, _ = system.g_loss_from_trunk(x, *feats, step=step, generator=gen)
        else:
            loss, metrics, _ = system.g_loss(x, step=step, generator=gen)
        results.append((loss.detach(), {k: float(v) for k, v in metrics.items()}))
    # not torch.equal: the discriminator's CPU forward differs in the last bits between two identical calls
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5, abs=1e-6)
    assert "shallow_mse" in results[0][1] and results[0][1]["adv_weight"] > 0  # every term took part


# ------------------------------------------------------------------------------------- config, no Ray
@pytest.mark.parametrize("overrides, fragment", [
    (["dist.vfm_placement=gpu"], "dist.vfm_placement 'gpu' is unknown; choose one of ('trainer', 'data')"),
    (["dist.vfm_placement=data", "dist.vfm_actors=0"], "dist.vfm_actors 0 must be at least 1"),
])
def test_bad_placement_settings_are_one_sentence(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", overrides)


def test_placement_is_refused_where_no_vfm_runs():
    with pytest.raises(ConfigError, match="does not apply to the AR stage"):
        load_ar_config("ar-tiny", ["dist.vfm_placement=data"])
    from ideal_ray.train.ray_trainer import train_tokenizer

    with pytest.raises(ConfigError, match="runs the VFM in Ray Data actors, which an in-process run does not have"):
        train_tokenizer(load_config("tiny", ["dist.vfm_placement=data"]), in_process=True)


def test_stage_follows_the_trainers_autocast_rule():
    assert vfm_stage(load_config("tiny")) is None
    cpu = vfm_stage(load_config("tiny", ["dist.vfm_placement=data", "dist.vfm_actors=2", "optim.precision=bf16"]))
    assert (cpu.num_actors, cpu.use_gpu, cpu.bf16, cpu.wire_dtype) == (2, False, False, torch.float32)  # CPU: fp32
    gpu = vfm_stage(load_config("paper", ["dist.vfm_placement=data"]))
    assert (gpu.use_gpu, gpu.bf16, gpu.wire_dtype, gpu.columns) == (True, True, torch.uint16, ("shallow", "deep"))
    gpu32 = vfm_stage(load_config("paper", ["dist.vfm_placement=data", "optim.precision=fp32"]))
    assert not gpu32.bf16  # no autocast in the trainer, so no bf16 on the wire either
    probe = vfm_stage(load_config("tiny+layer-probe", ["dist.vfm_placement=data"]))
    assert probe.columns == ("deep",) and set(rp.torch_dtypes(vfm=probe)) == set(rp.COLUMNS) | {"deep"}


def test_local_cluster_counts_the_vfm_actors():
    from ideal_ray.train.ray_trainer import local_cluster_cpus, vfm_actors_total

    base = load_config("tiny", ["data.loader_workers=1"])  # 2 workers x (1 CPU + 1 decode actor) + 2
    data = load_config("tiny", ["data.loader_workers=1", "dist.vfm_placement=data", "dist.vfm_actors=2"])
    assert (vfm_actors_total(base), local_cluster_cpus(base)) == (0, 6)
    assert (vfm_actors_total(data), local_cluster_cpus(data)) == (4, 10)


def test_a_rerun_may_switch_placement_but_not_the_experiment(tmp_path):
    from ideal_ray.train.run_storage import RUN_RECORD_FILE, check_or_record_config

    common = [f"dist.storage_path={tmp_path}", "name=switch"]
    assert check_or_record_config(load_config("tiny", common)) is False
    assert check_or_record_config(load_config("tiny", common + ["dist.vfm_placement=data",
                                                                "dist.vfm_actors=2"])) is True
    with open(tmp_path / "switch" / RUN_RECORD_FILE) as f:
        assert json.load(f)["dist.vfm_placement"] == "data"  # the run folder records the latest placement
    with pytest.raises(SettingsChangedError, match="with a different model.fusion.mode"):
        check_or_record_config(load_config("tiny", common + ["model.fusion.mode=linear"]))
    # a run recorded before a setting existed resumes at that setting's default (what the old code did) ...
    path = tmp_path / "switch" / RUN_RECORD_FILE
    record = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in record.items() if k not in ("data.format", "data.labels_file")}))
    assert check_or_record_config(load_config("tiny", common + ["dist.vfm_placement=data", "dist.vfm_actors=2"]))
    # ... and not at another value
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "data.format"}))
    with pytest.raises(SettingsChangedError, match="with a different data.format"):
        check_or_record_config(load_config("tiny", common + ["dist.vfm_placement=data", "dist.vfm_actors=2",
                                                             "data.format=parquet"]))


# ------------------------------------------------------------------------------------- Ray
# ray_cluster and data_root: the shared Ray Train fixtures of conftest.py


def _batches(ds, stage=None):
    return list(ds.iter_torch_batches(batch_size=4, dtypes=rp.torch_dtypes(vfm=stage)))


def test_actor_features_are_the_trainers_own(ray_cluster, data_root, system):
    cfg = load_config("tiny", [f"data.root={data_root}", "data.global_batch=4", "dist.num_workers=1",
                               "dist.vfm_placement=data"])
    stage = vfm_stage(cfg)
    plain = _batches(rp.rank_dataset(cfg.data, 1, 0, start_step=3, num_steps=3, seed=0, num_actors=1))
    fp32 = _batches(rp.rank_dataset(cfg.data, 1, 0, start_step=3, num_steps=3, seed=0, num_actors=1, vfm=stage),
                    stage)
    bf16_stage = rp.VFMStage(cfg.model.vfm, seed=cfg.optim.seed, bf16=True)  # the GPU wire format, on CPU
    bf16 = _batches(rp.rank_dataset(cfg.data, 1, 0, start_step=3, num_steps=3, seed=0, num_actors=1,
                                    vfm=bf16_stage), bf16_stage)
    assert len(plain) == len(fp32) == len(bf16) == 3
    vfm, cpu = system.tokenizer.vfm, torch.device("cpu")
    for p, a, b in zip(plain, fp32, bf16):
        for col in rp.COLUMNS:  # the data order and the images are exactly today's
            assert torch.equal(p[col], a[col]) and torch.equal(p[col], b[col]), col
        assert a["shallow"].dtype == torch.float32 and b["shallow"].dtype == torch.uint16
        shallow, deep = vfm.trunk_features(ag.to_model_input(p["image"]))  # (4, 64, 64) each
        got_shallow, got_deep = rp.trunk_features_from_batch(a, stage, cpu)
        torch.testing.assert_close(got_shallow, shallow, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_deep, deep, rtol=0, atol=1e-6)
        wire_shallow, wire_deep = rp.trunk_features_from_batch(b, bf16_stage, cpu)
        assert wire_deep.dtype == torch.float32
        assert torch.equal(wire_shallow, got_shallow.bfloat16().float())
        assert torch.equal(wire_deep, got_deep.bfloat16().float())


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("runs"))


def tiny(data_root, runs_dir, name, steps, placement):
    return load_config("tiny", [f"data.root={data_root}", f"dist.storage_path={runs_dir}", f"output_dir={runs_dir}",
                                f"name={name}", f"schedule.steps={steps}", "schedule.ckpt_every=2",
                                "schedule.log_every=1", "schedule.vis_every=2",
                                "loss.use_discriminator=true", "loss.disc_start=1",
                                "data.loader_workers=1", "dist.num_workers=1", "data.global_batch=4",
                                f"dist.vfm_placement={placement}"])


def train(cfg, in_process=False):
    from ideal_ray.train.ray_trainer import train_tokenizer

    return train_tokenizer(cfg, log=lambda line: None, in_process=in_process)


def checkpoint_states(run_dir):
    """{step: generator module state} of every checkpoint Ray Train kept for a run."""
    from ray.train import Result

    from ideal_ray.train.engines import load_module_state

    out = {}
    for ckpt, metrics in Result.from_path(run_dir).best_checkpoints:
        with ckpt.as_directory() as d:
            out[int(metrics["step"])] = load_module_state(d, "generator")
    return out


def g_losses(result):
    import mlflow

    from ideal_ray.tracking import find_runs

    run = find_runs(result["tracking_uri"], "ideal-tokenizer")[0]
    history = mlflow.MlflowClient(result["tracking_uri"]).get_metric_history(run["run_id"], "g_loss")
    return {m.step: m.value for m in history}


def assert_same_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def trainer_run(ray_cluster, data_root, runs_dir):
    """2 steps with the VFM in the trainer (the reference)."""
    result = train(tiny(data_root, runs_dir, "in-trainer", 2, "trainer"))
    return result, checkpoint_states(os.path.join(runs_dir, "in-trainer"))


@pytest.fixture(scope="module")
def data_run(ray_cluster, data_root, runs_dir):
    """2 steps with the VFM in the data pipeline."""
    result = train(tiny(data_root, runs_dir, "in-data", 2, "data"))
    return result, checkpoint_states(os.path.join(runs_dir, "in-data"))


def recorded_placement(result):
    """(placement in the checkpoint's config, in the MLflow params, reconstruction PNGs logged)."""
    from ideal_ray.tracking import find_runs

    with open(os.path.join(result["checkpoint"], "config.json")) as f:
        in_ckpt = json.load(f)["config"]["dist"]["vfm_placement"]
    run = find_runs(result["tracking_uri"], "ideal-tokenizer")[0]
    pngs = os.listdir(os.path.join(run["artifact_uri"].replace("file://", ""), "reconstructions"))
    return in_ckpt, run["params"]["dist.vfm_placement"], [p for p in pngs if p.endswith(".png")]


@pytest.mark.slow
def test_the_reference_run_records_trainer_placement(trainer_run):
    result, states = trainer_run
    assert result["steps"] == 2 and set(states) == {2}
    in_ckpt, in_mlflow, pngs = recorded_placement(result)
    assert in_ckpt == in_mlflow == "trainer" and pngs


@pytest.mark.slow
def test_data_placement_run_records_data_placement(data_run):
    result, states = data_run
    assert result["steps"] == 2 and set(states) == {2} and os.path.exists(result["export"])
    in_ckpt, in_mlflow, pngs = recorded_placement(result)
    assert in_ckpt == in_mlflow == "data" and pngs  # the reconstruction grid came from the shipped features


@pytest.mark.slow
def test_data_placement_trains_like_trainer_placement(trainer_run, data_run):
    (ref, ref_states), (got, got_states) = trainer_run, data_run
    assert_same_states(ref_states[2], got_states[2])  # adversarial terms included (loss.disc_start=1)
    ref_loss, got_loss = g_losses(ref), g_losses(got)
    assert set(got_loss) == {1, 2}
    for step in got_loss:
        assert got_loss[step] == pytest.approx(ref_loss[step], rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_in_process_run_equals_the_one_worker_ray_run(trainer_run, data_root, runs_dir):
    """The same config trained in this process (no Ray: LocalSession, ray_pipeline.local_batches) takes the 1-worker
    Ray run's steps bit for bit: the same batches, per-step losses and final weights (DeepSpeed engine on both, one
    thread each: the Ray worker's OMP_NUM_THREADS=1 and this module's one_thread)."""
    from ideal_ray.train.engines import load_module_state

    ref, ref_states = trainer_run
    got = train(tiny(data_root, runs_dir, "in-process", 2, "trainer"), in_process=True)
    assert got["steps"] == 2 and got["export"].endswith("tokenizer_step2.pt")
    got_states = load_module_state(got["checkpoint"], "generator")
    assert got_states.keys() == ref_states[2].keys()
    for k, v in ref_states[2].items():
        assert torch.equal(got_states[k], v), k
    assert g_losses(got) == g_losses(ref) and set(g_losses(got)) == {1, 2}
