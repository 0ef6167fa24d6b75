"""What every stage's worker does around its step: session, batches, shared loop, tracker.

One function for both places a rank runs: a Ray Train worker (``TorchTrainer`` calls the stage's
``train_loop_per_worker``), or the driver's own process for an in-process run (``ray_trainer.run_stage`` calls the
same ``train_loop_per_worker`` with a :class:`LocalRun` in its config). Only where the batches come from and where
checkpoints go differ (:class:`~ideal_ray.train.sessions.RaySession` / :class:`~ideal_ray.train.sessions.LocalSession`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator

import torch

from ideal_ray.train.loop import LoopConfig, NonFiniteLossError, run_loop

# The MLflow tag naming each rank's Ray node id, comma-separated in rank order; a Ray run's rank 0 sets it at every
# attempt (a restarted worker group may land elsewhere), an in-process run leaves it out.
NODES_TAG = "dist/nodes"


@dataclass
class LocalRun:
    """An in-process run of a stage: this process is rank 0 of 1 (its process group already exists)."""

    device: torch.device
    root: str  # the run folder: LocalSession's checkpoints go to <root>/checkpoint_<step>
    batches: Iterator[Any]  # the rank's batches from the step after the latest checkpoint in ``root``
    log: Callable[[str], None] = print


def read_ahead(batches: Iterable[Any]) -> Iterator[Any]:
    """``batches`` as an iterator whose first item is already being fetched in a background thread: a Ray Data
    input pipeline starts (its actors spawn, the first step decodes) while the caller builds the stage."""
    from concurrent.futures import ThreadPoolExecutor

    it = iter(batches)
    done = object()
    pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
    first = pool.submit(next, it, done)
    pool.shutdown(wait=False)

    def chained():
        item = first.result()  # re-raises what the first read raised
        if item is not done:
            yield item
            yield from it

    return chained()


def run_worker(config: Dict[str, Any], cfg, make_stage: Callable[[torch.device, int, int], Any],
               dtypes: Dict[str, torch.dtype], micro_batch: int, stage_name: str) -> None:
    """``config``: the driver's train_loop_config ({"cfg", "total_steps", "tracking_uri", "experiment", ...}, and
    "local": a :class:`LocalRun` for an in-process run); ``make_stage(device, rank, world)`` builds the stage; on
    Ray, rank r reads the dataset ``train_<r>``."""
    from ideal_ray.tracking import make_tracker
    from ideal_ray.train.sessions import LocalSession

    local = config.get("local")
    if local is None:
        import ray.train
        import ray.train.torch
        from ray.data import DataContext

        from ideal_ray.train.sessions import RaySession

        # one progress bar per rank's dataset would flood the job log; the loop logs throughput instead
        DataContext.get_current().enable_progress_bars = False
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        device = ray.train.torch.get_device()
        session = RaySession(device)
        nodes = session.node_ids()  # where each rank of this attempt runs: MLflow tag dist/nodes (rank 0)
        shard = ray.train.get_dataset_shard(f"train_{rank}")
        # the input pipeline starts (actors spawn, the first step decodes) while the stage is built
        batches = read_ahead(shard.iter_torch_batches(batch_size=micro_batch, drop_last=True,
                                                      prefetch_batches=cfg.dist.prefetch_batches, dtypes=dtypes))
        stage = make_stage(device, rank, world)
        log = lambda line: print(line, flush=True)  # noqa: E731
    else:
        rank, nodes = 0, None
        session = LocalSession(local.root, keep=cfg.dist.keep_checkpoints)
        stage = make_stage(local.device, 0, 1)
        batches, log = local.batches, local.log
    loop_cfg = LoopConfig(total_steps=config["total_steps"], log_every=cfg.schedule.log_every,
                          ckpt_every=cfg.schedule.ckpt_every, vis_every=cfg.schedule.vis_every,
                          max_bad_steps=cfg.dist.max_bad_steps, ema_decay=cfg.optim.ema_decay)

    tags = {"preset": cfg.preset, "stage": stage_name, **({NODES_TAG: ",".join(nodes)} if nodes else {})}

    def tracker_for(run_id):
        t = make_tracker(rank, tracking_uri=config["tracking_uri"], experiment=config["experiment"],
                         run_name=cfg.name, run_id=run_id, tags=tags)
        if run_id is None:
            t.log_params(cfg.flat())
        return t

    # rank 0's step bar: drawn by the driver from a Ray worker (tqdm_ray), on this console in process
    samples = {"tokenizer": "img", "ar": "seq"}.get(stage_name, "samples")

    def bar(done: int, total: int):
        from ideal_ray.console import progress

        return progress(total, stage_name, "step", initial=done, remote=local is None, samples=samples)

    try:
        run_loop(stage, batches, session, loop_cfg, tracker_for, log=log, progress=bar)
    except NonFiniteLossError as e:
        # Ending the worker normally keeps FailureConfig from restarting into the same non-finite steps; the
        # driver sees that the run stopped short of its last step and raises this message.
        log(f"[ideal-ray] {e}")
