"""The Ray cluster every job runs on, one way: :func:`init_ray` joins ``$RAY_ADDRESS`` (or a stage's
``dist.ray_address``) through :func:`connect_ray`, else starts a local cluster with at least the logical CPUs the
caller needs (training stages, sweeps, extraction, sampling, evaluation all call it), keeping Ray Data usable after a
lost node (:func:`keep_ray_data_actors`); and the device and actor count of a GPU-or-CPU actor pool from the
cluster's resources (extraction, sampling, evaluation)."""

from __future__ import annotations

import os
from typing import Optional, Tuple

from ideal_ray.errors import InputError


class ClusterUnreachableError(InputError, ConnectionError):
    """The Ray cluster named by an address cannot be reached; the message names the address and what to do."""


GCS_PROBE_SECONDS = 10.0  # how long a HOST:PORT may take to accept a connection before it counts as unreachable


def connect_ray(address: str) -> None:
    """Join the running Ray cluster at ``address`` (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``); one that cannot
    be reached is a :class:`ClusterUnreachableError` (one sentence, exit code 2 in a job) rather than Ray's
    traceback. A ``HOST:PORT`` is probed first (a TCP connection to the GCS port, :data:`GCS_PROBE_SECONDS`):
    ``ray.init`` itself would wait for an absent GCS for ever, logging a retry every 30 s."""
    import socket

    import ray

    where = "$RAY_ADDRESS" if address == os.environ.get("RAY_ADDRESS") else "the address given"

    def unreachable(why: str) -> ClusterUnreachableError:
        return ClusterUnreachableError(
            f"No Ray cluster could be reached at {address} ({where}: {why}); start it (`ray start --head` on the "
            f"head node), fix the address, or unset RAY_ADDRESS to run on a local cluster.")

    if "://" not in address and address != "auto":
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise unreachable("not HOST:PORT, ray://HOST:PORT or auto")
        try:
            socket.create_connection((host, int(port)), timeout=GCS_PROBE_SECONDS).close()
        except OSError as e:
            raise unreachable(f"nothing accepted a connection to port {port} within {GCS_PROBE_SECONDS:g} s: "
                              f"{e.strerror or e}") from None
    try:
        ray.init(address=address)
    except (ConnectionError, TimeoutError) as e:
        raise unreachable(f"Ray said: {str(e).strip().splitlines()[0][:160]}") from None


def init_ray(logical_cpus: int, address: str = "", runtime_env: Optional[dict] = None) -> bool:
    """Connect to ``address`` (or ``$RAY_ADDRESS``) or start a local cluster with at least ``logical_cpus`` logical
    CPUs and ``runtime_env``; returns True when this call started the local cluster.

    On a 2-core laptop too few logical CPUs deadlock the actor pools; oversubscribing the cores only slows them.
    Does nothing when Ray is already initialized (the caller's cluster is used as it is).
    """
    import ray

    if ray.is_initialized():
        keep_ray_data_actors()
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        connect_ray(address)
        keep_ray_data_actors()
        return False
    # The dashboard serves the State API, which Ray Train's PlacementGroupCleaner queries every second for its
    # controller (without it: a warning a second, and no clean-up of a crashed run's placement group).
    ray.init(num_cpus=max(os.cpu_count() or 1, int(logical_cpus)), include_dashboard=True, runtime_env=runtime_env)
    keep_ray_data_actors()
    return True


# Ray Data's cluster-wide helper actors in Ray 2.60 (each one detached actor, found by name): the module and the
# function that finds or makes each. Ray Train's controller asks the autoscaling coordinator too.
RAY_DATA_ACTORS = (
    ("ray.data._internal.stats", "get_or_create_stats_actor"),
    ("ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator", "get_or_create_autoscaling_coordinator"),
    ("ray.data._internal.execution.node_trackers.actor_location", "get_or_create_actor_location_tracker"),
)


def keep_ray_data_actors() -> None:
    """Make Ray Data's cluster-wide helper actors on this process's node. Ray 2.60 runs a few of them
    (:data:`RAY_DATA_ACTORS`: the stats actor, the autoscaling coordinator that every dataset's executor and Ray
    Train's controller ask for resources, the tracker of where actor-pool actors live), each made by the first process
    that needs it and pinned to that process's node. Ray means that to be the driver, but the training stages iterate
    their rank datasets inside the train workers, so a helper could land on a GPU node; when that node is lost (a
    reclaimed spot instance) every dataset running on the cluster fails with ``ActorUnschedulableError`` (an
    extraction whose encoder node was lost did, in tests/test_multinode.py). So every stage's driver, on connecting,
    makes each helper first (Ray's own function: a helper that exists is found, not moved), on the driver's node: the
    head, for a submitted job, whose loss ends the cluster anyway. Skips a helper this Ray does not have."""
    import importlib

    for module, function in RAY_DATA_ACTORS:
        try:
            make = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError):  # another Ray: nothing to make
            continue
        make()


def actor_cpus(device: str, num_actors: int, cluster_cpus: int, others: int = 1) -> int:
    """Logical CPUs for each of ``num_actors`` model actors: one beside a GPU; on the CPU, the node's cores shared
    among them (Ray sets an actor's OMP_NUM_THREADS, so its torch threads, from this) within the cluster's CPUs
    less ``others`` kept for the other tasks of the pipeline."""
    if device == "cuda":
        return 1
    return max(1, min((os.cpu_count() or 1) // num_actors, (cluster_cpus - others) // num_actors))


def use_actor_threads(device: str) -> None:
    """In a model actor on the CPU: run torch on the threads Ray gave it (its ``OMP_NUM_THREADS``, from
    :func:`actor_cpus`). A process Ray did not start (no ``OMP_NUM_THREADS``, e.g. the driver) is left as it is."""
    if device == "cpu" and os.environ.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))


def process_device(device: str) -> str:
    """The device of work done in this process (an in-process run's ``run.device``, ``GenEvalConfig.device``):
    ``auto`` is this process's GPU when it has one, else the CPU; anything else as given (cpu, cuda, cuda:N). The
    pool's counterpart is :func:`actor_device`."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def actor_device(device: str, num_actors: Optional[int]) -> Tuple[str, int, int, int]:
    """``(device, actors, cluster GPUs, cluster CPUs)``: ``auto`` is cuda when the cluster has GPUs; cuda without
    GPUs is an error; the actor count defaults to one per GPU, or 1 on CPU."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cuda" and gpus == 0:
        raise RuntimeError("device='cuda' but the Ray cluster has no GPUs; use device='cpu' or add GPU nodes.")
    return device, int(num_actors or (gpus if device == "cuda" else 1)), gpus, cpus
