"""What every stage's Ray Train worker does around its step: session, data shard, shared loop, tracker."""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch

from ideal_ray.train.loop import LoopConfig, NonFiniteLossError, run_loop


def run_worker(config: Dict[str, Any], cfg, make_stage: Callable[[torch.device, int, int], Any],
               dtypes: Dict[str, torch.dtype], micro_batch: int, stage_name: str) -> None:
    """``config``: the driver's train_loop_config ({"cfg", "total_steps", "tracking_uri", "experiment", ...});
    ``make_stage(device, rank, world)`` builds the stage; rank r reads the dataset ``train_<r>``."""
    import ray.train
    import ray.train.torch
    from ray.data import DataContext

    from ideal_ray.tracking import make_tracker
    from ideal_ray.train.sessions import RaySession

    # one progress bar per rank's dataset would flood the job log; the loop logs throughput instead
    DataContext.get_current().enable_progress_bars = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    session = RaySession(device)
    stage = make_stage(device, rank, world)
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    batches = iter(shard.iter_torch_batches(batch_size=micro_batch, drop_last=True,
                                            prefetch_batches=cfg.dist.prefetch_batches, dtypes=dtypes))
    loop_cfg = LoopConfig(total_steps=config["total_steps"], log_every=cfg.schedule.log_every,
                          ckpt_every=cfg.schedule.ckpt_every, vis_every=cfg.schedule.vis_every,
                          max_bad_steps=cfg.dist.max_bad_steps, ema_decay=cfg.optim.ema_decay)

    def tracker_for(run_id):
        t = make_tracker(rank, tracking_uri=config["tracking_uri"], experiment=config["experiment"],
                         run_name=cfg.name, run_id=run_id, tags={"preset": cfg.preset, "stage": stage_name})
        if run_id is None:
            t.log_params(cfg.flat())
        return t

    try:
        run_loop(stage, batches, session, loop_cfg, tracker_for, log=lambda line: print(line, flush=True))
    except NonFiniteLossError as e:
        # Ending the worker normally keeps FailureConfig from restarting into the same non-finite steps; the
        # driver sees that the run stopped short of its last step and raises this message.
        print(f"[ideal-ray] {e}", flush=True)
