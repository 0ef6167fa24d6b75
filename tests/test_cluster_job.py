"""Cluster operation end to end: a real local Ray head (`ray start --head`, GCS and dashboard / job API on
127.0.0.1, token auth on), the tiny pipeline (tokenizer -> extract -> AR -> sample -> evaluate -> CFG sweep)
submitted with `ray job submit --working-dir .`, and a real `mlflow server` (SQLite backend, proxied artifacts,
localhost) as the job's tracking URI, as on a cluster. Both use an S3-compatible object store (moto's server on
loopback, conftest's ``s3_store``; endpoint and credentials in the environment of the head and the server, as on a
cluster): the training stages' checkpoints and exports (``dist.storage_path=s3://bucket/runs``) and the server's
artifact store (``--artifacts-destination s3://bucket/mlflow``). Then the same run resumed twice, every stage
skipped: by `python jobs/pipeline.py` (a job and a plain run are interchangeable) and by `jobs/demo.py` (the demo is
the pipeline).

`make cluster-test` runs just this module (~3 minutes on 2 cores). The head and the server are stopped afterwards,
whatever happened. The head gets its own --temp-dir, so no other `ray.init()` (of this or a parallel test process)
finds and joins it, and stopping it ends only its processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest

from conftest import AWS_VARS, BUCKET, bucket_objects, report_rows

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # ray, mlflow and python of this environment
TOKEN = uuid.uuid4().hex + uuid.uuid4().hex  # the cluster's auth token (Ray 2.60 token auth)

# small enough for 2 CPU cores: 4 classes x 8 train images, 6 tokenizer steps on one worker, 40 AR steps on two (the
# AR stage's own end-to-end test: its loss must fall from log(vocab))
PIPELINE_OVERRIDES = ["name=tinyjob", "data.make_synthetic=true", "data.synthetic_classes=4",
                      "data.synthetic_train_per_class=8", "data.synthetic_val_per_class=2", "schedule.steps=6", "schedule.steps_per_epoch=4",
                      "schedule.ckpt_every=3", "schedule.log_every=3", "schedule.vis_every=1000",
                      "dist.num_workers=1", f"dist.storage_path=s3://{BUCKET}/runs"]
AGENT_ATTEMPTS = 30  # `ray job submit` tries, 1 s apart, while the head's job agent is not registered yet (_submit)
AR_SETS = ["schedule.steps=40", "schedule.ckpt_every=20", "schedule.log_every=1", "dist.num_workers=2"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, RAY_USAGE_STATS_ENABLED="0",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
               **extra)  # conftest.py says why
    return env


def _run(cmd, log, timeout, env=None, check=True):
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env or _env(), cwd=REPO, timeout=timeout)
    if check and p.returncode != 0:
        with open(log) as f:
            tail = f.read()[-6000:]
        raise AssertionError(f"{' '.join(cmd[:4])} ... exited {p.returncode}:\n{tail}")
    return p.returncode


@pytest.fixture(scope="module")
def head(s3_store, mlflow_boot, tmp_path_factory):
    """`ray start --head` bound to 127.0.0.1 (GCS and dashboard / job API), 8 logical CPUs, token auth, the object
    store's environment; yields the job API address. Stopped at the end (:func:`_stop_head`). The MLflow server
    boots meanwhile (``mlflow_boot``)."""
    base = tmp_path_factory.mktemp("head")
    log = str(base / "cluster.log")
    temp_dir = tempfile.mkdtemp(prefix="irh", dir="/tmp")  # short: Ray's socket paths live under it
    dash, gcs, agent = _port(), _port(), _port()
    # the job agent's HTTP port too: Ray's default (52365) is taken when another Ray instance runs on the machine,
    # and the head then refuses every submission ("No available agent to submit job")
    cmd = [os.path.join(BIN, "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
           "--num-cpus=8", "--num-gpus=0",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        _run(cmd, log, timeout=120, env=_env(DS_ACCELERATOR="cpu"))
        yield {"address": f"http://127.0.0.1:{dash}", "log": log, "base": base}
    finally:
        _stop_head(temp_dir, gcs, log)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_head(temp_dir: str, gcs_port: int, log: str) -> None:
    """`ray stop` for this head only (`ray stop` ends every Ray cluster of the user on the machine, a parallel test
    process's too): the processes naming this head's temp dir or GCS port, and everything they started, get SIGTERM,
    then SIGKILL after 5 s (zombies, already dead, are left to their parent)."""
    import psutil

    marks = (temp_dir, f":{gcs_port}")
    procs = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(m in " ".join(p.info["cmdline"] or []) for m in marks):
                for q in [p] + p.children(recursive=True):
                    if q.status() != psutil.STATUS_ZOMBIE:
                        procs[q.pid] = q
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass

    def running():
        out = []
        for p in procs.values():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:  # an exited process nobody reaped (no init here) is gone
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    deadline = time.time() + 5
    while running() and time.time() < deadline:
        time.sleep(0.2)
    alive = running()
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    with open(log, "a") as f:
        f.write(f"\nstopped the head: {len(procs)} process(es), {len(alive)} of them killed\n")


@pytest.fixture(scope="module")
def mlflow_boot(s3_store, tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts in the object store (clients send
    and fetch them through the server: they need no credentials of the store), started and not waited for: the head
    starts while it boots (~10 s each on 2 cores); ``mlflow_server`` waits until it answers."""
    base = tmp_path_factory.mktemp("mlflow_server")
    port = _port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([os.path.join(BIN, "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
                             "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT,
                            env=_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))  # no GenAI job runners: 8 processes
    try:
        yield {"uri": f"http://127.0.0.1:{port}", "base": base, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def mlflow_server(mlflow_boot):
    """``mlflow_boot``'s server once it answers its health check."""
    uri, base, proc = mlflow_boot["uri"], mlflow_boot["base"], mlflow_boot["proc"]
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.read().strip() == b"OK":
                    return {"uri": uri, "base": base}
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, open(base / "server.log").read()[-3000:]
        time.sleep(0.5)


def _submit(head, entrypoint, log, env_vars=None, timeout=900):
    """`ray job submit --working-dir .` (blocking: streams the job's output, exits 1 when it fails), then the job's
    final status from `ray job status`: "SUCCEEDED", or the command's whole answer; and where in ``log`` the output
    of the submission that ran begins."""
    ray = os.path.join(BIN, "ray")
    runtime_env = {"env_vars": {"DS_ACCELERATOR": "cpu", **(env_vars or {})}}
    for attempt in range(AGENT_ATTEMPTS):
        sid = f"ideal-test-{uuid.uuid4().hex[:8]}"
        cmd = [ray, "job", "submit", "--address", head["address"], "--submission-id", sid, "--working-dir", ".",
               "--runtime-env-json", json.dumps(runtime_env), "--", "python"] + entrypoint
        since = os.path.getsize(log) if os.path.exists(log) else 0
        if _run(cmd, log, timeout=timeout, check=False) == 0:
            break
        # the head's job agent registers with the job API some time after `ray start` returns (seconds on a loaded
        # machine), and until then a submission is refused without creating a job: ask again, anything else fails
        if "No available agent to submit job" not in _output(log, since) or attempt == AGENT_ATTEMPTS - 1:
            raise AssertionError(f"{' '.join(cmd[:4])} ... failed:\n{_output(log, since)[-6000:]}")
        time.sleep(1)
    out = subprocess.run([ray, "job", "status", "--address", head["address"], sid], capture_output=True, text=True,
                         env=_env(), cwd=REPO, timeout=60)
    text = out.stdout + out.stderr
    return ("SUCCEEDED" if f"Job '{sid}' succeeded" in text else text), since  # the CLI's words for a finished job


def _pipeline_args(head):
    return (["jobs/pipeline.py", "--preset", "tiny", "sampling.sample.per_class=2", "sweep.sample.per_class=1",
             "recon.num_images=8", f"output_dir={head['base'] / 'runs'}", f"data.root={head['base'] / 'data'}"]
            + PIPELINE_OVERRIDES + [f"ar.{s}" for s in AR_SETS])


def _output(log, since: int) -> str:
    """What was written to ``log`` after its first ``since`` bytes (a command's console output)."""
    with open(log) as f:
        f.seek(since)
        return f.read()


@pytest.fixture(scope="module")
def pipeline_job(head, mlflow_server):
    """The tiny pipeline as one submitted job, every output under an absolute folder outside the working dir, the
    MLflow server as its tracking URI (the job's runtime env, as cluster/runtime_env.yaml does)."""
    t0 = time.perf_counter()
    status, since = _submit(head, _pipeline_args(head), head["log"], env_vars={"MLFLOW_TRACKING_URI": mlflow_server["uri"]})
    return {"status": status, "run_dir": head["base"] / "runs" / "tinyjob", "seconds": time.perf_counter() - t0,
            "output": _output(head["log"], since)}


def _stages(pipeline_job):
    return json.loads((pipeline_job["run_dir"] / "pipeline.json").read_text())["stages"]


def test_job_api_refuses_a_client_without_the_cluster_token(head):
    env = _env()
    env["RAY_AUTH_TOKEN"] = "0" * 64
    p = subprocess.run([os.path.join(BIN, "ray"), "job", "list", "--address", head["address"]], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=60)
    assert p.returncode != 0 and "ideal-test" not in p.stdout


def test_submitted_pipeline_succeeds_with_every_stage_run(pipeline_job):
    print(f"pipeline job: {pipeline_job['seconds']:.0f} s")
    assert pipeline_job["status"] == "SUCCEEDED", pipeline_job["status"]
    state = _stages(pipeline_job)
    assert list(state) == ["tokenizer", "extract", "ar", "sample", "evaluate", "sweep"]
    assert not any(s["skipped"] for s in state.values())
    assert state["tokenizer"]["outputs"]["steps"] == 6 and state["ar"]["outputs"]["steps"] == 40
    ex = state["extract"]["outputs"]
    assert (ex["images"], ex["rows"], ex["skipped"]) == (4 * 8, 4 * 8 * 2, 0)  # release views: 2 per image
    assert state["sample"]["outputs"]["num_images"] == 4 * 2
    for key in ("recon", "gen"):
        result = json.load(open(state["evaluate"]["outputs"][key]))
        assert result["protocol"]
    assert state["sweep"]["outputs"]["best_cfg_scale"] in (1.0, 1.75)
    stored = bucket_objects(f"{BUCKET}/runs")  # <name> and <name>-ar
    for stage in ("tokenizer", "ar"):  # Ray Train checkpoints in the bucket, the exports published beside them
        out = state[stage]["outputs"]
        assert out["checkpoint"].startswith(f"s3://{BUCKET}/runs/tinyjob") and os.path.isfile(out["export"])
        ckpt = out["checkpoint"][len(f"s3://{BUCKET}/runs/"):]
        assert f"{ckpt}/loop_state.json" in stored, sorted(stored)
        assert stored[out["export_uri"][len(f"s3://{BUCKET}/runs/"):]] == os.path.getsize(out["export"])
    import torch

    from ideal_ray.checkpoint import load_gpt

    gpt = load_gpt(state["ar"]["outputs"]["export"])  # weights_only=True inside
    assert os.path.basename(state["ar"]["outputs"]["export"]) == "gpt_step40.pt"
    logits = gpt(torch.zeros(2, 64, dtype=torch.long), torch.tensor([0, 1]))
    assert logits.shape == (2, 64, 256) and torch.isfinite(logits).all()
    # the job knew it was one: pipeline.json records the submission and the working_dir Ray gave it (the detection
    # behind the refusal of relative output paths, whose sentence test_cluster_configs.py checks)
    (run,) = json.loads((pipeline_job["run_dir"] / "pipeline.json").read_text())["runs"]
    assert run["ray_job"]["submission_id"].startswith("ideal-test-") and run["ray_job"]["working_dir"]
    # the job ends with the report: a row per stage with the seconds it took (pipeline.json's), then the total
    rows = report_rows(pipeline_job["output"])
    assert list(rows) == list(state) + ["total"]
    assert [rows[k][0] for k in state] == [f"{s['seconds']:.0f}" for s in state.values()]
    assert "CFG scale: gFID / class accuracy (chance 25%)" in rows["sweep"][1]  # 4 classes
    assert "class accuracy" in rows["evaluate"][1] and rows["ar"][2].endswith("gpt_step40.pt")


CHATTER = ("PlacementGroupCleaner", "FutureWarning", "TrainingReport", "Execution plan", "pretrained weights",
           "mlflow.store", "Configuration for experiment", "tensorboard", "RayTrainWorker", "TrainController",
           "core_worker", "INFO", "WARNING", "Traceback")


def test_the_job_console_shows_each_stage_and_the_run_log_holds_the_libraries(pipeline_job):
    """The job's own output (what `ray job submit` streams after Ray's job-manager lines): the line naming the log,
    then per stage a start line, a progress bar (training, extraction, sampling, evaluation) and a result line, then
    the report; no line of Ray, Ray Train, Ray Data, Tune, DeepSpeed, MLflow or open_clip. Those are in the run
    folder's console.log, each worker line once, without the controller-query warnings or the deprecated all-gather."""
    assert pipeline_job["status"] == "SUCCEEDED"
    text = pipeline_job["output"].split("Tailing logs until the job exits")[1]
    text = text[text.index("[ideal-ray] log "):text.rindex("Job 'ideal-test-")]
    # a bar redraws itself after carriage returns; the job log's streaming may also break its redraws into lines
    lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    cli = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\t\w+ (sdk|cli)\.py:\d+ -- ")  # `ray job submit`'s own lines
    lines = [line for line in lines if line.strip() and not cli.match(line)]
    assert lines[0] == f"[ideal-ray] log (Ray, DeepSpeed, Tune, MLflow output): {pipeline_job['run_dir']}/console.log"
    bar = re.compile(r"^(\x1b\[[0-9;]*m|\(pid=\d+\) )*(tokenizer|ar|extract|sample|evaluate)\b.*: +(\d+)%\|")
    ours = ("[pipeline] ", "|", "MLflow: ")
    assert [line for line in lines[1:] if not (line.startswith(ours) or bar.match(line))] == []
    assert [line for line in lines if any(c in line for c in CHATTER)] == []
    stages = ["tokenizer", "extract", "ar", "sample", "evaluate", "sweep"]
    assert [line.split(":")[0][len("[pipeline] "):] for line in lines if line.startswith("[pipeline] ")] == [
        s for s in stages for _ in range(2)]  # a start line and a result line each
    done = {m.group(2) for m in map(bar.match, lines) if m and m.group(3) == "100"}
    assert done == set(stages[:-1])  # every stage but the sweep has a bar, and it reached its end
    log = (pipeline_job["run_dir"] / "console.log").read_text()
    for library_line in ("TrainController", "Execution plan", "TrainingReport"):
        assert library_line in log
    assert log.count("[ideal-ray] step 3/6 ") == 1 and "Failed to query Ray Train Controller" not in log
    assert "all_gather_into_tensor" not in log


def test_every_stage_logged_to_the_real_mlflow_server(pipeline_job, mlflow_server):
    """Every stage's run, metrics and artifacts went through the server's REST API and artifact proxy into its
    SQLite store and artifact folder."""
    import mlflow

    from ideal_ray.tracking import find_runs

    assert pipeline_job["status"] == "SUCCEEDED"
    state = _stages(pipeline_job)
    uri = mlflow_server["uri"]
    runs = {e: find_runs(uri, e) for e in ("ideal-tokenizer", "extract", "ideal-ar", "ideal-sample", "ideal-eval",
                                           "ideal-sweep-cfg")}
    for e, rs in runs.items():
        assert rs and all(r["status"] == "FINISHED" for r in rs), (e, rs)
    client = mlflow.MlflowClient(uri)
    assert client.get_metric_history(runs["ideal-tokenizer"][0]["run_id"], "g_loss")[-1].step == 6
    ar_loss = client.get_metric_history(runs["ideal-ar"][0]["run_id"], "loss")
    assert [m.step for m in ar_loss] == list(range(1, 41))
    # the AR stage learns: zero-init head = uniform over the codebook at first, then the loss falls
    assert ar_loss[0].value == pytest.approx(math.log(256), abs=0.3)
    assert ar_loss[-1].value < ar_loss[0].value - 0.5, [m.value for m in ar_loss]
    assert len(runs["ideal-eval"]) == 2  # reconstruction and generation
    parent = state["sweep"]["outputs"]["parent_run_id"]
    children = [r for r in runs["ideal-sweep-cfg"] if r["run_id"] != parent]
    assert sorted(float(r["params"]["cfg_scale"]) for r in children) == [1.0, 1.75]  # one child run per trial
    assert all("gfid" in r["metrics"] for r in children)
    best = client.download_artifacts(parent, "sweep/best.json", str(mlflow_server["base"] / "dl"))
    assert float(json.load(open(best))["config"]["cfg_scale"]) == state["sweep"]["outputs"]["best_cfg_scale"]
    # the server's artifact store: the bucket
    stored = {key.rsplit("/", 1)[-1] for key in bucket_objects(f"{BUCKET}/mlflow")}
    exports = [os.path.basename(state[s]["outputs"]["export"]) for s in ("tokenizer", "ar")]
    assert {"best.json", "cfg_table.md", "summary.json", "result.json", *exports} <= stored, stored
    assert any(name.endswith(".png") for name in stored)  # the sample and sweep grids
    assert os.path.getsize(mlflow_server["base"] / "mlflow.db") > 0
    assert not (pipeline_job["run_dir"] / "mlflow.db").exists()  # the job used the server, not a local file
    # a client without any credentials of the store downloads the GPT export through the server
    dl = mlflow_server["base"] / "dl-export"
    script = ("import sys, mlflow; print(mlflow.artifacts.download_artifacts(run_id=sys.argv[1], "
              "artifact_path=sys.argv[2], dst_path=sys.argv[3], tracking_uri=sys.argv[4]))")
    env = {k: v for k, v in _env().items() if k not in AWS_VARS}
    p = subprocess.run([sys.executable, "-c", script, runs["ideal-ar"][0]["run_id"], exports[1], str(dl), uri],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(p.stdout.strip().splitlines()[-1], "rb") as got, open(state["ar"]["outputs"]["export"], "rb") as want:
        assert got.read() == want.read()


def test_rerun_as_a_plain_python_job_skips_every_finished_stage(head, pipeline_job, mlflow_server):
    """The same command as `python jobs/pipeline.py` on the submitted job's run folder: a job and a plain run are
    interchangeable, and the rerun resumes the pipeline (every stage done, nothing redone)."""
    assert pipeline_job["status"] == "SUCCEEDED"
    before = _stages(pipeline_job)
    since = os.path.getsize(head["log"])
    _run([sys.executable] + _pipeline_args(head), head["log"], timeout=300,
         env=_env(MLFLOW_TRACKING_URI=mlflow_server["uri"], DS_ACCELERATOR="cpu"))
    after = _stages(pipeline_job)
    assert all(s["skipped"] for s in after.values())
    runs = json.loads((pipeline_job["run_dir"] / "pipeline.json").read_text())["runs"]
    assert [r["ray_job"] is None for r in runs] == [False, True]  # the job, then the plain run
    assert {k: v["outputs"] for k, v in before.items()} == {k: v["outputs"] for k, v in after.items()}
    _assert_skipped_everything(_output(head["log"], since), before)


def _assert_skipped_everything(output: str, recorded: dict) -> None:
    """A rerun's console: one line per skipped stage, and the report's rows saying 'skipped' with the seconds the
    stage took when it ran."""
    assert [line for line in output.splitlines() if "done earlier, skipped" in line] == [
        f"[pipeline] {k}: done earlier, skipped ({s['seconds']:.0f} s then)" for k, s in recorded.items()]
    rows = report_rows(output)
    assert [rows[k][0] for k in recorded] == [f"skipped ({s['seconds']:.0f} s then)" for s in recorded.values()]


def test_the_demo_is_the_pipeline_and_resumes_the_jobs_run(head, pipeline_job, mlflow_server):
    """`jobs/demo.py` pointed at the job's run folder (its name and settings): the demo runs the pipeline's chain
    (the same stages, recorded in the same pipeline.json), so it finds every stage done, skips each, and says so."""
    assert pipeline_job["status"] == "SUCCEEDED"
    before = _stages(pipeline_job)
    since = os.path.getsize(head["log"])
    _run([sys.executable, "jobs/demo.py", f"output_dir={head['base'] / 'runs'}", f"data.root={head['base'] / 'data'}"]
         + PIPELINE_OVERRIDES, head["log"], timeout=300,
         env=_env(MLFLOW_TRACKING_URI=mlflow_server["uri"], DS_ACCELERATOR="cpu"))
    after = _stages(pipeline_job)
    assert list(after) == ["tokenizer", "extract", "ar", "sample", "evaluate", "sweep"]
    assert all(s["skipped"] for s in after.values())
    assert {k: v["outputs"] for k, v in before.items()} == {k: v["outputs"] for k, v in after.items()}
    runs = json.loads((pipeline_job["run_dir"] / "pipeline.json").read_text())["runs"]
    assert runs[-1]["argv"][0] == f"output_dir={head['base'] / 'runs'}"  # the demo's invocation, recorded
    _assert_skipped_everything(_output(head["log"], since), before)
