"""The cluster configs we ship (cluster/): they parse, match the pinned Ray version, install the project, and never
expose the job API or MLflow beyond loopback / the private network, nor carry a credential."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "aws-h200.yaml"
KUBERAY = CLUSTER / "kuberay-h200.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"


def _ray_pin() -> str:
    m = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert m, "pyproject.toml pins ray"
    return m.group(1)


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in _strings(k) + _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def test_every_config_parses_and_pins_the_projects_ray():
    pin = _ray_pin()
    images = []
    for path in (LAUNCHER, KUBERAY):
        images += [s for s in _strings(_docs(path)) if s.startswith("rayproject/ray:")]
    assert images and all(img.startswith(f"rayproject/ray:{pin}-") for img in images), images
    (cluster,) = [d for d in _docs(KUBERAY) if d["kind"] == "RayCluster"]
    assert cluster["spec"]["rayVersion"] == pin
    assert isinstance(yaml.safe_load(RUNTIME_ENV.read_text())["env_vars"], dict)


def test_launcher_binds_job_api_to_loopback_and_mlflow_to_the_private_address():
    cfg = _docs(LAUNCHER)[0]
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in " ".join(_strings(cfg))  # in what runs (comments may explain why)
    mlflow = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    assert mlflow and "hostname -I" in mlflow[0]  # the head's private address
    assert cfg["provider"]["use_internal_ips"] is True
    gpu = cfg["available_node_types"]["gpu_h200"]
    assert gpu["node_config"]["InstanceType"] == "p5en.48xlarge" and gpu["min_workers"] < gpu["max_workers"]
    setup = " ".join(cfg["setup_commands"])
    assert "pip install -q -e /home/ray/ideal-ray" in setup and "ideal_ray.eval.inception install" in setup


def test_kuberay_exposes_nothing_outside_the_cluster():
    docs = _docs(KUBERAY)
    running = " ".join(_strings(docs))  # what is applied (comments may explain why)
    assert "LoadBalancer" not in running and "NodePort" not in running
    services = [d for d in docs if d["kind"] == "Service"]
    assert services and all(s["spec"]["type"] == "ClusterIP" for s in services)
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    spec = cluster["spec"]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP" and spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8" and group["maxReplicas"] > group["minReplicas"]
    for pod in (spec["headGroupSpec"]["template"]["spec"], group["template"]["spec"]):
        (c,) = pod["containers"]
        assert {"name": "shared", "mountPath": "/shared"} in c["volumeMounts"]
        assert "pip install -q -e /shared/ideal-ray" in " ".join(c["args"])


@pytest.mark.parametrize("path", [LAUNCHER, KUBERAY, RUNTIME_ENV], ids=lambda p: p.name)
def test_no_credentials_in_configs(path):
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # an AWS access key id
    for key in ("aws_secret_access_key", "secret_access_key", "password", "api_key", "apikey"):
        assert key not in text.lower(), f"{path.name} mentions {key}"
    env = yaml.safe_load(RUNTIME_ENV.read_text())["env_vars"]
    assert not [k for k in env if re.search(r"SECRET|TOKEN|PASSWORD|KEY", k)]


def test_runtime_env_keeps_user_data_out_of_the_upload():
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    assert env["working_dir"] == "."
    for heavy in (".venv", "runs", "data", ".git"):
        assert heavy in env["excludes"]
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert os.path.isfile(ROOT / "jobs" / "extract_tokens.py")  # the job its usage line names


def test_jobs_refuse_relative_output_paths_only_inside_a_working_dir_job(monkeypatch, capsys):
    """Ray gives a job's entrypoint its runtime env in $RAY_JOB_CONFIG_JSON_ENV_VAR (the real thing is exercised by
    test_cluster_job.py); with a working_dir there, relative output paths are refused in one sentence."""
    import json

    from ideal_ray.cli import job_working_dir, require_durable_paths

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_working_dir() is None
    require_durable_paths(output_dir="runs", **{"--out": "x"})  # a plain `python jobs/x.py`: fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"A": "1"}}}))
    require_durable_paths(output_dir="runs")  # a job without --working-dir runs in the submitter's cwd: fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}, "metadata": {}}))
    assert job_working_dir() == "gcs://_ray_pkg_abc.zip"
    require_durable_paths(output_dir="/shared/runs", **{"dist.storage_path": "s3://bucket/runs", "--out": None})
    with pytest.raises(SystemExit) as e:
        require_durable_paths(**{"--storage-path": "runs/sweeps"})
    assert e.value.code == 2  # refused: exit code 2, the sentence on stderr
    assert re.search(r"--storage-path=runs/sweeps is relative.*--storage-path=/shared/runs/sweeps",
                     capsys.readouterr().err)
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_ar_job", Path(__file__).parents[1] / "jobs" / "train_ar.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with pytest.raises(SystemExit) as e:
        job.main(["--preset", "ar-tiny", "data.shards=/shared/tokens"])
    assert e.value.code == 2 and "output_dir=runs is relative" in capsys.readouterr().err
