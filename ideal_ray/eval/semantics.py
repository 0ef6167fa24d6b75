"""How much semantics the discrete tokens keep: zero-shot classification and a linear probe (spec sections 1, 8).

Zero-shot (paper: 80.89 / 96.40 top-1 / top-5 from decoded features vs SigLIP2's own 83.23 / 97.11):
- text side: for each class, the 80 OpenAI ImageNet templates (shipped with open_clip) filled with the class name go
  through the SigLIP2 text tower; the class embedding is the mean of the L2-normalized prompt embeddings,
  renormalized (:func:`text_class_embeddings`, :class:`ZeroShotHead`);
- image side: deep tokens -> the frozen trunk's MAP attention-pool head (``FrozenVFM.pool``) -> L2 norm, for
  (a) the tokenizer's decoded deep features ``decode_features(encode(x))`` and (b) the frozen VFM's own deep tokens;
- logits = cos * exp(logit_scale) + logit_bias, scored as top-1 / top-5.

The ``tiny`` backbone runs the same code with the registered tiny open_clip model (random text tower, CLIP BPE
tokenizer shipped with open_clip). The paper's ``siglip2`` path needs the open_clip weights and the Gemma text
tokenizer (``tokenizer.json`` from the HF repo ``timm/ViT-L-16-SigLIP2-384``, read through ``transformers``); a
missing one fails in :func:`build_zero_shot_head` before anything is built, naming the file or package.

Linear probe (paper Table 1): multinomial logistic regression on (N, C) features -- pooled reconstructed deep
features, or any others -- trained full-batch with L-BFGS from zero on standardized features, the L2 weight decay
chosen on a seeded held-out part of the training split, then refit on all of it; deterministic for fixed inputs
(:mod:`ideal_ray.eval.probe`, re-exported here).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from ideal_ray.config import VFMConfig
from ideal_ray.eval.probe import DEFAULT_WEIGHT_DECAYS, ProbeResult, linear_probe  # noqa: F401 (re-exported)
from ideal_ray.models.tokenizer import IdealTokenizer
from ideal_ray.models.vfm import build_zero_shot_model, get_tokenizer

__all__ = [
    "DEFAULT_WEIGHT_DECAYS",
    "IMAGENET_TEMPLATES",
    "PooledFeatures",
    "ProbeResult",
    "ZeroShotHead",
    "build_zero_shot_head",
    "extract_pooled_features",
    "linear_probe",
    "per_class_top1",
    "text_class_embeddings",
    "topk_accuracy",
    "zero_shot",
    "zero_shot_class_names",
]

Template = Union[str, Callable[[str], str]]
IMAGENET_TEMPLATES: Tuple[Template, ...] = tuple(OPENAI_IMAGENET_TEMPLATES)  # the 80 OpenAI prompts
# The ImageNet-1k class index in its standard (sorted wnid) order, which open_clip's IMAGENET_CLASSNAMES follows.
_IMAGENET_FIRST_WNID, _IMAGENET_LAST_WNID = "n01440764", "n15075141"


# ------------------------------------------------------------------------------------------ class names
def zero_shot_class_names(entries: Sequence[Tuple[str, str]]) -> List[str]:
    """Prompt names for a class index ``[(wnid, name), ...]`` (``ideal_ray.data.folder.load_class_index``): the
    standard ImageNet-1k index gets open_clip's curated ``IMAGENET_CLASSNAMES`` (its zero-shot ImageNet names),
    any other index (e.g. the synthetic one) its own names."""
    wnids = [w for w, _ in entries]
    if (len(wnids) == len(IMAGENET_CLASSNAMES) and wnids == sorted(wnids)
            and (wnids[0], wnids[-1]) == (_IMAGENET_FIRST_WNID, _IMAGENET_LAST_WNID)):
        return list(IMAGENET_CLASSNAMES)
    return [name for _, name in entries]


# ---------------------------------------------------------------------------------------- zero-shot head
@torch.no_grad()
def text_class_embeddings(model: nn.Module, tokenizer: Callable, class_names: Sequence[str],
                          templates: Sequence[Template] = IMAGENET_TEMPLATES, classes_per_batch: int = 10,
                          device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Class embeddings (K, C): per class, the mean of the L2-normalized text embeddings of every template filled
    with its name, renormalized. ``model`` is an open_clip model (``encode_text``), ``tokenizer`` its tokenizer."""
    if not class_names or not templates:
        raise ValueError(f"Zero-shot needs class names and templates, got {len(class_names)} names and "
                         f"{len(templates)} templates.")
    out = []
    for s in range(0, len(class_names), classes_per_batch):
        names = class_names[s:s + classes_per_batch]
        texts = [t.format(c) if isinstance(t, str) else t(c) for c in names for t in templates]
        emb = model.encode_text(tokenizer(texts).to(device), normalize=True).float()  # (k * T, C)
        emb = emb.view(len(names), len(templates), -1).mean(1)  # (k, C)
        out.append(F.normalize(emb, dim=-1))
    return torch.cat(out)  # (K, C)


