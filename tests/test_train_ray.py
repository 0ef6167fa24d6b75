"""The tokenizer stage on real Ray Train + DeepSpeed + MLflow, 2 CPU workers, tiny preset.

Slow (each run starts a worker group and two DeepSpeed engines per worker): ~2 minutes for the file on 2 cores.
"""
import json
import os
import re
import signal

import pytest
import torch

from conftest import Background, own_processes
from ideal_ray.checkpoint import load_tokenizer
from ideal_ray.config import load_config
from ideal_ray.tracking import find_runs
from ideal_ray.train.engines import load_module_state
from ideal_ray.train.loop import NonFiniteLossError

pytestmark = pytest.mark.slow


# ray_cluster and data_root: the shared Ray Train fixtures of conftest.py


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("runs"))


def tiny(data_root, runs_dir, name, steps, *overrides):
    return load_config("tiny", [f"data.root={data_root}", f"dist.storage_path={runs_dir}", f"output_dir={runs_dir}",
                                f"name={name}", f"schedule.steps={steps}", "schedule.ckpt_every=2",
                                "schedule.log_every=1", "schedule.vis_every=2",
                                "loss.use_discriminator=true", "loss.disc_start=1",
                                "data.loader_workers=1", *overrides])


def train(cfg):
    from ideal_ray.train.ray_trainer import train_tokenizer

    return train_tokenizer(cfg, log=lambda line: None)


def final_states(run_dir):
    """(generator module state, EMA) of the latest checkpoint in a run folder."""
    from ray.train import Result  # Train V2's Result (V2 is the default in Ray 2.60)

    ckpt = Result.from_path(run_dir).checkpoint
    with ckpt.as_directory() as d:
        return load_module_state(d, "generator"), torch.load(os.path.join(d, "ema.pt"), weights_only=True)


@pytest.fixture(scope="module")
def full_run(ray_cluster, data_root, runs_dir):
    cfg = tiny(data_root, runs_dir, "full", 6)
    return cfg, train(cfg)


def test_two_workers_write_checkpoint_mlflow_run_and_export(full_run):
    cfg, result = full_run
    assert result["steps"] == 6
    ckpt = result["checkpoint"]
    for part in ("generator/mp_rank_00_model_states.pt", "generator/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                 "discriminator/mp_rank_00_model_states.pt", "ema.pt", "loop_state.json", "lecam_rank1.pt",
                 "config.json"):
        assert os.path.exists(os.path.join(ckpt, part)), part
    with open(os.path.join(ckpt, "config.json")) as f:
        described = json.load(f)
    assert described["data_position"] == {"step": 6, "epoch": 1, "step_in_epoch": 2, "steps_per_epoch": 4}
    assert described["config"]["model"]["quantizer"]["codebook_size"] == 256
    runs = find_runs(result["tracking_uri"], "ideal-tokenizer")
    assert len(runs) == 1
    run = runs[0]
    assert run["status"] == "FINISHED"
    assert run["params"]["model.quantizer.codebook_size"] == "256"
    assert len(run["params"]) == len(cfg.flat())
    for key in ("g_loss", "d_loss", "lr", "grad_norm_g", "usage", "samples_per_s", "rec_mse", "deep_cos"):
        assert key in run["metrics"], key
    assert run["tags"]["final_checkpoint"] == ckpt and run["tags"]["inference_export"] == result["export"]
    artifacts = os.listdir(os.path.join(run["artifact_uri"].replace("file://", ""), "reconstructions"))
    assert any(a.endswith(".png") for a in artifacts)
    tok = load_tokenizer(result["export"])  # weights_only=True inside
    assert tok.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 8, 8)


