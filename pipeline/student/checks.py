"""Which cache stage 2 reads, and everything it checks in the driver before any worker starts."""

from __future__ import annotations

from pipeline import storage
from pipeline.cache.index import recorded_cache
from pipeline.cache.manifest import Manifest, read_manifest
from pipeline.cache.verify import check_files
from pipeline.config import TrainConfig, load_precompute_config
from pipeline.errors import DistillError
from pipeline.student.tasks import Task, task_for


def resolve_cache_uri(cfg: TrainConfig) -> str:
    """The `cache:` URI, or the cache the named precompute config last produced (from stage 1's
    record under its cache root: no weights are hashed and no data is read here)."""
    if cfg.cache:
        return cfg.cache
    pre = load_precompute_config(cfg.precompute)  # type: ignore[arg-type]
    saved = storage.options()
    if pre.storage.endpoint_url or pre.storage.region:  # where the precompute config's cache root is
        storage.configure(**pre.storage.model_dump())
    try:
        cache_id = recorded_cache(pre.cache_root, pre.recipe())
    finally:
        storage.configure(**saved)
    if cache_id is None:
        raise DistillError(f"no cache of precompute config {cfg.precompute} is recorded under {pre.cache_root}",
                           f"run `distill precompute {cfg.precompute}` first, or set `cache:` to a cache URI")
    return storage.join(pre.cache_root, cache_id)


def open_cache(cfg: TrainConfig, cache_uri: str) -> tuple[Manifest, Task]:
    """The cache's manifest and the task that trains this student on it, after every check a worker would fail."""
    manifest = read_manifest(cache_uri)
    problems = check_files(cache_uri, manifest)
    if problems:
        raise DistillError(f"cache {cache_uri} is damaged: {'; '.join(problems[:3])}",
                           "run `distill cache verify` for details, then recompute with --force")
    return manifest, check_student(cfg, manifest)


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
    storage.configure(**cfg.storage.model_dump())
    try:
        cache_uri = resolve_cache_uri(cfg)
    except DistillError as e:
        if cfg.precompute and "no cache of precompute config" in e.problem:
            return f"its cache is not computed yet: {e.fix}"
        raise
    storage.check_reachable(cache_uri, "cache")
    manifest, task = open_cache(cfg, cache_uri)
    return f"the {task.name} student fits cache {cache_uri} ({manifest.rows} rows, {manifest.num_classes} classes)"
