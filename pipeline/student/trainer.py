"""Stage 2: Ray Train over the teacher cache. No teacher is ever built or imported here.

The driver checks the cache against the student config, then `TorchTrainer` runs
`train_loop_per_worker` on N workers, each streaming its split of the train shards.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from pipeline.cache import storage
from pipeline.cache.manifest import Manifest, read_manifest
from pipeline.cache.schema import LABEL, LOGITS, X
from pipeline.cache.verify import check_files
from pipeline.config import TrainConfig, load_precompute_config
from pipeline.errors import DistillError
from pipeline.models.factory import BUILT_IN_THIS_PROCESS, LOADED_IN_THIS_PROCESS, build_model, output_width
from pipeline.progress import Throttle, progress_line
from pipeline.runtime import ensure_ray, quiet_data_context
from pipeline.student.loop import evaluate, make_optimizer, train_epoch
from pipeline.student.losses import DistillationLoss, LossInputs
from pipeline.student.model import build_student, loss_inputs
from pipeline.student.token_task import (
    TokenDistillationLoss,
    check_token_loss,
    evaluate_tokens,
    is_token_cache,
    token_columns,
    token_dtypes,
)

CHECKPOINT_FILE = "state.pt"
RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"
STUDENT_FILE = "student.pt"  # the trained student's state dict, written when the run finishes
logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: str
    result: dict[str, Any]


def resolve_cache_uri(cfg: TrainConfig) -> str:
    if cfg.cache:
        return cfg.cache
    from pipeline.cache.identity import resolve_target

    return resolve_target(load_precompute_config(cfg.precompute)).uri  # type: ignore[arg-type]


def check_against_cache(cfg: TrainConfig, manifest: Manifest, cache_uri: str) -> LossInputs:
    """Every mismatch a worker would hit, raised in the driver before any worker starts."""
    problems = check_files(cache_uri, manifest)
    if problems:
        raise DistillError(f"cache {cache_uri} is damaged: {'; '.join(problems[:3])}",
                           "run `distill cache verify` for details, then recompute with --force")
    for split in ("train", "val"):
        if manifest.rows_by_split.get(split, 0) == 0:
            raise DistillError(f"cache {manifest.cache_id} has no {split} rows", "check the source's split settings")
    if is_token_cache(manifest):
        check_token_loss(cfg.loss, manifest)
        student = build_model(cfg.student, input_shape=tuple(manifest.input_shape), num_classes=manifest.num_classes)
        try:
            width = output_width(student, tuple(manifest.input_shape))
        except (RuntimeError, ValueError, IndexError) as e:
            raise DistillError(f"student {cfg.student.factory} cannot read the cache's windows of {manifest.input_shape[0]} tokens: "
                               f"{str(e).splitlines()[0]}", "fix the student's kwargs (max_len, vocabulary)") from None
        if width != manifest.num_classes:
            raise DistillError(f"student {cfg.student.factory} has a vocabulary of {width}, cache {manifest.cache_id} of "
                               f"{manifest.num_classes} (tokenizer {manifest.dataset.get('tokenizer', {}).get('digest')})",
                               f"build the student with num_classes={manifest.num_classes}, the cache's tokenizer.json")
        return LossInputs()
    inputs = loss_inputs(cfg.loss, manifest)
    missing = sorted({c for c in _columns(inputs) if c not in manifest.columns})
    if missing:
        raise DistillError(f"the loss needs cache column(s) {missing}, which cache {manifest.cache_id} lacks",
                           "drop the term or precompute a cache with that output")
    try:
        student = build_student(cfg.student, manifest, cfg.loss, inputs)
        width = output_width(student.net, tuple(manifest.input_shape))
    except RuntimeError as e:
        raise DistillError(f"student {cfg.student.factory} cannot take the cache's inputs of shape {manifest.input_shape}: "
                           f"{str(e).splitlines()[0]}", "fix the student's kwargs") from None
    if width != manifest.num_classes:
        raise DistillError(f"student {cfg.student.factory} predicts {width} classes, the cache has {manifest.num_classes}",
                           f"build the student with num_classes={manifest.num_classes} (or train on a matching cache)")
    return inputs


def _columns(inputs: LossInputs) -> list[str]:
    """What stage 2 reads: inputs, label, the primary teacher's logits (for evaluation) and what the terms use."""
    cols = [X, LABEL, LOGITS, *inputs.logits, *(c for _, c in inputs.hint), *(a[1] for a in inputs.attention)]
    if inputs.rkd:
        cols.append(inputs.rkd[1])
    return list(dict.fromkeys(cols))


