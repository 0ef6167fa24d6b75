"""The tokenizer stage on Ray Train + DeepSpeed: the per-worker step (:class:`TokenizerStage`) and the worker
entry point (:func:`train_loop_per_worker`). The driver side (building the trainer) is in ``ray_trainer.py``.

Each worker holds a :class:`~ideal_ray.train.tokenizer_step.TokenizerSystem` with two DeepSpeed engines: one over
the tokenizer (the frozen VFM trunk stays frozen inside it) and one over the discriminator heads. Step order as in
the release: G step -> (EMA, by the shared loop) -> D step. Weights stay fp32 in the engines; on GPU the forward
runs under bf16 autocast, as the authors' release trains.

Determinism: the data order is fixed by the schedule of ``ideal_ray.data.ray_pipeline`` and every random draw of
a step (dropout, DiffAugment, the discriminator's crop) is seeded from (seed, step, rank), so a resumed run takes
exactly the steps an uninterrupted run would.

VFM placement (``dist.vfm_placement``): "trainer" runs the frozen trunk in the step; "data" receives its outputs
with the images (:func:`vfm_stage` describes the Ray Data stage) and runs only the trainable rest (the shallow
LayerNorm onwards). The trunk stays in the tokenizer module either way (checkpoints, export and a resumed run that
switches placement see the same parameters).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Callable, Dict, Optional

import torch

from ideal_ray.config import TokenizerTrainConfig, from_dict
from ideal_ray.data.ray_pipeline import VFMStage, to_model_input, torch_dtypes, trunk_features_from_batch
from ideal_ray.data.transforms import make_grid_png
from ideal_ray.train import ds as dsu
from ideal_ray.train.loop import StepResult
from ideal_ray.train.schedule import LRSchedule
from ideal_ray.train.tokenizer_step import TokenizerSystem, autocast

LECAM_FILE = "lecam_rank{rank}.pt"
CONFIG_FILE = "config.json"


def step_seed(seed: int, step: int, rank: int) -> int:
    """One independent seed per (run seed, step, rank), so no random draw depends on what ran before."""
    return (seed * 1_000_003 + step * 8191 + rank * 131) % (2**63 - 1)


def vfm_stage(cfg: TokenizerTrainConfig) -> Optional[VFMStage]:
    """The Ray Data VFM stage for ``dist.vfm_placement=data`` (None for "trainer"). Its bf16 rule is the trainer's
    autocast rule (CUDA and optim.precision=bf16), so the actor computes what the trainer would."""
    d = cfg.dist
    if d.vfm_placement == "trainer":
        return None
    return VFMStage(vfm=cfg.model.vfm, seed=cfg.optim.seed, num_actors=d.vfm_actors, use_gpu=d.use_gpu,
                    bf16=d.use_gpu and cfg.optim.precision == "bf16")


@contextlib.contextmanager
def frozen(module: Optional[torch.nn.Module]):
    """Temporarily stop gradients into ``module``'s parameters (the generator's adversarial term must not touch
    the discriminator's gradients, which DeepSpeed owns)."""
    if module is None:
        yield
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class TokenizerStage:
    """The tokenizer's step for the shared loop, on DeepSpeed engines."""

    def __init__(self, cfg: TokenizerTrainConfig, device: torch.device, rank: int, world_size: int,
                 steps_per_epoch: int, load_weights: bool = True):
        self.cfg, self.device, self.rank, self.world_size = cfg, device, rank, world_size
        o = cfg.optim
        self.schedule = LRSchedule.from_config(o, cfg.data.global_batch, steps_per_epoch)
        self.micro_batch = cfg.data.global_batch // world_size
        self.steps_per_epoch = steps_per_epoch
        self.last_step = 0  # the last step taken (the next batch of the data stream is step last_step + 1)
        torch.manual_seed(o.seed)  # identical initial weights on every rank (DeepSpeed also broadcasts rank 0's)
        self.system = TokenizerSystem(cfg, load_weights=load_weights).to(device)
        self.system.train()
        dsu.prepare_deepspeed(device.type)
        engine_optim = dataclasses.replace(o, precision="fp32")  # fp32 weights; bf16 comes from autocast
        self.g = dsu.build_engine(self.system.tokenizer, engine_optim, self.schedule.peak_lr, self.micro_batch, world_size,
                                  cfg.dist.zero_stage, device.type)
        self.d = None
        if self.system.discriminator is not None:
            self.d = dsu.build_engine(self.system.discriminator, engine_optim, self.schedule.peak_lr, self.micro_batch,
                                      world_size, cfg.dist.zero_stage, device.type)
        self.generator = torch.Generator(device="cpu")
        self.vfm_stage = vfm_stage(cfg)

    # ------------------------------------------------------------------------------------------ Stage
    def ema_module(self) -> torch.nn.Module:
        return self.system.tokenizer

    def train_step(self, batch: Dict[str, torch.Tensor], step: int,
                   all_finite: Callable[[torch.Tensor], bool]) -> StepResult:
        self.last_step = step
        expected = step - 1
        got = int(batch["step"][0])
        if got != expected:
            raise RuntimeError(f"Data order broke: rank {self.rank} got the batch of step {got} for step {expected}.")
        images = to_model_input(batch["image"].to(self.device, non_blocking=True))  # (B, 3, H, W) in [-1, 1]
        seed = step_seed(self.cfg.optim.seed, step, self.rank)
        torch.manual_seed(seed)
        self.generator.manual_seed(seed)
        lr = self.schedule(step - 1)
        tok = self.system.tokenizer

        # generator step
        dsu.set_lr(self.g, lr)
        with autocast(self.device, self.cfg.optim.precision), frozen(self.system.discriminator):
            if self.vfm_stage is None:
                g_loss, metrics, out = self.system.g_loss(images, step, generator=self.generator)
            else:  # the trunk ran in the data pipeline
                shallow_raw, deep = trunk_features_from_batch(batch, self.vfm_stage, self.device)
                g_loss, metrics, out = self.system.g_loss_from_trunk(images, shallow_raw, deep, step,
                                                                     generator=self.generator)
        if not all_finite(g_loss):
            return StepResult(metrics={}, samples=0, skipped=True)
        self.g.backward(g_loss)
        self.g.step()
        metrics["grad_norm_g"] = dsu.grad_norm(self.g) or 0.0
        with torch.no_grad():
            tok.quantizer.update_usage(out.quant.indices)
        metrics["usage"] = tok.quantizer.usage()
        metrics["lr"] = lr

        # discriminator step (its grads were never touched by the generator step)
        if self.d is not None:
            dsu.set_lr(self.d, lr)
            with autocast(self.device, self.cfg.optim.precision):
                d_loss, d_metrics = self.system.d_loss(images, out.recon, step, generator=self.generator)
            metrics.update(d_metrics)
            if all_finite(d_loss):
                self.d.backward(d_loss)
                self.d.step()
                metrics["grad_norm_d"] = dsu.grad_norm(self.d) or 0.0
                metrics["d_skipped"] = 0.0
            else:  # keep G's update, skip only D's; counted in the metrics
                metrics["d_skipped"] = 1.0
        return StepResult(metrics=metrics, samples=images.shape[0])

    def save(self, ckpt_dir: str) -> None:
        position = {"step": self.last_step, "epoch": self.last_step // self.steps_per_epoch,
                    "step_in_epoch": self.last_step % self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch}
        dsu.save_engine(self.g, ckpt_dir, "generator", {"data_position": position})
        if self.d is not None:
            dsu.save_engine(self.d, ckpt_dir, "discriminator", {"data_position": position})
        torch.save(self.system.lecam.state_dict(), os.path.join(ckpt_dir, LECAM_FILE.format(rank=self.rank)))
        if self.rank == 0:  # the checkpoint describes itself: the config and where the data stream stands
            with open(os.path.join(ckpt_dir, CONFIG_FILE), "w") as f:
                json.dump({"config": dataclasses.asdict(self.cfg), "data_position": position}, f, indent=1)

    def load(self, ckpt_dir: str) -> None:
        self.last_step = dsu.load_engine(self.g, ckpt_dir, "generator")["data_position"]["step"]
        if self.d is not None:
            dsu.load_engine(self.d, ckpt_dir, "discriminator")
        path = os.path.join(ckpt_dir, LECAM_FILE.format(rank=self.rank))
        if os.path.exists(path):  # a restart with more workers starts the new ranks' LeCAM averages fresh
            self.system.lecam.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    @torch.no_grad()
    def visualize(self, batch: Dict[str, torch.Tensor], out_dir: str, step: int) -> Optional[str]:
        tok = self.system.tokenizer
        was_training = tok.training
        tok.eval()
        images = to_model_input(batch["image"][:8].to(self.device))
        with autocast(self.device, self.cfg.optim.precision):
            if self.vfm_stage is None:
                indices = tok.encode(images)
            else:
                first = {k: batch[k][:8] for k in self.vfm_stage.columns}
                indices = tok.encode_from_trunk(*trunk_features_from_batch(first, self.vfm_stage, self.device))
            recon = tok.decode(indices)
        tok.train(was_training)
        return str(make_grid_png(images.float().cpu(), recon.float().cpu(),
                                 os.path.join(out_dir, f"recon_step{step:08d}.png"), nrow=4))


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    """Ray Train worker entry point of the tokenizer stage (see ``worker.run_worker``)."""
    from ideal_ray.train.worker import run_worker

    cfg = from_dict(TokenizerTrainConfig, config["cfg"])
    run_worker(config, cfg, lambda device, rank, world: TokenizerStage(cfg, device, rank, world,
                                                                       config["steps_per_epoch"]),
               torch_dtypes(vfm=vfm_stage(cfg)), micro_batch=cfg.data.global_batch // cfg.dist.num_workers,
               stage_name="tokenizer")
