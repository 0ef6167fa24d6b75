"""What every stage's ``train_step`` shares: per-step seeds, autocast, the NaN-guarded update, the data position.

The NaN guard (:func:`guarded_update`) is the one place that decides when a non-finite loss skips an update, for
the tokenizer's G and D steps and the AR step alike, on either engine backend (``train/engines.py``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

import torch

from ideal_ray.train.engines import nan_poison


def step_seed(seed: int, step: int, rank: int) -> int:
    """One independent seed per (run seed, step, rank), so no random draw depends on what ran before."""
    return (seed * 1_000_003 + step * 8191 + rank * 131) % (2**63 - 1)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked for; full precision elsewhere (CPU bf16 autocast is slow, not faster)."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether :func:`autocast` runs bf16 on this device (the condition of the bf16-only speed levers)."""
    return device.type == "cuda" and precision == "bf16"


@contextlib.contextmanager
def frozen(module: Optional[torch.nn.Module]):
    """Temporarily stop gradients into ``module``'s parameters (the generator's adversarial term must not touch
    the discriminator's gradients, which its engine owns)."""
    if module is None:
        yield
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def guarded_update(engine, loss: torch.Tensor, all_finite: Callable[[torch.Tensor], object],
                   nan_check: str) -> bool:
    """``engine.backward(loss)`` + ``engine.step()`` unless ``loss`` is non-finite on some rank; True if it stepped.

    ``all_finite(loss)`` is the session's cross-rank flag; it is only *read* (a host sync) where ``bool()`` is taken.
    ``nan_check="before_backward"`` reads it before the backward is launched, so the GPU idles from the end of the
    forward until the host has launched the backward's first kernels. ``"after_backward"`` starts the flag's
    device-to-host copy, launches the backward on a loss multiplied by :func:`~ideal_ray.train.engines.nan_poison`
    (1.0, or NaN in every gradient when the loss is not finite), and only then reads the flag: the GPU works
    through the queued backward while the host waits; a non-finite step's gradients are dropped
    (``engine.skip()``). Both take the same updates.
    """
    finite = all_finite(loss)  # enqueued: the flag's reduction and copy follow the forward on the device
    if nan_check == "before_backward":
        if not finite:
            return False
        engine.backward(loss)
        engine.step()
        return True
    engine.backward(loss * nan_poison(loss))
    if finite:
        engine.step()
        return True
    engine.skip()
    return False


def data_position(last_step: int, steps_per_epoch: int) -> Dict[str, int]:
    """Where the data stream stands after ``last_step`` steps (checkpoints record it; resume checks it)."""
    return {"step": last_step, "epoch": last_step // steps_per_epoch, "step_in_epoch": last_step % steps_per_epoch,
            "steps_per_epoch": steps_per_epoch}