def batch_dtypes(columns: list[str]) -> dict[str, torch.dtype]:
    return {c: torch.int64 if c == LABEL else torch.float32 for c in columns}


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


def _save_checkpoint(directory: str, model: torch.nn.Module, optimizer, epoch: int, history: list[dict]) -> None:
    raw = model.module if hasattr(model, "module") else model
    # "student" is the bare network (no adapters): what a later stage loads, e.g. as a born-again teacher.
    torch.save({"model": raw.state_dict(), "student": getattr(raw, "net", raw).state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "history": history}, os.path.join(directory, CHECKPOINT_FILE))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = TrainConfig.model_validate(config["train"])
    try:  # Ray Train logs every report, the whole metrics dict, at INFO; the epoch line below says it in one line
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    manifest = Manifest.model_validate(config["manifest"])
    tokens = is_token_cache(manifest)
    if tokens:
        model = build_model(cfg.student, input_shape=tuple(manifest.input_shape), num_classes=manifest.num_classes)
        loss_fn: Any = TokenDistillationLoss(cfg.loss.terms, cfg.loss.temperature, manifest.outputs["logits"], cfg.loss.topk_tail)
        dtypes = token_dtypes(token_columns(manifest))
        inputs_of = loss_fn.inputs
    else:
        inputs = loss_inputs(cfg.loss, manifest)
        model = build_student(cfg.student, manifest, cfg.loss, inputs)  # adapters are parameters too
        loss_fn = DistillationLoss(cfg.loss.terms, cfg.loss.temperature, inputs)
        dtypes = batch_dtypes(_columns(inputs))
        inputs_of = None
    ddp_model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(ddp_model.parameters(), cfg.optimizer.name, cfg.optimizer.lr,
                               cfg.optimizer.weight_decay, cfg.optimizer.momentum)

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
        (ddp_model.module if hasattr(ddp_model, "module") else ddp_model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
    resumed_from = start_epoch

    # Checked inside the worker: how many workers show any sign of a teacher.
    evidence = teacher_evidence(config.get("teacher_factory"), config.get("teacher_weights"))
    flag = torch.tensor([1.0 if evidence else 0.0])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag)
    workers_with_teacher = int(flag.item())

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    per_worker_batch = max(1, cfg.batch_size // world)
    steps_per_epoch = math.ceil(config.get("train_rows", 0) / world / per_worker_batch)
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
        stats = train_epoch(ddp_model, timed(batches, waited), loss_fn, optimizer, inputs_of, on_step)
        train_s = time.time() - started
        val_batches = val_shard.iter_torch_batches(batch_size=64 if tokens else 1024, dtypes=dtypes)
        evaluated = (evaluate_tokens(ddp_model, val_batches, manifest.outputs["logits"]["mode"]) if tokens
                     else evaluate(ddp_model, val_batches, cfg.loss.temperature))
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
                _save_checkpoint(d, ddp_model, optimizer, epoch + 1, history)
                if evidence:
                    metrics["teacher_evidence"] = "; ".join(evidence)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)
        if rank == 0:  # through logging: Ray Train would print() twice (stdout and its console handler)
            logger.info(f"epoch {epoch + 1}/{cfg.epochs}  loss {stats.get('train_loss', float('nan')):.4f}  "
                  f"val_accuracy {evaluated['val_accuracy']:.4f}  agreement {evaluated['val_agreement']:.4f}  "
                  f"({train_s:.1f}s train of which {waited[0]:.1f}s waiting for data, {metrics['eval_seconds']:.1f}s eval, "
                  f"{time.time() - started:.1f}s epoch)")


def _cache_dataset(cache_uri: str, manifest: Manifest, split: str, columns: list[str]):
    import ray

    fs, root = storage.arrow_filesystem(cache_uri)
    paths = [f"{root}/{s.path}" for s in manifest.shards_of(split)]
    return ray.data.read_parquet(paths, filesystem=fs, shuffle="files" if split == "train" else None).select_columns(columns)


IN_MEMORY_SHARE = 0.2  # of the cluster's object store memory, for in_memory: auto


