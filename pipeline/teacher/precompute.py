"""Stage 1: find the cache a precompute config produces, or run the teacher once and publish it.

Under the cache's lock: source rows staged as Parquet -> read -> actor pool running the teachers
-> Parquet shards, checkpointed by sample_id so an interrupted run resumes -> publish (checksums,
manifest written last).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline import storage
from pipeline.cache.index import record_cache
from pipeline.cache.lock import CacheLock
from pipeline.cache.manifest import Manifest, PrecomputeStats, manifest_uri, read_manifest
from pipeline.cache.schema import LOGITS, SHARDS_DIR, SPLIT, X
from pipeline.config import PrecomputeConfig
from pipeline.errors import DistillError
from pipeline.models.factory import resolve_factory
from pipeline.progress import every, progress_line
from pipeline.runtime import actor_nodes, ensure_ray, map_worker_class_name, root_cause
from pipeline.teacher.checks import check_source_values, check_teachers
from pipeline.teacher.identity import CacheTarget, resolve_target
from pipeline.teacher.predictor import TeacherPredictor
from pipeline.teacher.publish import publish
from pipeline.teacher.resume import checkpointing, clear_attempts, committed_rows
from pipeline.teacher.sizing import check_token_outputs, token_cache_line
from pipeline.teacher.staging import stage_source
from pipeline.teacher.writer import SHARD_COMPRESSION, ShardNames

Log = Callable[[str], None]


@dataclass
class PrecomputeResult:
    uri: str
    hit: bool
    rows_computed: int  # rows the teacher ran on in this call (0 on a cache hit)
    manifest: Manifest


def run_precompute(cfg: PrecomputeConfig, *, force: bool = False, address: str | None = None,
                   log: Log = print) -> PrecomputeResult:
    """Compute (or find) the cache for `cfg`. A second call with the same content inputs does no teacher work."""
    cfg = cfg.with_absolute_paths()  # relative to this driver's directory: actors on a cluster run elsewhere
    for teacher in cfg.all_teachers.values():  # fail on a typo before hashing weights or starting Ray
        resolve_factory(teacher.factory)
    opts = cfg.storage
    storage.check_reachable(cfg.cache_root, "cache root", opts)
    target = resolve_target(cfg)

    def published() -> bool:
        return storage.exists(manifest_uri(target.uri), opts)

    if not force and published():
        log(f"cache hit: {target.uri}")
        return _hit(cfg, target, log)
    check_token_outputs(cfg, target.source)
    check_source_values(cfg)
    check_teachers(cfg, target.source)
    size = token_cache_line(cfg, target.source)
    if size:
        log(size)
    for name, teacher in cfg.all_teachers.items():
        if teacher.weights is None:
            log(f"warning: teacher {name!r} has no `weights`; its outputs come from random initialisation")
    lock = CacheLock(target.uri, opts)
    try:
        if not lock.acquire_unless(lambda: not force and published(), log):
            log(f"cache hit: {target.uri} (published by another run while this one waited)")
            return _hit(cfg, target, log)
        try:
            if not force and published():
                log(f"cache hit: {target.uri} (published by another run while this one waited)")
                return _hit(cfg, target, log)
            return _compute(cfg, target, force=force, address=address, log=log)
        finally:
            lock.release()
    except (PermissionError, OSError) as e:  # a permanent storage error that outlived the retries
        raise DistillError(f"storage error while writing {target.uri}: {type(e).__name__}: {e}",
                           "check the bucket's permissions and health; nothing was published, "
                           "run again to resume") from None


def _hit(cfg: PrecomputeConfig, target: CacheTarget, log: Log) -> PrecomputeResult:
    try:  # caches published before config records existed get one; a hit must still work on a read-only root
        record_cache(cfg.cache_root, cfg.recipe(), target.cache_id, cfg.storage)
    except OSError as e:
        log(f"warning: could not record this config under {cfg.cache_root} ({type(e).__name__}); "
            f"train configs naming it must use `cache: {target.uri}`")
    return PrecomputeResult(uri=target.uri, hit=True, rows_computed=0, manifest=read_manifest(target.uri, cfg.storage))


def _compute(cfg: PrecomputeConfig, target: CacheTarget, *, force: bool, address: str | None, log: Log) -> PrecomputeResult:
    """The teacher pass, under the cache's lock."""
    rows_total = sum(target.source.rows.values())
    opts = cfg.storage
    if force:
        clear_attempts(target.uri, opts)
    ensure_ray(address)

    import ray

    # An earlier attempt that did not finish left committed rows and a checkpoint: resume it.
    skipped = committed_rows(target.uri, opts)
    if skipped:
        log(f"resuming {target.uri}: {skipped} of {rows_total} rows are already done")
    else:
        log(f"cache miss: computing {target.uri} ({rows_total} rows)")
    source_uri, source_files = stage_source(cfg, target.rows, target.uri)
    fs, shards_path = storage.arrow_filesystem(storage.join(target.uri, SHARDS_DIR), opts)
    src_fs, src_path = storage.arrow_filesystem(source_uri, opts)
    started = time.time()
    todo = rows_total - skipped

    def report() -> None:  # rows committed (what a restart would keep), rows/s and ETA; also in `ray job logs`
        done = max(0, committed_rows(target.uri, opts) - skipped)
        log(progress_line("precompute", min(done, todo), todo, time.time() - started))

    with checkpointing(target.uri, opts):
        ds = ray.data.read_parquet(src_path, filesystem=src_fs, override_num_blocks=max(source_files, 1)).map_batches(
            TeacherPredictor,
            fn_constructor_kwargs=_predictor_kwargs(cfg, target),
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor,
            resources=cfg.actor_resources or None,
        )
        try:
            with every(5.0, report):  # one pass over all rows; the split becomes the directory (shards/split=train/...)
                ds.write_parquet(shards_path, filesystem=fs, partition_cols=[SPLIT], filename_provider=ShardNames(),
                                 max_rows_per_file=cfg.rows_per_shard, compression=SHARD_COMPRESSION)
        except Exception as e:
            raise DistillError(f"the teacher stage failed: {root_cause(e)}",
                               "nothing was published; run again to resume (with -v for Ray's own logs)") from None
    wall = time.time() - started
    stats = PrecomputeStats(wall_s=round(wall, 3), rows_per_s=round(todo / max(wall, 1e-9), 1),
                            devices="cuda" if cfg.gpus_per_actor > 0 else "cpu", num_actors=cfg.num_actors,
                            ray_job_id=ray.get_runtime_context().get_job_id(),
                            teacher_nodes=actor_nodes(map_worker_class_name(TeacherPredictor)),
                            rows_computed=todo, rows_resumed=skipped, fraction_computed=round(todo / max(rows_total, 1), 4))
    manifest = publish(cfg, target, stats)
    storage.remove_tree(source_uri, opts)
    log(f"wrote {manifest.rows} rows in {len(manifest.shards)} shards ({manifest.bytes / 1e6:.1f} MB) "
        f"in {wall:.1f}s, {todo / max(wall, 1e-9):.0f} rows/s: {target.uri}")
    return PrecomputeResult(uri=target.uri, hit=False, rows_computed=todo, manifest=manifest)


