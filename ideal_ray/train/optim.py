"""AdamW parameter groups shared by both engine backends (``train/engines.py``, ``train/ds.py``)."""
from __future__ import annotations

from typing import Iterable, List, Tuple

import torch.nn as nn


def decay_groups(named_params: Iterable[Tuple[str, nn.Parameter]], weight_decay: float) -> List[dict]:
    """AdamW groups: weight decay on >= 2-D weights only (no decay on biases, norms, embeddings' 1-D params)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

