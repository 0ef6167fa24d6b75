"""Training on several Ray nodes, on one machine: ``dist.placement_strategy`` and the record of where ranks ran.

A module-scoped ``ray.cluster_utils.Cluster`` on loopback: a head with no CPUs (the driver and Ray Train's controller
need none, so no worker fits there) and two worker nodes of 4 logical CPUs each, told apart by the custom resources
``node_a`` and ``node_b``. The tiny tokenizer and AR stages run on it with 2 workers and
``dist.placement_strategy=STRICT_SPREAD``; their MLflow runs' tag ``dist/nodes`` (each rank's Ray node id) must name
both worker nodes, one rank each.

Node loss: a whole worker node ends (``Cluster.remove_node(allow_graceful=False)``: its raylet and every process on
it, as a reclaimed spot instance) in the middle of a 2-node tokenizer run and of a Ray extraction, and a replacement
node with the same resources joins, as an autoscaler would add one. The training run must end on the parameters of
the uninterrupted run with one MLflow run; the extraction must hold every row once. Each prints how long the
recovery took (the numbers in the README's failure table).

The cluster's Ray temp dir is private (``RAY_TMPDIR``): a Cluster writes its address to ``<temp>/ray/
ray_current_cluster``, which any plain ``ray.init()`` on the machine would otherwise find and join. Any Ray
connection an earlier test left open is closed first; the cluster is shut down and the environment restored after
the module (the session's one-node head of conftest's ``ray_head`` runs beside it, untouched).
"""
import os
import shutil
import tempfile
import time

import numpy as np
import pytest
import torch

