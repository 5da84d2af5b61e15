"""What a worker measures between two reports: loss terms, rows, units (samples or target tokens),
and the seconds it waited for data rather than computing."""

from __future__ import annotations

import time
from typing import Iterable, Iterator, TypeVar

import torch

from pipeline.progress import format_eta

T = TypeVar("T")


class Meter:
    """Sums of one stretch between reports (not the shuffle window of `Order`)."""

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.rows = 0
        self.units: torch.Tensor | float = 0.0  # summed where the batches live; read at reports and progress lines
        self.waited = 0.0
        self.started = time.time()
        self.steps = 0

    def timed(self, items: Iterable[T]) -> Iterator[T]:
        """Yields the items, adding the seconds spent waiting for each to `waited`."""
        it, end = iter(items), object()
        while True:
            started = time.perf_counter()
            item = next(it, end)
            self.waited += time.perf_counter() - started
            if item is end:
                return
            yield item  # type: ignore[misc]

    def add(self, parts: dict[str, torch.Tensor], rows: int, units: torch.Tensor) -> None:
        for name, value in parts.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * rows
        self.rows += rows
        self.steps += 1
        self.units = self.units + units

    def means(self) -> dict[str, float]:
        """Row-weighted mean of each loss term over the window (this worker's rows)."""
        return {f"train_{k}": float(v) / max(self.rows, 1) for k, v in self.sums.items()}

    def line(self, step: int, total: int, per_epoch: int) -> str:
        """A progress line within a long stretch between reports."""
        elapsed = time.time() - self.started
        rate = float(self.units) / max(elapsed, 1e-9)
        loss = self.means().get("train_loss", float("nan"))
        eta = (total - step) * elapsed / max(self.steps, 1)
        return (f"step {step}/{total} (epoch {step / per_epoch:.2f}), ETA {format_eta(eta)}  loss {loss:.4f}  "
                f"{rate:,.0f} {self.unit}/s on this worker, {self.waited:.1f}s of {elapsed:.1f}s waiting for data")
