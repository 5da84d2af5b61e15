"""Length-grouped forward passes for language-model teachers: rows of similar length run together,
each group cut to its longest row, so the teacher does not compute logits for padding. Outputs
come back in the batch's own order; positions past a row's length hold zeros (no target reads them)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

# Groups per batch at most: fewer, larger forwards keep a GPU busy; more cut more padding.
MAX_GROUPS = 4


def length_groups(lengths: np.ndarray, max_groups: int = MAX_GROUPS) -> list[np.ndarray]:
    """Row indices in groups of near-equal length (shortest first); one group when every row is full."""
    order = np.argsort(lengths, kind="stable")
    if len(lengths) == 0 or lengths.min() == lengths.max():
        return [np.arange(len(lengths))]
    return [g for g in np.array_split(order, min(max_groups, len(lengths))) if len(g)]


def grouped_forward(model: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, lengths: np.ndarray,
                    max_groups: int = MAX_GROUPS) -> torch.Tensor:
    """model(inputs) (B, L) -> (B, L, V), computed group by group over positions t < length - 1:
    a causal model's outputs there do not depend on the padding after them."""
    width = inputs.shape[1]
    if np.all(lengths - 1 >= width):  # every window full: one plain forward
        return model(inputs)
    out: torch.Tensor | None = None
    for g in length_groups(lengths, max_groups):
        span = int(max(1, min(width, lengths[g].max() - 1)))
        idx = torch.from_numpy(g).to(inputs.device)
        logits = model(inputs[idx, :span])
        if out is None:
            out = logits.new_zeros((inputs.shape[0], width, logits.shape[-1]))
        out[idx, :span] = logits
    # Zeros past each row's targets, however the rows were grouped: the cache does not depend on it.
    pos = torch.arange(width, device=inputs.device)[None, :]
    real = pos < torch.from_numpy(np.asarray(lengths) - 1).to(inputs.device)[:, None]
    return out.masked_fill(~real[..., None], 0)  # type: ignore[union-attr]
