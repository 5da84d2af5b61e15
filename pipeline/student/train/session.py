"""Where the student loop runs: in a Ray Train worker (one of N, `distill train` and sweep trials
with several workers), or directly in a Ray Tune trial's process (a single-worker sweep trial,
without a Train run's start-up). The loop sees only this interface."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Protocol

import torch


class Session(Protocol):
    rank: int
    world: int
    device: torch.device

    def checkpoint_dir(self) -> Any:
        """A context manager yielding the latest checkpoint's local directory, or None without one."""

    def report(self, metrics: dict[str, Any], directory: str | None) -> None:
        """Hand the metrics on, with the checkpoint in `directory` when one was written."""


class TrainSession:
    """A Ray Train worker's session."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint_dir(self):
        import ray.train

        return _as_directory(ray.train.get_checkpoint())

    def report(self, metrics: dict[str, Any], directory: str | None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)


class TuneSession:
    """A Ray Tune function trial's own process: one worker, no process group."""

    rank, world = 0, 1

    def __init__(self) -> None:
        import ray

        gpus = ray.get_gpu_ids()
        if gpus and torch.cuda.is_available():
            # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPUs, so the first visible one is ours.
            self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
            if threads > 0:
                torch.set_num_threads(threads)

    def checkpoint_dir(self):
        import ray.tune

        return _as_directory(ray.tune.get_checkpoint())

    def report(self, metrics: dict[str, Any], directory: str | None) -> None:
        import ray.tune

        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(directory) if directory else None)


def _as_directory(checkpoint):
    return checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext()