@dataclass
class ZeroShotHead:
    """The text side of zero-shot classification: normalized class embeddings and the model's logit scale/bias."""

    class_embeddings: torch.Tensor  # (K, C), L2-normalized
    logit_scale: float  # exp of the model's learned log-scale
    logit_bias: float = 0.0
    protocol: Dict[str, object] = field(default_factory=dict)  # how the text side was made, stored with results

    @property
    def num_classes(self) -> int:
        return self.class_embeddings.shape[0]

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled image features (B, C), not yet normalized -> logits (B, K) = cos * scale + bias."""
        if pooled.shape[-1] != self.class_embeddings.shape[-1]:
            raise ValueError(f"Pooled image features have width {pooled.shape[-1]} but the class embeddings "
                             f"{self.class_embeddings.shape[-1]}; pool with the same model's MAP head.")
        w = self.class_embeddings.to(pooled.device, torch.float32)
        return F.normalize(pooled.float(), dim=-1) @ w.T * self.logit_scale + self.logit_bias  # (B, K)


def build_zero_shot_head(cfg: VFMConfig, class_names: Sequence[str],
                         templates: Sequence[Template] = IMAGENET_TEMPLATES, classes_per_batch: int = 10,
                         device: Union[str, torch.device] = "cpu") -> ZeroShotHead:
    """The zero-shot head of ``cfg``'s open_clip model (``siglip2`` or ``tiny``). The text tokenizer is resolved
    first, then the weights, each failing fast with the missing file or package named; the full model (the
    SigLIP2 text tower has ~0.57B parameters) is freed before returning."""
    tokenizer = get_tokenizer(cfg)
    model = build_zero_shot_model(cfg).to(device)
    emb = text_class_embeddings(model, tokenizer, class_names, templates, classes_per_batch, device).cpu()
    scale = float(model.logit_scale.exp())
    bias = 0.0 if model.logit_bias is None else float(model.logit_bias)
    protocol = {
        "text_tower": f"open_clip {cfg.model_name} " + (f"({cfg.pretrained})" if cfg.pretrained else
                                                         f"({cfg.weights_path or 'random weights'})"),
        "templates": f"{len(templates)} " + ("OpenAI ImageNet templates (open_clip)"
                                             if tuple(templates) == IMAGENET_TEMPLATES else "custom templates"),
        "classes": len(class_names),
        "class_embedding": "mean of the L2-normalized prompt embeddings, renormalized",
        "logits": f"cos(image, class) * {scale:.6g} + {bias:.6g}",
    }
    return ZeroShotHead(emb, scale, bias, protocol)


# --------------------------------------------------------------------------------------- image features
@dataclass
class PooledFeatures:
    """Pooled features of one split, rows aligned: the tokenizer's reconstruction and the frozen VFM's own."""

    recon: torch.Tensor  # (N, C) pooled decode_features(encode(x))
    vfm: torch.Tensor  # (N, C) pooled frozen-VFM deep tokens
    labels: torch.Tensor  # (N,) int64
    pool: str = "map"  # "map": the VFM's attention-pool head (zero-shot needs it); "mean": token mean


def _pool_fn(tokenizer: IdealTokenizer, pool: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if pool == "map":
        return tokenizer.vfm.pool  # (B, N, C) -> (B, C'), the SigLIP2 MAP head
    if pool == "mean":
        return lambda tokens: tokens.mean(1)  # (B, N, C) -> (B, C), for head-less backbones (DINO)
    raise ValueError(f"pool='{pool}' is unknown; use 'map' (the VFM's attention-pool head) or 'mean'.")


@torch.no_grad()
def extract_pooled_features(tokenizer: IdealTokenizer, batches: Iterable, device: Union[str, torch.device] = "cpu",
                            max_batches: int = 0, pool: str = "map") -> PooledFeatures:
    """Run (images (B, 3, H, W) in [-1, 1], labels (B,), ...) batches through the frozen trunk once and pool both
    its deep tokens and ``decode_features(encode(x))`` -> :class:`PooledFeatures` on the CPU (float32)."""
    pool_fn = _pool_fn(tokenizer, pool)
    was_training = tokenizer.training
    tokenizer.eval()
    recon, vfm, labels = [], [], []
    try:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("extract_pooled_features needs (images, labels) batches; the loader yields "
                                 f"{type(batch).__name__} without labels.")
            images = batch[0].to(device)
            shallow_raw, deep = tokenizer.vfm.trunk_features(images)  # (B, N, C) each (shallow may be None)
            deep_rec = tokenizer.decode_features(tokenizer.encode_from_trunk(shallow_raw, deep))  # (B, N, C)
            recon.append(pool_fn(deep_rec).float().cpu())
            vfm.append(pool_fn(deep).float().cpu())
            labels.append(torch.as_tensor(batch[1]).long().cpu())
    finally:
        tokenizer.train(was_training)
    if not labels:
        raise ValueError("extract_pooled_features got no batches; check the evaluation loader.")
    return PooledFeatures(torch.cat(recon), torch.cat(vfm), torch.cat(labels), pool)


# ------------------------------------------------------------------------------------------- scoring
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """logits (N, K), labels (N,) in [0, K) -> {"top{k}": fraction}; k larger than K counts as K."""
    if logits.shape[0] == 0:
        raise ValueError("topk_accuracy got no rows to score.")
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, k_max), best first
    hit = top == labels.to(top.device).view(-1, 1)  # (N, k_max)
    return {f"top{k}": float(hit[:, :k].any(1).float().mean()) for k in ks}


def per_class_top1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of each class (K,) (NaN for a class with no rows), for a per-class table."""
    k = logits.shape[1]
    correct = (logits.argmax(1) == labels).float()
    total = torch.bincount(labels, minlength=k).float()
    hits = torch.bincount(labels, weights=correct, minlength=k)
    return torch.where(total > 0, hits / total.clamp_min(1), torch.full_like(total, float("nan")))


