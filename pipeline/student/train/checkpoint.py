"""A training checkpoint's files: every worker's shard of the model and optimizer (torch's
distributed checkpoint, any worker count can restore it), rank 0's step, history, scheduler and
scaler, and in the final checkpoint the gathered bare student."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from pipeline.student.train import parallel

META_FILE = "meta.pt"  # step, history, scheduler, scaler: rank 0's
STUDENT_FILE = "student.pt"  # the gathered bare student, in the final checkpoint


def load_checkpoint(directory: str) -> dict[str, Any]:
    """Rank 0's metadata of a checkpoint, and the gathered student when it is the final one."""
    state = torch.load(os.path.join(directory, META_FILE), map_location="cpu", weights_only=False)
    path = os.path.join(directory, STUDENT_FILE)
    if os.path.exists(path):
        state["student"] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def restore(directory: str | None, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Load the model's and optimizer's shards from `directory`; returns its metadata (None: no checkpoint)."""
    if directory is None:
        return None
    parallel.load(directory, model, optimizer)
    return load_checkpoint(directory)


def save_checkpoint(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                    meta: dict[str, Any], student: nn.Module | None) -> None:
    """Every worker writes its shards (a collective); rank 0 writes `meta` and, when `student` (the
    bare student inside the model) is given, its gathered weights."""
    parallel.save(directory, model, optimizer)
    full = parallel.full_state(model) if student is not None else None
    if rank != 0:
        return
    torch.save(meta, os.path.join(directory, META_FILE))
    if full is not None:
        prefix = parallel.prefix_of(model, student)
        torch.save({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}, os.path.join(directory, STUDENT_FILE))
