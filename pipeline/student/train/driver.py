"""Stage 2 in the driver: check the cache against the student config, run Ray Train's `TorchTrainer`
over it, and write the run's results. No teacher is ever built or imported here."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from pipeline import rundir, storage
from pipeline.config import TrainConfig
from pipeline.errors import DistillError
from pipeline.runtime import ensure_ray, root_cause
from pipeline.student.prelude import Prepared, prepare
from pipeline.student.train.checkpoint import load_checkpoint
from pipeline.student.train.export import export_student
from pipeline.student.train.plan import WorkerPlan, plan, slim, step_budget, units_per_row
from pipeline.student.train.worker import PLAN, train_loop_per_worker

Log = Callable[[str], None]
# What to do with a run directory that already exists: fail (a CLI run), replace it (--overwrite), or
# continue it (--resume; and a resubmitted Ray Job, which must never wipe its own checkpoints).
Existing = Literal["fail", "overwrite", "resume"]


@dataclass
class TrainResult:
    run_dir: str
    result: rundir.RunResult


def load_run_config(run_dir: str, options: storage.Options = None) -> TrainConfig:
    """The config a run was started with, for `--resume`."""
    return TrainConfig.model_validate(rundir.read_config(run_dir, options))


def run_dir_of(cfg: TrainConfig) -> str:
    root = cfg.storage_path if not storage.is_local(cfg.storage_path) else storage.local_path(cfg.storage_path)
    return storage.join(root, cfg.name or "run")


def run_train(cfg: TrainConfig, *, address: str | None = None, existing: Existing = "fail",
              log: Log = print) -> TrainResult:
    """Train one student from the cache; writes checkpoints and `result.json` under storage_path/name.

    With `existing="resume"` a started run continues from its latest checkpoint (Ray Train restores
    a run started again with the same name and storage path) and a finished one is not retrained.
    """
    cfg = cfg.with_absolute_paths()  # relative to this driver's directory: workers on a cluster run elsewhere
    ready = prepare(cfg)
    run_dir = run_dir_of(cfg)
    if existing == "resume" and rundir.finished(run_dir, cfg.storage):
        log(f"{cfg.name} already finished, not retrained: {storage.join(run_dir, rundir.RESULT_FILE)}")
        return TrainResult(run_dir=run_dir, result=rundir.read_result(run_dir, cfg.storage))
    if existing == "resume" and rundir.started(run_dir, cfg.storage):
        check_same_run(cfg, run_dir)
        log(f"resuming {cfg.name} from its latest checkpoint in {run_dir}")
    else:
        if storage.exists(run_dir, cfg.storage):
            if existing != "overwrite":
                raise DistillError(f"run directory {run_dir} already exists",
                                   "resume it (distill train --resume RUN_DIR), pick another name (--set name=...) "
                                   "or pass --overwrite to replace it")
            storage.remove_tree(run_dir, cfg.storage)
        rundir.write_config(run_dir, cfg.model_dump(mode="json"), cfg.storage)
    ensure_ray(address)
    cache = plan(ready.cache_uri, ready.manifest, ready.task, cfg.in_memory, cfg.num_workers, log, cfg.storage,
                 cfg.local_cache, cfg.local_cache_gb)
    per_epoch, total = step_budget(cfg, cache, units_per_row(cache, ready.task) if cfg.max_tokens else None)
    trainer = make_trainer(cfg, WorkerPlan(cfg, slim(ready.manifest), cache, total))
    log(f"training {cfg.name}: {cfg.student.factory} on cache {ready.manifest.cache_id} "
        f"({ready.manifest.rows_by_split['train']} train rows), {cfg.num_workers} workers ({cfg.parallel}, "
        f"{cfg.precision}), {total} steps of {cfg.batch_size} rows ({total / per_epoch:.3g} epochs)")
    started = time.time()
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; show the cause, not the wrappers
        raise DistillError(f"training {cfg.name} failed: {root_cause(e)}", "see the worker traceback above") from None
    out = result_record(cfg, ready, run_dir, result.checkpoint, result.metrics, time.time() - started)
    uri = rundir.write_result(run_dir, out, cfg.storage)
    log(f"{cfg.name}: {ready.task.summary(out.metrics)}  ({out.wall_s:.0f}s) -> {uri}")
    return TrainResult(run_dir=run_dir, result=out)


def check_same_run(cfg: TrainConfig, run_dir: str) -> None:
    """A run resumes only with the config it started with: another config would silently train a mix."""
    recorded = rundir.read_config(run_dir, cfg.storage)
    current = cfg.model_dump(mode="json")
    changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    if changed:
        raise DistillError(f"run directory {run_dir} holds a run started with another config (differs in "
                           f"{', '.join(changed[:5])})", "pick another name (--set name=...), or start it over "
                           "with --overwrite (distill submit: --force)")


def make_trainer(cfg: TrainConfig, worker_plan: WorkerPlan, callbacks: list | None = None):
    """The run's `TorchTrainer` over `worker_plan`; `callbacks` are Ray Train's (a sweep passes Tune's
    report callback)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    if storage.is_local(cfg.storage_path):
        storage_path, storage_fs = storage.local_path(cfg.storage_path), None
    else:  # a scheme-less path with the pipeline's own filesystem, so the endpoint override holds
        storage_fs, storage_path = storage.arrow_filesystem(cfg.storage_path, cfg.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={PLAN: worker_plan},
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


def result_record(cfg: TrainConfig, ready: Prepared, run_dir: str, checkpoint, metrics: dict | None,
                  wall: float) -> rundir.RunResult:
    """result.json from the run's latest checkpoint: the final metrics the task names, the history, the
    student's weights (written beside it; only the final checkpoint holds them) and the config."""
    task, manifest = ready.task, ready.manifest
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
        storage.write_bytes_atomic(weights_uri, buf.getvalue(), cfg.storage)
        exported = export_student(cfg, manifest, ready.cache_uri, student_state, storage.join(run_dir, rundir.HF_DIR))
    checkpoint_uri = None
    if checkpoint is not None:
        checkpoint_uri = (checkpoint.path if storage.is_local(cfg.storage_path)
                          else f"{cfg.storage_path.split('://', 1)[0]}://{checkpoint.path}")
    return rundir.RunResult(
        name=cfg.name or "run", task=task.name, cache=ready.cache_uri, cache_id=manifest.cache_id,
        student=cfg.student.factory, alpha=cfg.alpha, temperature=cfg.loss.temperature, loss_terms=cfg.loss.terms,
        seed=cfg.seed, epochs=final.get("epoch", 0), steps=final.get("step", 0), num_workers=cfg.num_workers,
        parallel=cfg.parallel, precision=cfg.precision,
        throughput={k: final.get(k) for k in (f"{task.unit}_per_s", "samples_per_s", "data_wait_seconds", "train_seconds")},
        memory_per_worker={k: final.get(k) for k in ("param_bytes", "optimizer_bytes")},
        metrics={**{k: final.get(k) for k in task.result_metrics},
                 **({"calibration": final["calibration"]} if final.get("calibration") else {})},
        weights=weights_uri if student_state is not None else None, hf_model=exported,
        workers_with_teacher=final.get("workers_with_teacher"), wall_s=round(wall, 2), history=history,
        checkpoint=checkpoint_uri, config=cfg.model_dump(mode="json"),
    )
