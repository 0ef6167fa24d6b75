"""``dist.storage_path=s3://bucket/runs``: the tokenizer stage on Ray Train (1 CPU worker, tiny preset) with its
checkpoints, run record and export in an S3-compatible object store (moto's server on loopback, started here), a
resumed run equal to an uninterrupted one, and the pre-flight refusals of a store that cannot be used.

The store is configured the one way users configure it: the bare URI plus the AWS SDK's environment variables
(AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), set here before the module's
Ray cluster starts so that its workers inherit them.
"""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import BUCKET, STORAGE, bucket_objects, free_port
from ideal_ray.config import ConfigError, load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

@pytest.fixture(scope="module")
def s3_ray(s3_store, ray_cluster):
    """The session's Ray head joined after the store's environment is set (the job's workers get it)."""
    return s3_store


def tiny(data_root, out_dir, name, steps, *overrides):
    """A 1-worker tiny Ray run whose checkpoints go to the bucket and whose discriminator takes part from step 1."""
    return load_config("tiny", [f"data.root={data_root}", f"dist.storage_path={STORAGE}", f"output_dir={out_dir}",
                                f"name={name}", f"schedule.steps={steps}", "schedule.ckpt_every=2",
                                "schedule.log_every=1", "schedule.vis_every=100", "loss.use_discriminator=true",
                                "loss.disc_start=1", "dist.num_workers=1", "data.global_batch=4",
                                "data.loader_workers=1", *overrides])


def final_states(run_uri: str) -> dict:
    """{"generator", "discriminator", "ema"} of the latest checkpoint Ray Train registered at ``run_uri``."""
    from ray.train import Result

    from ideal_ray.train.engines import load_module_state

    with Result.from_path(run_uri).checkpoint.as_directory() as d:
        return {"generator": load_module_state(d, "generator"), "discriminator": load_module_state(d, "discriminator"),
                "ema": torch.load(os.path.join(d, "ema.pt"), weights_only=True)}


# ------------------------------------------------------------------------------------- refused before any worker
@pytest.fixture
def no_start(monkeypatch):
    """train_tokenizer may not get as far as the data or Ray."""
    import ideal_ray.train.ray_trainer as rt

    def started(*a, **k):
        raise AssertionError("the run started although its storage is unusable")

    monkeypatch.setattr(rt, "prepare_data", started)
    monkeypatch.setattr(rt, "init_ray", started)


def refused(cfg, within: float = 3.0) -> str:
    """The one sentence train_tokenizer refuses ``cfg`` with (before the data or Ray: ``no_start``); the check alone
    (``check_storage``, without the stage's imports) takes less than ``within`` seconds."""
    from ideal_ray.train.ray_trainer import train_tokenizer
    from ideal_ray.train.run_storage import check_storage

    with pytest.raises(ConfigError) as e:
        train_tokenizer(cfg, log=lambda line: None)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as again:
        check_storage(cfg)
    took = time.monotonic() - t0
    assert took < within, f"the check took {took:.1f} s"
    message = str(e.value)
    assert str(again.value) == message
    assert "\n" not in message and message.count(". ") == 0, message
    return message


def test_a_missing_bucket_is_refused_naming_the_uri_and_what_was_tried(s3_store, no_start, data_root, tmp_path):
    cfg = tiny(data_root, tmp_path, "lost", 2, "dist.storage_path=s3://no-such-bucket/runs")
    assert refused(cfg) == (
        f"dist.storage_path s3://no-such-bucket/runs is not usable: its bucket does not exist (tried writing and "
        f"deleting s3://no-such-bucket/runs/lost/.ideal-ray-storage-check through {s3_store} with credentials "
        f"from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).")


