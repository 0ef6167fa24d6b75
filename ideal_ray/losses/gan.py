"""Adversarial losses for the tokenizer (spec section 6): hinge, LeCAM, consistency regularization.

Every loss function is pure and returns ``(loss, metrics)`` where ``metrics`` holds plain floats for logging.
The only state is :class:`LeCAM`'s two EMAs, kept in buffers so that checkpoints carry them.

Schedule (release ``losses/vq_loss.py`` with ``configs/tokenizer/ideal-tokenizer.yaml``):

* D step: ``lambda_d * (hinge + lecam_weight * LeCAM) + cr_weight * CR`` with lambda_d = ``disc_weight`` and the
  CR weight both switched on at ``step >= disc_start`` (0 before). D still runs before ``disc_start`` so that the
  LeCAM EMAs and the logged logits are warm when the weight switches on (as in the release); the loss is then a
  graph-connected zero and the strong-augmentation passes for CR are skipped.
* G step: ``adv_weight * hinge_G`` from ``disc_start``; before it D is not run at all.
* DiffAugment (p = ``diffaug_prob`` per group and batch) on real and generated images in both steps, drawn
  independently for the real and the generated batch. CR compares the logits used in the hinge (on the
  DiffAugment-ed images) with D's logits on strongly augmented copies of the un-augmented images, real and
  generated together.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ideal_ray.config import LossConfig
from ideal_ray.losses.diffaug import diff_augment, strong_augment

Metrics = Dict[str, Union[float, torch.Tensor]]
Number = Union[float, torch.Tensor]


def _floats(**values: torch.Tensor) -> Metrics:
    """Detached fp32 scalars: no host sync here; the training loop reads them only when it logs."""
    return {k: v.detach().float().reshape(()) for k, v in values.items()}


# --------------------------------------------------------------------------------------- hinge
def _hinge_d(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> Tuple[torch.Tensor, Metrics]:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    loss = _hinge_d(logits_real, logits_fake)
    return loss, _floats(d_hinge=loss)


def hinge_g_loss(logits_fake: torch.Tensor) -> Tuple[torch.Tensor, Metrics]:
    """-mean D(x_hat): the generator pushes its logits up without a margin."""
    loss = -logits_fake.mean()
    return loss, _floats(g_hinge=loss)


# --------------------------------------------------------------------------------------- LeCAM
class LeCAM(nn.Module):
    """EMAs of D's mean real and fake logits for the LeCAM regulariser (Tseng et al. 2021).

    A module only to own two scalar buffers: ``state_dict`` / ``load_state_dict`` carry them through checkpoints
    and ``.to(device)`` moves them. Updates stay on the device (no host sync). In data-parallel training each rank
    keeps its own EMAs of its local means, as the release does.
    """

    def __init__(self, decay: float = 0.999, init: float = 0.0):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"LeCAM decay {decay} must be in (0, 1).")
        self.decay = decay
        self.register_buffer("ema_real", torch.tensor(float(init)))
        self.register_buffer("ema_fake", torch.tensor(float(init)))

    @classmethod
    def from_config(cls, cfg: LossConfig) -> "LeCAM":
        return cls(decay=cfg.lecam_decay)

    @torch.no_grad()
    def update(self, real_mean: Number, fake_mean: Number) -> None:
        """ema <- decay * ema + (1 - decay) * mean, for the real and the fake side."""
        for ema, value in ((self.ema_real, real_mean), (self.ema_fake, fake_mean)):
            value = torch.as_tensor(value, dtype=ema.dtype, device=ema.device).detach().reshape(())
            ema.mul_(self.decay).add_(value, alpha=1.0 - self.decay)

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


def lecam_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real: Number,
               ema_fake: Number) -> Tuple[torch.Tensor, Metrics]:
    """mean relu(D(x) - ema_fake)^2 + mean relu(ema_real - D(x_hat))^2 (EMAs are constants)."""
    loss = _lecam(logits_real, logits_fake, ema_real, ema_fake)
    return loss, _floats(d_lecam=loss)


def _lecam(logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real: Number, ema_fake: Number) -> torch.Tensor:
    ema_real = torch.as_tensor(ema_real, dtype=logits_real.dtype, device=logits_real.device).detach()
    ema_fake = torch.as_tensor(ema_fake, dtype=logits_fake.dtype, device=logits_fake.device).detach()
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


# ---------------------------------------------------------------------------------- consistency
def consistency_loss(d_on_images: torch.Tensor, d_on_aug: torch.Tensor) -> Tuple[torch.Tensor, Metrics]:
    """MSE between D's logits on images and on augmented copies (both sides carry gradients, as in the release)."""
    loss = F.mse_loss(d_on_images, d_on_aug)
    return loss, _floats(d_cr=loss)


