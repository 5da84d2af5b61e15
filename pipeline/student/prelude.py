"""The driver's prelude to stage 2, shared by `distill train`, `distill sweep` and `distill validate`:
which cache the config reads, and every check a worker would otherwise fail after start-up."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import storage
from pipeline.cache.index import recorded_cache
from pipeline.cache.manifest import Manifest, read_manifest
from pipeline.cache.verify import check_files
from pipeline.config import TrainConfig, load_precompute_config
from pipeline.errors import DistillError
from pipeline.student.tasks import Task, task_for

NOT_COMPUTED = "no cache of precompute config"  # the start of the error for a precompute not yet run


@dataclass(frozen=True)
class Prepared:
    """A checked cache and the task that trains the config's student on it."""

    cache_uri: str  # absolute for a local cache: workers read it from their own working directories
    manifest: Manifest
    task: Task


def resolve_cache_uri(cfg: TrainConfig) -> str:
    """The `cache:` URI, or the cache the named precompute config last produced (from stage 1's
    record under its cache root, read through that config's storage options: no weights are hashed
    and no data is read here)."""
    if cfg.cache:
        uri = cfg.cache
    else:
        pre = load_precompute_config(cfg.precompute)  # type: ignore[arg-type]
        cache_id = recorded_cache(pre.cache_root, pre.recipe(), pre.storage)
        if cache_id is None:
            raise DistillError(f"{NOT_COMPUTED} {cfg.precompute} is recorded under {pre.cache_root}",
                               f"run `distill precompute {cfg.precompute}` first, or set `cache:` to a cache URI")
        uri = storage.join(pre.cache_root, cache_id)
    return storage.local_path(uri) if storage.is_local(uri) else uri


def prepare(cfg: TrainConfig, storage_what: str | None = "run storage path") -> Prepared:
    """Every driver-side check of stage 2, in the order a user fixes them: the storage path is
    reachable (unless `storage_what` is None), the cache is found, reachable and whole, and the
    student fits it."""
    if storage_what:
        storage.check_reachable(cfg.storage_path, storage_what, cfg.storage)
    cache_uri = resolve_cache_uri(cfg)
    storage.check_reachable(cache_uri, "cache", cfg.storage)
    manifest = read_manifest(cache_uri, cfg.storage)
    problems = check_files(cache_uri, manifest, cfg.storage)
    if problems:
        raise DistillError(f"cache {cache_uri} is damaged: {'; '.join(problems[:3])}",
                           "run `distill cache verify` for details, then recompute with --force")
    return Prepared(cache_uri, manifest, check_student(cfg, manifest))


def check_student(cfg: TrainConfig, manifest: Manifest) -> Task:
    """The task that trains this student on the cache, after every config-against-cache check."""
    if manifest.rows_by_split.get("train", 0) == 0:
        raise DistillError(f"cache {manifest.cache_id} has no train rows", "check the source's split settings")
    task = task_for(cfg, manifest)
    if cfg.max_tokens and task.unit != "tokens":
        raise DistillError(f"max_tokens is a budget for token caches; cache {manifest.cache_id} is for a {task.name} student",
                           "use max_steps or epochs")
    task.check()
    if manifest.rows_by_split["train"] < cfg.batch_size:
        raise DistillError(f"cache {manifest.cache_id} has {manifest.rows_by_split['train']} train rows, fewer than one "
                           f"batch of {cfg.batch_size}", "lower batch_size")
    return task


def validate_train(cfg: TrainConfig) -> str:
    """Every check stage 2 makes in the driver (`distill validate`), when the cache exists. Returns a summary."""
    from pipeline.models.factory import resolve_factory

    resolve_factory(cfg.student.factory)
    try:
        ready = prepare(cfg, storage_what=None)
    except DistillError as e:
        if cfg.precompute and e.problem.startswith(NOT_COMPUTED):
            return f"its cache is not computed yet: {e.fix}"
        raise
    return (f"the {ready.task.name} student fits cache {ready.cache_uri} ({ready.manifest.rows} rows, "
            f"{ready.manifest.num_classes} classes)")