def test_missing_credentials_are_refused(s3_store, no_start, data_root, tmp_path, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    cfg = tiny(data_root, tmp_path, "anon", 2)
    message = refused(cfg)
    assert message.startswith(f"dist.storage_path {STORAGE} needs AWS credentials and none were found (tried "
                              f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ")
    assert "the EC2 instance metadata service" in message
    # ... also when the instance metadata service is asked (here: nothing listens where it is said to be)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "false")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    assert refused(cfg) == message
    assert bucket_objects(f"{BUCKET}/runs/anon") == {}


def test_an_unreachable_endpoint_is_refused_without_waiting_on_retries(s3_store, no_start, data_root, tmp_path,
                                                                        monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    cfg = tiny(data_root, tmp_path, "nowhere", 2)
    assert refused(cfg) == (
        f"dist.storage_path {STORAGE} is not usable: the endpoint could not be reached (tried writing and deleting "
        f"{STORAGE}/nowhere/.ideal-ray-storage-check through {closed} with credentials from AWS_ACCESS_KEY_ID / "
        f"AWS_SECRET_ACCESS_KEY).")
    from ideal_ray.train.run_storage import check_storage

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        mute = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", mute)
        t0 = time.monotonic()
        with pytest.raises(ConfigError) as e:
            check_storage(cfg)
        took = time.monotonic() - t0
    assert took < 12, f"the check waited {took:.1f} s"  # one attempt, the check's request timeout (5 s)
    assert str(e.value).startswith(f"dist.storage_path {STORAGE} is not usable: the endpoint did not answer within "
                                   f"5 s (tried writing and deleting {STORAGE}/nowhere/.ideal-ray-storage-check "
                                   f"through {mute} with credentials from ")


def test_a_query_string_is_refused_for_the_environment(s3_store, no_start, data_root, tmp_path):
    cfg = tiny(data_root, tmp_path, "q", 2, f"dist.storage_path={STORAGE}?endpoint_override={s3_store}")
    assert "has a query string; give the bare URI (s3://bucket/path) and set an S3-compatible endpoint with " \
           "AWS_ENDPOINT_URL_S3" in refused(cfg)


@pytest.mark.parametrize("job", ["train_tokenizer", "pipeline"])
def test_the_jobs_exit_2_with_one_line(s3_store, data_root, tmp_path, capsys, job, monkeypatch):
    import ray

    import ideal_ray.cluster

    def started(*a, **k):
        raise AssertionError("Ray started although the storage is unusable")

    monkeypatch.setattr(ideal_ray.cluster, "init_ray", started)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "jobs"))
    main = __import__(job).main
    with pytest.raises(SystemExit) as e:
        main([f"data.root={data_root}", f"output_dir={tmp_path}", "dist.storage_path=s3://no-such-bucket/runs"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("config error: dist.storage_path s3://no-such-bucket/runs is not usable: its bucket does "
                          "not exist (tried writing and deleting s3://no-such-bucket/runs/"), err
    assert not ray.is_initialized()


def test_an_upload_cut_off_midway_leaves_no_object(s3_store):
    """A writer killed in the middle of a multipart upload (two 5 MiB parts sent, the upload never completed): the
    key never appears, so nothing half-written can be read as a file (Ray Train's checkpoint copies, our exports)."""
    script = ("import os, pyarrow.fs as f\n"
              "fs, p = f.FileSystem.from_uri('s3://bucket/cut/blob')\n"
              "s = fs.open_output_stream(p)\n"
              "s.write(b'x' * (11 << 20)); s.flush()\n"
              "os._exit(9)\n")
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == 9
    assert bucket_objects(f"{BUCKET}/cut") == {}


# ---------------------------------------------------------------------------------------------- runs in the bucket
@pytest.fixture(scope="module")
def resumed(s3_ray, data_root, tmp_path_factory):
    """A Ray run with its checkpoints in the bucket, interrupted after 2 steps and rerun to 4 with a fresh output
    folder (nothing local to resume from; the MLflow store stays the same): {"first", "second": summaries,
    "lines": the rerun's log, "seconds": the rerun's}."""
    from ideal_ray.train.ray_trainer import train_tokenizer

    out, again = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("again")
    tracking = f"sqlite:///{out}/mlflow.db"
    first = train_tokenizer(tiny(data_root, out, "resumed", 2), log=lambda line: None, tracking_uri=tracking)
    lines = []
    t0 = time.monotonic()
    second = train_tokenizer(tiny(data_root, again, "resumed", 4), log=lines.append, tracking_uri=tracking)
    return {"first": first, "second": second, "lines": lines, "seconds": time.monotonic() - t0}


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    """The same 4 steps uninterrupted, in this process with a local run folder: the batches a 1-worker Ray run reads
    and the same steps (so the reference costs ~10 s, not another Ray run); the summary."""
    from ideal_ray.train.ray_trainer import train_tokenizer

    out = tmp_path_factory.mktemp("local")
    cfg = tiny(data_root, out, "uninterrupted", 4, f"dist.storage_path={out}")
    return train_tokenizer(cfg, log=lambda line: None, tracking_uri=f"sqlite:///{out}/mlflow.db", in_process=True)


def test_checkpoints_record_and_exports_land_in_the_bucket(resumed):
    first, second = resumed["first"], resumed["second"]
    assert (first["steps"], second["steps"]) == (2, 4) and second["run_path"] == f"{STORAGE}/resumed"
    assert second["checkpoint"].startswith(f"{STORAGE}/resumed/checkpoint_")
    stored = bucket_objects(f"{BUCKET}/runs/resumed")
    ckpt = second["checkpoint"][len(f"{STORAGE}/resumed/"):]
    for part in ("generator/mp_rank_00_model_states.pt", "generator/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "discriminator/mp_rank_00_model_states.pt", "ema.pt", "loop_state.json", "config.json"):
        assert f"{ckpt}/{part}" in stored, part
    assert len({k.split("/")[0] for k in stored if k.startswith("checkpoint_") and "/" in k}) == 2  # steps 2, 4
    assert "ideal_config.json" in stored and ".ideal-ray-storage-check" not in stored
    for summary, step in ((first, 2), (second, 4)):  # each run's export: in the bucket and where the next stage reads
        assert summary["export_uri"] == f"{STORAGE}/resumed/tokenizer_step{step}.pt"
        assert stored[f"tokenizer_step{step}.pt"] == os.path.getsize(summary["export"])
    total = sum(stored.values())
    print(f"\n[s3] {len(stored)} objects, {total / 2**20:.1f} MiB in the run folder; the 4-step rerun took "
          f"{resumed['seconds']:.1f} s")

    from ideal_ray.tracking import find_runs

    run = find_runs(second["tracking_uri"], "ideal-tokenizer")[0]
    assert run["tags"]["final_checkpoint"] == second["checkpoint"]
    assert run["tags"]["inference_export_uri"] == second["export_uri"]


def test_an_export_fetches_the_module_states_and_ema_not_the_optimizer_shards(resumed, data_root, tmp_path,
                                                                              monkeypatch):
    """The export at the end of a run reads two objects of the checkpoint in the bucket (the generator's module
    states and the EMA) and never fetches it whole (the optimizer shards are most of its bytes: gigabytes at paper
    scale, on the driver's disk); the export equals one built from the whole checkpoint."""
    from ray.train import Checkpoint, Result

    from ideal_ray.train.ray_trainer import checkpoint_dir, export_tokenizer

    ckpt = Result.from_path(f"{STORAGE}/resumed").checkpoint
    cfg = tiny(data_root, tmp_path, "resumed", 4)
    needed = ("generator/mp_rank_00_model_states.pt", "ema.pt")
    stored = bucket_objects(ckpt.path)  # bucket/runs/resumed/checkpoint_...
    with checkpoint_dir(ckpt, only=needed) as d:
        fetched = {os.path.relpath(os.path.join(p, n), d): os.path.getsize(os.path.join(p, n))
                   for p, _, names in os.walk(d) for n in names}
    assert fetched == {k: stored[k] for k in needed} and not os.path.exists(d)
    print(f"\n[s3] the export fetched {sum(fetched.values()) / 2**20:.1f} of the checkpoint's "
          f"{sum(stored.values()) / 2**20:.1f} MiB")
    with pytest.raises(FileNotFoundError, match="No gpt/mp_rank_00_model_states.pt in the checkpoint s3://"):
        with checkpoint_dir(ckpt, only=("gpt/mp_rank_00_model_states.pt",)):
            pass

    with ckpt.as_directory() as whole:  # Ray's download of every file
        want = torch.load(export_tokenizer(whole, cfg, str(tmp_path / "whole.pt")), weights_only=True)

    def whole_download(self):
        raise AssertionError("the export fetched the whole checkpoint")

    monkeypatch.setattr(Checkpoint, "as_directory", whole_download)
    got = torch.load(export_tokenizer(ckpt, cfg, str(tmp_path / "two-files.pt")), weights_only=True)
    assert got.keys() == want.keys() and got["config"] == want["config"] and got["model"].keys() == want["model"].keys()
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])


def test_a_rerun_resumes_from_the_bucket_and_equals_the_uninterrupted_run(resumed, uninterrupted):
    """The rerun continued from the bucket's step-2 checkpoint and ends on the generator, discriminator and EMA of
    4 uninterrupted steps, bit for bit."""
    from ideal_ray.train.engines import load_module_state

    assert any("(resuming)" in line for line in resumed["lines"]), resumed["lines"]
    d = uninterrupted["checkpoint"]
    want = {"generator": load_module_state(d, "generator"), "discriminator": load_module_state(d, "discriminator"),
            "ema": torch.load(os.path.join(d, "ema.pt"), weights_only=True)}
    got = final_states(f"{STORAGE}/resumed")
    for part in want:
        assert got[part].keys() == want[part].keys()
        for k in want[part]:
            assert torch.equal(got[part][k], want[part][k]), f"{part}.{k}"


def test_a_half_written_checkpoint_in_the_bucket_is_never_the_latest(resumed):
    """A checkpoint folder whose upload stopped midway is not in Ray Train's index: resume ignores it."""
    import pyarrow.fs

    from ideal_ray.train.run_storage import latest_checkpoint_step

    fs = pyarrow.fs.FileSystem.from_uri(STORAGE)[0]
    with fs.open_output_stream(f"{BUCKET}/runs/resumed/checkpoint_2099-01-01_00-00-00.000000/generator/"
                               "mp_rank_00_model_states.pt") as f:
        f.write(b"truncated")
    assert latest_checkpoint_step(f"{STORAGE}/resumed") == 4
    assert final_states(f"{STORAGE}/resumed")["generator"]  # the complete one still loads
