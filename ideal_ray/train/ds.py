"""DeepSpeed engines for the Ray Train loop: setup, config, engine construction, lr, grad norm and checkpoints.

One place knows how DeepSpeed is driven, so the tokenizer and AR stages share it:

* :func:`prepare_deepspeed` makes DeepSpeed reuse the process group Ray Train already created (gloo on CPU, NCCL
  on GPU) and keeps it from JIT-compiling C++ ops on CPU workers (see ``shared/design/stack-notes.md``).
* :func:`ds_config` is the whole engine config; it has no ``optimizer`` or ``scheduler`` section because
  :func:`build_engine` hands DeepSpeed a torch AdamW and the loop sets the lr of every step with :func:`set_lr`.
* :func:`save_engine` / :func:`load_engine` wrap DeepSpeed checkpoints (module, optimizer, client state).

Only this package imports DeepSpeed; models and losses stay single-device PyTorch.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ideal_ray.config import OptimConfig
from ideal_ray.train.engines import CLIENT_KEY, TORCH_OPTIM_FILE
from ideal_ray.train.optim import decay_groups

DEVICE_TYPES = ("cpu", "cuda")
ZERO_STAGES = (0, 1, 2)
# DeepSpeed prints a progress line every ``steps_per_print`` steps; our loop logs on its own cadence (MLflow).
NEVER = 2 ** 62
# DeepSpeed merges client_state into its own checkpoint dict and hands back everything it does not recognize;
# keeping ours under one key (CLIENT_KEY) returns exactly what was saved.

_state = {"device_type": None, "world_group": None}


def _check_device_type(device_type: str) -> None:
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device_type={device_type!r} is not supported; use one of {DEVICE_TYPES}.")


def _no_shm_op():
    """Stand-in for DeepSpeed's ``build_shm_op``: no shared-memory all-reduce kernel, plain gloo collectives."""
    return None


# DeepSpeed's name for a collective -> torch's current name. DeepSpeed 0.19 binds the old names once, when its
# communication backend is built; torch 2.14 deprecates them (a FutureWarning on every call) and the old functions
# now just call the new ones, with the same arguments.
_RENAMED_COLLECTIVES = {"all_gather_function": ("all_gather_into_tensor", "all_gather_single"),
                        "reduce_scatter_function": ("reduce_scatter_tensor", "reduce_scatter_single")}


def _bind_current_collectives(cdb) -> None:
    """Point DeepSpeed's communication backend at torch's current collectives. ZeRO 1 and 2 end every optimizer
    step by all-gathering the updated parameter partitions through ``cdb.all_gather_function``, which DeepSpeed 0.19
    bound to ``torch.distributed.all_gather_into_tensor``: deprecated in torch 2.14 in favour of
    ``all_gather_single``, the same collective (likewise ``reduce_scatter_tensor`` -> ``reduce_scatter_single``)."""
    for attr, (old, new) in _RENAMED_COLLECTIVES.items():
        if getattr(cdb, attr, None) is getattr(dist, old, None) and hasattr(dist, new):
            setattr(cdb, attr, getattr(dist, new))


