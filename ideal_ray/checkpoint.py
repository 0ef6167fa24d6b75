"""Single-file tokenizer checkpoints: ours (EMA weights + config) and the authors' release layout.

Everything is loaded with ``torch.load(..., weights_only=True)``; files are written atomically (temp file, then
rename) and an existing file is never replaced unless the caller says ``overwrite=True``.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from typing import Dict, List, Optional, Tuple

import torch

from ideal_ray.config import TokenizerConfig, TokenizerTrainConfig, from_dict, validate_tokenizer

FORMAT = "ideal-ray/tokenizer/v1"


def atomic_torch_save(obj, path: str, overwrite: bool = False) -> str:
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it (pass overwrite=True or choose a new path).")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=os.path.dirname(path))
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def unique_dir(base: str) -> str:
    """``base`` if it does not exist yet, else ``base-2``, ``base-3``, ...: a rerun never overwrites a run."""
    if not os.path.exists(base):
        return base
    i = 2
    while os.path.exists(f"{base}-{i}"):
        i += 1
    return f"{base}-{i}"


def save_inference_checkpoint(path: str, tokenizer, cfg: TokenizerTrainConfig, step: int = 0,
                              include_vfm: bool = True, overwrite: bool = False) -> str:
    """Write ``{"format", "config", "model", "step"}``; ``model`` is the tokenizer's state dict (the EMA copy).

    ``include_vfm=False`` leaves out the frozen VFM trunk (316M parameters at paper scale), which the loader then
    takes from the VFM's own weights file.
    """
    state = tokenizer.state_dict() if include_vfm else tokenizer.trainable_state_dict()
    payload = {
        "format": FORMAT,
        "config": dataclasses.asdict(cfg.model),
        "train_config": dataclasses.asdict(cfg),
        "model": {k: v.detach().cpu() for k, v in state.items()},
        "step": int(step),
        "includes_vfm": bool(include_vfm),
    }
    return atomic_torch_save(payload, path, overwrite=overwrite)


def load_tokenizer(path: str, device: str = "cpu"):
    """Rebuild an :class:`IdealTokenizer` from a file written by :func:`save_inference_checkpoint`."""
    from ideal_ray.models.tokenizer import IdealTokenizer

    if not os.path.isfile(path):
        raise FileNotFoundError(f"No tokenizer checkpoint at {path}.")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an ideal-ray tokenizer checkpoint (no format '{FORMAT}'); for the authors' "
                         f"release checkpoints use load_release_checkpoint().")
    cfg = from_dict(TokenizerConfig, ckpt["config"])
    validate_tokenizer(cfg)
    model = IdealTokenizer(cfg, load_weights=not ckpt.get("includes_vfm", True))
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    missing = [k for k in missing if not (k.startswith("vfm.trunk.") and not ckpt.get("includes_vfm", True))]
    if missing or unexpected:
        raise ValueError(f"{path} does not match the tokenizer it describes: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")
    return model.to(device).eval()


# ------------------------------------------------------------------------------- the authors' release layout
# The release (GitHub Row11n/IDEAL) saves {"model": state_dict} (optionally "ema") of a wrapper whose keys start
# with "model." (plus aliases "decoder." and "quantize." of the same tensors, and DDP/compile prefixes).
# Each rule maps a release key (after the "model." prefix is removed) to ours.
_RELEASE_RULES: List[Tuple[str, str]] = [
    (r"^encode_transformer\.backbone\.model\.", "vfm.trunk."),
    (r"^encode_transformer\.backbone\.spatial_norm\.", "vfm.shallow_norm."),
    (r"^encode_transformer\.attn_fuse\.", "fusion."),
    (r"^pre_slots_quant\.", "pre_quant."),
    (r"^post_slots_quant\.", "post_quant."),
    (r"^slot_quantize\.embedding\.", "quantizer.embedding."),
    (r"^decode_transformer\.slot_position_embedding$", "feature_decoder.pos_embed"),
    (r"^decode_transformer\.cls_pos_embedding$", "feature_decoder.cls_pos_embed"),
    (r"^decode_transformer\.cls_token$", "feature_decoder.cls_token"),
    (r"^decode_transformer\.register_tokens$", "feature_decoder.register_tokens"),
    (r"^decode_transformer\.norm_post\.", "feature_decoder.norm_in."),
    (r"^decode_transformer\.project_semantic\.", "feature_decoder.deep_head."),
    (r"^decode_transformer\.project_shallow\.", "feature_decoder.shallow_head."),
    (r"^decode_transformer\.transformer\.layers\.(\d+)\.ffn\.net\.", r"feature_decoder.blocks.\1.mlp."),
    (r"^decode_transformer\.transformer\.layers\.(\d+)\.", r"feature_decoder.blocks.\1."),
    (r"^decoder\.", "pixel_decoder."),  # the CNN decoder's names are the same as ours
]
_RELEASE_SKIP = re.compile(r"codebook_used")


def release_key_to_ours(key: str) -> Optional[str]:
    """Map one key of the release's state dict to ours; None for keys we do not keep (usage buffers, aliases)."""
    for prefix in ("module.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if _RELEASE_SKIP.search(key):
        return None
    if not key.startswith("model."):
        return None  # the wrapper's aliases "decoder." / "quantize." repeat tensors found under "model."
    key = key[len("model."):]
    for pattern, repl in _RELEASE_RULES:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    raise KeyError(f"Unrecognised key in the release checkpoint: model.{key}")


def convert_release_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        ours = release_key_to_ours(k)
        if ours is not None:
            out[ours] = v
    return out


def load_release_checkpoint(model, path: str, prefer_ema: bool = True, strict: bool = True):
    """Load the authors' released tokenizer weights into an :class:`IdealTokenizer` built with the paper preset.

    The file holds ``{"model": ...}`` and/or ``{"ema": ...}``; EMA weights are preferred when present. The frozen
    SigLIP2 trunk is part of the file, so the model may be built with ``load_weights=False``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No release checkpoint at {path}; download the authors' tokenizer checkpoint "
                                f"(GitHub Row11n/IDEAL, README 'Model zoo') and pass its path.")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and prefer_ema and "ema" in ckpt:
        state = ckpt["ema"]
    elif isinstance(ckpt, dict) and "model" in ckpt:
        state = ckpt["model"]
    else:
        state = ckpt
    ours = convert_release_state_dict(state)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"The release checkpoint {path} does not fit this model: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}). Build the model with "
                         f"the 'paper' preset (shallow_norm, fusion mode and sizes must match).")
    return model
