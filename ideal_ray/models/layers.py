"""Small building blocks shared by the tokenizer's transformer parts."""
import torch.nn as nn


def mlp(width: int, hidden: int, dropout: float) -> nn.Sequential:
    """Linear -> GELU -> Dropout -> Linear -> Dropout (indices 0 and 3 hold the weights, as in the release)."""
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width),
                         nn.Dropout(dropout))
