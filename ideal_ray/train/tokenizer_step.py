"""The tokenizer's networks and losses, independent of how a step is taken or distributed.

:class:`TokenizerSystem` owns the networks of one tokenizer run (tokenizer, discriminator, LPIPS, LeCAM state) and
computes the G and D losses; ``tokenizer_stage.TokenizerStage`` takes the training step with them (every run,
in-process or on Ray, every test and benchmark). :func:`evaluate_reconstruction` measures a tokenizer on a loader.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn

from ideal_ray.config import TokenizerTrainConfig
from ideal_ray.losses.gan import LeCAM, discriminator_loss
from ideal_ray.losses.tokenizer import generator_loss
from ideal_ray.models.discriminator import DinoDiscriminator
from ideal_ray.models.tokenizer import IdealTokenizer
from ideal_ray.weights import lpips_model


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


@torch.no_grad()
def evaluate_reconstruction(tokenizer: IdealTokenizer, batches: Iterable, device: str | torch.device = "cpu",
                            max_batches: int = 0) -> Dict[str, float]:
    """PSNR through the discrete bottleneck (encode -> indices -> decode) and codebook usage/entropy on a loader;
    the PSNR is the evaluation protocol's (``ideal_ray.eval.recon.psnr`` over uint8 pixels)."""
    import numpy as np

    from ideal_ray.eval.recon import psnr, to_uint8

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
        psnrs.append(psnr(to_uint8(images), to_uint8(recon)))  # the evaluation protocol's PSNR, over uint8 pixels
        counts += torch.bincount(idx.flatten().cpu(), minlength=k)
    tokenizer.train(was_training)
    p = counts.float() / counts.sum().clamp_min(1)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {"psnr": float(np.mean(np.concatenate(psnrs))), "usage": float((counts > 0).float().mean()),
            "entropy": entropy, "max_entropy": float(torch.log(torch.tensor(float(k))))}
