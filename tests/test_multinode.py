"""Training on several Ray nodes, on one machine: ``dist.placement_strategy`` and the record of where ranks ran.

A module-scoped ``ray.cluster_utils.Cluster`` on loopback: a head with no CPUs (the driver and Ray Train's controller
need none, so no worker fits there) and two worker nodes of 4 logical CPUs each, told apart by the custom resources
``node_a`` and ``node_b``. The tiny tokenizer and AR stages run on it with 2 workers and
``dist.placement_strategy=STRICT_SPREAD``; their MLflow runs' tag ``dist/nodes`` (each rank's Ray node id) must name
both worker nodes, one rank each.

The cluster's Ray temp dir is private (``RAY_TMPDIR``): a Cluster writes its address to ``<temp>/ray/
ray_current_cluster``, which any plain ``ray.init()`` on the machine would otherwise find and join. Any Ray
connection an earlier test left open is closed first; the cluster is shut down and the environment restored after
the module (the next module's ``ray_cluster`` starts its own instance as usual).
"""
import os
import shutil
import tempfile

import numpy as np
import pytest

from ideal_ray.config import ConfigError, load_ar_config, load_config
from ideal_ray.tracking import find_runs
from ideal_ray.train.worker import NODES_TAG

WORKER_CPUS = 4  # logical CPUs of each worker node: a train worker, its rank's decode actor, Ray Data's reads


# --------------------------------------------------------------------------------------------- config
def test_unknown_placement_strategy_is_one_sentence():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["dist.placement_strategy=EVERYWHERE"])
    msg = str(e.value)
    assert msg.startswith("dist.placement_strategy 'EVERYWHERE' is unknown") and "STRICT_SPREAD" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")
    with pytest.raises(ConfigError, match="dist.placement_strategy 'spread' is unknown"):
        load_ar_config("ar-tiny", ["dist.placement_strategy=spread"])
    assert load_config("tiny").dist.placement_strategy == "PACK"


def test_strict_spread_on_a_local_one_node_cluster_is_refused(monkeypatch):
    """A local cluster started for the run is one node: STRICT_SPREAD with 2 workers would wait for ever."""
    import ray

    import ideal_ray.cluster
    from ideal_ray.train import ray_trainer

    shut = []
    monkeypatch.setattr(ideal_ray.cluster, "init_ray", lambda *a, **k: True)  # "started a local cluster"
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(ray, "shutdown", lambda: shut.append(True))
    cfg = load_config("tiny", ["dist.placement_strategy=STRICT_SPREAD"])
    with pytest.raises(ConfigError, match="STRICT_SPREAD puts each of the 2 workers on its own node"):
        ray_trainer.init_ray(cfg)
    assert shut == [True]
    ray_trainer.init_ray(load_config("tiny", ["dist.placement_strategy=STRICT_SPREAD", "dist.num_workers=1"]))


# ------------------------------------------------------------------------------------------ the cluster
@pytest.fixture(scope="module")
def two_nodes():
    """{"node_a": id, "node_b": id, "head": id} of a running 3-node Cluster this process is connected to."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # a connection an earlier test left open (conftest's ray_cluster closes its own)
        ray.shutdown()
    saved = os.environ.get("RAY_TMPDIR")
    temp = tempfile.mkdtemp(prefix="ray-mn-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    os.environ["RAY_TMPDIR"] = temp
    cluster = Cluster()
    try:
        head = cluster.add_node(num_cpus=0, include_dashboard=False)
        a = cluster.add_node(num_cpus=WORKER_CPUS, resources={"node_a": 1})
        b = cluster.add_node(num_cpus=WORKER_CPUS, resources={"node_b": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
        yield {"node_a": a.node_id, "node_b": b.node_id, "head": head.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()  # also deletes the cluster's address file (under RAY_TMPDIR: before restoring it)
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(temp, ignore_errors=True)


def _ranks_nodes(result, experiment):
    """The node ids the run's MLflow record gives its ranks (tag dist/nodes), in rank order."""
    (run,) = find_runs(result["tracking_uri"], experiment)
    return run["tags"][NODES_TAG].split(",")


def _assert_one_rank_per_worker_node(nodes, two_nodes):
    import ray

    assert len(nodes) == 2 and set(nodes) == {two_nodes["node_a"], two_nodes["node_b"]}, (nodes, two_nodes)
    alive = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 3
    custom = [sorted(k for k in alive[n] if k in ("node_a", "node_b")) for n in nodes]
    assert sorted(custom) == [["node_a"], ["node_b"]]  # each rank on the node of one custom resource


def test_tokenizer_workers_run_one_per_node(two_nodes, data_root, tmp_path):
    from ideal_ray.train.ray_trainer import train_tokenizer

    runs = str(tmp_path)
    cfg = load_config("tiny", [f"data.root={data_root}", f"dist.storage_path={runs}", f"output_dir={runs}",
                               "name=spread", "schedule.steps=2", "schedule.ckpt_every=2", "schedule.log_every=1",
                               "schedule.vis_every=1000", "data.loader_workers=1",
                               "dist.placement_strategy=STRICT_SPREAD"])
    result = train_tokenizer(cfg, log=lambda line: None)
    assert result["steps"] == 2
    _assert_one_rank_per_worker_node(_ranks_nodes(result, "ideal-tokenizer"), two_nodes)


def _token_shards(folder, images=8, views=2, grid=8, vocab=256, classes=10):
    """A one-shard token folder of random codes (the layout jobs/extract_tokens.py writes)."""
    from ideal_ray.data import tokens as tk

    os.makedirs(folder)
    rng = np.random.default_rng(0)
    ids = [f"train/img{i:03d}.png" for i in range(images)]
    rows = [(i, v) for i in range(images) for v in range(views)]
    info = tk.write_shard(os.path.join(folder, tk.shard_name(0)), [ids[i] for i, _ in rows], [v for _, v in rows],
                          [i % classes for i, _ in rows], rng.integers(0, vocab, (len(rows), grid * grid)),
                          row_group_rows=2 * views)
    tk.write_manifest(folder, {"format": tk.FORMAT, "complete": True, "grid": grid, "vocab": vocab,
                               "num_views": views, "views": "test", "shards": [dict(info, images=images)],
                               "num_images": images})
    return folder


def test_ar_workers_run_one_per_node(two_nodes, tmp_path):
    from ideal_ray.train.ar_stage import train_ar

    runs, shards = str(tmp_path / "runs"), _token_shards(str(tmp_path / "tokens"))
    cfg = load_ar_config("ar-tiny", [f"data.shards={shards}", f"dist.storage_path={runs}", f"output_dir={runs}",
                                     "name=spread-ar", "data.global_batch=4", "schedule.steps=2",
                                     "schedule.ckpt_every=2", "schedule.log_every=1",
                                     "dist.placement_strategy=STRICT_SPREAD"])
    result = train_ar(cfg, log=lambda line: None)
    assert result["steps"] == 2
    _assert_one_rank_per_worker_node(_ranks_nodes(result, "ideal-ar"), two_nodes)
