"""The task seam: what stage 2 needs to know about one kind of cache.

A task knows its cache columns and their dtypes, turns a batch into model inputs, returns named
loss terms ({"loss": weighted sum, term: value, ...}; the loop calls backward on "loss" and logs
the rest), evaluates, and checks a student config against a cache before any worker starts.
The trainer and the worker loop know only this class; `pipeline.student.tasks.TASKS` maps the
manifest's `task` to an implementation. Pure PyTorch: no Ray here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from pipeline.cache.manifest import Manifest
from pipeline.config import TrainConfig

Batch = Mapping[str, torch.Tensor]
# Sums over every worker's share of the val split (an all-reduce in Ray Train; identity alone).
Reduce = Callable[[dict[str, float]], dict[str, float]]


def alone(sums: dict[str, float]) -> dict[str, float]:
    return sums


class Task(ABC):
    """One kind of student training, built from the train config and the cache's manifest (in the
    driver for the checks, again in every worker for the loop)."""

    name: str = ""
    eval_batch_size: int = 1024
    # The metrics `result.json` keeps from the final evaluation (beside the full history).
    result_metrics: tuple[str, ...] = ()
    unit: str = "samples"  # what throughput counts: samples, or target tokens for language models

    def __init__(self, cfg: TrainConfig, manifest: Manifest) -> None:
        self.cfg = cfg
        self.manifest = manifest

    @abstractmethod
    def check(self) -> None:
        """Every mismatch between the student config and the cache a worker would hit, as a
        DistillError naming it, raised in the driver."""

    @abstractmethod
    def columns(self) -> list[str]:
        """The cache columns this task reads (and nothing else, so unused signals are never read)."""

    @abstractmethod
    def dtypes(self) -> dict[str, torch.dtype]:
        """The torch dtype of each column in a batch."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The module trained: the user's student plus whatever the loss needs (hooks, adapters)."""

    @abstractmethod
    def model_inputs(self, batch: Batch) -> torch.Tensor:
        """What the model's forward takes from a batch."""

    def prepare(self, batch: Batch) -> Batch:
        """A training batch as the step uses it for both the forward pass and the losses (augmented,
        with whatever the losses need to know of it); evaluation batches skip it. Draws come from
        torch's generator, which the worker loop seeds per step."""
        return batch

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> Any:
        """The model's output for a batch's inputs, as `losses` takes it (language models may hand
        over their hidden states and head instead of logits)."""
        return model(inputs)

    @abstractmethod
    def losses(self, output: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """{"loss": the weighted sum, and each weighted term by name}, all scalars."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Iterable[Batch], reduce: Reduce = alone) -> dict[str, Any]:
        """Validation metrics of the whole split: additive sums over these batches (a worker's share
        of it), passed through `reduce` (summed over workers), then divided."""

    def units(self, batch: Batch) -> torch.Tensor:
        """How many `unit`s a batch trains on (a tensor: counted without a device sync)."""
        return torch.tensor(len(next(iter(batch.values()))))

    def student(self, model: nn.Module) -> nn.Module:
        """The bare student inside the trained module: what `student.pt` holds and a later stage loads."""
        return model

    def summary(self, metrics: Mapping[str, Any]) -> str:
        """The metrics part of an epoch's progress line."""
        return "  ".join(f"{k.removeprefix('val_')} {metrics[k]:.4f}" for k in self.result_metrics
                         if isinstance(metrics.get(k), float))
