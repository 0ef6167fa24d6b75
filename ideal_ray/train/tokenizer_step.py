"""The tokenizer's training step, independent of how it is distributed.

:class:`TokenizerSystem` owns the networks of one tokenizer run (tokenizer, discriminator, LPIPS, LeCAM state) and
computes the G and D losses. :class:`LocalTrainer` runs the step order of the release (G step -> EMA -> D step)
with plain torch optimizers in one process: the demo, the tests and ``jobs/bench.py`` use it directly, and the Ray
Train + DeepSpeed loop wraps the same :class:`TokenizerSystem`.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from ideal_ray.config import ConfigError, TokenizerTrainConfig
from ideal_ray.losses.gan import LeCAM, discriminator_loss
from ideal_ray.losses.reconstruction import psnr
from ideal_ray.losses.tokenizer import generator_loss
from ideal_ray.models.discriminator import DinoDiscriminator
from ideal_ray.models.tokenizer import IdealTokenizer
from ideal_ray.train.ema import EMA
from ideal_ray.train.optim import adamw
from ideal_ray.train.schedule import LRSchedule
from ideal_ray.weights import lpips_model


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked for; full precision elsewhere (CPU bf16 autocast is slow, not faster)."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TokenizerSystem(nn.Module):
    """Everything a tokenizer training step needs, as one module tree (for .to(device) and state dicts).

    ``load_weights=False`` builds every network with random weights (benchmarks, parameter counts); training
    runs load the pretrained VFM, DINO trunk and LPIPS trunk, and fail fast when a file is missing.
    """

    def __init__(self, cfg: TokenizerTrainConfig, load_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = IdealTokenizer(cfg.model, load_weights=load_weights)
        lc = cfg.loss
        self.discriminator = None
        if lc.use_discriminator:
            self.discriminator = DinoDiscriminator(cfg.discriminator, load_weights=load_weights)
        self.lpips = None
        if lc.perceptual_weight > 0:
            # load_weights=False (benchmarks): a random LPIPS trunk with the same architecture and cost
            self.lpips = lpips_model(lc.lpips_net, lc.lpips_pretrained and load_weights, lc.lpips_weights_path)
        self.lecam = LeCAM(lc.lecam_decay)

    def g_loss(self, images: torch.Tensor, step: int, generator: Optional[torch.Generator] = None):
        """Generator forward (VFM included) + loss for images (B, 3, H, W). Returns (loss, metrics, TokenizerOutput)."""
        return self._g_loss(images, self.tokenizer(images), step, generator)

    def g_loss_from_trunk(self, images: torch.Tensor, shallow_raw: Optional[torch.Tensor], deep: torch.Tensor,
                          step: int, generator: Optional[torch.Generator] = None):
        """:meth:`g_loss` with the frozen VFM trunk's outputs for ``images`` computed elsewhere (Ray Data actors,
        ``dist.vfm_placement=data``): shallow before its norm (B, N, C) or None, deep (B, N, C)."""
        return self._g_loss(images, self.tokenizer.forward_from_trunk(shallow_raw, deep), step, generator)

    def _g_loss(self, images: torch.Tensor, out, step: int, generator: Optional[torch.Generator]):
        loss, metrics = generator_loss(out, images, self.cfg.loss, self.cfg.model.quantizer, step, self.lpips,
                                       self.discriminator, generator=generator)
        return loss, metrics, out

    def d_loss(self, images: torch.Tensor, recon: torch.Tensor, step: int,
               generator: Optional[torch.Generator] = None):
        return discriminator_loss(self.discriminator, images, recon.detach(), self.cfg.loss, step, self.lecam,
                                  generator=generator)


class LocalTrainer:
    """Single-process trainer with the release's step order and schedule. ``step`` counts optimizer steps."""

    def __init__(self, cfg: TokenizerTrainConfig, device: str | torch.device = "cpu", total_steps: Optional[int] = None,
                 load_weights: bool = True):
        if cfg.dist.vfm_placement != "trainer":
            raise ConfigError(f"dist.vfm_placement={cfg.dist.vfm_placement} needs the Ray pipeline "
                              f"(jobs/train_tokenizer.py); the single-process trainer runs the VFM itself, so set "
                              f"dist.vfm_placement=trainer.")
        self.cfg = cfg
        self.device = torch.device(device)
        torch.manual_seed(cfg.optim.seed)
        self.system = TokenizerSystem(cfg, load_weights=load_weights).to(self.device)
        self.system.train()
        o = cfg.optim
        spe = cfg.schedule.steps_per_epoch
        self.schedule = LRSchedule.from_config(o, cfg.data.global_batch, spe)
        self.total_steps = total_steps or cfg.schedule.steps or int(o.epochs * spe)
        self.opt_g = adamw(self.system.tokenizer, self.schedule.peak_lr, o.betas, o.weight_decay)
        self.opt_d = None
        if self.system.discriminator is not None:
            self.opt_d = adamw(self.system.discriminator, self.schedule.peak_lr, o.betas, o.weight_decay)
        self.ema = EMA(self.system.tokenizer, o.ema_decay)
        self.step = 0
        self.rng = torch.Generator(device="cpu").manual_seed(o.seed)

    def lr(self) -> float:
        return self.schedule(self.step)

    def train_step(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        cfg, sys_ = self.cfg, self.system
        images = images.to(self.device, non_blocking=True)
        lr = self.lr()
        for opt in (self.opt_g, self.opt_d):
            if opt is not None:
                for g in opt.param_groups:
                    g["lr"] = lr
        step = self.step + 1  # the release passes global_step = train_steps + 1 to the losses

        # generator
        self.opt_g.zero_grad(set_to_none=True)
        with autocast(self.device, cfg.optim.precision):
            g_loss, metrics, out = sys_.g_loss(images, step, generator=self.rng)
        g_loss.backward()
        if cfg.optim.grad_clip > 0:
            metrics["grad_norm_g"] = torch.nn.utils.clip_grad_norm_(sys_.tokenizer.parameters(), cfg.optim.grad_clip)
        self.opt_g.step()
        self.ema.update(sys_.tokenizer)
        with torch.no_grad():
            sys_.tokenizer.quantizer.update_usage(out.quant.indices)

        # discriminator
        if self.opt_d is not None:
            self.opt_d.zero_grad(set_to_none=True)
            with autocast(self.device, cfg.optim.precision):
                d_loss, d_metrics = sys_.d_loss(images, out.recon, step, generator=self.rng)
            metrics.update(d_metrics)
            if d_loss.requires_grad:
                d_loss.backward()
                if cfg.optim.grad_clip > 0:
                    metrics["grad_norm_d"] = torch.nn.utils.clip_grad_norm_(
                        sys_.discriminator.parameters(), cfg.optim.grad_clip)
                self.opt_d.step()
            metrics["d_loss"] = d_loss.detach()
        metrics["lr"] = lr
        self.step += 1
        return metrics


def infinite(loader: Iterable) -> Iterator:
    """Cycle a DataLoader forever (a new shuffled epoch each pass)."""
    while True:
        for batch in loader:
            yield batch


@torch.no_grad()
def evaluate_reconstruction(tokenizer: IdealTokenizer, batches: Iterable, device: str | torch.device = "cpu",
                            max_batches: int = 0) -> Dict[str, float]:
    """PSNR through the discrete bottleneck (encode -> indices -> decode) and codebook usage/entropy on a loader."""
    was_training = tokenizer.training
    tokenizer.eval()
    k = tokenizer.cfg.quantizer.codebook_size
    counts = torch.zeros(k, dtype=torch.long)
    psnrs = []
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        images = images.to(device)
        idx = tokenizer.encode(images)  # (B, g, g)
        recon = tokenizer.decode(idx)
        psnrs.append(psnr(images, recon).cpu())
        counts += torch.bincount(idx.flatten().cpu(), minlength=k)
    tokenizer.train(was_training)
    p = counts.float() / counts.sum().clamp_min(1)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {"psnr": float(torch.cat(psnrs).mean()), "usage": float((counts > 0).float().mean()),
            "entropy": entropy, "max_entropy": float(torch.log(torch.tensor(float(k))))}


def metrics_to_floats(metrics: Dict[str, object]) -> Dict[str, float]:
    return {k: (v.item() if torch.is_tensor(v) else float(v)) for k, v in metrics.items()}


class Throughput:
    """Images per second over a window of steps (host-side timing; synchronize first on GPU)."""

    def __init__(self):
        self.t0, self.n = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.n += n

    def rate(self, reset: bool = True) -> float:
        dt = time.perf_counter() - self.t0
        r = self.n / dt if dt > 0 else 0.0
        if reset:
            self.t0, self.n = time.perf_counter(), 0
        return r
