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


# ---- who can reach the KubeRay cluster: NetworkPolicies and Ray's token auth, checked on the parsed manifest ----
CLUSTER_PEER = {"ray.io/cluster": "ideal-ray"}  # this RayCluster's pods (KubeRay labels every pod it makes)
OPERATOR_PEER = {"ideal-ray.io/operator": "true"}  # the pods allowed to submit jobs and read/write experiments
HEAD_PORTS = (8265, 6379, 10001)  # job API / dashboard, GCS, Ray client
MLFLOW_PORT = 5000


def _pods(docs) -> dict:
    """The labels of the pods the manifest makes: the Ray head, a Ray worker and the MLflow server."""
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    (mlflow,) = [d for d in docs if d["kind"] == "Deployment"]
    name = cluster["metadata"]["name"]
    return {"head": {"ray.io/cluster": name, "ray.io/node-type": "head"},
            "worker": {"ray.io/cluster": name, "ray.io/node-type": "worker"},
            "mlflow": dict(mlflow["spec"]["template"]["metadata"]["labels"])}


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked here: {selector}"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _admitted(docs, pod: dict, port: int):
    """Who may connect to ``pod`` on ``port`` under the manifest's NetworkPolicies: None when no policy selects the
    pod for ingress (Kubernetes then admits everyone), else the list of peers of every rule that covers the port
    (a rule without ``from`` admits everyone: the string ``"anyone"``)."""
    selecting = [p for p in docs if p["kind"] == "NetworkPolicy" and "Ingress" in p["spec"].get("policyTypes", [])
                 and _selects(p["spec"]["podSelector"], pod)]
    if not selecting:
        return None
    peers = []
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
                continue
            peers += rule.get("from") or ["anyone"]
    return peers


def network_violations(docs) -> list[str]:
    """Every way the manifest lets a pod other than this RayCluster's own (or, on the head's job API / GCS / client
    ports and MLflow's, a labelled operator) reach the Ray pods or MLflow."""
    pods, out = _pods(docs), []
    targets = [("head", p, (CLUSTER_PEER, OPERATOR_PEER)) for p in HEAD_PORTS]
    targets += [("worker", p, (CLUSTER_PEER,)) for p in (6379, 8265, 10001, 8076, 10002)]  # any worker port
    targets += [("mlflow", MLFLOW_PORT, (CLUSTER_PEER, OPERATOR_PEER))]
    for name, port, allowed in targets:
        peers = _admitted(docs, pods[name], port)
        if peers is None:
            out.append(f"no NetworkPolicy selects the {name} pod: every pod may reach it")
            continue
        for peer in peers:
            if (peer == "anyone" or set(peer) != {"podSelector"}
                    or peer["podSelector"].get("matchLabels") not in allowed):
                out.append(f"{name}:{port} admits {peer}")
        wanted = [a for a in allowed if {"podSelector": {"matchLabels": a}} not in peers]
        if wanted:
            out.append(f"{name}:{port} does not admit {wanted}")  # the cluster would not work, or not be usable
    return out


def auth_violations(docs) -> list[str]:
    """Every Ray container that does not run with token auth and the token from the Secret, and every token or
    Secret written into the manifest."""
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    spec, out = cluster["spec"], []
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["containers"]:
            env = {e["name"]: e for e in c.get("env") or []}
            if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
                out.append(f"{c['name']}: RAY_AUTH_MODE is not token")
            token = env.get("RAY_AUTH_TOKEN", {})
            if "value" in token:
                out.append(f"{c['name']}: RAY_AUTH_TOKEN is written in the manifest")
            ref = (token.get("valueFrom") or {}).get("secretKeyRef") or {}
            if not (ref.get("name") and ref.get("key")):
                out.append(f"{c['name']}: RAY_AUTH_TOKEN does not come from a Secret")
    out += [f"a Secret ({d['metadata']['name']}) is in the manifest" for d in docs if d["kind"] == "Secret"]
    out += [f"a token-like string: {s[:8]}..." for s in _strings(docs) if re.fullmatch(r"[0-9a-fA-F-]{32,}", s)]
    return out


def test_kuberay_admits_only_its_own_pods_and_the_labelled_operators():
    assert network_violations(_docs(KUBERAY)) == []


def test_kuberay_runs_ray_with_token_auth_from_a_secret():
    assert auth_violations(_docs(KUBERAY)) == []


def test_the_manifest_checks_find_a_missing_rule_or_an_inlined_token():
    """The two checks fail on a manifest that lacks a policy, opens a port to everyone or inlines the token."""
    import copy

    docs = _docs(KUBERAY)
    policies = [d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"]
    for name in policies:  # each policy is needed
        assert network_violations([d for d in docs if not (d["kind"] == "NetworkPolicy"
                                                           and d["metadata"]["name"] == name)]), name
    opened = copy.deepcopy(docs)
    for d in opened:
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "ideal-ray-head-operators":
            d["spec"]["ingress"][0].pop("from")  # the job API to every pod
    assert any("admits anyone" in v for v in network_violations(opened))
    widened = copy.deepcopy(docs)
    for d in widened:
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "ideal-ray-mlflow":
            d["spec"]["ingress"][0]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}})
    assert any("mlflow:5000 admits {'ipBlock'" in v for v in network_violations(widened))
    inlined = copy.deepcopy(docs)
    (cluster,) = [d for d in inlined if d["kind"] == "RayCluster"]
    (head,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    head["env"] = [e if e["name"] != "RAY_AUTH_TOKEN" else {"name": "RAY_AUTH_TOKEN", "value": "f" * 64}
                   for e in head["env"]]
    found = auth_violations(inlined)
    assert "ray-head: RAY_AUTH_TOKEN is written in the manifest" in found and any("token-like" in v for v in found)
    off = copy.deepcopy(docs)
    (cluster,) = [d for d in off if d["kind"] == "RayCluster"]
    (worker,) = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    worker["env"] = [e for e in worker["env"] if e["name"] != "RAY_AUTH_MODE"]
    assert auth_violations(off) == ["ray-worker: RAY_AUTH_MODE is not token"]
    assert auth_violations(off + [{"kind": "Secret", "metadata": {"name": "ideal-ray-auth"}}])[-1].startswith(
        "a Secret (ideal-ray-auth)")