def test_a_half_written_checkpoint_is_never_the_latest(full_run, runs_dir):
    """Ray registers a checkpoint only after every rank's upload finished; a folder left by an interrupted write
    is not in its index, so resume (and the data position) ignores it."""
    from ideal_ray.train.run_storage import latest_checkpoint_step

    run_dir = os.path.join(runs_dir, "full")
    partial = os.path.join(run_dir, "checkpoint_2099-01-01_00-00-00.000000")
    os.makedirs(os.path.join(partial, "generator"))
    with open(os.path.join(partial, "generator", "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(b"truncated")
    assert latest_checkpoint_step(run_dir) == 6
    model, _ = final_states(run_dir)  # still loads the complete one
    assert model


def test_changed_experiment_under_the_same_name_is_refused(full_run, data_root, runs_dir):
    from ideal_ray.train.run_storage import check_or_record_config

    from ideal_ray.io import SettingsChangedError

    with pytest.raises(SettingsChangedError, match="already exists at .* with a different .*model.fusion.mode"):
        check_or_record_config(tiny(data_root, runs_dir, "full", 4, "model.fusion.mode=linear"))


def test_killed_worker_restarts_and_ends_on_the_uninterrupted_parameters(full_run, data_root, runs_dir):
    """SIGKILL one Ray Train worker after the first checkpoint of a 6-step run: the group restarts from the latest
    checkpoint and finishes. The final parameters equal the uninterrupted 6-step run's (full_run), and one MLflow run
    holds every step, at most one checkpoint interval logged twice. (A rerun of a finished or stopped run takes the
    same path: Ray Train's snapshot in the run folder, the loop state in the checkpoint.)"""
    from ideal_ray.train.run_storage import latest_checkpoint_step

    # checkpoints every step for a wide kill window; the cadence is a schedule setting, not part of the experiment
    cfg = tiny(data_root, runs_dir, "killed", 6, "dist.max_failures=2", "schedule.ckpt_every=1")
    run = Background(lambda: train(cfg))
    run_dir = os.path.join(runs_dir, "killed")
    run.wait_for(lambda: latest_checkpoint_step(run_dir) >= 1)
    victims = own_processes("RayTrainWorker")
    assert victims, "no Ray Train worker process found to kill"
    killed_at = latest_checkpoint_step(run_dir)
    assert 1 <= killed_at < 6 and run.running(), "the kill must land mid-run"
    os.kill(victims[0].pid, signal.SIGKILL)
    out = run.result()
    assert out["steps"] == 6
    model_a, ema_a = final_states(os.path.join(runs_dir, "full"))
    model_b, ema_b = final_states(run_dir)
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k
    for k in ema_a:
        assert torch.equal(ema_a[k], ema_b[k]), k

    import mlflow

    runs = {r["run_name"]: r for r in find_runs(out["tracking_uri"], "ideal-tokenizer")}
    assert runs["killed"]["status"] == "FINISHED"  # one MLflow run continued through the restart
    history = mlflow.MlflowClient(out["tracking_uri"]).get_metric_history(runs["killed"]["run_id"], "g_loss")
    steps = [m.step for m in history]
    assert set(steps) == set(range(1, 7)) and len(steps) - len(set(steps)) <= 1, steps


def test_nan_guard_stops_with_the_last_good_checkpoint(ray_cluster, data_root, runs_dir):
    from ideal_ray.train.run_storage import latest_checkpoint_step

    cfg = tiny(data_root, runs_dir, "diverges", 10, "optim.lr=1e30", "optim.warmup_epochs=0",
               "optim.min_lr=1e29", "optim.warmup_start_lr=1e29", "schedule.ckpt_every=1", "dist.max_bad_steps=2",
               "dist.num_workers=1")
    with pytest.raises(NonFiniteLossError, match="non-finite losses in a row") as e:
        train(cfg)
    step = latest_checkpoint_step(os.path.join(runs_dir, "diverges"))
    assert 1 <= step < 10 and f"step {step}" in str(e.value)
    model, _ = final_states(os.path.join(runs_dir, "diverges"))
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_bad_data_folder_is_an_error_before_any_worker(tmp_path):
    from ideal_ray.train.ray_trainer import prepare_data

    (tmp_path / "train").mkdir()
    cfg = load_config("paper", [f"data.root={tmp_path}"])
    with pytest.raises(Exception, match="class"):
        prepare_data(cfg)


def _with_bad_files(data_root, folder, kinds, count):
    """A copy of ``data_root`` where the first ``count`` listed training images hold the bytes of the planted bad
    ``kinds`` in turn; returns (root, {image id: reason})."""
    import shutil

    from ideal_ray.data.sources import list_images
    from planted import planted_files

    root = os.path.join(folder, "data")
    shutil.copytree(data_root, root)
    paths = list_images(root).files  # the training listing's order (a folder: the image files)
    planted = planted_files()
    reasons = {"zero_bytes": "empty file (0 bytes)", "not_an_image": "not an image (unrecognised format)",
               "truncated_jpeg": "truncated image (JPEG, 14 bytes not processed)",
               "truncated_png": "truncated image (PNG)"}
    bad = {}
    for k, path in enumerate(paths[:count]):
        kind = kinds[k % len(kinds)]
        with open(path, "wb") as f:
            f.write(planted[kind][1])
        bad[os.path.relpath(path, root)] = reasons[kind]
    return root, bad


def test_unreadable_files_are_counted_listed_and_logged_like_extraction(ray_cluster, data_root, runs_dir, tmp_path):
    """8 of the 32 images unreadable (each kind twice), 4 steps of 8 on 2 workers: one epoch without a dropped tail,
    so every file is read. The run finishes; its summary counts the 8 once each (not the images the actors passed
    over, whichever rank met them) and excludes them from the images; skipped.tsv, with extraction's columns, lists
    them with their reasons; MLflow holds the metric and the same file."""
    root, bad = _with_bad_files(data_root, str(tmp_path), ["zero_bytes", "not_an_image", "truncated_jpeg",
                                                            "truncated_png"], 8)
    cfg = tiny(root, runs_dir, "bad-files", 4, "loss.use_discriminator=false", "schedule.vis_every=100")
    result = train(cfg)
    assert result["steps"] == 4 and (result["skipped_files"], result["images"]) == (8, 24)
    lines = open(result["skipped_file"]).read().splitlines()
    assert lines[0] == "image_id\terror" and dict(ln.split("\t") for ln in lines[1:]) == bad
    assert len(lines) == 1 + len(bad)  # each file once
    (run,) = [r for r in find_runs(result["tracking_uri"], "ideal-tokenizer") if r["run_name"] == "bad-files"]
    assert run["status"] == "FINISHED" and run["metrics"]["data/skipped_files"] == 8
    art = run["artifact_uri"].replace("file://", "")
    assert open(os.path.join(art, "skipped.tsv")).read() == open(result["skipped_file"]).read()


def test_a_mostly_unreadable_batch_stops_training_with_one_sentence(ray_cluster, data_root, runs_dir, tmp_path):
    """28 of the 32 images unreadable (what a vanished mount looks like to a listed folder): the run stops with the
    decode actor's sentence, naming the first bad file and the fraction, not a Ray traceback's text and not after
    training on the four good images; skipped.tsv lists what was met. (Which step's decode call reports first is up
    to Ray Data's prefetching: any of the run's 2 steps.)"""
    from ideal_ray.data.skipped import UnreadableDataError

    root, bad = _with_bad_files(data_root, str(tmp_path), ["zero_bytes"], 28)
    cfg = tiny(root, runs_dir, "vanished", 2, "loss.use_discriminator=false", "dist.max_failures=0")
    with pytest.raises(UnreadableDataError) as e:
        train(cfg)
    m = re.match(r"(\d+) of the (\d+) image files rank \d read for training step [12] could not be read or decoded "
                 r"\(first: (\S+): empty file \(0 bytes\)\); that is more than 5% of them, .* Training stopped",
                 str(e.value))
    assert m, str(e.value)
    met, read, first = int(m[1]), int(m[2]), m[3]
    assert met == 11 and read - met <= 4  # stopped at the first count over 10, having decoded at most the 4 good
    assert os.path.relpath(first, root) in bad
    lines = open(os.path.join(runs_dir, "vanished", "skipped.tsv")).read().splitlines()
    assert len(lines) - 1 >= 11 and all(ln.split("\t")[0] in bad for ln in lines[1:])
