"""MLflow tracking: real mlflow, a SQLite store under tmp_path per test."""
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ideal_ray.config import load_config
from ideal_ray.tracking import (
    CHANGED_PARAM_TAG_PREFIX,
    MAX_PARAM_VAL_LENGTH,
    NONFINITE_METRIC,
    TRUNCATION_MARKER,
    NullTracker,
    Tracker,
    TrackingError,
    default_tracking_uri,
    find_runs,
    local_artifact_root,
    make_tracker,
)


@pytest.fixture
def uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return default_tracking_uri(str(tmp_path / "run"))


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 4), (255, 0, 0)).save(path)
    return path


def test_import_does_not_load_mlflow():
    code = "import sys, ideal_ray.tracking; assert 'mlflow' not in sys.modules, 'mlflow imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_uri_is_sqlite_in_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "a" / "b"
    uri = default_tracking_uri(str(run_dir))
    assert run_dir.is_dir()
    assert uri == f"sqlite:///{run_dir.resolve()}/mlflow.db"
    assert local_artifact_root(uri) == (run_dir.resolve() / "mlartifacts").as_uri()


def test_local_artifact_root_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_artifact_root("sqlite:///rel/m.db") == (tmp_path / "rel" / "mlartifacts").as_uri()
    assert local_artifact_root("file:///x/mlruns") == Path("/x/mlartifacts").as_uri()
    assert local_artifact_root("/x/mlruns") == Path("/x/mlartifacts").as_uri()
    assert local_artifact_root("http://host:5000") is None
    assert local_artifact_root("postgresql://u@h/db") is None


def test_env_override_is_honoured(tmp_path, monkeypatch):
    env_uri = f"sqlite:///{tmp_path / 'elsewhere' / 'x.db'}"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    run_dir = tmp_path / "run"
    uri = default_tracking_uri(str(run_dir))
    assert uri == env_uri
    with Tracker(uri, "exp", "r") as t:
        t.log_metrics({"loss": 1.0}, step=0)
    assert not (run_dir / "mlflow.db").exists()
    assert [r["run_id"] for r in find_runs(env_uri, "exp")] == [t.run_id]


def test_params_of_real_config(uri):
    flat = load_config("tiny").flat()
    assert any(isinstance(v, tuple) for v in flat.values())  # the stringify path is exercised
    with Tracker(uri, "exp", "params") as t:
        t.log_params(flat)
    (run,) = find_runs(uri, "exp")
    assert run["params"] == {k: str(v) for k, v in flat.items()}
    assert run["params"]["model.vfm.mean"] == "(0.5, 0.5, 0.5)"
    assert run["status"] == "FINISHED" and run["run_name"] == "params"


def test_params_batching_none_and_truncation(uri):
    flat = {f"p{i:03d}": i for i in range(250)}  # more than MLflow's 100 per batch
    flat.update({"none": None, "list": [1, 2], "long": "x" * (MAX_PARAM_VAL_LENGTH + 500)})
    with Tracker(uri, "exp", "many") as t:
        t.log_params(flat)
    params = find_runs(uri, "exp")[0]["params"]
    assert len(params) == 253 and params["p249"] == "249"
    assert params["none"] == "None" and params["list"] == "[1, 2]"
    assert len(params["long"]) == MAX_PARAM_VAL_LENGTH and params["long"].endswith(TRUNCATION_MARKER)


def test_metrics_history_and_nonfinite(uri):
    with Tracker(uri, "exp", "metrics") as t:
        for step in range(5):
            t.log_metrics({"loss": torch.tensor(1.0 / (step + 1)), "lr": np.float32(step), "ok": True}, step=step)
        with pytest.warns(UserWarning, match="Non-finite"):
            t.log_metrics({"loss": float("nan"), "gnorm": math.inf}, step=5)
        t.log_metrics({"loss": float("nan")}, step=6)  # counted, warned only once per key
        with pytest.raises(TypeError, match="more than one element"):
            t.log_metrics({"bad": torch.ones(3)}, step=7)
        with pytest.raises(TypeError, match="log a number"):
            t.log_metrics({"bad": "high"}, step=7)
    client = _client(uri)
    hist = client.get_metric_history(t.run_id, "loss")
    assert [m.step for m in hist] == [0, 1, 2, 3, 4]
    assert [m.value for m in hist] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert [m.value for m in client.get_metric_history(t.run_id, "lr")] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert client.get_metric_history(t.run_id, "gnorm") == []
    nonfinite = client.get_metric_history(t.run_id, NONFINITE_METRIC)
    assert [(m.step, m.value) for m in nonfinite] == [(5, 2.0), (6, 3.0)]