def zero_shot(head: ZeroShotHead, feats: PooledFeatures, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Zero-shot accuracy of the reconstructed and the frozen-VFM features side by side:
    ``{recon_top1, recon_top5, vfm_top1, vfm_top5, n, skipped}``. Rows whose label is not a class of ``head``
    are skipped and counted."""
    if feats.pool != "map":
        raise ValueError(f"Zero-shot compares with the text tower in the space of the VFM's MAP head; these features "
                         f"were pooled with '{feats.pool}', extract them with pool='map'.")
    ok = (feats.labels >= 0) & (feats.labels < head.num_classes)
    if not ok.any():
        raise ValueError(f"No row has a label in [0, {head.num_classes}); the class names and the dataset's "
                         f"labels do not match.")
    labels = feats.labels[ok]
    out: Dict[str, float] = {}
    for name, x in (("recon", feats.recon), ("vfm", feats.vfm)):
        for key, acc in topk_accuracy(head.logits(x[ok]), labels, ks).items():
            out[f"{name}_{key}"] = acc
    out["n"] = int(ok.sum())
    out["skipped"] = int((~ok).sum())
    return out


# ------------------------------------------------------------------------------------------ linear probe
# The probe itself lives in ideal_ray.eval.probe (torch only), shared with the class accuracy of samples.
