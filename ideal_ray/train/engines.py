"""How a stage's trainable parameters are updated: one interface, two backends chosen by ``dist.engine``.

* ``deepspeed`` (:class:`ideal_ray.train.ds.DeepSpeedEngine`): every Ray run, and one process at world size 1
  (``jobs/bench.py`` times this one by default). ZeRO stages 0-2, gloo on CPU, NCCL on GPU.
* ``torch`` (:class:`TorchEngine`): the same AdamW, weight-decay groups and global-norm clipping in plain torch, for
  one process (quick CPU runs, where DeepSpeed's start-up costs more than the run). Same math: the two reach the
  same parameters to float rounding (``tests/test_engines.py``).

What a stage calls, on either backend::

    engine.module                       the wrapped module (its trainable parameters are the ones updated)
    engine.set_lr(lr)                   the lr of every parameter group, set before each step
    engine.backward(loss)
    engine.step()                       clip to optim.grad_clip (global norm) + AdamW, then clear the gradients
    engine.skip()                       drop the gradients of a backward whose loss was not finite; no update
    engine.grad_norm()                  the global gradient norm (before clipping) of the last step: a 0-dim tensor
                                        or float (no host sync), None before the first step
    engine.save(ckpt_dir, tag, client_state)    every rank; ``<ckpt_dir>/<tag>/`` (module, optimizer, client state)
    engine.load(ckpt_dir, tag) -> client_state  every rank

Both write the module's full state dict to ``<tag>/mp_rank_00_model_states.pt`` under ``"module"``, so the driver's
export (:func:`load_module_state`) reads a checkpoint of either backend. Optimizer states differ
(ZeRO shards vs one torch state dict): a run resumes on the backend that wrote its checkpoint, and the other one
says so in one sentence.

No DeepSpeed import here unless the ``deepspeed`` backend is built: models, losses and this file stay importable on
a machine without it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from ideal_ray.config import ConfigError, OptimConfig
from ideal_ray.train.optim import decay_groups

ENGINES = ("deepspeed", "torch")
MODULE_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's name for the module states; both backends write it
TORCH_OPTIM_FILE = "torch_optim_states.pt"  # the torch backend's optimizer + client state
CLIENT_KEY = "ideal_ray_client_state"


def build_engine(kind: str, module: nn.Module, optim: OptimConfig, lr: float, micro_batch: int, world_size: int,
                 zero_stage: int, device_type: str):
    """The engine of backend ``kind`` over ``module``'s trainable parameters (see the module docstring)."""
    if kind == "deepspeed":
        from ideal_ray.train.ds import DeepSpeedEngine

        return DeepSpeedEngine(module, optim, lr, micro_batch, world_size, zero_stage, device_type)
    if kind == "torch":
        if world_size != 1:
            raise ConfigError(f"dist.engine=torch runs in one process, but this run has {world_size} workers; use "
                              f"dist.engine=deepspeed for Ray runs with several workers.")
        return TorchEngine(module, optim, lr, device_type)
    raise ConfigError(f"dist.engine '{kind}' is unknown; choose one of {ENGINES}.")


def nan_poison(loss: torch.Tensor) -> torch.Tensor:
    """1.0 where ``loss`` is finite, NaN where it is not (a 0-dim tensor, computed on the device, no host sync).

    ``engine.backward(loss * nan_poison(loss))`` has exactly the gradients of ``loss`` when it is finite (x * 1.0
    is exact) and NaN in *every* gradient when it is not (NaN * g is NaN even where g is 0), so a backward can be
    launched before the host knows whether the loss was finite, and the step that follows can always tell."""
    finite = torch.isfinite(loss.detach())
    return torch.where(finite, torch.ones_like(loss.detach()), torch.full_like(loss.detach(), float("nan")))


class TorchEngine:
    """AdamW (fused on CUDA) over the trainable parameters, global-norm clipping, in one process.

    The optimizer sees only parameters with ``requires_grad`` (weight decay on >= 2-D weights, as the DeepSpeed
    backend), so frozen trunks are never updated.
    """

    def __init__(self, module: nn.Module, optim: OptimConfig, lr: float, device_type: str):
        self.module = module
        self.clip = float(optim.grad_clip)
        groups = [g for g in decay_groups(module.named_parameters(), optim.weight_decay) if g["params"]]
        if not groups:
            raise ValueError(f"{type(module).__name__} has no trainable parameters; an engine needs at least one "
                             f"parameter with requires_grad=True.")
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                                           fused=True if device_type == "cuda" else None)
        self._norm: Optional[torch.Tensor] = None
        self.set_lr(lr)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.clip > 0:  # the same rule as DeepSpeed: scale by clip / (norm + 1e-6) when that is below 1
            self._norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        else:
            self._norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self):
        return None if self._norm is None else self._norm.detach()

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        d = os.path.join(ckpt_dir, str(tag))
        os.makedirs(d, exist_ok=True)
        torch.save({"module": self.module.state_dict()}, os.path.join(d, MODULE_FILE))
        torch.save({"optimizer": self.optimizer.state_dict(), CLIENT_KEY: dict(client_state)},
                   os.path.join(d, TORCH_OPTIM_FILE))

    def load(self, ckpt_dir: str, tag: str) -> dict:
        d = os.path.join(ckpt_dir, str(tag))
        if not os.path.isdir(d):
            raise FileNotFoundError(f"No checkpoint {tag!r} under {ckpt_dir}; pass the directory and tag given to "
                                    f"save.")
        if not os.path.isfile(os.path.join(d, TORCH_OPTIM_FILE)):
            raise ConfigError(f"The checkpoint {tag!r} under {ckpt_dir} was written by the DeepSpeed engine; resume "
                              f"it with dist.engine=deepspeed.")
        module = torch.load(os.path.join(d, MODULE_FILE), map_location="cpu", weights_only=True)["module"]
        self.module.load_state_dict(module)
        state = torch.load(os.path.join(d, TORCH_OPTIM_FILE), map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        return state[CLIENT_KEY]


def load_module_state(ckpt_dir: str, tag: str) -> dict:
    """The module's full state dict from a checkpoint of either backend (``<tag>/mp_rank_00_model_states.pt``, under
    ``"module"``), without building an engine: the driver's export step."""
    path = os.path.join(ckpt_dir, str(tag), MODULE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model states at {path}; pass the checkpoint directory and the tag the engine "
                                f"saved under.")
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # DeepSpeed stores a few plain objects beside the tensors
        raise ValueError(f"{path} cannot be read with weights_only=True ({e}); it was not written by an engine of "
                         f"this version.") from None
    return states["module"]
