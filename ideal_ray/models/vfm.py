"""The frozen vision foundation model whose features Ideal tokenizes (spec section 1).

SigLIP2 ViT-L/16 at 384 px gives 24 x 24 = 576 patch tokens of width 1024. The tokenizer reads two of
them: the *shallow* tokens (output of block 8, before any norm) carry the pixel detail, the *deep* tokens
(output of block 24 with the backbone's own final LayerNorm) carry the semantics that zero-shot
classification and the generator rely on. Shallow tokens get a fresh LayerNorm of their own, the only
parameter here that may train (paper: "a learnable normalization"; the authors' release keeps it at 1/0).

Backbones:
- ``siglip2``: open_clip ``ViT-L-16-SigLIP2-384``; only the timm visual trunk (with its MAP attention-pool
  head, used for zero-shot) is kept, the 566M-parameter text tower is dropped.
- ``dinov2`` / ``dinov3``: timm ViT-L (paper Table 7c); class/register tokens are dropped.
- ``tiny``: a registered tiny open_clip model (tiny timm ViT with a MAP head + tiny text tower) that goes
  through exactly the siglip2 code path with random weights, so CPU tests exercise the real code.

Weights are found offline by :mod:`ideal_ray.weights`; a missing file raises ``MissingWeightsError``
before the (4 GB) model is built.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ideal_ray.config import VFMConfig
from ideal_ray.weights import MissingWeightsError, resolve_hf_file, resolve_local_file

__all__ = ["FrozenVFM", "build_zero_shot_model", "get_tokenizer", "register_tiny_open_clip"]

OPEN_CLIP_BACKBONES = ("siglip2", "tiny")
TIMM_BACKBONES = ("dinov2", "dinov3")
_WEIGHTS_KEY = "model.vfm.weights_path"


# --------------------------------------------------------------------------------- tiny registration
def _tiny_timm_name(cfg: VFMConfig) -> str:
    """The timm name encodes every size, so one name always means one architecture (and re-registering
    is never needed)."""
    base = re.sub(r"[^0-9a-zA-Z]+", "_", cfg.model_name).strip("_")
    return (f"{base}_i{cfg.image_size}_p{cfg.patch_size}_w{cfg.width}_d{cfg.depth}_h{cfg.heads}"
            f"_r{int(round(cfg.mlp_ratio * 1000))}")


def _register_tiny_timm(cfg: VFMConfig) -> str:
    import timm
    from timm.models import VisionTransformer, register_model

    name = _tiny_timm_name(cfg)
    if timm.is_model(name):
        return name
    arch = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
                num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, class_token=False, global_pool="map")

    def factory(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        # timm's factory passes pretrained_cfg* / cache_dir for its own loader; a registered tiny model has
        # no pretrained weights, so drop them (weights, if any, come through open_clip's checkpoint).
        if pretrained:
            raise ValueError(f"The tiny timm model '{name}' has no pretrained weights; use model.vfm.weights_path.")
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(k, None)
        return VisionTransformer(**dict(arch, **kwargs))

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = __name__
    register_model(factory)
    # register_model lists the name in this module's __all__; it is not an attribute here, so take it out
    module_all = getattr(sys.modules[__name__], "__all__", [])
    if name in module_all:
        module_all.remove(name)
    return name


def _tiny_open_clip_config(cfg: VFMConfig, timm_name: str) -> Dict[str, Any]:
    """SigLIP-like layout at toy size: timm ViT with MAP pooling and no projection (so the image embedding
    width is the trunk width), and a 2-layer text tower using open_clip's offline CLIP BPE tokenizer."""
    return {
        "embed_dim": cfg.width,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "timm_model_name": timm_name,
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }


def register_tiny_open_clip(cfg: VFMConfig) -> str:
    """Register ``cfg.model_name`` as an open_clip model config (and its tiny timm trunk); returns the name.

    The name must not contain "siglip": open_clip's ``get_tokenizer`` would then pick the Gemma tokenizer,
    which needs ``transformers`` and a download.
    """
    from open_clip import factory as oc_factory

    if "siglip" in cfg.model_name.lower():
        raise ValueError(f"model.vfm.model_name '{cfg.model_name}' for the tiny backbone must not contain "
                         f"'siglip' (open_clip would pick the Gemma tokenizer, a download); rename it.")
    timm_name = _register_tiny_timm(cfg)
    # open_clip's registry is the dict that add_model_config fills from JSON files; we put the config in
    # directly (overwriting on every build, since the sizes may change under one name).
    oc_factory._MODEL_CONFIGS[cfg.model_name] = _tiny_open_clip_config(cfg, timm_name)
    return cfg.model_name