# ------------------------------------------------------------------------------------- schedule
def disc_weight(cfg: LossConfig, step: int) -> float:
    """lambda_d: ``cfg.disc_weight`` from ``cfg.disc_start`` on, 0 before."""
    return cfg.disc_weight if step >= cfg.disc_start else 0.0


def adv_weight(cfg: LossConfig, step: int) -> float:
    """lambda_adv: ``cfg.adv_weight`` from ``cfg.disc_start`` on, 0 before."""
    return cfg.adv_weight if step >= cfg.disc_start else 0.0


def _run(D: nn.Module, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """D(x); the generator is passed only when given, so any D with a plain forward(x) works too."""
    return D(x) if generator is None else D(x, generator=generator)


def _augment(x: torch.Tensor, cfg: LossConfig, generator: Optional[torch.Generator]) -> torch.Tensor:
    return diff_augment(x, prob=cfg.diffaug_prob, generator=generator) if cfg.diffaug else x


# -------------------------------------------------------------------------------------- D and G
def discriminator_loss(D: nn.Module, x_real: torch.Tensor, x_fake: torch.Tensor, cfg: LossConfig, step: int,
                       lecam: LeCAM, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Metrics]:
    """The D-step loss: lambda_d * (hinge + lecam_weight * LeCAM) + cr_weight * CR (CR only from disc_start).

    x_real, x_fake: (B, 3, H, W) in [-1, 1]; both are detached here (no gradient reaches the generator).
    Updates ``lecam``'s EMAs with this step's mean logits before computing LeCAM (release order).
    ``generator`` (CPU) drives DiffAugment and D's crop choice; None uses torch's global RNG.
    Metrics: d_loss, d_hinge, d_lecam, d_cr, logits_real_mean, logits_fake_mean, d_weight.
    """
    x_real, x_fake = x_real.detach(), x_fake.detach()
    lam_d = disc_weight(cfg, step)
    cr_w = cfg.cr_weight if step >= cfg.disc_start else 0.0

    logits_real = _run(D, _augment(x_real, cfg, generator), generator)  # (B, T)
    logits_fake = _run(D, _augment(x_fake, cfg, generator), generator)  # (B, T)

    lecam.update(logits_real.detach().float().mean(), logits_fake.detach().float().mean())
    hinge = _hinge_d(logits_real, logits_fake)
    lecam_term = _lecam(logits_real, logits_fake, lecam.ema_real, lecam.ema_fake)
    loss = lam_d * (hinge + cfg.lecam_weight * lecam_term)

    cr = hinge.new_zeros(())
    if cr_w > 0.0:
        logits_real_s = _run(D, strong_augment(x_real, generator), generator)  # (B, T)
        logits_fake_s = _run(D, strong_augment(x_fake, generator), generator)  # (B, T)
        cr = F.mse_loss(torch.cat([logits_real, logits_fake]), torch.cat([logits_real_s, logits_fake_s]))
        loss = loss + cr_w * cr

    metrics = _floats(d_loss=loss, d_hinge=hinge, d_lecam=lecam_term, d_cr=cr,
                      logits_real_mean=logits_real.mean(), logits_fake_mean=logits_fake.mean())
    metrics["d_weight"] = float(lam_d)
    return loss, metrics


def generator_adv_loss(D: nn.Module, x_fake: torch.Tensor, cfg: LossConfig, step: int,
                       generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Metrics]:
    """The generator's adversarial term: lambda_adv * -mean D(DiffAugment(x_hat)).

    Gradients flow through D (its frozen trunk included) into x_fake. D's head parameters also receive gradients
    here: zero them (or the D optimizer's grads) before the D step. Before ``disc_start`` D is not run and a zero
    tensor is returned.
    """
    lam = adv_weight(cfg, step)
    if lam == 0.0:
        return x_fake.new_zeros(()), {"g_adv": 0.0, "g_hinge": 0.0, "adv_weight": 0.0}
    logits_fake = _run(D, _augment(x_fake, cfg, generator), generator)  # (B, T)
    hinge = -logits_fake.mean()
    loss = lam * hinge
    metrics = _floats(g_adv=loss, g_hinge=hinge)
    metrics["adv_weight"] = float(lam)
    return loss, metrics
