"""What a language model returns when its forward is asked for hidden states (`hidden=True`): the
last hidden layer and the output head, so a loss can apply the head a chunk of positions at a time
and no (B, L, V) logits tensor exists (see `pipeline/student/losses/fused.py`)."""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from torch import nn


class Hidden(NamedTuple):
    """The last hidden layer (B, L, H) and the output head's weight (V, H) and bias (V,) or None:
    logits are `hidden @ weight.T + bias`."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


def returns_hidden(model: nn.Module) -> bool:
    """Whether the module's forward takes `hidden=True` (built-in and HF language models whose
    logits are a plain linear head of the last hidden layer)."""
    if "hidden" not in inspect.signature(model.forward).parameters:
        return False
    check = getattr(model, "head_is_linear", None)
    return bool(check()) if callable(check) else True