def prepare_deepspeed(device_type: str):
    """Import DeepSpeed for ``device_type`` and attach it to the current torch.distributed process group.

    Call it in every worker before :func:`build_engine`; calling it again is cheap. Why each step:

    * ``DS_ACCELERATOR=cpu`` must be set before DeepSpeed is imported: DeepSpeed picks its accelerator once,
      and a CPU worker on a machine that has GPUs would otherwise pick CUDA.
    * On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce op on first use (~80 s,
      needs a compiler on every worker). It is only an intra-node speed-up, so we replace ``build_shm_op`` with a
      no-op and gloo does the collectives. The function must be patched in ``sys.modules["deepspeed.comm.torch"]``:
      ``deepspeed.comm.torch`` as an attribute is the ``torch`` package re-exported by ``deepspeed.comm``.
    * ``deepspeed.init_distributed`` reuses a process group that is already initialized (Ray Train's
      ``TorchTrainer`` creates one per worker) instead of creating a second one. Without one it initializes
      from the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT must be set).
    * DeepSpeed's ZeRO 1/2 all-gather goes through torch's current name for it (:func:`_bind_current_collectives`),
      not the one torch 2.14 deprecates, which warned on every step.
    * DeepSpeed caches a clone of the world group; if the default group was destroyed and created again in this
      process (tests), the stale clone is dropped so engines use the live group.

    Returns the ``deepspeed`` module.
    """
    _check_device_type(device_type)
    if _state["device_type"] not in (None, device_type):
        raise RuntimeError(f"DeepSpeed was already prepared for {_state['device_type']!r} in this process; "
                           f"one process cannot switch to {device_type!r} (use a new worker process).")
    if device_type == "cpu":
        if "deepspeed" not in sys.modules:
            os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator().device_name()
    if accel != device_type:
        raise RuntimeError(f"DeepSpeed's accelerator is {accel!r} but device_type={device_type!r}; set "
                           f"DS_ACCELERATOR={device_type} before anything imports deepspeed.")
    if device_type == "cpu":
        sys.modules["deepspeed.comm.torch"].build_shm_op = _no_shm_op

    backend = "gloo" if device_type == "cpu" else "nccl"
    deepspeed.init_distributed(dist_backend=backend)  # no-op on an initialized group, else env:// init
    have = str(dist.get_backend())
    if backend not in have:
        raise RuntimeError(f"torch.distributed is initialized with backend {have!r} but {device_type} engines "
                           f"need {backend!r}; initialize the process group with {backend!r} (Ray Train: "
                           f"TorchConfig(backend={backend!r})).")
    _bind_current_collectives(sys.modules["deepspeed.comm.comm"].cdb)
    world = dist.group.WORLD
    if _state["world_group"] is not None and _state["world_group"] is not world:
        from deepspeed.utils import groups
        groups._WORLD_GROUP = None  # clone of a destroyed group; DeepSpeed re-clones the live one lazily
    _state["world_group"] = world
    _state["device_type"] = device_type
    return deepspeed


def ds_config(optim: OptimConfig, micro_batch: int, world_size: int, zero_stage: int, device_type: str) -> dict:
    """The DeepSpeed config of one engine (generator or discriminator side)."""
    _check_device_type(device_type)
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage={zero_stage} is not supported; use 0, 1 or 2 (stage 3 partitions the "
                         f"parameters themselves, which EMA and the frozen trunks do not expect).")
    if micro_batch < 1 or world_size < 1:
        raise ValueError(f"micro_batch={micro_batch} and world_size={world_size} must both be >= 1.")
    return {
        # Every worker feeds `micro_batch` images per step and steps once per batch: no gradient accumulation,
        # so DeepSpeed's consistency check is train_batch_size == micro_batch * 1 * world_size.
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": 1,
        "train_batch_size": int(micro_batch) * int(world_size),
        # Clip the global gradient norm (across ranks) inside engine.step(); 0 disables clipping.
        "gradient_clipping": float(optim.grad_clip),
        # ZeRO 1 shards optimizer state, ZeRO 2 also gradients; 0 is plain data parallel. Parameters are never
        # partitioned (stage 3 excluded), so every rank holds the full module for EMA and evaluation.
        "zero_optimization": {"stage": int(zero_stage)},
        # bf16 weights + fp32 master copy on GPU when the run asks for bf16. CPU stays fp32: bf16 matmuls are
        # slower than fp32 on CPU and the CPU runs are for tests and laptops, where exactness matters more.
        "bf16": {"enabled": device_type == "cuda" and optim.precision == "bf16"},
        "fp16": {"enabled": False},
        # No "optimizer" section: a config optimizer would JIT-build DeepSpeed's fused Adam on first use; we pass
        # a torch AdamW instead (build_engine). No "scheduler" section: the loop computes the warm-up + cosine lr
        # of every step itself (train/schedule.py) and applies it with set_lr, so resume only needs the step.
        "steps_per_print": NEVER,  # the loop logs on its own cadence (MLflow), DeepSpeed stays quiet
        "wall_clock_breakdown": False,  # per-step timers add syncs; the loop measures img/s itself
    }


def build_engine(module: nn.Module, optim: OptimConfig, lr: float, micro_batch: int, world_size: int,
                 zero_stage: int, device_type: str):
    """Wrap ``module`` in a DeepSpeed engine that trains its trainable parameters with AdamW.

    The optimizer only sees parameters with ``requires_grad`` (``decay_groups`` skips the rest), so frozen
    submodules (the VFM trunk, the discriminator's DINO trunk) are never updated, and ZeRO never shards them.
    In bf16 mode DeepSpeed casts *all* parameters of ``module`` to bf16, frozen ones included (buffers keep
    their dtype); the optimizer keeps fp32 master weights of the trainable ones. Call :func:`prepare_deepspeed`
    first.

    On ZeRO stage 0 in fp32, DeepSpeed clips but does not keep the norm it computed; the engine is patched to
    record it so :func:`grad_norm` reports the global norm on every stage.
    """
    deepspeed = prepare_deepspeed(device_type)
    cfg = ds_config(optim, micro_batch, world_size, zero_stage, device_type)
    if dist.is_initialized() and dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but the process group has {dist.get_world_size()} ranks; "
                         f"pass the Ray Train world size.")
    groups = decay_groups(module.named_parameters(), optim.weight_decay)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(module).__name__} has no trainable parameters; an engine needs at least one "
                         f"parameter with requires_grad=True.")
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                            fused=True if device_type == "cuda" else None)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=cfg)
    set_lr(engine, lr)
    if zero_stage == 0 and not cfg["bf16"]["enabled"] and cfg["gradient_clipping"] > 0:
        _record_fp32_grad_norm(engine)
    return engine


