"""One optimizer step, and a pass over batches: plain PyTorch through the task seam, no Ray.

The Ray Train loop (pipeline/student/worker.py) feeds it with its share of each global batch;
tests and benchmarks feed it in-memory tensors.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch

from pipeline.student.train.precision import Precision
from pipeline.student.tasks.base import Batch, Task

Sync = Callable[[bool], ContextManager[Any]]


def as_float(output: Any) -> Any:
    """Model outputs in float32 (losses are never computed in half precision)."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() and output.dtype != torch.float64 else output
    if isinstance(output, dict):
        return {k: as_float(v) for k, v in output.items()}
    return output


def train_step(model: torch.nn.Module, micro_batches: Sequence[Batch], task: Task, optimizer: torch.optim.Optimizer,
               precision: Precision | None = None, clip: float | None = None,
               sync: Sync | None = None, scale: float = 1.0) -> tuple[dict[str, torch.Tensor], int, torch.Tensor]:
    """Forward and backward over the micro-batches, then one optimizer step.

    Each micro-batch's loss is weighted by its share of the step's rows, so accumulating gradients
    over k micro-batches gives the step one batch of all of them would (up to rounding).
    `sync(last)` lets DDP/FSDP reduce gradients only on the last micro-batch. `scale` (this worker's
    rows x workers / global batch) makes the workers' mean of gradients the global batch's mean when
    workers hold unequal parts of a step.
    Returns (the row-weighted loss terms, the rows, the task's units, e.g. target tokens).
    """
    precision = precision or Precision("fp32", torch.device("cpu"))
    model.train()
    micro_batches = [task.prepare(b) for b in micro_batches]
    inputs = [task.model_inputs(b) for b in micro_batches]
    rows = sum(len(x) for x in inputs)
    optimizer.zero_grad(set_to_none=True)
    parts_sum: dict[str, torch.Tensor] = {}
    units: torch.Tensor | float = 0.0
    for i, (batch, x) in enumerate(zip(micro_batches, inputs)):
        share = len(x) / rows
        with (sync(i == len(inputs) - 1) if sync else contextlib.nullcontext()):
            with precision.autocast():
                output = task.forward(model, x)
            parts = task.losses(as_float(output), batch)
            precision.backward(parts["loss"] * (share * scale))
        for name, value in parts.items():
            # Summed on the device: a float() here would sync a GPU on every step.
            parts_sum[name] = parts_sum.get(name, 0.0) + value.detach() * share
        units = units + task.units(batch)  # on the batch's device: no sync per step
    precision.step(optimizer, [p for g in optimizer.param_groups for p in g["params"]], clip)
    return parts_sum, rows, units  # type: ignore[return-value]


def train_epoch(model: torch.nn.Module, batches: Iterable[Batch], task: Task, optimizer: torch.optim.Optimizer,
                on_step: Callable[[int, int], None] | None = None, precision: Precision | None = None,
                clip: float | None = None) -> dict[str, float]:
    """One pass, one optimizer step per batch; returns the sample-weighted mean of every loss term
    and the sample count. `on_step(step, samples)` is called after every step (progress lines)."""
    sums: dict[str, torch.Tensor] = {}
    samples = steps = 0
    for batch in batches:
        parts, n, _ = train_step(model, [batch], task, optimizer, precision, clip)
        samples += n
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value * n
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
