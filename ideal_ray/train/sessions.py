"""Where the shared loop runs: :class:`RaySession` inside Ray Train workers, :class:`LocalSession` in one process.

Both give the loop the same four things: cross-rank agreement on finiteness, cross-rank means for logging,
checkpoint reporting, and the latest checkpoint to resume from.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


class RaySession:
    """Ray Train (V2) worker: ``ray.train.report`` / ``get_checkpoint`` and torch.distributed collectives."""

    def __init__(self, device: torch.device):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = device

    def all_finite(self, value: torch.Tensor) -> bool:
        """True on every rank iff the value is finite on every rank (a MIN all-reduce of one flag)."""
        flag = torch.isfinite(value.detach()).all().to(torch.int32).reshape(1)
        if _dist_ready():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def mean(self, values: Dict[str, float]) -> Dict[str, float]:
        if not _dist_ready() or self.world_size == 1:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= self.world_size
        return dict(zip(keys, t.tolist()))

    def report(self, metrics: Dict[str, float], ckpt_dir: Optional[str]) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Optional[str]]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d


class LocalSession:
    """One process: checkpoints go to ``<root>/checkpoint_<step:08d>``, written to a temporary name first and
    renamed when complete, so a half-written checkpoint is never taken as the latest one."""

    rank = 0
    world_size = 1
    _PATTERN = re.compile(r"^checkpoint_(\d{8})$")

    def __init__(self, root: str, keep: int = 3):
        self.root = root
        self.keep = keep
        os.makedirs(root, exist_ok=True)
        self.reports = []

    def all_finite(self, value: torch.Tensor) -> bool:
        return bool(torch.isfinite(value.detach()).all())

    def mean(self, values: Dict[str, float]) -> Dict[str, float]:
        return dict(values)

    def checkpoints(self):
        names = sorted(n for n in os.listdir(self.root) if self._PATTERN.match(n))
        return [os.path.join(self.root, n) for n in names]

    def report(self, metrics: Dict[str, float], ckpt_dir: Optional[str]) -> None:
        self.reports.append(dict(metrics))
        if ckpt_dir is None:
            return
        final = os.path.join(self.root, f"checkpoint_{int(metrics['step']):08d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ckpt_dir, tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Optional[str]]:
        ckpts = self.checkpoints()
        yield ckpts[-1] if ckpts else None
