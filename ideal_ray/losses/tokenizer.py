"""The tokenizer's generator objective (spec section 6), composed from the pure loss functions.

L_G = MSE + w_p * LPIPS + lambda_adv * hinge_G + VQ terms + L_deep + L_shallow.
The discriminator side lives in :mod:`ideal_ray.losses.gan` (``discriminator_loss``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ideal_ray.config import LossConfig, QuantizerConfig
from ideal_ray.losses.alignment import alignment_loss
from ideal_ray.losses.gan import generator_adv_loss
from ideal_ray.losses.reconstruction import lpips_loss, mse_loss, perceptual_weight
from ideal_ray.losses.vq import vq_losses


def generator_loss(out, images: torch.Tensor, loss_cfg: LossConfig, q_cfg: QuantizerConfig, step: int,
                   lpips_net: Optional[nn.Module], discriminator: Optional[nn.Module],
                   generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """out: :class:`~ideal_ray.models.tokenizer.TokenizerOutput` for ``images``; step: 1-based optimizer step."""
    metrics: Dict[str, torch.Tensor] = {}
    rec, m = mse_loss(images, out.recon)
    metrics.update(m)
    total = loss_cfg.recon_weight * rec

    w_p = perceptual_weight(step, loss_cfg.perceptual_weight, loss_cfg.perceptual_warmup_steps)
    if lpips_net is not None and loss_cfg.perceptual_weight > 0:
        p, m = lpips_loss(lpips_net, images, out.recon)
        metrics.update(m)
        total = total + w_p * p
    metrics["w_perceptual"] = w_p

    q = out.quant
    vq, m = vq_losses(q.z, q.z_q, q.distances, q_cfg.codebook_weight, q_cfg.commitment_weight,
                      q_cfg.entropy_weight, q_cfg.entropy_temperature)
    metrics.update(m)
    total = total + vq

    deep, m = alignment_loss(out.deep_pred, out.deep_target, loss_cfg.deep_mse_weight, loss_cfg.deep_cos_weight,
                             prefix="deep")
    metrics.update(m)
    total = total + deep
    if loss_cfg.shallow_align and out.shallow_target is not None:
        shallow, m = alignment_loss(out.shallow_pred, out.shallow_target, loss_cfg.shallow_mse_weight,
                                    loss_cfg.shallow_cos_weight, prefix="shallow")
        metrics.update(m)
        total = total + shallow

    if discriminator is not None and loss_cfg.use_discriminator:
        adv, m = generator_adv_loss(discriminator, out.recon, loss_cfg, step, generator=generator)
        metrics.update(m)
        total = total + adv

    metrics["g_loss"] = total.detach()
    return total, metrics
