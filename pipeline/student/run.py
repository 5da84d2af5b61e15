"""Stage 2 in the driver: check the cache against the student config, run Ray Train's `TorchTrainer`
over it, and write the run's results. No teacher is ever built or imported here."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pipeline import rundir, storage
from pipeline.cache.manifest import Manifest
from pipeline.config import TrainConfig
from pipeline.errors import DistillError
from pipeline.runtime import ensure_ray
from pipeline.student.checks import open_cache, resolve_cache_uri
from pipeline.student.datasets import plan, units_per_row
from pipeline.student.export import export_student
from pipeline.student.schedule import total_steps
from pipeline.student.stream import Order
from pipeline.student.tasks import Task
from pipeline.student.worker import load_checkpoint, train_loop_per_worker

Log = Callable[[str], None]


@dataclass
class TrainResult:
    run_dir: str
    result: dict[str, Any]


def load_run_config(run_dir: str) -> TrainConfig:
    """The config a run was started with, for `--resume`."""
    return TrainConfig.model_validate(rundir.read_config(run_dir))


def run_train(cfg: TrainConfig, *, address: str | None = None, overwrite: bool = False, resume: bool = False,
              log: Log = print) -> TrainResult:
    """Train one student from the cache; writes checkpoints and `result.json` under storage_path/name.

    With `resume`, an interrupted run continues from its latest checkpoint (Ray Train restores
    a run started again with the same name and storage path).
    """
    storage.configure(**cfg.storage.model_dump())
    storage.check_reachable(cfg.storage_path, "run storage path")
    run_dir = storage.join(cfg.storage_path if not storage.is_local(cfg.storage_path)
                           else storage.local_path(cfg.storage_path), cfg.name or "run")
    if resume and rundir.finished(run_dir):
        log(f"{cfg.name} already finished: {storage.join(run_dir, rundir.RESULT_FILE)}")
        return TrainResult(run_dir=run_dir, result=rundir.read_result(run_dir))
    cache_uri = resolve_cache_uri(cfg)
    if storage.is_local(cache_uri):  # the workers read it from their own working directories
        cache_uri = storage.local_path(cache_uri)
    storage.check_reachable(cache_uri, "cache")
    manifest, task = open_cache(cfg, cache_uri)
    if resume:
        log(f"resuming {cfg.name} from its latest checkpoint in {run_dir}")
    elif storage.exists(run_dir):
        if not overwrite:
            raise DistillError(f"run directory {run_dir} already exists",
                               "resume it (distill train --resume RUN_DIR), pick another name (--set name=...) "
                               "or pass --overwrite to replace it")
        storage.remove_tree(run_dir)
    if not resume:
        rundir.write_config(run_dir, cfg.model_dump(mode="json"))
    ensure_ray(address)
    data = plan(cache_uri, manifest, task, cfg.in_memory, cfg.num_workers, log)
    per_epoch, total = step_budget(cfg, data, units_per_row(cache_uri, manifest, task) if cfg.max_tokens else None)
    trainer = make_trainer(cfg, manifest, {**data, "total_steps": total})
    log(f"training {cfg.name}: {cfg.student.factory} on cache {manifest.cache_id} "
        f"({manifest.rows_by_split['train']} train rows), {cfg.num_workers} workers ({cfg.parallel}, {cfg.precision}), "
        f"{total} steps of {cfg.batch_size} rows ({total / per_epoch:.3g} epochs)")
    started = time.time()
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; show the cause, not the wrapper
        raise DistillError(f"training {cfg.name} failed: {type(e).__name__}: {str(e).strip().splitlines()[-1]}",
                           "see the worker traceback above") from None
    out = result_record(cfg, task, manifest, cache_uri, run_dir, result.checkpoint, result.metrics, time.time() - started)
    uri = rundir.write_result(run_dir, out)
    log(f"{cfg.name}: {task.summary(out['metrics'])}  ({out['wall_s']:.0f}s) -> {uri}")
    return TrainResult(run_dir=run_dir, result=out)


def step_budget(cfg: TrainConfig, data: dict[str, Any], units_per_row: float | None) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the run) over the planned train shards; `units_per_row`
    (target tokens of a mean row) only for a `max_tokens` budget."""
    per_epoch = Order(tuple(n for _, n in data["shards"]["train"]), cfg.batch_size, cfg.seed).steps_per_epoch
    return per_epoch, total_steps(cfg, per_epoch, cfg.batch_size * units_per_row if cfg.max_tokens and units_per_row else None)