def test_resume_appends_to_same_run(uri):
    flat = load_config("tiny").flat()
    with Tracker(uri, "exp", "job", tags={"stage": "tokenizer"}) as t:
        t.log_params(flat)
        for step in range(3):
            t.log_metrics({"loss": float(step)}, step=step)
        with pytest.warns(UserWarning, match="Non-finite"):
            t.log_metrics({"x": float("inf")}, step=2)
        run_id = t.run_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # re-logging identical params must be silent
        t2 = Tracker(uri, "exp", "job", run_id=run_id, tags={"resumed_at": 3})
        assert t2.run_id == run_id and t2.resumed
        assert _client(uri).get_run(run_id).info.status == "RUNNING"
        t2.log_params(flat)
        for step in range(3, 6):
            t2.log_metrics({"loss": float(step)}, step=step)
    with pytest.warns(UserWarning, match="Non-finite"):
        t2.log_metrics({"x": float("nan")}, step=5)
    t2.finish()
    (run,) = find_runs(uri, "exp")
    assert run["run_id"] == run_id and run["status"] == "FINISHED"
    assert run["tags"] == {"stage": "tokenizer", "resumed_at": "3"}
    assert [m.step for m in _client(uri).get_metric_history(run_id, "loss")] == list(range(6))
    assert run["metrics"][NONFINITE_METRIC] == 2.0  # the count carries over the resume


def test_changed_param_on_resume_is_recorded_not_raised(uri):
    with Tracker(uri, "exp", "job") as t:
        t.log_params(load_config("tiny").flat())
    changed = load_config("tiny", ["optim.lr=0.5"]).flat()
    with Tracker(uri, "exp", "job", run_id=t.run_id) as t2:
        with pytest.warns(UserWarning, match="optim.lr"):
            t2.log_params(changed)
    (run,) = find_runs(uri, "exp")
    assert run["params"]["optim.lr"] == str(load_config("tiny").optim.lr)  # MLflow keeps the first value
    assert run["tags"][CHANGED_PARAM_TAG_PREFIX + "optim.lr"] == "0.5"
    assert run["status"] == "FINISHED"


def test_unknown_run_id_is_a_clear_error(uri):
    with pytest.raises(TrackingError, match="does not exist"):
        Tracker(uri, "exp", "job", run_id="0123456789abcdef0123456789abcdef")


def test_artifacts_land_next_to_db_not_cwd(uri, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    png = _png(tmp_path / "grid.png")
    with Tracker(uri, "exp", "art") as t:
        assert t.log_image(str(png)) == "reconstructions/grid.png"
        assert t.log_dict({"shape": (1, 2), "path": tmp_path}, "config/resolved") == "config/resolved.json"
        assert t.log_artifact(str(png), "final") == "final/grid.png"
        with pytest.raises(FileNotFoundError, match="does not exist"):
            t.log_artifact(str(tmp_path / "missing.pt"))
    root = tmp_path / "run" / "mlartifacts" / t.run_id / "artifacts"
    assert (root / "reconstructions" / "grid.png").read_bytes() == png.read_bytes()
    assert (root / "config" / "resolved.json").is_file()
    assert list(cwd.iterdir()) == []  # nothing written relative to the working directory
    client = _client(uri)
    assert [f.path for f in client.list_artifacts(t.run_id, "reconstructions")] == ["reconstructions/grid.png"]
    assert {f.path for f in client.list_artifacts(t.run_id)} == {"reconstructions", "config", "final"}
    exp = client.get_experiment_by_name("exp")
    assert exp.artifact_location == (tmp_path / "run" / "mlartifacts").as_uri()


def test_null_tracker_and_make_tracker(uri, tmp_path):
    png = _png(tmp_path / "g.png")
    nt = make_tracker(1, uri, "exp", "r")
    assert isinstance(nt, NullTracker) and nt.run_id is None
    with nt as t:
        t.log_params({"a": 1})
        t.log_metrics({"loss": 1.0}, step=0)
        t.log_artifact(str(png))
        t.log_image(str(png))
        t.log_dict({"a": 1}, "x")
        t.set_tags({"a": "b"})
        t.finish("FAILED")
    assert not (tmp_path / "run" / "mlflow.db").exists()  # rank != 0 never opens the store
    tracker = make_tracker(0, uri, "exp", "r")
    assert isinstance(tracker, Tracker)
    tracker.finish()


def test_exception_marks_run_failed(uri):
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(uri, "exp", "crash") as t:
            t.log_metrics({"loss": 1.0}, step=0)
            raise RuntimeError("boom")
    assert find_runs(uri, "exp")[0]["status"] == "FAILED"
    with pytest.raises(ValueError, match="not allowed"):
        t.finish("DONE")
    t.finish("FINISHED")  # already terminated: no-op, stays FAILED
    assert find_runs(uri, "exp")[0]["status"] == "FAILED"


def test_find_runs_unknown_experiment(uri):
    Tracker(uri, "known", "r").finish("KILLED")
    with pytest.raises(TrackingError, match="known"):
        find_runs(uri, "nope")
    assert find_runs(uri, "known")[0]["status"] == "KILLED"