from conftest import Background, own_processes, ray_tmpdir
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
    """{"node_a": id, "node_b": id, "head": id, "cluster": the Cluster, "nodes": {"node_a": its Node, "node_b": ...}}
    of a running 3-node Cluster this process is connected to. A test that ends a node adds its replacement (same
    resources) and updates the ids and nodes here."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # a connection an earlier test left open (conftest's ray_connected closes its own)
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="ray-mn-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    with ray_tmpdir(temp):  # for the whole module: the cluster's address file and sessions stay private
        cluster = Cluster()
        try:
            # a lost node is declared dead after 3 missed health checks 0.5 s apart (Ray's default: 5 x 3 s): the
            # tests measure what Ray Train and Ray Data do after the loss, not the detection delay, a cluster setting
            head = cluster.add_node(num_cpus=0, include_dashboard=False,
                                    _system_config={"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                                                    "health_check_timeout_ms": 1000})
            a = cluster.add_node(num_cpus=WORKER_CPUS, resources={"node_a": 1})
            b = cluster.add_node(num_cpus=WORKER_CPUS, resources={"node_b": 1})
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False,
                     runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
            yield {"node_a": a.node_id, "node_b": b.node_id, "head": head.node_id, "cluster": cluster,
                   "nodes": {"node_a": a, "node_b": b}}
        finally:
            ray.shutdown()
            cluster.shutdown()  # also deletes the cluster's address file (under RAY_TMPDIR: still set here)
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


def spread(data_root, runs, name, *overrides):
    """The tiny tokenizer on 2 workers, one per worker node, 6 steps with a checkpoint after each."""
    return load_config("tiny", [f"data.root={data_root}", f"dist.storage_path={runs}", f"output_dir={runs}",
                                f"name={name}", "schedule.steps=6", "schedule.ckpt_every=1", "schedule.log_every=1",
                                "schedule.vis_every=1000", "data.loader_workers=1",
                                "dist.placement_strategy=STRICT_SPREAD", *overrides])


@pytest.fixture(scope="module")
def spread_run(two_nodes, data_root, tmp_path_factory):
    """The uninterrupted 2-node run: (summary, its run folder)."""
    from ideal_ray.train.ray_trainer import train_tokenizer

    runs = str(tmp_path_factory.mktemp("spread"))
    result = train_tokenizer(spread(data_root, runs, "spread"), log=lambda line: None)
    return result, os.path.join(runs, "spread")


def test_tokenizer_workers_run_one_per_node(spread_run, two_nodes):
    result, _ = spread_run
    assert result["steps"] == 6
    _assert_one_rank_per_worker_node(_ranks_nodes(result, "ideal-tokenizer"), two_nodes)


def _final_generator(run_dir):
    from ray.train import Result

    from ideal_ray.train.engines import load_module_state

    with Result.from_path(run_dir).checkpoint.as_directory() as d:
        return load_module_state(d, "generator"), torch.load(os.path.join(d, "ema.pt"), weights_only=True)


def _replace_node(two_nodes, name):
    """End worker node ``name`` at once (its raylet and every process on it, as a reclaimed spot instance) and add
    a node with the same resources in its place, as an autoscaler would."""
    cluster = two_nodes["cluster"]
    cluster.remove_node(two_nodes["nodes"][name], allow_graceful=False)
    new = cluster.add_node(num_cpus=WORKER_CPUS, resources={name: 1})
    two_nodes["nodes"][name], two_nodes[name] = new, new.node_id


def test_a_lost_node_restarts_the_run_on_a_replacement_with_the_uninterrupted_parameters(spread_run, two_nodes,
                                                                                        data_root, tmp_path):
    """End node_b (rank 1's node) after the first checkpoint of a 6-step 2-node run and add a replacement: Ray Train
    restarts the worker group from the latest checkpoint once both nodes are there, the run ends on the parameters
    of the uninterrupted run (spread_run), and one MLflow run holds every step, at most one checkpoint interval twice.
    Prints the restart time: the node's end to the first step of the restarted group."""
    import mlflow

    from ideal_ray.train.ray_trainer import train_tokenizer
    from ideal_ray.train.run_storage import latest_checkpoint_step

    runs = str(tmp_path)
    cfg = spread(data_root, runs, "lost", "dist.max_failures=2")
    run = Background(lambda: train_tokenizer(cfg, log=lambda line: None))
    run_dir = os.path.join(runs, "lost")
    run.wait_for(lambda: latest_checkpoint_step(run_dir) >= 1)
    killed_at = latest_checkpoint_step(run_dir)
    assert run.running() and 1 <= killed_at < 6, "the node must end mid-run"
    lost = time.time()
    _replace_node(two_nodes, "node_b")
    out = run.result()
    assert out["steps"] == 6

    want, got = _final_generator(spread_run[1]), _final_generator(run_dir)
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k

    (run,) = [r for r in find_runs(out["tracking_uri"], "ideal-tokenizer") if r["run_name"] == "lost"]
    assert run["status"] == "FINISHED"
    history = mlflow.MlflowClient(out["tracking_uri"]).get_metric_history(run["run_id"], "g_loss")
    steps = [m.step for m in history]
    assert set(steps) == set(range(1, 7)) and len(steps) - len(set(steps)) <= 1, steps  # ckpt_every=1
    # the restart: the longest pause in the step log after the loss (the old group's failure, the new group's
    # placement on the replacement node, its start-up and the checkpoint's load); the surviving rank may log a step
    # or two before it
    times = [lost] + sorted(m.timestamp / 1000 for m in history if m.timestamp / 1000 > lost)
    gap = max(range(1, len(times)), key=lambda i: times[i] - times[i - 1])
    print(f"\n[node loss] node_b ended after checkpoint {killed_at}; training went on {times[gap] - lost:.1f} s "
          f"later on the replacement node; the run ended {time.time() - lost:.1f} s after the loss")
    _assert_one_rank_per_worker_node(run["tags"][NODES_TAG].split(","), two_nodes)  # the last attempt's ranks


def _node_of(pid, two_nodes):
    """The worker node ("node_a" / "node_b") whose raylet started process ``pid``."""
    import psutil

    parent = psutil.Process(pid).ppid()
    (name,) = [n for n, node in two_nodes["nodes"].items() if node.all_processes["raylet"][0].process.pid == parent]
    return name


def test_a_lost_encoder_node_leaves_every_row_once(spread_run, two_nodes, data_root, tmp_path):
    """End the node holding the encoder actor of a Ray extraction once its first shard is written, and add a
    replacement: Ray Data restarts the actor and retries its batches (the decode actors of that node too), the
    driver drops rows delivered twice, and the folder holds every row once, equal to the in-process extraction."""

    from ideal_ray.config import ExtractConfig, load_stage_config
    from ideal_ray.data import ar_reader as ar
    from ideal_ray.data import tokens as tk
    from ideal_ray.pipelines.extract_local import extract_tokens_local
    from ideal_ray.pipelines.extract_ray import extract_tokens_ray

    def cfg(out, *extra):
        return load_stage_config(ExtractConfig, "tiny", [f"tokenizer={spread_run[0]['export']}",
                                                         f"data.root={data_root}", f"out={out}", "views=llamagen",
                                                         "batch_size=20", "shard_images=4", "row_group_images=2",
                                                         *extra])

    extract_tokens_local(cfg(tmp_path / "local"))
    out = tmp_path / "ray"
    # one image per encoder call and per decode task: many tasks, a wide window for the loss
    run = Background(lambda: extract_tokens_ray(cfg(out, "run.decode_actors=2", "decode_batch=1", "tracking_uri=")))
    run.wait_for(lambda: list(out.glob(tk.SHARD_GLOB)))
    encoders = own_processes("_EncodeViews")
    assert run.running() and encoders, "the loss must land mid-run, on an encoder actor's node"
    written = len(list(out.glob(tk.SHARD_GLOB)))
    lost = time.time()
    _replace_node(two_nodes, _node_of(encoders[0].pid, two_nodes))
    s = run.result()
    print(f"\n[node loss] the encoder's node ended after {written} of {s['shards']} shards; {s['duplicates_dropped']} "
          f"duplicate row(s) dropped; the extraction ended {time.time() - lost:.1f} s after the loss")
    assert s["complete"] and s["verify"]["ok"] and s["verify"]["duplicates"] == 0 and s["verify"]["missing"] == 0
    got, want = ar.TokenShardDataset(out), ar.TokenShardDataset(tmp_path / "local")
    assert got.image_ids == want.image_ids and len(set(got.image_ids)) == len(got.image_ids) == 32
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.tokens, want.tokens)