def _predictor_kwargs(cfg: PrecomputeConfig, target: CacheTarget) -> dict:
    return {
        "teachers": {name: t.model_dump(exclude={"fit"}) for name, t in cfg.all_teachers.items()},
        "input_shape": target.source.input_shape,
        "input_scale": target.source.input_scale,
        "views": cfg.outputs.views.model_dump() if cfg.outputs.views else None,
        "num_classes": target.source.num_classes,
        "taps": [t.model_dump() for t in cfg.outputs.taps],
        "logits_spec": cfg.outputs.logits.model_dump(),
        "use_gpu": cfg.gpus_per_actor > 0,
        "threads": max(1, int(cfg.cpus_per_actor)) if cfg.gpus_per_actor == 0 else None,
        "storage_options": cfg.storage,
    }


def teacher_logits_for(cfg: PrecomputeConfig, x: np.ndarray) -> np.ndarray:
    """The teacher's float32 logits on `x` as models read it (decoded, as `load_split` gives it), in this
    process (for checks and tests, not the pipeline)."""
    target = resolve_target(cfg)
    kwargs = _predictor_kwargs(cfg, target) | {"logits_spec": {"mode": "full", "dtype": "float32"}, "taps": [], "input_scale": 1.0,
                                               "views": None}  # the whole image
    return TeacherPredictor(**kwargs)({X: x})[LOGITS]
