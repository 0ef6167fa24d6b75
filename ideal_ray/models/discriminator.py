"""DINO discriminator: a frozen DINO ViT-S/16 trunk read at five depths, each read by a small trainable head.

Why this design (spec section 6): a self-supervised ViT already separates natural from unnatural image statistics
at several levels of abstraction, so the discriminator only has to learn cheap per-token heads on top of frozen
features. The heads see the token embedding and the outputs of blocks 2, 5, 8 and 11 (0-based) and each emits one
logit per token; the logits of all five heads are concatenated into one (B, total_tokens) vector that the hinge
losses average over.

Facts taken from the authors' release (``modelling/discriminators/discriminator_dino.py``):

* Images in [-1, 1] are remapped to ImageNet mean/std in fp32; if the image is larger than the trunk's input, one
  random crop (the same offset for the whole batch) is taken with probability 0.5, otherwise the image is
  area-resized (bicubic when it has to grow).
* A tap is the token sequence with the class token *added* to every patch token ("readout"), so a tap has
  ``(image / patch) ** 2`` tokens (196 at 224 px), not 197. ``DiscriminatorConfig.tap_readout`` picks this
  (``"add_cls"``, the release) or keeps the class token as its own token (``"cls_token"``, L = 197, as the spec
  text says).
* A head is ``SN-Conv1d(k=1) -> BN -> LeakyReLU(0.2)``, then a residual ``[SN-Conv1d(k=9, circular) -> BN ->
  LeakyReLU(0.2)]`` whose sum with its input is scaled by 1/sqrt(2), then ``SN-Conv1d(k=1) -> 1 channel``. Spectral
  norm uses one power iteration, eps 1e-12; BN eps is 1e-6. The release's class also offers a "local" batch norm
  (statistics over virtual batches of 8 samples, no running statistics) which is the default here; the release's
  own default is SyncBatchNorm (``norm="batch"`` here gives ``nn.BatchNorm1d`` that a trainer may convert with
  ``nn.SyncBatchNorm.convert_sync_batchnorm``). Both have the same parameters.
* The release zeroes the key bias of the DINO checkpoint; that changes nothing (softmax is invariant to a
  per-query constant), so the timm weights are used as they are.

The trunk is frozen (``eval()`` + ``requires_grad_(False)``) but runs with autograd on, because the generator's
adversarial loss needs dD/dx.
"""
from __future__ import annotations

import math
from typing import List, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import VisionTransformer, register_model
from torch.nn.utils.parametrizations import spectral_norm

from ideal_ray.config import DiscriminatorConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TAP_READOUTS = ("add_cls", "cls_token")
HEAD_NORMS = ("local", "batch")
HEAD_NORM_EPS = 1e-6
VIRTUAL_BATCH = 8  # samples per BatchNormLocal group (release)


# ------------------------------------------------------------------------------------- tiny trunk
TINY_DINO_NAME = "ideal_tiny_dino"
_TINY_DEFAULTS = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0, num_classes=0)