HELPERS = {"datasets_stats_actor", "AutoscalingCoordinator", "ActorLocationTracker"}  # Ray Data's, by name


def _helper_nodes():
    """{name: node id} of Ray Data's cluster-wide helper actors that are alive."""
    import ray
    from ray._private import state

    out = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"] in HELPERS:
            info = state.actors(actor_id=ray.get_actor(entry["name"], namespace=entry["namespace"])._actor_id.hex())
            if info["State"] == "ALIVE":
                out[entry["name"]] = info["Address"]["NodeID"]
    return out


def test_the_driver_makes_ray_data_helpers_on_its_own_node(two_nodes):
    """Ray Data's cluster-wide helper actors (stats, autoscaling coordinator, actor-location tracker) are pinned to
    the node of the process that makes them first: without ``init_ray`` making them, a train worker's dataset on
    node_a would put them there, and losing node_a would fail every dataset running on the cluster (the two
    node-loss tests above). A stage's driver makes them on connecting, on its own node (the head, as for a submitted
    job), and a dataset run on a worker node afterwards uses those."""
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):  # start from none (earlier drivers made them)
        if entry["name"] in HELPERS:
            ray.kill(ray.get_actor(entry["name"], namespace=entry["namespace"]), no_restart=True)
    deadline = time.time() + 60
    while _helper_nodes() and time.time() < deadline:
        time.sleep(0.05)
    assert not _helper_nodes()

    from ideal_ray.cluster import init_ray

    init_ray(1)

    class Same:
        def __call__(self, batch):
            return batch

    @ray.remote(num_cpus=1, resources={"node_a": 0.01})
    def dataset_on_node_a():
        ray.data.DataContext.get_current().enable_progress_bars = False
        return len(ray.data.range(8).map_batches(Same, compute=ray.data.ActorPoolStrategy(size=1)).take_all())

    assert ray.get(dataset_on_node_a.remote()) == 8
    assert _helper_nodes() == {name: two_nodes["head"] for name in HELPERS}


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
