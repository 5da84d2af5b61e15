"""Sparse, unbiased estimates of a teacher's token distribution: what a sampled token cache stores.

Each estimator turns p (N, V) into at most k (id, weight) pairs per row with E[weight of id i] =
p_i (before any renormalisation), so the student's soft cross-entropy to the estimate has the
full-KD gradient in expectation. They differ in variance at a given k:

- `multinomial`: k draws with replacement, weight count / k (Anshumann et al., 2025).
- `priority`: priority sampling (Duffield, Lund & Thorup, 2007): with u_i ~ U(0, 1], keep the k
  largest p_i / u_i; tau is the (k+1)-th largest; weight max(p_i, tau). Near-minimal variance
  among k-sparse unbiased estimates; tokens above tau are kept exactly.
- `head_tail`: the `head` most likely tokens exactly, plus k - head draws with replacement from
  the rest renormalised, each weighted by the exact rest mass times count / draws.

All are pure torch; `generator` makes them reproducible.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("multinomial", "priority", "head_tail")


def multinomial(p: torch.Tensor, k: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, k), weights (N, k)): k draws, equal ids merged (merged slots get weight 0)."""
    draws = torch.multinomial(p, k, replacement=True, generator=generator)
    return merge(draws, torch.full(draws.shape, 1.0 / k, dtype=p.dtype, device=p.device))


def priority(p: torch.Tensor, k: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, k), weights max(p_i, tau) (N, k)); rows with at most k nonzero p are kept exactly."""
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float64).clamp_min(1e-300)
    pri = torch.where(p > 0, p.double() / u, torch.zeros((), dtype=torch.float64, device=p.device))
    top = torch.topk(pri, min(k + 1, p.shape[-1]), dim=-1)
    ids = top.indices[:, :k]
    tau = top.values[:, k:k + 1] if top.values.shape[-1] > k else torch.zeros_like(top.values[:, :1])
    kept = p.gather(-1, ids).double()
    w = torch.where(kept > 0, torch.maximum(kept, tau), torch.zeros_like(kept))
    return ids, w.to(p.dtype)


def head_tail(p: torch.Tensor, k: int, head: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, k), weights (N, k)): the `head` largest p exactly, then k - head draws from the rest."""
    if not 0 <= head <= k:
        raise ValueError(f"head must be in [0, k={k}], got {head}")
    top = torch.topk(p, head, dim=-1) if head else None
    if head == k:
        return top.indices, top.values  # type: ignore[union-attr]
    rest = p.clone()
    if top is not None:
        rest.scatter_(-1, top.indices, 0.0)
    mass = rest.sum(-1, keepdim=True)
    safe = torch.where(mass > 0, rest / mass.clamp_min(torch.finfo(p.dtype).tiny), torch.ones_like(rest) / rest.shape[-1])
    m = k - head
    draws = torch.multinomial(safe, m, replacement=True, generator=generator)
    ids, w = merge(draws, (mass / m).expand(-1, m).clone())
    if top is None:
        return ids, w
    return torch.cat([top.indices, ids], -1), torch.cat([top.values, w], -1)


def estimate(p: torch.Tensor, name: str, k: int, head: int = 0,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "multinomial":
        return multinomial(p, k, generator)
    if name == "priority":
        return priority(p, k, generator)
    if name == "head_tail":
        return head_tail(p, k, head, generator)
    raise ValueError(f"unknown estimator {name!r}; known: {list(ESTIMATORS)}")


def dense(ids: torch.Tensor, weights: torch.Tensor, vocab: int) -> torch.Tensor:
    """The estimate as a (N, V) vector (weights of repeated ids added)."""
    return torch.zeros(ids.shape[0], vocab, dtype=weights.dtype, device=weights.device).scatter_add_(-1, ids, weights)


def merge(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal ids merged: the distinct ids ascending in the first slots with their summed weights,
    then id 0 with weight 0 (the layout of a sampled cache's columns)."""
    ids, order = torch.sort(ids, dim=-1)
    weights = weights.gather(-1, order)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    slot = first.long().cumsum(-1) - 1
    return torch.zeros_like(ids).scatter_(-1, slot, ids), torch.zeros_like(weights).scatter_add_(-1, slot, weights)
