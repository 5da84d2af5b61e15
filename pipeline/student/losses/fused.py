"""Token losses with the student's output head applied inside, a chunk of positions at a time, so no
(B, L, V) logits tensor exists: at V = 131,072 one row of 1,024 positions of float32 logits is
0.5 GiB, and a log-softmax and its gradient triple that.

The gradient is computed in the forward pass, chunk by chunk: d loss / d logits of one chunk from
the unfused loss formulas (`losses/tokens.py`, on that chunk alone, one term at a time so only
one term's temporaries exist at once), then the head's two matmuls
into d hidden and d weight. Backward only scales what was stored. That is three matmuls of the head
per chunk, as unfused, and peak memory is one chunk's logits with the loss's temporaries over them.
Liger Kernel's fused linear losses and Cut Cross-Entropy do this with GPU kernels; this is plain
PyTorch, for CPU and GPU alike.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.models.hidden import Hidden

__all__ = ["Hidden", "chunk_positions", "head_losses", "head_sums"]

# Logits one chunk holds: 16 MiB in float32, 32 positions at V = 131,072 and 512 at V = 8,192.
CHUNK_ELEMENTS = 1 << 22

# logits (C, V) of the selected positions [lo, hi) -> one term's sum over those positions
ChunkTerm = Callable[[torch.Tensor, slice], torch.Tensor]


def chunk_positions(vocab: int, budget: int | None = None) -> int:
    """Positions a chunk holds at this vocabulary, so its logits are about `budget` elements."""
    return max(1, (budget or CHUNK_ELEMENTS) // max(vocab, 1))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, terms: dict[str, ChunkTerm], weights: dict[str, float], count: int, chunk: int,
                out: dict[str, torch.Tensor]):
        dtype = _compute_dtype(weight)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk):
            rows = slice(lo, min(lo + chunk, hidden.shape[0]))
            h = hidden[rows]
            z = F.linear(h, weight, bias).to(dtype).requires_grad_()
            g = None
            for name, term in terms.items():  # one term's graph at a time: its temporaries are freed before the next
                with torch.enable_grad():
                    value = term(z, rows)
                    weighted = weights.get(name, 0.0) * value / count
                out[name] = out.get(name, 0.0) + value.detach() / count
                if weights.get(name, 0.0):
                    (part,) = torch.autograd.grad(weighted, z)
                    g = part if g is None else g.add_(part)
                    total += weighted.detach()
                del value, weighted
            if g is None:
                continue
            g = g.to(weight.dtype)
            if need_h:
                grad_h[rows] = (g @ weight).to(hidden.dtype)
            if need_w:
                grad_w += (g.T @ h.to(weight.dtype)).to(dtype)
            if need_b:
                grad_b += g.sum(0).to(dtype)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.present = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_out if present else None for present in ctx.present]
        if grads[1] is not None:
            grads[1] = grads[1].to(ctx.dtypes[0])
        if grads[2] is not None:
            grads[2] = grads[2].to(ctx.dtypes[1])
        return (*grads, None, None, None, None, None)


def head_losses(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, terms: dict[str, ChunkTerm],
                weights: dict[str, float], chunk: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_n weights[n] * mean_n over the N selected positions, the head applied chunk by chunk.

    Args:
        hidden: (N, H) the last hidden state of the positions that count (padding already dropped).
        weight: (V, H) the output head; bias (V,) or None.
        terms: per term, its sum over a chunk's positions from their logits (C, V) in the compute
            dtype; terms without a weight are computed and reported only.
        weights: the loss weight of each term.
        chunk: positions per chunk (default: `chunk_positions(V)`).

    Returns:
        (the weighted loss, differentiable in hidden, weight and bias; each term's mean, detached).
    """
    count = hidden.shape[0]
    out: dict[str, torch.Tensor] = {}
    if count == 0:  # nothing counts: a zero loss that still reaches the head's parameters
        zero = hidden.sum() * 0 + weight.sum() * 0
        return zero, {name: zero.detach() for name in terms}
    loss = _HeadLoss.apply(hidden, weight, bias, terms, weights, count, chunk or chunk_positions(weight.shape[0]), out)
    return loss, out


@torch.no_grad()
def head_sums(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              sums: Callable[[torch.Tensor, slice], dict[str, float]], chunk: int | None = None) -> dict[str, float]:
    """Additive evaluation sums over the (N, H) positions, the head applied a chunk at a time."""
    total: dict[str, float] = {}
    chunk = chunk or chunk_positions(weight.shape[0])
    for lo in range(0, hidden.shape[0], chunk):
        rows = slice(lo, min(lo + chunk, hidden.shape[0]))
        for k, v in sums(F.linear(hidden[rows], weight, bias), rows).items():
            total[k] = total.get(k, 0.0) + v
    return total