def in_memory_bytes(cache_uri: str, manifest: Manifest, columns: list[str]) -> int:
    """Decoded size of `columns` over every row, from the first rows of one shard."""
    import pyarrow.parquet as pq

    fs, root = storage.arrow_filesystem(cache_uri)
    with fs.open_input_file(f"{root}/{manifest.shards[0].path}") as f:
        batch = next(pq.ParquetFile(f).iter_batches(batch_size=256, columns=columns))
    return int(batch.nbytes / max(batch.num_rows, 1) * manifest.rows)


def _load_datasets(cfg: TrainConfig, cache_uri: str, manifest: Manifest, columns: list[str], log) -> dict:
    """Both splits as Ray Datasets; materialised once in the object store when they fit (see
    TrainConfig.in_memory): a small cache then costs one read instead of one per epoch."""
    import ray

    datasets = {split: _cache_dataset(cache_uri, manifest, split, columns) for split in ("train", "val")}
    in_memory = cfg.in_memory
    if in_memory is None:
        need = in_memory_bytes(cache_uri, manifest, columns)
        budget = IN_MEMORY_SHARE * ray.cluster_resources().get("object_store_memory", 0)
        in_memory = need <= budget
        if in_memory:
            log(f"reading the cache into the object store once ({need / 1e6:.0f} MB of {budget / 1e6:.0f} MB allowed; "
                "in_memory: false streams it every epoch instead)")
    if in_memory:
        started = time.time()
        datasets = {split: ds.materialize() for split, ds in datasets.items()}
        log(f"cache in memory in {time.time() - started:.1f}s")
    return datasets


def timed(batches: Iterable[Any], waited: list[float]) -> Iterator[Any]:
    """Yields the batches, adding the seconds spent waiting for each to waited[0]: the share of
    an epoch the student spent waiting on data rather than computing."""
    it, end = iter(batches), object()
    while True:
        started = time.perf_counter()
        batch = next(it, end)
        waited[0] += time.perf_counter() - started
        if batch is end:
            return
        yield batch


def _run_storage(path: str):
    """Ray Train's (storage_path, storage_filesystem): a local absolute path, or a scheme-less
    path with the same filesystem the rest of the pipeline uses (so the endpoint override holds)."""
    if storage.is_local(path):
        return storage.local_path(path), None
    fs, scheme_less = storage.arrow_filesystem(path)
    return scheme_less, fs


def load_run_config(run_dir: str) -> TrainConfig:
    """The config a run was started with (written before its first epoch), for `--resume`."""
    uri = storage.join(run_dir, CONFIG_FILE)
    if not storage.exists(uri):
        raise DistillError(f"{run_dir} is not a run directory (no {CONFIG_FILE})",
                           "pass the directory `distill train` created: <storage_path>/<name>")
    return TrainConfig.model_validate(json.loads(storage.read_bytes(uri)))