# ---------------------------------------------------------------------------------- weight resolution
def _open_clip_hub(cfg: VFMConfig) -> Optional[Tuple[str, List[str]]]:
    """(HF repo, candidate file names) of ``cfg.pretrained`` for an open_clip model, or None if the tag is
    not an HF-hub tag (pure registry lookup, no network)."""
    import open_clip

    if not cfg.pretrained:
        return None
    hub = (open_clip.get_pretrained_cfg(cfg.model_name, cfg.pretrained) or {}).get("hf_hub", "")
    if not hub:
        return None
    parts = hub.strip("/").split("/")
    repo = "/".join(parts[:2])
    if len(parts) > 2:  # "org/repo/file.bin": a named file, possibly with a safetensors twin
        name = parts[2]
        names = [name] if name.endswith(".safetensors") else [name.rsplit(".", 1)[0] + ".safetensors", name]
    else:
        names = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return repo, names


def _open_clip_weights(cfg: VFMConfig) -> Optional[str]:
    """Local file for an open_clip model (``weights_path``, else the HF cache file of the ``pretrained`` tag),
    or None for random init (``pretrained=""``, e.g. tiny)."""
    import open_clip

    what = f"open_clip {cfg.model_name}" + (f" ({cfg.pretrained})" if cfg.pretrained else "")
    hub = _open_clip_hub(cfg)
    if cfg.pretrained and hub is None and not cfg.weights_path:
        tags = open_clip.list_pretrained_tags_by_model(cfg.model_name)
        raise ValueError(f"model.vfm.pretrained '{cfg.pretrained}' is not an open_clip HF-hub tag of "
                         f"{cfg.model_name} (tags: {tags}); set model.vfm.weights_path to a local file instead.")
    if hub is not None:
        return resolve_hf_file(hub[0], hub[1], cfg.weights_path, config_key=_WEIGHTS_KEY, what=what)
    if cfg.weights_path:
        return resolve_local_file(cfg.weights_path, config_key=_WEIGHTS_KEY, what=what,
                                  how_to_get="torch.save / safetensors.save_file of the open_clip model's state dict")
    return None


def _timm_weights(cfg: VFMConfig) -> Optional[str]:
    """Local file for a timm backbone (``weights_path``, else the HF cache file of the tagged timm name), or
    None for random init (``pretrained=""``)."""
    import timm

    what = f"timm {cfg.model_name}"
    if not cfg.pretrained and not cfg.weights_path:
        return None
    pcfg = timm.models.get_pretrained_cfg(cfg.model_name)
    if pcfg is None or not pcfg.hf_hub_id:
        if cfg.weights_path:
            return resolve_local_file(cfg.weights_path, config_key=_WEIGHTS_KEY, what=what,
                                      how_to_get="torch.save of the timm model's state dict")
        raise ValueError(f"timm has no pretrained weights named '{cfg.model_name}'; set model.vfm.model_name to a "
                         f"tagged name (e.g. vit_large_patch14_dinov2.lvd142m) or model.vfm.weights_path.")
    repo = pcfg.hf_hub_id.split("@")[0]
    names = [pcfg.hf_hub_filename] if pcfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return resolve_hf_file(repo, names, cfg.weights_path, config_key=_WEIGHTS_KEY, what=what)


# ------------------------------------------------------------------------------------------- builders
def _build_open_clip(cfg: VFMConfig, device: str = "cpu") -> nn.Module:
    """Full open_clip model (image + text) with weights resolved offline first. ``device="meta"`` builds
    the architecture without memory (shape / parameter-count checks of the paper-size models)."""
    if cfg.backbone not in OPEN_CLIP_BACKBONES:
        raise ValueError(f"Backbone '{cfg.backbone}' has no open_clip text tower; zero-shot needs "
                         f"model.vfm.backbone in {OPEN_CLIP_BACKBONES}.")
    import open_clip

    if cfg.backbone == "tiny":
        register_tiny_open_clip(cfg)
    elif cfg.model_name not in open_clip.list_models():
        raise ValueError(f"model.vfm.model_name '{cfg.model_name}' is not an open_clip model for the siglip2 "
                         f"backbone; use e.g. ViT-L-16-SigLIP2-384.")
    weights = _open_clip_weights(cfg)  # raises MissingWeightsError before anything large is built
    with torch.device(device):
        model = open_clip.create_model(
            cfg.model_name,
            pretrained=weights,
            device=device,
            force_preprocess_cfg=dict(mean=tuple(cfg.mean), std=tuple(cfg.std)),  # no 'webli' tag to supply them
        )
    return model.eval().requires_grad_(False)