def _record_fp32_grad_norm(engine) -> None:
    """Make ZeRO-0 fp32 engines keep the global grad norm their clipping computes (DeepSpeed drops it)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record():
        norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                               mpu=engine.mpu)
        engine._global_grad_norm = norm  # kept as it comes (a tensor on recent versions): no host sync here

    engine.clip_fp32_gradients = clip_and_record


def set_lr(engine, lr: float) -> None:
    """Set the learning rate of every param group (the loop calls it before each step)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def grad_norm(engine) -> Optional[float]:
    """Global gradient norm (before clipping) of the last engine.step() as a float; None before the first step.
    (Reads a device value: a host sync. :meth:`DeepSpeedEngine.grad_norm` hands back the tensor instead.)"""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def save_engine(engine, ckpt_dir: str, tag: str, client_state: dict) -> None:
    """Write a DeepSpeed checkpoint (module, optimizer state, ``client_state``) to ``ckpt_dir/tag``.

    Every rank must call this with the same ``ckpt_dir`` and ``tag``: each rank writes its own optimizer shard
    (ZeRO) and DeepSpeed synchronizes the ranks, so calling it from rank 0 alone hangs.
    """
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={CLIENT_KEY: dict(client_state)},
                           save_latest=True)


def load_engine(engine, ckpt_dir: str, tag: str) -> dict:
    """Restore module and optimizer state from ``ckpt_dir/tag``; returns the saved ``client_state``.

    Every rank must call this (each reads its own optimizer shard). The engine must have the same module, ZeRO
    stage and world size as the one that saved. There is no lr scheduler state: the loop derives the lr from the
    step in ``client_state``.
    """
    if not os.path.isdir(os.path.join(ckpt_dir, str(tag))):
        raise FileNotFoundError(f"No DeepSpeed checkpoint {tag!r} under {ckpt_dir}; pass the directory and tag "
                                f"given to save_engine.")
    if os.path.isfile(os.path.join(ckpt_dir, str(tag), TORCH_OPTIM_FILE)):
        from ideal_ray.config import ConfigError

        raise ConfigError(f"The checkpoint {tag!r} under {ckpt_dir} was written by the torch engine; resume it with "
                          f"dist.engine=torch.")
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag!r} from {ckpt_dir}; see its log above.")
    if CLIENT_KEY not in (client_state or {}):
        raise ValueError(f"Checkpoint {tag!r} under {ckpt_dir} was not written by save_engine (no {CLIENT_KEY!r}).")
    return client_state[CLIENT_KEY]


class DeepSpeedEngine:
    """The DeepSpeed backend of :mod:`ideal_ray.train.engines` (its interface; the functions above do the work)."""

    def __init__(self, module: nn.Module, optim: OptimConfig, lr: float, micro_batch: int, world_size: int,
                 zero_stage: int, device_type: str):
        self.engine = build_engine(module, optim, lr, micro_batch, world_size, zero_stage, device_type)
        self.zero_stage = zero_stage

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def set_lr(self, lr: float) -> None:
        set_lr(self.engine, lr)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def skip(self) -> None:
        """Drop the gradients of a backward whose loss was not finite (the stage poisoned them with NaN, see
        ``engines.nan_poison``). ZeRO 1/2: ``step()`` itself, because DeepSpeed's ZeRO optimizer finds the global
        norm non-finite, skips the update and clears its gradient partitions (its overflow path); stage 0 has no
        such path, so the gradients are cleared here and no step is taken."""
        if self.zero_stage > 0:
            self.engine.step()
        else:
            self.engine.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self):
        return self.engine.get_global_grad_norm()

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        save_engine(self.engine, ckpt_dir, tag, client_state)

    def load(self, ckpt_dir: str, tag: str) -> dict:
        return load_engine(self.engine, ckpt_dir, tag)