def run_train(cfg: TrainConfig, *, address: str | None = None, overwrite: bool = False, resume: bool = False,
              log=print) -> TrainResult:
    """Train one student from the cache; writes checkpoints and `result.json` under storage_path/name.

    With `resume`, an interrupted run continues from its latest checkpoint (Ray Train restores
    a run started again with the same name and storage path).
    """
    storage.configure(**cfg.storage.model_dump())
    storage.check_reachable(cfg.storage_path, "run storage path")
    cache_uri = resolve_cache_uri(cfg)
    storage.check_reachable(cache_uri, "cache")
    manifest = read_manifest(cache_uri)
    inputs = check_against_cache(cfg, manifest, cache_uri)
    run_dir = storage.join(cfg.storage_path if not storage.is_local(cfg.storage_path)
                           else storage.local_path(cfg.storage_path), cfg.name or "run")
    if resume:
        if storage.exists(storage.join(run_dir, RESULT_FILE)):
            log(f"{cfg.name} already finished: {storage.join(run_dir, RESULT_FILE)}")
            return TrainResult(run_dir=run_dir, result=json.loads(storage.read_bytes(storage.join(run_dir, RESULT_FILE))))
        log(f"resuming {cfg.name} from its latest checkpoint in {run_dir}")
    elif storage.exists(run_dir):
        if not overwrite:
            raise DistillError(f"run directory {run_dir} already exists",
                               "resume it (distill train --resume RUN_DIR), pick another name (--set name=...) "
                               "or pass --overwrite to replace it")
        storage.remove_tree(run_dir)
    if not resume:
        storage.write_bytes_atomic(storage.join(run_dir, CONFIG_FILE), (json.dumps(cfg.model_dump(), indent=2) + "\n").encode())
    ensure_ray(address)

    import ray.train
    from ray.train.torch import TorchTrainer

    run_storage_path, run_storage_fs = _run_storage(cfg.storage_path)
    with quiet_data_context():
        columns = token_columns(manifest) if is_token_cache(manifest) else _columns(inputs)
        datasets = _load_datasets(cfg, cache_uri, manifest, columns, log)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(),
            "manifest": manifest.model_copy(update={"shards": [], "config": {}}).model_dump(),
            "teacher_factory": manifest.teacher.get("factory"),
            "teacher_weights": manifest.teacher.get("weights"),
            "train_rows": manifest.rows_by_split["train"],
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.gpus_per_worker > 0,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})},
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=run_storage_path,
            storage_filesystem=run_storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # A lost worker restarts the worker group from the latest registered checkpoint.
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # Ray Train logs every report at INFO; rank 0 prints one line per epoch instead.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    log(f"training {cfg.name}: {cfg.student.factory} on cache {manifest.cache_id} "
        f"({manifest.rows_by_split['train']} train rows), {cfg.num_workers} workers, {cfg.epochs} epochs")
    started = time.time()
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; show the cause, not the wrapper
        raise DistillError(f"training {cfg.name} failed: {type(e).__name__}: {str(e).strip().splitlines()[-1]}",
                           "see the worker traceback above") from None
    wall = time.time() - started
    history, student_state = _history_of(result)
    final = history[-1] if history else dict(result.metrics or {})
    weights_uri = storage.join(run_dir, STUDENT_FILE)
    if student_state is not None:  # the bare student, loadable by its factory (e.g. as the next generation's teacher)
        buf = io.BytesIO()
        torch.save(student_state, buf)
        storage.write_bytes_atomic(weights_uri, buf.getvalue())
    out = {
        "name": cfg.name,
        "cache": storage.local_path(cache_uri) if storage.is_local(cache_uri) else cache_uri,  # usable from any cwd
        "cache_id": manifest.cache_id,
        "student": cfg.student.factory,
        "alpha": cfg.alpha,
        "temperature": cfg.loss.temperature,
        "loss_terms": cfg.loss.terms,
        "seed": cfg.seed,
        "epochs": int(final.get("epoch", 0)),
        "num_workers": cfg.num_workers,
        "metrics": {
            "val_accuracy": final.get("val_accuracy"),
            "val_agreement": final.get("val_agreement"),
            "val_kl": final.get("val_kl"),
            "teacher_val_accuracy": final.get("teacher_val_accuracy"),
            "calibration": final.get("calibration"),
            **({"val_perplexity": final["val_perplexity"]} if "val_perplexity" in final else {}),
        },
        "weights": weights_uri if student_state is not None else None,
        "workers_with_teacher": final.get("workers_with_teacher"),
        "wall_s": round(wall, 2),
        "history": history,
        "checkpoint": _checkpoint_uri(result.checkpoint, cfg.storage_path),
        "config": cfg.model_dump(),
    }
    storage.write_bytes_atomic(storage.join(run_dir, RESULT_FILE), (json.dumps(out, indent=2) + "\n").encode())
    m = out["metrics"]
    ppl = f"perplexity {m['val_perplexity']:.2f}  " if "val_perplexity" in m else ""
    log(f"{cfg.name}: {ppl}val_accuracy {m['val_accuracy']:.4f}  agreement {m['val_agreement']:.4f}  "
        f"kl {m['val_kl']:.4f}  ({wall:.0f}s) -> {storage.join(run_dir, RESULT_FILE)}")
    return TrainResult(run_dir=run_dir, result=out)


def _checkpoint_uri(checkpoint, storage_path: str) -> str | None:
    if checkpoint is None:
        return None
    if storage.is_local(storage_path):
        return checkpoint.path
    return f"{storage_path.split('://', 1)[0]}://{checkpoint.path}"


def _history_of(result) -> tuple[list[dict[str, Any]], dict | None]:
    """The per-epoch metrics and the bare student's state dict from the final checkpoint."""
    if not result.checkpoint:
        return [], None
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
    return state["history"], state.get("student")