def _build_timm(cfg: VFMConfig, device: str = "cpu") -> nn.Module:
    import timm

    weights = _timm_weights(cfg)  # raises MissingWeightsError before the model is built
    kwargs: Dict[str, Any] = dict(img_size=cfg.image_size, num_classes=0)
    if weights:
        kwargs["pretrained_cfg_overlay"] = dict(file=weights)
    with torch.device(device):
        return timm.create_model(cfg.model_name, pretrained=bool(weights), **kwargs)


def _build_trunk(cfg: VFMConfig, device: str = "cpu") -> nn.Module:
    if cfg.backbone in OPEN_CLIP_BACKBONES:
        model = _build_open_clip(cfg, device)
        return model.visual.trunk  # the text tower and logit scale are freed with `model`
    if cfg.backbone in TIMM_BACKBONES:
        return _build_timm(cfg, device)
    raise ValueError(f"model.vfm.backbone '{cfg.backbone}' is unknown; choose one of "
                     f"{OPEN_CLIP_BACKBONES + TIMM_BACKBONES}.")


def _check_trunk(trunk: nn.Module, cfg: VFMConfig) -> None:
    depth, width = len(trunk.blocks), trunk.embed_dim
    if (depth, width) != (cfg.depth, cfg.width):
        raise ValueError(f"The {cfg.model_name} trunk has depth {depth} and width {width}, but model.vfm.depth/width "
                         f"say {cfg.depth}/{cfg.width}; set them to {depth}/{width}.")
    grid = tuple(trunk.patch_embed.grid_size)
    if grid != (cfg.grid, cfg.grid):
        raise ValueError(f"The {cfg.model_name} trunk makes a {grid[0]}x{grid[1]} token grid at model.vfm.image_size "
                         f"{cfg.image_size}, not {cfg.grid}x{cfg.grid}; check model.vfm.patch_size/image_size.")


