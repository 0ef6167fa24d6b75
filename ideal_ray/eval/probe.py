"""A linear classifier on fixed features: the paper's linear probe (Table 1) and the class-accuracy classifier of
generated samples (:mod:`ideal_ray.eval.class_accuracy`).

Multinomial logistic regression on (N, C) features, trained full-batch with L-BFGS from zero on standardized
features, the L2 weight decay chosen on a seeded held-out part of the training rows, then refit on all of them;
deterministic for fixed inputs. Only torch: no model code, no open_clip.

:func:`fit_linear_classifier` returns the fitted :class:`LinearClassifier` (it can be stored as arrays and applied
later); :func:`linear_probe` fits one and scores it on an evaluation split in one call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_WEIGHT_DECAYS", "LinearClassifier", "ProbeResult", "fit_linear_classifier", "linear_probe"]

DEFAULT_WEIGHT_DECAYS: Tuple[float, ...] = tuple(10.0 ** e for e in range(-6, 0))  # 1e-6 ... 1e-1


@dataclass
class ProbeResult:
    top1: float  # on the evaluation split, with the chosen weight decay, fit on the whole training split
    weight_decay: float
    val_top1: Dict[float, float] = field(default_factory=dict)  # held-out top-1 of every weight decay tried
    n_train: int = 0
    n_eval: int = 0
    skipped: int = 0  # rows with a non-finite feature or a label outside [0, num_classes)
    protocol: Dict[str, object] = field(default_factory=dict)


@dataclass
class LinearClassifier:
    """A fitted probe: logits = ((x - mean) / std) @ w + b, over ``num_classes`` classes."""

    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)
    w: torch.Tensor  # (C, K)
    b: torch.Tensor  # (K,)
    weight_decay: float
    val_top1: Dict[float, float] = field(default_factory=dict)  # held-out top-1 of every weight decay tried
    n_train: int = 0
    skipped: int = 0  # training rows with a non-finite feature or a label outside [0, num_classes)
    protocol: Dict[str, object] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.w.shape[1])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Features (N, C) -> predicted class ids (N,) int64."""
        x = x.float().to(self.w.device)
        return (((x - self.mean) / self.std) @ self.w + self.b).argmax(1)  # (N,)

    def to_arrays(self) -> Dict[str, np.ndarray]:
        """The weights as numpy arrays (with :meth:`from_arrays`: store and reload without pickle)."""
        decays = sorted(self.val_top1)
        return {"mean": self.mean.cpu().numpy(), "std": self.std.cpu().numpy(), "w": self.w.cpu().numpy(),
                "b": self.b.cpu().numpy(), "weight_decay": np.float64(self.weight_decay),
                "val_decays": np.array(decays, dtype=np.float64),
                "val_top1": np.array([self.val_top1[d] for d in decays], dtype=np.float64),
                "n_train": np.int64(self.n_train), "skipped": np.int64(self.skipped)}

    @classmethod
    def from_arrays(cls, a: Dict[str, np.ndarray], protocol: Optional[Dict[str, object]] = None
                    ) -> "LinearClassifier":
        t = lambda k: torch.from_numpy(np.asarray(a[k], dtype=np.float32))  # noqa: E731
        return cls(t("mean"), t("std"), t("w"), t("b"), float(a["weight_decay"]),
                   {float(d): float(v) for d, v in zip(a["val_decays"], a["val_top1"])}, int(a["n_train"]),
                   int(a["skipped"]), dict(protocol or {}))


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                  max_iter: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, full-batch L-BFGS from zero: x (N, C), y (N,) -> (W (C, K), b (K,)).
    Loss = mean cross-entropy + weight_decay / 2 * ||W||^2 (the bias is not decayed)."""
    w = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _accuracy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    return float(((x @ w + b).argmax(1) == y).float().mean())


def _valid_rows(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.isfinite(x).all(1) & (y >= 0) & (y < num_classes)  # (N,) bool


def _standardizer(fit: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return fit.mean(0), fit.std(0).clamp_min(1e-6)


def fit_linear_classifier(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: Optional[int] = None,
                          weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, val_fraction: float = 0.2,
                          max_iter: int = 200, seed: int = 0,
                          device: Union[str, torch.device] = "cpu") -> LinearClassifier:
    """Fit the probe on features (N, C) with labels (N,); ``num_classes`` defaults to the largest label + 1.
    Features are standardized with the fitting rows' mean/std; each weight decay is fit on a seeded
    ``1 - val_fraction`` of the rows and scored on the rest, the best (ties: the larger decay) is refit on all rows.
    Rows with a non-finite feature or an out-of-range label are skipped and counted."""
    if not weight_decays:
        raise ValueError("linear_probe needs at least one weight decay to try.")
    if not 0.0 < val_fraction < 1.0 and len(weight_decays) > 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1) to choose among {len(weight_decays)} "
                         f"weight decays; pass one weight decay to skip the choice.")
    k = int(num_classes if num_classes is not None else int(train_y.max()) + 1)
    tx, ty = train_x.float(), train_y.long()
    ok = _valid_rows(tx, ty, k)
    tx, ty = tx[ok].to(device), ty[ok].to(device)
    if len(ty) < 2:
        raise ValueError(f"linear_probe needs at least 2 training rows with finite features and labels in "
                         f"[0, {k}); got {len(ty)}.")
    val_top1: Dict[float, float] = {}
    best = float(weight_decays[0])
    if len(weight_decays) > 1:
        perm = torch.randperm(len(ty), generator=torch.Generator().manual_seed(seed)).to(device)
        n_val = min(max(1, round(val_fraction * len(ty))), len(ty) - 1)
        val_i, fit_i = perm[:n_val], perm[n_val:]
        mean, std = _standardizer(tx[fit_i])
        fx, vx = (tx[fit_i] - mean) / std, (tx[val_i] - mean) / std
        for wd in sorted(weight_decays, reverse=True):  # strongest first, so ties keep the larger decay
            val_top1[float(wd)] = _accuracy(vx, ty[val_i], *_fit_logistic(fx, ty[fit_i], k, wd, max_iter))
        best = max(val_top1, key=lambda wd: (val_top1[wd], wd))
    mean, std = _standardizer(tx)
    w, b = _fit_logistic((tx - mean) / std, ty, k, best, max_iter)
    protocol = {
        "classifier": f"multinomial logistic regression, {k} classes, standardized features, L-BFGS "
                      f"(strong Wolfe, max_iter {max_iter}) from zero, loss CE + wd / 2 ||W||^2",
        "weight_decay": (f"best of {sorted(float(w) for w in weight_decays)} on a seed-{seed} {val_fraction:g} "
                         f"held-out part of the training rows, then refit on all" if len(weight_decays) > 1
                         else f"{best:g} (fixed)"),
    }
    return LinearClassifier(mean, std, w, b, best, val_top1, n_train=len(ty), skipped=int((~ok).sum()),
                            protocol=protocol)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor,
                 num_classes: Optional[int] = None, weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
                 val_fraction: float = 0.2, max_iter: int = 200, seed: int = 0,
                 device: Union[str, torch.device] = "cpu") -> ProbeResult:
    """Top-1 of a linear classifier (:func:`fit_linear_classifier`) fit on the training features and scored on the
    evaluation features. Rows with a non-finite feature or an out-of-range label are skipped and counted."""
    k = int(num_classes if num_classes is not None else int(train_y.max()) + 1)
    ex, ey = eval_x.float(), eval_y.long()
    ok_e = _valid_rows(ex, ey, k)
    ex, ey = ex[ok_e].to(device), ey[ok_e].to(device)
    n_train = int(_valid_rows(train_x.float(), train_y.long(), k).sum())
    if n_train < 2 or len(ey) == 0:
        raise ValueError(f"linear_probe needs at least 2 training rows and 1 evaluation row with finite features "
                         f"and labels in [0, {k}); got {n_train} and {len(ey)}.")
    clf = fit_linear_classifier(train_x, train_y, k, weight_decays, val_fraction, max_iter, seed, device)
    top1 = float((clf.predict(ex) == ey).float().mean())
    return ProbeResult(top1=top1, weight_decay=clf.weight_decay, val_top1=clf.val_top1, n_train=clf.n_train,
                       n_eval=len(ey), skipped=clf.skipped + int((~ok_e).sum()), protocol=clf.protocol)
