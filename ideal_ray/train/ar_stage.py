"""The AR stage on Ray Train + DeepSpeed: the per-worker step (:class:`ARStage`), the worker entry point, and the
driver (:func:`train_ar`), on the same shared loop and driver pieces as the tokenizer stage.

Training (spec section 7): inputs [class, codes 0..574], targets codes 0..575, cross-entropy; class/token/residual
dropout inside the model; AdamW (fused on GPU) at a constant lr 1e-4, betas (0.9, 0.95), wd 0.05 on matrices,
grad clip 1.0, EMA; bf16 autocast on GPU with fp32 weights in the engine. Data: token shards, one random view per
image per epoch, in a fixed order per rank (``ideal_ray.data.ar_reader.ar_rank_dataset``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ideal_ray.checkpoint import write_gpt_export
from ideal_ray.config import ARTrainConfig, from_dict, validate_ar
from ideal_ray.data.tokens import check_shards
from ideal_ray.models.gpt import GPT
from ideal_ray.train import levers
from ideal_ray.train.engines import build_engine
from ideal_ray.train.loop import CONFIG_FILE, StepResult
from ideal_ray.train.schedule import LRSchedule
from ideal_ray.train.step import autocast, data_position, guarded_update, step_seed


class ARStage:
    def __init__(self, cfg: ARTrainConfig, device: torch.device, rank: int, world_size: int, steps_per_epoch: int):
        self.cfg, self.device, self.rank = cfg, device, rank
        self.micro_batch = cfg.data.global_batch // world_size
        self.steps_per_epoch = steps_per_epoch
        self.last_step = 0
        self.schedule = LRSchedule.from_config(cfg.optim, cfg.data.global_batch, steps_per_epoch)
        torch.manual_seed(cfg.optim.seed)
        self.model = GPT(cfg.model).to(device)
        self.model.train()
        self.levers = []
        if cfg.perf.compile and device.type == "cuda":  # the blocks share one compiled graph (equal shapes)
            levers.compile_regions(self.model.blocks, mode=cfg.perf.compile_mode)
            self.levers.append("compile")
        if cfg.perf.nan_check == "after_backward":
            self.levers.append("nan_after")
        self.engine = build_engine(cfg.dist.engine, self.model, dataclasses.replace(cfg.optim, precision="fp32"),
                                   self.schedule.peak_lr, self.micro_batch, world_size, cfg.dist.zero_stage,
                                   device.type)

    def ema_module(self) -> torch.nn.Module:
        return self.model

    def train_step(self, batch: Dict[str, torch.Tensor], step: int,
                   all_finite: Callable[[torch.Tensor], bool]) -> StepResult:
        self.last_step = step
        got = int(batch["step"][0])
        if got != step - 1:
            raise RuntimeError(f"Data order broke: rank {self.rank} got the batch of step {got} for step {step - 1}.")
        tokens = batch["tokens"].to(self.device, non_blocking=True)  # (B, N)
        labels = batch["label"].to(self.device, non_blocking=True)  # (B,)
        seed = step_seed(self.cfg.optim.seed, step, self.rank)
        torch.manual_seed(seed)  # class/token dropout, drop path
        lr = self.schedule(step - 1)
        self.engine.set_lr(lr)
        with autocast(self.device, self.cfg.optim.precision):
            logits = self.model(tokens, labels)  # (B, N, V)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        if not guarded_update(self.engine, loss, all_finite, self.cfg.perf.nan_check):
            return StepResult(metrics={}, samples=0, skipped=True)
        norm = self.engine.grad_norm()
        return StepResult(metrics={"loss": loss.detach(), "lr": lr, "grad_norm": 0.0 if norm is None else norm},
                          samples=tokens.shape[0])

    def _position(self) -> Dict[str, int]:
        return data_position(self.last_step, self.steps_per_epoch)

    def save(self, ckpt_dir: str) -> None:
        self.engine.save(ckpt_dir, "gpt", {"data_position": self._position()})
        if self.rank == 0:
            with open(os.path.join(ckpt_dir, CONFIG_FILE), "w") as f:
                json.dump({"config": dataclasses.asdict(self.cfg), "data_position": self._position()}, f, indent=1)

    def load(self, ckpt_dir: str) -> None:
        self.last_step = self.engine.load(ckpt_dir, "gpt")["data_position"]["step"]

    def visualize(self, batch: Any, out_dir: str, step: int) -> Optional[str]:
        return None  # sample grids need the tokenizer's decoder: jobs/sample.py


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    from ideal_ray.data.ar_reader import AR_TORCH_DTYPES
    from ideal_ray.train.worker import run_worker

    cfg = from_dict(ARTrainConfig, config["cfg"])
    run_worker(config, cfg, lambda device, rank, world: ARStage(cfg, device, rank, world, config["steps_per_epoch"]),
               AR_TORCH_DTYPES, micro_batch=cfg.data.global_batch // cfg.dist.num_workers, stage_name="ar")


# ---------------------------------------------------------------------------------------------------- driver
def train_ar(cfg: ARTrainConfig, log: Callable[[str], None] = print,
             tracking_uri: Optional[str] = None) -> Dict[str, Any]:
    """Train (or resume) a GPT on token shards on Ray Train + DeepSpeed; export the EMA weights. MLflow experiment
    ``ideal-ar`` at ``tracking_uri`` (default ``$MLFLOW_TRACKING_URI`` or ``<output_dir>/<name>/mlflow.db``).
    Returns ``checkpoint``, ``export``, ``steps``, ``tracking_uri`` and ``metrics`` (the MLflow run's latest values)."""
    from ideal_ray.data.ar_reader import ar_rank_dataset
    from ideal_ray.train.ray_trainer import checkpoint_path, publish_and_record, run_stage
    from ideal_ray.train.run_storage import check_storage

    validate_ar(cfg)
    check_storage(cfg)
    manifest = check_shards(cfg)
    steps_per_epoch = manifest["num_images"] // cfg.data.global_batch
    total_steps = cfg.schedule.steps or int(cfg.optim.epochs * steps_per_epoch)
    log(f"[ideal-ray] AR {cfg.model.size}: {manifest['num_images']} images x {manifest['num_views']} views, "
        f"{steps_per_epoch} steps/epoch")

    def rank_data(rank: int, start: int):
        return ar_rank_dataset(cfg.data.shards, cfg.data.global_batch, cfg.dist.num_workers, rank, start,
                               max(total_steps - start, 0), cfg.optim.seed, manifest=manifest,
                               num_actors=cfg.data.loader_workers)

    result, final_step, tracking_uri, local_dir = run_stage(
        cfg, train_loop_per_worker, rank_data, total_steps, "ideal-ar", {"steps_per_epoch": steps_per_epoch}, log,
        tracking_uri=tracking_uri)
    export_path = export_gpt(result.checkpoint, cfg, os.path.join(local_dir, f"gpt_step{final_step}.pt"), final_step)
    export_uri, metrics = publish_and_record(cfg, export_path, tracking_uri, "ideal-ar", result.checkpoint)
    log(f"[ideal-ray] done: checkpoint {checkpoint_path(result.checkpoint)}, inference export {export_path}")
    return {"checkpoint": checkpoint_path(result.checkpoint), "export": export_path, "export_uri": export_uri,
            "steps": final_step, "tracking_uri": tracking_uri, "metrics": metrics}


def export_gpt(checkpoint, cfg: ARTrainConfig, out_path: str, step: int) -> str:
    """Single-file GPT export: EMA weights + model config, loadable with ``weights_only=True``."""
    from ideal_ray.train.engines import MODULE_FILE, load_module_state
    from ideal_ray.train.loop import EMA_FILE
    from ideal_ray.train.ray_trainer import checkpoint_dir

    if os.path.exists(out_path):
        return out_path  # an earlier export of the same step; never replaced silently
    with checkpoint_dir(checkpoint, only=(f"gpt/{MODULE_FILE}", EMA_FILE)) as d:  # not the optimizer shards
        state = load_module_state(d, "gpt")
        ema = torch.load(os.path.join(d, EMA_FILE), map_location="cpu", weights_only=True)
    state = {k: v.clone() for k, v in state.items()}
    state.update({k: v.to(state[k].dtype) for k, v in ema.items()})
    return write_gpt_export(out_path, cfg.model, state, step)
