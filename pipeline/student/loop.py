"""The per-worker train pass: plain PyTorch over an iterable of batches, through the task seam, no Ray.

The Ray Train loop (pipeline/student/worker.py) feeds it with `iter_torch_batches`; tests feed it
in-memory tensors.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from pipeline.student.tasks.base import Batch, Task


def train_epoch(model: torch.nn.Module, batches: Iterable[Batch], task: Task, optimizer: torch.optim.Optimizer,
                on_step: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """One pass; returns the sample-weighted mean of every loss term and the sample count.

    `on_step(step, samples)` is called after every step (progress lines)."""
    model.train()
    sums: dict[str, torch.Tensor] = {}
    samples = steps = 0
    for batch in batches:
        inputs = task.model_inputs(batch)
        parts = task.losses(model(inputs), batch)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        n = len(inputs)
        samples += n
        # Summed on the device: a float() here would sync a GPU on every step.
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value.detach() * n
        steps += 1
        if on_step:
            on_step(steps, samples)
    return {**{f"train_{k}": float(v) / max(samples, 1) for k, v in sums.items()}, "train_samples": samples}


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
