"""Where the shared loop runs: :class:`RaySession` inside Ray Train workers, :class:`LocalSession` in one process.

Both give the loop the same four things: cross-rank agreement on finiteness, cross-rank means for logging,
checkpoint reporting, and the latest checkpoint to resume from.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


class FiniteFlag:
    """Whether a value was finite on every rank, read lazily: building it only enqueues work (the flag, its MIN
    all-reduce, and on CUDA an asynchronous copy into pinned host memory); ``bool(flag)`` waits for that copy alone,
    not for whatever the host launched after it (see ``train.step.guarded_update``)."""

    def __init__(self, value: torch.Tensor, reduce: bool):
        flag = torch.isfinite(value.detach()).all().to(torch.int32).reshape(1)
        if reduce:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        self._event = None
        if flag.is_cuda:
            self._host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = flag
        self._value: Optional[bool] = None

    def __bool__(self) -> bool:
        if self._value is None:
            if self._event is not None:
                self._event.synchronize()
            self._value = bool(self._host.item())
        return self._value


class RaySession:
    """Ray Train (V2) worker: ``ray.train.report`` / ``get_checkpoint`` and torch.distributed collectives."""

    def __init__(self, device: torch.device):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = device

    def all_finite(self, value: torch.Tensor) -> FiniteFlag:
        """True on every rank iff the value is finite on every rank (a MIN all-reduce of one flag), read lazily."""
        return FiniteFlag(value, reduce=_dist_ready() and self.world_size > 1)

    def node_ids(self) -> List[str]:
        """Every rank's Ray node id, ordered by rank (a collective: every rank calls it)."""
        import ray

        nodes = [ray.get_runtime_context().get_node_id()]
        if _dist_ready() and self.world_size > 1:
            mine, nodes = nodes[0], [None] * self.world_size
            dist.all_gather_object(nodes, mine)
        return nodes

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


def init_local_process_group(device: torch.device) -> None:
    """A one-rank torch.distributed group for the engines of a run outside Ray Train (in-process runs, benchmarks):
    gloo on CPU, NCCL on a GPU, as Ray Train would create it. A no-op when a group exists already."""
    if _dist_ready():
        return
    import socket

    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


@contextlib.contextmanager
def local_process_group(device: torch.device) -> Iterator[None]:
    """:func:`init_local_process_group` for the duration of a block: when the process had no group before, the group
    is destroyed afterwards and the environment variables it set are restored (a later Ray cluster started from this
    process must not inherit RANK / MASTER_PORT)."""
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved = {k: os.environ.get(k) for k in keys}
    had = _dist_ready()
    init_local_process_group(device)
    try:
        yield
    finally:
        if not had:
            if _dist_ready():
                dist.destroy_process_group()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


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

    def all_finite(self, value: torch.Tensor) -> FiniteFlag:
        return FiniteFlag(value, reduce=False)

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
