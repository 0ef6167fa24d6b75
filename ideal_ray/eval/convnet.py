"""A small convolutional classifier trained from scratch on real images: the ``cnn`` kind of the class-accuracy
classifier (:mod:`ideal_ray.eval.class_accuracy`).

This is the "GAN-test" protocol (Shmelkov et al., *How good is my GAN?*, ECCV 2018): a classifier trained on the
real training split of the data set scores the generated images. It suits data sets that are unlike ImageNet (the
synthetic shapes of the tiny runs, small custom sets), where a linear probe on Inception features keys on textures
that any reconstruction blurs: on the tiny demo the probe put decoded *real* codes in the right class 26-41% of the
time, this network 85-97%, with both near 100% on real held-out images.

It works at ``SIZE`` = 32 px, like CIFAR classifiers: samples of any size are resized to it (antialiased bilinear;
the tiny runs decode 32 px images and save them at 256 px), real images are ADM-center-cropped to 40 px.

The network: three conv3x3 stages (32, 64, 128 channels; GroupNorm, SiLU, 2x2 max-pool after the first two), global
average pooling, one linear layer. Training: AdamW (lr 2e-3, weight decay 0.05), batch 32, ``epochs`` passes over the
fitting images, each batch a random ``size`` crop of the images resized to ``size * 5 / 4`` with random horizontal
flips (the tokenizer's own augmentation: shorter side to [size, 1.25 size], random crop, flip). A seeded fifth of the
images is held out and scored (``real_top1``); the weights are those trained on the other four fifths.
Deterministic for fixed inputs, seed and thread count. Only torch: no model code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvClassifier", "SIZE", "VERSION", "build_convnet", "fit_conv_classifier", "resize"]

VERSION = 1  # bump when the network or the training recipe changes
WIDTH = 32
SIZE = 32  # the working resolution


def build_convnet(num_classes: int, width: int = WIDTH) -> nn.Sequential:
    """Images (B, 3, H, W) in [-1, 1] -> logits (B, num_classes), for any H, W >= 4."""
    c = width

    def stage(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

    return nn.Sequential(*stage(3, c), nn.MaxPool2d(2), *stage(c, 2 * c), nn.MaxPool2d(2), *stage(2 * c, 4 * c),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, num_classes))


def _to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the pipeline's own conversion."""
    from ideal_ray.data.augment import to_model_input

    return to_model_input(torch.from_numpy(np.ascontiguousarray(images)))


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (N, 3, H, W) -> (N, 3, size, size), antialiased bilinear (identity at that size already)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@dataclass
class ConvClassifier:
    """A fitted network: ``predict`` maps uint8 images of ``size`` px to class ids."""

    net: nn.Sequential
    size: int
    real_top1: Optional[float]  # top-1 on the held-out real images (None when none were held out)
    n_train: int = 0
    protocol: Dict[str, object] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.net[-1].out_features)

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 RGB images (N, H, W, 3), resized to ``size`` when they are not that size -> class ids (N,) int64."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"the classifier takes uint8 RGB images (N, H, W, 3); got {images.shape}.")
        self.net.eval()
        out = [self.net(resize(_to_float(images[i:i + batch_size]), self.size)).argmax(1)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, dtype=np.int64)

    def to_arrays(self) -> Dict[str, np.ndarray]:
        """The weights as numpy arrays (``w_<name>``), with :meth:`from_arrays`: stored and reloaded without pickle."""
        arrays = {f"w_{k}": v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        arrays.update(size=np.int64(self.size), n_train=np.int64(self.n_train),
                      real_top1=np.float64(np.nan if self.real_top1 is None else self.real_top1))
        return arrays

    @classmethod
    def from_arrays(cls, a: Dict[str, np.ndarray], num_classes: int,
                    protocol: Optional[Dict[str, object]] = None) -> "ConvClassifier":
        net = build_convnet(num_classes)
        net.load_state_dict({k[2:]: torch.from_numpy(np.asarray(v)) for k, v in a.items() if k.startswith("w_")})
        top1 = float(a["real_top1"])
        return cls(net.eval(), int(a["size"]), None if np.isnan(top1) else top1, int(a["n_train"]),
                   dict(protocol or {}))


def _split(labels: np.ndarray, holdout: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices): a seeded ``holdout`` share of each class held out (at least one image of a
    class stays in the fitting part)."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n = min(int(round(holdout * len(idx))), len(idx) - 1)
        held.append(idx[:n])
        fit.append(idx[n:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def fit_conv_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, size: int = SIZE, *,
                        epochs: int = 30, batch_size: int = 32, lr: float = 2e-3, holdout: float = 0.2,
                        seed: int = 0) -> ConvClassifier:
    """Train the network (module notes) on uint8 images (N, S, S, 3) with S = ``size * 5 // 4`` (the real images
    resized so a random ``size`` crop keeps most of each), labels (N,) in [0, num_classes)."""
    pad = size * 5 // 4
    if images.ndim != 4 or images.shape[1:] != (pad, pad, 3):
        raise ValueError(f"fit_conv_classifier takes the real images at {pad}x{pad} (size * 5 / 4); "
                         f"got {images.shape}.")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(images) or len(labels) < 2:
        raise ValueError(f"fit_conv_classifier needs at least 2 labelled images; got {len(images)} images, "
                         f"{len(labels)} labels.")
    fit_i, held_i = _split(labels, holdout, seed)
    x, y = _to_float(images[fit_i]), torch.from_numpy(labels[fit_i])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_convnet(num_classes)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
        net.train()
        with torch.enable_grad():
            for _ in range(epochs):
                perm = torch.randperm(len(y), generator=g)
                for start in range(0, len(y), batch_size):
                    idx = perm[start:start + batch_size]
                    oy, ox = torch.randint(0, pad - size + 1, (2,), generator=g).tolist()
                    xb = x[idx, :, oy:oy + size, ox:ox + size]  # (b, 3, size, size)
                    if torch.rand(1, generator=g).item() < 0.5:
                        xb = xb.flip(3)
                    loss = F.cross_entropy(net(xb), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
    net.eval()
    clf = ConvClassifier(net, size, None, n_train=len(fit_i))
    if len(held_i):
        off = (pad - size) // 2
        held = images[held_i][:, off:off + size, off:off + size]  # center crops of the held-out images
        clf.real_top1 = float(np.mean(clf.predict(held) == labels[held_i]))
    clf.protocol = {"kind": f"convnet-v{VERSION}", "network": f"3 conv3x3 stages ({WIDTH}/{2 * WIDTH}/{4 * WIDTH} "
                    f"channels, GroupNorm, SiLU, max-pool), global average pool, linear",
                    "training": f"AdamW lr {lr} wd 0.05, batch {batch_size}, {epochs} epochs, random {size} crops "
                    f"of {pad} px images + horizontal flips, seed {seed}",
                    "held_out": f"{len(held_i)} real images (a seeded {holdout:.0%} of each class)",
                    "n_train": len(fit_i)}
    return clf