def ideal_tiny_dino(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A tiny timm VisionTransformer on the same code path as ViT-S/16 DINO (class token, learned pos embed).

    Registered with timm so ``timm.create_model("ideal_tiny_dino", img_size=..., embed_dim=...)`` works in tests
    and the tiny preset; it has no pretrained weights.
    """
    if pretrained:
        raise ValueError("ideal_tiny_dino has no pretrained weights; build it with pretrained=False.")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return VisionTransformer(**dict(_TINY_DEFAULTS, **kwargs))


if not timm.models.is_model(TINY_DINO_NAME):
    register_model(ideal_tiny_dino)


# ------------------------------------------------------------------------------------------ heads
class BatchNormLocal(nn.Module):
    """Batch norm over groups of ``virtual_bs`` samples (statistics over samples and tokens), no running stats.

    Why: the statistics never depend on other GPUs or on a running average, so D behaves the same in train and
    eval mode and with any data-parallel layout. The batch is split into ceil(B / virtual_bs) groups of (nearly)
    equal size, as the release does when B divides evenly.
    """

    def __init__(self, num_features: int, virtual_bs: int = VIRTUAL_BATCH, eps: float = HEAD_NORM_EPS):
        super().__init__()
        self.virtual_bs = virtual_bs
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:  # x: (G, b, C, L)
        mean = x.mean(dim=(1, 3), keepdim=True)  # (G, 1, C, 1)
        var = x.var(dim=(1, 3), keepdim=True, unbiased=False)  # (G, 1, C, 1)
        return (x - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, L)
        B, C, L = x.shape
        x = x.float()
        groups = max(1, math.ceil(B / self.virtual_bs))
        if B % groups == 0:
            y = self._norm(x.view(groups, B // groups, C, L)).view(B, C, L)  # (B, C, L)
        else:
            y = torch.cat([self._norm(g.unsqueeze(0)).squeeze(0) for g in x.tensor_split(groups, dim=0)], dim=0)
        return y * self.weight[None, :, None] + self.bias[None, :, None]  # (B, C, L)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, virtual_bs={self.virtual_bs}, eps={self.eps}"


def _sn_conv(c_in: int, c_out: int, kernel: int) -> nn.Module:
    conv = nn.Conv1d(c_in, c_out, kernel_size=kernel, padding=kernel // 2, padding_mode="circular")
    return spectral_norm(conv, n_power_iterations=1, eps=1e-12, dim=0)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "local":
        return BatchNormLocal(channels)
    return nn.BatchNorm1d(channels, eps=HEAD_NORM_EPS)


class _Residual(nn.Module):
    """(fn(x) + x) / sqrt(2): keeps the activation scale of the residual branch's sum at about 1."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) * (1.0 / math.sqrt(2.0))


class DiscHead(nn.Sequential):
    """One per-token head: (B, C, L) tap -> (B, 1, L) logits."""

    def __init__(self, channels: int, kernel: int, norm: str = "local"):
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731 (not inplace: keeps autograd simple under checkpointing)
        super().__init__(
            nn.Sequential(_sn_conv(channels, channels, 1), _norm(norm, channels), act()),
            _Residual(nn.Sequential(_sn_conv(channels, channels, kernel), _norm(norm, channels), act())),
            _sn_conv(channels, 1, 1),
        )


def head_param_count(width: int, kernel: int) -> int:
    """Trainable parameters of one head (conv weights + biases and two norms' affine pairs)."""
    return (width * width + width) + 2 * width + (width * width * kernel + width) + 2 * width + (width + 1)


# ---------------------------------------------------------------------------------- discriminator
class DinoDiscriminator(nn.Module):
    """Frozen DINO ViT trunk + one trainable head per tap; ``forward(x) -> (B, total_tokens)`` logits.

    ``load_weights=False`` skips loading the pretrained trunk (meta-device parameter counts, shape tests).
    ``norm`` picks the heads' batch norm: ``"local"`` (virtual batches of 8, default) or ``"batch"``.
    """

    def __init__(self, cfg: DiscriminatorConfig, load_weights: bool = True, norm: str = "local"):
        super().__init__()
        readout = getattr(cfg, "tap_readout", "add_cls")
        if readout not in TAP_READOUTS:
            raise ValueError(f"discriminator.tap_readout '{readout}' is unknown; choose one of {TAP_READOUTS}.")
        if norm not in HEAD_NORMS:
            raise ValueError(f"Discriminator head norm '{norm}' is unknown; choose one of {HEAD_NORMS}.")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"discriminator.image_size {cfg.image_size} is not a multiple of "
                             f"discriminator.patch_size {cfg.patch_size}.")
        if any(not 0 <= b < cfg.depth for b in cfg.tap_blocks):
            raise ValueError(f"discriminator.tap_blocks {tuple(cfg.tap_blocks)} must be 0-based blocks below the "
                             f"trunk's depth {cfg.depth}.")
        self.cfg = cfg
        self.readout = readout
        self.tap_blocks = tuple(sorted(set(cfg.tap_blocks)))
        grid = cfg.image_size // cfg.patch_size
        self.tokens_per_tap = grid * grid + (1 if readout == "cls_token" else 0)
        self.num_taps = 1 + len(self.tap_blocks)

        self.trunk = self._build_trunk(cfg, load_weights)
        self.trunk.eval()
        self.trunk.requires_grad_(False)
        # [-1, 1] -> ImageNet normalisation as one affine map: ((x + 1) / 2 - m) / s = (0.5 / s) x + (0.5 - m) / s
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("x_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("x_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)

        self.heads = nn.ModuleList(DiscHead(cfg.width, cfg.head_kernel, norm) for _ in range(self.num_taps))

    # ------------------------------------------------------------------------------------- building
    @staticmethod
    def _build_trunk(cfg: DiscriminatorConfig, load_weights: bool) -> VisionTransformer:
        trunk = timm.create_model(
            cfg.model_name, pretrained=False, num_classes=0, img_size=cfg.image_size, patch_size=cfg.patch_size,
            embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads,
        )
        if not isinstance(trunk, VisionTransformer) or trunk.cls_token is None:
            raise ValueError(f"discriminator.model_name '{cfg.model_name}' is not a timm VisionTransformer with a "
                             f"class token; use a DINO ViT such as vit_small_patch16_224.dino.")
        if cfg.pretrained and load_weights:
            from ideal_ray.weights import load_state_dict_file, resolve_hf_file

            path = resolve_hf_file(f"timm/{cfg.model_name}", "model.safetensors", local_path=cfg.weights_path,
                                   config_key="discriminator.weights_path",
                                   what=f"the DINO discriminator trunk ({cfg.model_name})",
                                   set_hint="Set discriminator.weights_path=/path/to/model.safetensors (or "
                                            "discriminator.pretrained=false for a random trunk, tests only)")
            state = load_state_dict_file(path)
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            own = trunk.state_dict()
            missing = [k for k in own if k not in state]
            unexpected = [k for k in state if k not in own]
            wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
            if missing or unexpected or wrong:
                raise ValueError(f"The discriminator weights at {path} do not fit '{cfg.model_name}' with width "
                                 f"{cfg.width}, depth {cfg.depth}, patch {cfg.patch_size}, image {cfg.image_size} "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}); "
                                 f"point discriminator.weights_path at the timm checkpoint of that model.")
            trunk.load_state_dict(state)
        return trunk

    def train(self, mode: bool = True) -> "DinoDiscriminator":
        super().train(mode)
        self.trunk.eval()  # frozen: no dropout / drop-path, whatever the heads do
        return self

    def heads_parameters(self) -> List[nn.Parameter]:
        """The trainable parameters (the heads); the trunk has none."""
        return [p for p in self.heads.parameters() if p.requires_grad]

    # -------------------------------------------------------------------------------------- forward
    def preprocess(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> (B, 3, S, S) ImageNet-normalised, S = cfg.image_size.

        With probability ``crop_prob`` (and only when the image is larger than S) one random S x S crop with the
        same offset for the whole batch; otherwise an area resize (bicubic when the image is smaller). Random
        numbers come from ``generator`` or torch's global CPU RNG, so ``torch.manual_seed`` makes it repeatable.
        """
        size = self.cfg.image_size
        device_type = x.device.type if x.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            x = x.float() * self.x_scale + self.x_shift  # (B, 3, H, W)
            H, W = x.shape[-2:]
            if H > size and W > size and _uniform(generator) < self.cfg.crop_prob:
                top = int(torch.randint(0, H - size + 1, (1,), generator=_cpu(generator)))
                left = int(torch.randint(0, W - size + 1, (1,), generator=_cpu(generator)))
                x = x[:, :, top:top + size, left:left + size]  # (B, 3, S, S)
            elif (H, W) != (size, size):
                mode = "area" if H >= size and W >= size else "bicubic"
                x = F.interpolate(x, size=(size, size), mode=mode)  # (B, 3, S, S)
        return x

    def taps(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> list of ``num_taps`` tensors, each (B, width, tokens_per_tap)."""
        t = self.trunk
        x = self.preprocess(x, generator)  # (B, 3, S, S)
        h = t.patch_embed(x)  # (B, N, C)
        h = t._pos_embed(h)  # (B, 1 + N, C): class token + pos embed
        h = t.norm_pre(h)  # identity for DINO
        out = [self._readout(h)]
        last = self.tap_blocks[-1]
        for i, block in enumerate(t.blocks[: last + 1]):
            h = block(h)  # (B, 1 + N, C)
            if i in self.tap_blocks:
                out.append(self._readout(h))
        return out

    def _readout(self, h: torch.Tensor) -> torch.Tensor:  # h: (B, 1 + N, C)
        h = h.float()
        if self.readout == "add_cls":
            h = h[:, 1:] + h[:, :1]  # (B, N, C)
        return h.transpose(1, 2)  # (B, C, L)

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> logits (B, num_taps * tokens_per_tap), heads concatenated in tap order."""
        B = x.shape[0]
        logits = [head(tap).view(B, -1) for head, tap in zip(self.heads, self.taps(x, generator))]  # (B, L) each
        return torch.cat(logits, dim=1).float()  # (B, 5 L); fp32 so the hinge means are exact under autocast


# -------------------------------------------------------------------------------------------- utils
def _cpu(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("DinoDiscriminator needs a CPU torch.Generator (its crop choice is made on the host).")
    return generator


def _uniform(generator: Optional[torch.Generator]) -> float:
    return float(torch.rand((), generator=_cpu(generator)))