def make_trainer(cfg: TrainConfig, manifest: Manifest, data: dict[str, Any], callbacks: list | None = None):
    """The run's `TorchTrainer`: the worker loop over `data` (shards, in_memory, total_steps); `callbacks`
    are Ray Train's (a sweep passes Tune's report callback)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    if storage.is_local(cfg.storage_path):
        storage_path, storage_fs = storage.local_path(cfg.storage_path), None
    else:  # a scheme-less path with the pipeline's own filesystem, so the endpoint override holds
        storage_fs, storage_path = storage.arrow_filesystem(cfg.storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(mode="json"), **data,
                           "manifest": manifest.model_copy(update={"shards": [], "config": {}}).model_dump(mode="json")},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.gpus_per_worker > 0,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # A lost worker restarts the worker group from the latest registered checkpoint.
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # Ray Train logs every report at INFO; rank 0 prints one line per epoch instead.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )


def result_record(cfg: TrainConfig, task: Task, manifest: Manifest, cache_uri: str, run_dir: str, checkpoint,
                  metrics: dict[str, Any] | None, wall: float) -> dict[str, Any]:
    """result.json from the run's latest checkpoint: the final metrics the task names, the history, the
    student's weights (written beside it; only the final checkpoint holds them) and the config."""
    history, student_state = [], None
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d)
        history, student_state = state["history"], state.get("student")
    final = history[-1] if history else dict(metrics or {})
    weights_uri = storage.join(run_dir, rundir.STUDENT_FILE)
    exported = None
    if student_state is not None:  # the bare student, loadable by its factory (e.g. as the next generation's teacher)
        buf = io.BytesIO()
        torch.save(student_state, buf)
        storage.write_bytes_atomic(weights_uri, buf.getvalue())
        exported = export_student(cfg, manifest, cache_uri, student_state, storage.join(run_dir, rundir.HF_DIR))
    checkpoint_uri = None
    if checkpoint is not None:
        checkpoint_uri = (checkpoint.path if storage.is_local(cfg.storage_path)
                          else f"{cfg.storage_path.split('://', 1)[0]}://{checkpoint.path}")
    return {
        "name": cfg.name,
        "task": task.name,
        "cache": storage.local_path(cache_uri) if storage.is_local(cache_uri) else cache_uri,  # usable from any cwd
        "cache_id": manifest.cache_id,
        "student": cfg.student.factory,
        "alpha": cfg.alpha,
        "temperature": cfg.loss.temperature,
        "loss_terms": cfg.loss.terms,
        "seed": cfg.seed,
        "epochs": final.get("epoch", 0),
        "steps": final.get("step", 0),
        "num_workers": cfg.num_workers,
        "parallel": cfg.parallel,
        "precision": cfg.precision,
        "throughput": {k: final.get(k) for k in (f"{task.unit}_per_s", "samples_per_s", "data_wait_seconds", "train_seconds")},
        "memory_per_worker": {k: final.get(k) for k in ("param_bytes", "optimizer_bytes")},
        "metrics": {**{k: final.get(k) for k in task.result_metrics},
                    **({"calibration": final["calibration"]} if final.get("calibration") else {})},
        "weights": weights_uri if student_state is not None else None,
        "hf_model": exported,
        "workers_with_teacher": final.get("workers_with_teacher"),
        "wall_s": round(wall, 2),
        "history": history,
        "checkpoint": checkpoint_uri,
        "config": cfg.model_dump(mode="json"),
    }
