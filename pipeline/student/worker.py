"""The code that runs in each Ray Train worker: restore, train epochs through the task seam, report.

No teacher is ever built or imported here; each worker checks that and reports what it found.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from typing import Any

import torch

from pipeline.cache.manifest import Manifest
from pipeline.config import TrainConfig
from pipeline.models.factory import BUILT_IN_THIS_PROCESS, LOADED_IN_THIS_PROCESS
from pipeline.progress import Throttle, progress_line
from pipeline.runtime import quiet_train_worker
from pipeline.student.datasets import timed
from pipeline.student.loop import make_optimizer, train_epoch
from pipeline.student.tasks import Task, task_for

CHECKPOINT_FILE = "state.pt"
logger = logging.getLogger(__name__)


def teacher_evidence(teacher_factory: str | None, teacher_weights: str | None = None) -> list[str]:
    """Signs that a teacher was loaded into this process: its weights were read (or, for a teacher
    without weights file, its factory was built), or stage 1 was imported. A student of the
    teacher's own architecture (born-again) is not a teacher: it does not read the teacher's weights."""
    if teacher_weights:
        found = [f"loaded {w}" for w in LOADED_IN_THIS_PROCESS if w == teacher_weights]
    else:
        found = [f"built {f}" for f in BUILT_IN_THIS_PROCESS if teacher_factory and f == teacher_factory]
    found += [f"imported {m}" for m in sorted(sys.modules) if m == "pipeline.teacher" or m.startswith("pipeline.teacher.")]
    return found


def save_checkpoint(directory: str, task: Task, model: torch.nn.Module, optimizer, epoch: int, history: list[dict]) -> None:
    raw = model.module if hasattr(model, "module") else model
    # "student" is the bare network (no adapters): what a later stage loads, e.g. as a born-again teacher.
    torch.save({"model": raw.state_dict(), "student": task.student(raw).state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "history": history}, os.path.join(directory, CHECKPOINT_FILE))


def load_checkpoint(directory: str) -> dict[str, Any]:
    return torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=False)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker: `config` holds the train config and the cache's manifest."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    quiet_train_worker()
    cfg = TrainConfig.model_validate(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    manifest = Manifest.model_validate(config["manifest"])
    task = task_for(cfg, manifest)
    model = ray.train.torch.prepare_model(task.build_model())
    opt = cfg.optimizer
    optimizer = make_optimizer(model.parameters(), opt.name, opt.lr, opt.weight_decay, opt.momentum)

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d)
        (model.module if hasattr(model, "module") else model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
    resumed_from = start_epoch

    # Checked inside the worker: how many workers show any sign of a teacher.
    evidence = teacher_evidence(manifest.teacher.factory, manifest.teacher.weights)
    flag = torch.tensor([1.0 if evidence else 0.0])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag)
    workers_with_teacher = int(flag.item())

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if manifest.rows_by_split.get("val", 0) else None
    per_worker_batch = max(1, cfg.batch_size // world)
    steps_per_epoch = math.ceil(manifest.rows_by_split["train"] / world / per_worker_batch)
    dtypes = task.dtypes()
    for epoch in range(start_epoch, cfg.epochs):
        started = time.time()
        # Rank 0 prints a step line every 10 s within long epochs (through logging: shows in `ray job logs`).
        throttle = Throttle(logger.info, every=10.0)
        throttle.last = time.monotonic()

        def on_step(step: int, samples: int, epoch: int = epoch, started: float = started, throttle: Throttle = throttle) -> None:
            if rank == 0:
                throttle(lambda: f"epoch {epoch + 1}/{cfg.epochs}  " + progress_line(
                    "step", step, steps_per_epoch, time.time() - started, unit="steps").removeprefix("step: "))

        batches = train_shard.iter_torch_batches(
            batch_size=per_worker_batch, dtypes=dtypes, prefetch_batches=2,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed * 100_003 + epoch * 101 + rank) if cfg.shuffle_buffer else None,
        )
        waited = [0.0]
        stats = train_epoch(model, timed(batches, waited), task, optimizer, on_step)
        train_s = time.time() - started
        evaluated = (task.evaluate(model, val_shard.iter_torch_batches(batch_size=task.eval_batch_size, dtypes=dtypes))
                     if val_shard is not None else {})
        calibration = evaluated.pop("calibration", None)
        metrics = {
            "epoch": epoch + 1,
            **stats,
            "train_seconds": train_s,
            "eval_seconds": time.time() - started - train_s,
            "samples_per_s": stats["train_samples"] * world / max(train_s, 1e-9),
            "data_wait_seconds": waited[0],  # of train_seconds (this worker): the student waiting on data
            **evaluated,
            "workers_with_teacher": workers_with_teacher,
            "resumed_from_epoch": resumed_from,  # > 0 after a restart from a checkpoint
        }
        history.append({**metrics, "calibration": calibration})
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                save_checkpoint(d, task, model, optimizer, epoch + 1, history)
                if evidence:
                    metrics["teacher_evidence"] = "; ".join(evidence)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)
        if rank == 0:  # through logging: Ray Train would print() twice (stdout and its console handler)
            logger.info(f"epoch {epoch + 1}/{cfg.epochs}  loss {stats.get('train_loss', float('nan')):.4f}  "
                        f"{task.summary(evaluated)}  ({train_s:.1f}s train of which {waited[0]:.1f}s waiting for data, "
                        f"{metrics['eval_seconds']:.1f}s eval, {time.time() - started:.1f}s epoch)")
