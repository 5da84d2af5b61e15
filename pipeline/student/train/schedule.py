"""How long a run is and its learning rate at each optimizer step: warmup then constant, cosine or
linear decay. Pure arithmetic, so the schedule is tested without training anything."""

from __future__ import annotations

import math

from pipeline.config import TrainConfig


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "constant", min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based) of `total`.

    Linear warmup (step + 1) / warmup over the first `warmup` steps, so the first step already
    moves; then 1 (constant), or a cosine or linear decay from 1 to `min_ratio` reached at the last step.
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup - 1, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def total_steps(cfg: TrainConfig, steps_per_epoch: int, tokens_per_step: float | None = None) -> int:
    """Optimizer steps the run takes: `max_steps`, or the steps to see `max_tokens` target tokens
    (at the cache's mean tokens per step), capped by `epochs` x `steps_per_epoch`."""
    budget = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        return min(cfg.max_steps, budget)
    if cfg.max_tokens and tokens_per_step:
        return min(math.ceil(cfg.max_tokens / tokens_per_step), budget)
    return budget


def scheduler(optimizer, cfg: TrainConfig, total: int):
    """A LambdaLR over optimizer steps; its state is the step count, restored by stepping to it."""
    import torch

    opt = cfg.optimizer
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, opt.warmup_steps, opt.schedule, opt.min_lr_ratio))
