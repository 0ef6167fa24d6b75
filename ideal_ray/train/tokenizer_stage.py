"""The tokenizer stage: its one training step (:class:`TokenizerStage`, what every run, test and benchmark takes)
and the Ray Train worker entry point (:func:`train_loop_per_worker`). The driver side is in ``ray_trainer.py``.

Each rank holds a :class:`~ideal_ray.train.tokenizer_step.TokenizerSystem` with two engines (``dist.engine``:
DeepSpeed, or plain torch in one process): one over the tokenizer (the frozen VFM trunk stays frozen inside it)
and one over the discriminator heads. Step order as in the release: G step -> D step, then the shared loop's EMA
(of G's parameters only, which the D step does not touch, so it equals the release's EMA between the two). Weights
stay fp32 in the engines; on GPU the forward runs under bf16 autocast, as the authors' release trains. The
``perf.*`` speed levers (:func:`apply_levers`) change where and how it runs, never what it computes.

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
from typing import Any, Callable, Dict, List, Optional

import torch

from ideal_ray.config import TokenizerTrainConfig, from_dict
from ideal_ray.data.augment import to_model_input
from ideal_ray.data.ray_pipeline import VFMStage, torch_dtypes, trunk_features_from_batch
from ideal_ray.data.transforms import make_grid_png
from ideal_ray.train import levers
from ideal_ray.train.engines import build_engine
from ideal_ray.train.loop import CONFIG_FILE, StepResult
from ideal_ray.train.schedule import LRSchedule
from ideal_ray.train.step import autocast, data_position, frozen, guarded_update, step_seed, uses_bf16
from ideal_ray.train.tokenizer_step import TokenizerSystem

LECAM_FILE = "lecam_rank{rank}.pt"


def vfm_stage(cfg: TokenizerTrainConfig) -> Optional[VFMStage]:
    """The Ray Data VFM stage for ``dist.vfm_placement=data`` (None for "trainer"). Its bf16 rule is the trainer's
    autocast rule (CUDA and optim.precision=bf16), so the actor computes what the trainer would."""
    d = cfg.dist
    if d.vfm_placement == "trainer":
        return None
    return VFMStage(vfm=cfg.model.vfm, seed=cfg.optim.seed, num_actors=d.vfm_actors, use_gpu=d.use_gpu,
                    bf16=d.use_gpu and cfg.optim.precision == "bf16")


def apply_levers(system: TokenizerSystem, cfg: TokenizerTrainConfig, device: torch.device) -> List[str]:
    """Apply the ``perf.*`` speed levers that hold on this device to the networks of one tokenizer run; returns
    the names of those applied (the benchmark prints them). None of them changes the math (train/levers.py)."""
    p, applied = cfg.perf, []
    tok, disc, lp = system.tokenizer, system.discriminator, system.lpips
    if p.frozen_bf16 and uses_bf16(device, cfg.optim.precision):
        for frozen_net in (tok.vfm.trunk, disc.trunk if disc is not None else None, lp):
            if frozen_net is not None:
                levers.hold_frozen_in_bf16(frozen_net)
        applied.append("frozen_bf16")
    if p.channels_last and device.type == "cuda":
        tok.pixel_decoder.channels_last = True  # its activations (its weights live in the engine's flat buffers)
        if lp is not None:
            levers.to_channels_last(lp)  # frozen, outside every engine: weights too
        applied.append("channels_last")
    if p.compile and device.type == "cuda":
        levers.compile_regions(compile_targets(system), mode=p.compile_mode)
        applied.append("compile")
    if p.nan_check == "after_backward":
        applied.append("nan_after")
    return applied


def compile_targets(system: TokenizerSystem) -> List[torch.nn.Module]:
    """The regions ``perf.compile`` compiles: both decoders and the fusion block (trainable), the VFM and DINO trunks'
    blocks and the LPIPS trunk (frozen; gradients still flow through the last two into the reconstruction). The
    discriminator heads stay eager (spectral norm updates its power-iteration buffers in place every forward)."""
    tok, disc, lp = system.tokenizer, system.discriminator, system.lpips
    regions = [tok.pixel_decoder, tok.feature_decoder, *tok.vfm.trunk.blocks]
    if any(True for _ in tok.fusion.parameters()):
        regions.append(tok.fusion)
    if lp is not None:
        regions.append(lp.net)
    if disc is not None:
        regions.extend(disc.trunk.blocks)
    return regions


class TokenizerStage:
    """The tokenizer's step for the shared loop, on the engine backend of ``dist.engine`` (train/engines.py)."""

    def __init__(self, cfg: TokenizerTrainConfig, device: torch.device, rank: int, world_size: int,
                 steps_per_epoch: int, load_weights: bool = True):
        self.cfg, self.device, self.rank, self.world_size = cfg, device, rank, world_size
        o = cfg.optim
        self.schedule = LRSchedule.from_config(o, cfg.data.global_batch, steps_per_epoch)
        self.micro_batch = cfg.data.global_batch // world_size
        self.steps_per_epoch = steps_per_epoch
        self.last_step = 0  # the last step taken (the next batch of the data stream is step last_step + 1)
        torch.manual_seed(o.seed)  # identical initial weights on every rank (DeepSpeed also broadcasts rank 0's)
        # built where it runs: random init of ~900M parameters (VFM with its text tower, DINO, LPIPS) takes tens of
        # seconds on a CPU and a moment on a GPU; pretrained weights load the same either way
        with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self.system = TokenizerSystem(cfg, load_weights=load_weights)
        self.system.to(device)
        self.system.train()
        self.levers = apply_levers(self.system, cfg, device)
        engine_optim = dataclasses.replace(o, precision="fp32")  # fp32 weights; bf16 comes from autocast
        make = lambda module: build_engine(cfg.dist.engine, module, engine_optim, self.schedule.peak_lr,  # noqa: E731
                                           self.micro_batch, world_size, cfg.dist.zero_stage, device.type)
        self.g = make(self.system.tokenizer)
        self.d = make(self.system.discriminator) if self.system.discriminator is not None else None
        self.generator = torch.Generator(device="cpu")
        self.vfm_stage = vfm_stage(cfg)

    # ------------------------------------------------------------------------------------------ Stage
    def ema_module(self) -> torch.nn.Module:
        return self.system.tokenizer

    def train_step(self, batch: Dict[str, torch.Tensor], step: int,
                   all_finite: Callable[[torch.Tensor], Any]) -> StepResult:
        """G step, then D step (the loop updates the EMA after this returns, as the release does between them:
        the EMA sees only G's parameters). No host sync but the NaN guard's reads (``perf.nan_check``)."""
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
        tok, nan_check = self.system.tokenizer, self.cfg.perf.nan_check

        # generator step
        self.g.set_lr(lr)
        with autocast(self.device, self.cfg.optim.precision), frozen(self.system.discriminator):
            if self.vfm_stage is None:
                g_loss, metrics, out = self.system.g_loss(images, step, generator=self.generator)
            else:  # the trunk ran in the data pipeline
                shallow_raw, deep = trunk_features_from_batch(batch, self.vfm_stage, self.device)
                g_loss, metrics, out = self.system.g_loss_from_trunk(images, shallow_raw, deep, step,
                                                                     generator=self.generator)
        if not guarded_update(self.g, g_loss, all_finite, nan_check):
            return StepResult(metrics={}, samples=0, skipped=True)
        metrics["grad_norm_g"] = _norm_or_zero(self.g.grad_norm())
        with torch.no_grad():
            tok.quantizer.update_usage(out.quant.indices)
        metrics["usage"] = tok.quantizer.usage_tensor()
        metrics["lr"] = lr

        # discriminator step (its grads were never touched by the generator step)
        if self.d is not None:
            self.d.set_lr(lr)
            with autocast(self.device, self.cfg.optim.precision):
                d_loss, d_metrics = self.system.d_loss(images, out.recon, step, generator=self.generator)
            metrics.update(d_metrics)
            if guarded_update(self.d, d_loss, all_finite, nan_check):
                metrics["grad_norm_d"] = _norm_or_zero(self.d.grad_norm())
                metrics["d_skipped"] = 0.0
            else:  # keep G's update, skip only D's; counted in the metrics
                metrics["d_skipped"] = 1.0
        return StepResult(metrics=metrics, samples=images.shape[0])

    def save(self, ckpt_dir: str) -> None:
        position = data_position(self.last_step, self.steps_per_epoch)
        self.g.save(ckpt_dir, "generator", {"data_position": position})
        if self.d is not None:
            self.d.save(ckpt_dir, "discriminator", {"data_position": position})
        torch.save(self.system.lecam.state_dict(), os.path.join(ckpt_dir, LECAM_FILE.format(rank=self.rank)))
        if self.rank == 0:  # the checkpoint describes itself: the config and where the data stream stands
            with open(os.path.join(ckpt_dir, CONFIG_FILE), "w") as f:
                json.dump({"config": dataclasses.asdict(self.cfg), "data_position": position}, f, indent=1)

    def load(self, ckpt_dir: str) -> None:
        self.last_step = self.g.load(ckpt_dir, "generator")["data_position"]["step"]
        if self.d is not None:
            self.d.load(ckpt_dir, "discriminator")
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


def _norm_or_zero(norm):
    """An engine's grad norm for the metrics (a tensor stays a tensor: read only when the loop logs)."""
    return 0.0 if norm is None else norm


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    """Ray Train worker entry point of the tokenizer stage (see ``worker.run_worker``)."""
    from ideal_ray.train.worker import run_worker

    cfg = from_dict(TokenizerTrainConfig, config["cfg"])
    run_worker(config, cfg, lambda device, rank, world: TokenizerStage(cfg, device, rank, world,
                                                                       config["steps_per_epoch"]),
               torch_dtypes(vfm=vfm_stage(cfg)), micro_batch=cfg.data.global_batch // cfg.dist.num_workers,
               stage_name="tokenizer")
