"""Speed levers for a stage's networks on a GPU (``perf.*``), each keeping the math of the plain step.

* :func:`hold_frozen_in_bf16` -- the matmul/conv weights of frozen networks (the VFM trunk, the DINO trunk, the
  LPIPS trunk) stored in bf16 once, instead of autocast casting their fp32 weights again at every op of every
  step. Under bf16 autocast the result is the same bits: autocast rounds an fp32 weight to bf16 with the same
  round-to-nearest-even each time. Norm layers, embeddings and other parameters keep fp32, because autocast runs
  those ops in fp32 (a bf16 LayerNorm gain would be rounded where autocast never rounds it).
* :func:`to_channels_last` -- conv networks in NHWC (cuDNN's fast layout on tensor cores); a conv's output follows
  its weight's layout, so converting the weights is enough.
* :func:`compile_regions` -- ``torch.compile`` (inductor) of named submodules ("regional compile"): each keeps its
  parameter names (``nn.Module.compile`` compiles in place), so checkpoints, EMA and DeepSpeed see the same module.

Single-device torch: no Ray, no DeepSpeed. Where each lever is applied is the stage's business (``train/*_stage.py``).
"""
from __future__ import annotations

from typing import Iterable, List

import torch
import torch.nn as nn

# the layer types whose weights autocast casts to the lower precision (torch's autocast op lists: linear, conv*)
_BF16_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def hold_frozen_in_bf16(module: nn.Module) -> int:
    """Cast the weights and biases of every frozen Linear/Conv layer inside ``module`` to bf16, in place.

    Only layers whose parameters all have ``requires_grad=False`` are touched. Use only where the module runs
    under bf16 autocast (CUDA + optim.precision=bf16): outside autocast a bf16 weight meets an fp32 input.
    Returns the number of parameters cast.
    """
    n = 0
    for layer in module.modules():
        if isinstance(layer, _BF16_LAYERS):
            params = list(layer.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                layer.to(torch.bfloat16)
                n += sum(p.numel() for p in params)
    return n


def to_channels_last(module: nn.Module) -> nn.Module:
    """Every 4-D parameter and buffer of ``module`` in channels_last layout, in place."""
    return module.to(memory_format=torch.channels_last)


def compile_regions(modules: Iterable[nn.Module], mode: str = "default", backend: str = "inductor") -> List[nn.Module]:
    """``torch.compile`` each module in place (static shapes; inductor, or ``backend`` for tests). Returns them.

    Modules of one class with equal shapes share their compiled code (dynamo treats parameters as inputs), so
    compiling each of N identical blocks costs one compilation, not N.
    """
    import torch._dynamo

    # one stage compiles a few dozen (module, shape) pairs; the default limit of 8 per code object would silently
    # fall back to eager for the rest
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    out = []
    for m in modules:
        m.compile(dynamic=False, backend=backend, mode=None if mode == "default" else mode)
        out.append(m)
    return out