# ------------------------------------------------------------------------------------------ the module
class FrozenVFM(nn.Module):
    """Frozen VFM trunk returning ``(shallow, deep)`` patch tokens, each (B, N, C).

    The trunk is built once, frozen, kept in eval mode (``train()`` cannot switch it), and run under
    ``no_grad``; only ``shallow_norm`` may learn (``cfg.shallow_norm_trainable``).
    """

    def __init__(self, cfg: VFMConfig, load_weights: bool = True):
        """``load_weights=False`` builds the architecture with random weights (parameter counts, or a checkpoint
        that carries the trunk). The trunk is built on the current default device (``with torch.device("meta")``
        builds it without memory)."""
        super().__init__()
        self.cfg = cfg
        build_cfg = cfg if load_weights else dataclasses.replace(cfg, pretrained="", weights_path="")
        trunk = _build_trunk(build_cfg, device=str(torch.get_default_device()))
        _check_trunk(trunk, cfg)
        self.trunk = trunk.eval().requires_grad_(False)
        self.shallow_norm = nn.LayerNorm(cfg.width, eps=1e-6)
        # single-layer mode never uses it: keep it frozen so no optimizer sees an unused trainable parameter
        self.shallow_norm.requires_grad_(cfg.shallow_norm_trainable and not cfg.single_layer)
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._indices = [cfg.deep_layer - 1] if cfg.single_layer else [cfg.shallow_layer - 1, cfg.deep_layer - 1]

    @property
    def num_tokens(self) -> int:
        return self.cfg.num_tokens

    @property
    def width(self) -> int:
        return self.trunk.embed_dim

    def train(self, mode: bool = True) -> "FrozenVFM":
        """The trunk stays in eval mode (no dropout / drop-path in a frozen feature extractor)."""
        super().train(mode)
        self.trunk.eval()
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> the backbone's input at ``cfg.image_size``, mean/std normalized."""
        size = self.cfg.image_size
        x = images.float()  # antialiased bicubic has no CPU bf16 kernel; 3 channels cost nothing in fp32
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)  # (B, 3, S, S)
        x = (x.clamp(-1.0, 1.0) + 1.0) / 2.0  # bicubic overshoots; back into [0, 1]
        return (x - self.mean) / self.std  # (B, 3, S, S) fp32

    def forward(self, images: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Images in [-1, 1] -> (shallow (B, N, C) or None in single-layer mode, deep (B, N, C)).

        Exactly ``finish(*trunk_features(images))``: the frozen part, then the trainable shallow norm."""
        return self.finish(*self.trunk_features(images))

    @torch.no_grad()
    def trunk_features(self, images: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """The frozen part. Images in [-1, 1] (B, 3, H, W) -> (shallow block output before any norm (B, N, C), or
        None in single-layer mode; deep tokens with the trunk's own, frozen, final norm (B, N, C)).

        Nothing here trains, so it may run away from the trainer (``dist.vfm_placement=data``: Ray Data actors);
        :meth:`finish` is the trainable rest."""
        x = self.preprocess(images).to(self.trunk.patch_embed.proj.weight.dtype)  # a bf16-cast trunk takes bf16
        feats = self.trunk.forward_intermediates(
            x, indices=self._indices, norm=False, stop_early=True, output_fmt="NLC", intermediates_only=True,
        )  # list of (B, N, C), prefix tokens dropped, pre-norm
        deep = self.trunk.norm(feats[-1])  # (B, N, C)
        return (None if self.cfg.single_layer else feats[0]), deep

    def finish(self, shallow_raw: Optional[torch.Tensor],
               deep: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """The trainable part: :meth:`trunk_features` outputs -> (shallow with its own LayerNorm (B, N, C) or None in
        single-layer mode, deep unchanged (B, N, C)). Runs with grad so ``shallow_norm`` can learn."""
        if self.cfg.single_layer:
            return None, deep
        if shallow_raw is None:
            raise ValueError("FrozenVFM.finish needs the shallow block output (model.vfm.single_layer is false); "
                             "pass the first value trunk_features returned.")
        return self.shallow_norm(shallow_raw), deep  # (B, N, C) each

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Deep tokens (B, N, C), already final-normed as :meth:`forward` returns them -> the trunk's MAP
        head (attention pool + fc_norm) -> (B, C'): open_clip's un-normalized ``encode_image`` embedding,
        used for zero-shot classification of (reconstructed) deep features."""
        if getattr(self.trunk, "attn_pool", None) is None:
            raise ValueError(f"pool() needs an attention-pool (MAP) head; the {self.cfg.backbone} backbone has none.")
        return self.trunk.forward_head(tokens)  # (B, C')


# ------------------------------------------------------------------------------------------ zero-shot
def build_zero_shot_model(cfg: VFMConfig) -> nn.Module:
    """The full open_clip model (image + text towers, logit scale/bias), frozen and in eval mode, with the
    same offline weight resolution as :class:`FrozenVFM`."""
    return _build_open_clip(cfg)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "open_clip_config.json")


def get_tokenizer(cfg: VFMConfig):
    """open_clip's tokenizer for the zero-shot text side, loaded without network access.

    tiny: open_clip's CLIP BPE tokenizer (ships with the package). siglip2: the Gemma tokenizer of the model's HF
    repo, read from the HF cache snapshot that holds ``TOKENIZER_FILES`` through open_clip's ``local-dir:`` path
    (needs ``transformers``). Asking transformers for the repo id with ``local_files_only`` is not enough offline:
    it looks for a ``config.json`` the open_clip repo does not have.
    """
    import open_clip

    if cfg.backbone == "tiny":
        register_tiny_open_clip(cfg)
        return open_clip.get_tokenizer(cfg.model_name)
    if cfg.backbone != "siglip2":
        raise ValueError(f"Backbone '{cfg.backbone}' has no text tokenizer; zero-shot needs siglip2 or tiny.")
    text_cfg = (open_clip.get_model_config(cfg.model_name) or {}).get("text_cfg", {})
    repo = text_cfg.get("hf_tokenizer_name", "")
    if not repo:
        raise ValueError(f"open_clip model '{cfg.model_name}' names no HF tokenizer; cannot load it offline.")
    found = [resolve_hf_file(repo, name, config_key="HF_HOME", what=f"the {cfg.model_name} text tokenizer ({name})",
                             set_hint="Point HF_HOME (or HF_HUB_CACHE) at an HF cache that holds it")
             for name in TOKENIZER_FILES]
    snapshot = os.path.dirname(found[0])
    if any(os.path.dirname(f) != snapshot for f in found):
        raise MissingWeightsError(f"the {cfg.model_name} text tokenizer",
                                  [f"{', '.join(TOKENIZER_FILES)} in one snapshot of {repo}"], "HF_HOME",
                                  TOKENIZER_FILES[0], f"huggingface-cli download {repo} {' '.join(TOKENIZER_FILES)}",
                                  "Download all three files of the same revision")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise RuntimeError(f"The {cfg.model_name} tokenizer needs the `transformers` package: pip install transformers.")
    return open_clip.get_tokenizer(f"local-dir:{snapshot}")
