"""Stage 1: the Ray Data plan that runs the teacher once and publishes the cache.

Under the cache's lock: source rows staged as Parquet -> read -> actor pool running the
teacher -> Parquet shards, checkpointed by sample_id so an interrupted run resumes ->
checksums -> manifest, written last.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache import storage
from pipeline.cache.identity import CacheTarget, resolve_target
from pipeline.cache.lock import CacheLock
from pipeline.cache.manifest import Manifest, ShardEntry, manifest_uri, read_manifest, write_manifest
from pipeline.cache.schema import (
    CHECKPOINT_DIR,
    LOGITS,
    LOGITS_FIELDS,
    SAMPLE_ID,
    SHARDS_DIR,
    SOURCE_DIR,
    SPLIT,
    TOKEN_MODE_COLUMNS,
    TOKENIZER_FILE,
    X,
    logits_column,
    tap_column,
)
from pipeline.cache.verify import inspect_shard, list_shard_files, split_of_shard
from pipeline.config import PRIMARY_TEACHER, PrecomputeConfig
from pipeline.data.sources import SPLITS, load_split, standardize_parquet_batch
from pipeline.errors import DistillError
from pipeline.models.factory import resolve_factory
from pipeline.progress import progress_line
from pipeline.runtime import ensure_ray
from pipeline.teacher.inference import TeacherPredictor
from pipeline.teacher.writer import ShardNames


@dataclass
class PrecomputeResult:
    uri: str
    hit: bool
    rows_computed: int  # rows the teacher ran on in this call (0 on a cache hit)
    manifest: Manifest


def _stage_source(cfg: PrecomputeConfig, cache_uri: str) -> tuple[str, int]:
    """Stage all source rows (standard columns plus `split`) as Parquet beside the cache.

    Ray Data checkpoints only plans that start with a Read, so built-in (in-memory) sources are
    written out once; a user's table is standardised once. Returns (uri, number of files).
    """
    import ray

    uri = storage.join(cache_uri, SOURCE_DIR)
    marker = storage.join(uri, "_SUCCESS")
    fs, path = storage.arrow_filesystem(uri)
    if not storage.exists(marker):
        storage.remove_tree(uri)
        if cfg.source.kind == "parquet":
            src_fs, src_path = storage.arrow_filesystem(cfg.source.uri or "")
            ray.data.read_parquet(src_path, filesystem=src_fs).map_batches(
                standardize_parquet_batch, fn_kwargs={"cfg": cfg.source}, batch_format="numpy"
            ).write_parquet(path, filesystem=fs)
        else:
            fs.create_dir(path)
            for split in SPLITS:
                cols = load_split(cfg.source, split)
                n = len(cols[SAMPLE_ID])
                # Several files, so that more than one teacher actor has work, progress is visible
                # and a resumed run loses at most a file's worth of rows.
                step = max(cfg.batch_size, math.ceil(n / (4 * cfg.num_actors)))
                for i in range(0, n, step):
                    part = {name: _arrow_column(values[i:i + step]) for name, values in cols.items()}
                    part[SPLIT] = pa.array([split] * len(part[SAMPLE_ID]), pa.string())
                    pq.write_table(pa.table(part), f"{path}/{split}-{i // step:05d}.parquet", filesystem=fs)
        storage.write_bytes_atomic(marker, b"")
    listing_fs, listing_path = storage.filesystem(uri)
    return uri, len([p for p in listing_fs.find(listing_path) if p.endswith(".parquet")])


def _arrow_column(values: np.ndarray):
    """Ids as strings, per-row arrays as Ray's tensor columns, scalars as they are."""
    from ray.data.extensions import ArrowTensorArray

    if values.dtype == object:
        return pa.array(values.tolist(), pa.string())
    if values.ndim > 1:
        return ArrowTensorArray.from_numpy(values)
    return pa.array(values)


@contextmanager
def _checkpointing(cache_uri: str):
    """Ray Data checkpointing keyed by sample_id for datasets built inside the block."""
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    fs, path = storage.arrow_filesystem(storage.join(cache_uri, CHECKPOINT_DIR))
    ctx = ray.data.DataContext.get_current()
    saved = ctx.checkpoint_config
    ctx.checkpoint_config = CheckpointConfig(id_column=SAMPLE_ID, checkpoint_path=path, override_filesystem=fs,
                                             delete_checkpoint_on_success=True)
    try:
        yield
    finally:
        ctx.checkpoint_config = saved


@contextmanager
def _progress(cache_uri: str, skipped: int, todo: int, log, every: float = 5.0):
    """While the pass runs, a line every `every` seconds: rows committed (Ray Data's checkpoint,
    so what a restart would keep), rows/s and ETA. In the driver's stdout, so also in `ray job logs`."""
    stop = threading.Event()
    started = time.time()

    def report() -> None:
        while not stop.wait(every):
            try:
                done = max(0, committed_rows(cache_uri) - skipped)
            except OSError:  # a listing racing a commit; try again next tick
                continue
            log(progress_line("precompute", min(done, todo), todo, time.time() - started))

    thread = threading.Thread(target=report, name="precompute-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every)


def committed_rows(cache_uri: str) -> int:
    """Rows an earlier, interrupted attempt committed (Ray Data skips them on resume)."""
    fs, path = storage.filesystem(storage.join(cache_uri, CHECKPOINT_DIR))
    if not fs.exists(path):
        return 0
    total = 0
    for f in fs.find(path):
        if f.endswith(".parquet") and not f.endswith(".pending.parquet"):
            with fs.open(f, "rb") as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
    return total


def _clear(uri: str) -> None:
    """Remove every trace of earlier attempts. The manifest goes first, so no reader sees a
    complete cache while the shards change."""
    storage.remove_file(manifest_uri(uri))
    for sub in (SHARDS_DIR, SOURCE_DIR, CHECKPOINT_DIR):
        storage.remove_tree(storage.join(uri, sub))


def run_precompute(cfg: PrecomputeConfig, *, force: bool = False, address: str | None = None,
                   log=print) -> PrecomputeResult:
    """Compute (or find) the cache for `cfg`. A second call with the same content inputs does no teacher work."""
    for teacher in cfg.all_teachers.values():  # fail on a typo before hashing weights or starting Ray
        resolve_factory(teacher.factory)
    storage.configure(**cfg.storage.model_dump())
    storage.check_reachable(cfg.cache_root, "cache root")
    target = resolve_target(cfg)
    if not force and storage.exists(manifest_uri(target.uri)):
        log(f"cache hit: {target.uri}")
        return PrecomputeResult(uri=target.uri, hit=True, rows_computed=0, manifest=read_manifest(target.uri))
    _check_taps(cfg, target)
    for name, teacher in cfg.all_teachers.items():
        if teacher.weights is None:
            log(f"warning: teacher {name!r} has no `weights`; its outputs come from random initialisation")
    try:
        return _under_lock(cfg, target, force=force, address=address, log=log)
    except (PermissionError, OSError) as e:  # a permanent storage error that outlived the retries
        raise DistillError(f"storage error while writing {target.uri}: {type(e).__name__}: {e}",
                           "check the bucket's permissions and health; nothing was published, "
                           "run again to resume") from None


def _under_lock(cfg: PrecomputeConfig, target: CacheTarget, *, force: bool, address: str | None, log) -> PrecomputeResult:
    """Take the cache's lock (waiting for another run, or taking over a stale lock), then compute."""
    lock = CacheLock(target.uri)
    waiting = False
    while not lock.try_acquire():
        if not force and storage.exists(manifest_uri(target.uri)):
            log(f"cache hit: {target.uri} (published by another run while this one waited)")
            return PrecomputeResult(uri=target.uri, hit=True, rows_computed=0, manifest=read_manifest(target.uri))
        record = lock.holder()
        if record and CacheLock.is_stale(record):
            log(f"taking over the stale lock of {record.get('owner')} (no heartbeat for {CacheLock.stale_hint()})")
            lock.break_stale()
        elif record and not waiting:
            log(f"waiting: another precompute of this cache is running ({record.get('owner')})")
            waiting = True
        time.sleep(1.0)
    try:
        if not force and storage.exists(manifest_uri(target.uri)):
            log(f"cache hit: {target.uri} (published by another run while this one waited)")
            return PrecomputeResult(uri=target.uri, hit=True, rows_computed=0, manifest=read_manifest(target.uri))
        return _compute(cfg, target, force=force, address=address, log=log)
    finally:
        lock.release()


def _compute(cfg: PrecomputeConfig, target: CacheTarget, *, force: bool, address: str | None, log) -> PrecomputeResult:
    """The teacher pass, under the cache's lock."""
    rows_total = sum(target.source.rows.values())
    if force:
        _clear(target.uri)
    ensure_ray(address)

    import ray

    # An earlier attempt that did not finish left committed rows and a checkpoint: resume it.
    skipped = committed_rows(target.uri)
    if skipped:
        log(f"resuming {target.uri}: {skipped} of {rows_total} rows are already done")
    else:
        log(f"cache miss: computing {target.uri} ({rows_total} rows)")
    source_uri, source_files = _stage_source(cfg, target.uri)
    shards_uri = storage.join(target.uri, SHARDS_DIR)
    fs, shards_path = storage.arrow_filesystem(shards_uri)
    src_fs, src_path = storage.arrow_filesystem(source_uri)
    started = time.time()
    with _checkpointing(target.uri):
        ds = ray.data.read_parquet(src_path, filesystem=src_fs, override_num_blocks=max(source_files, 1)).map_batches(
            TeacherPredictor,
            fn_constructor_kwargs={
                "teachers": _teacher_specs(cfg),
                "input_shape": target.source.input_shape,
                "num_classes": target.source.num_classes,
                "logits_dtype": cfg.outputs.logits.dtype,
                "taps": [t.model_dump() for t in cfg.outputs.taps],
                "logits_spec": cfg.outputs.logits.model_dump(),
                "use_gpu": cfg.gpus_per_actor > 0,
                "threads": max(1, int(cfg.cpus_per_actor)) if cfg.gpus_per_actor == 0 else None,
                "storage_options": storage.options(),
            },
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor,
            resources=cfg.actor_resources or None,
        )
        try:
            # One pass over all rows; the split becomes the directory (shards/split=train/...).
            with _progress(target.uri, skipped, rows_total - skipped, log):
                ds.write_parquet(shards_path, filesystem=fs, partition_cols=[SPLIT], filename_provider=ShardNames(),
                                 max_rows_per_file=cfg.rows_per_shard)
        except Exception as e:
            raise DistillError(f"the teacher stage failed: {_root_cause(e)}",
                               "see the Ray logs above; nothing was published, run again to resume") from None
    wall = time.time() - started
    computed = rows_total - skipped
    manifest = _publish(cfg, target, wall, {"rows_computed": computed, "rows_resumed": skipped,
                                            "fraction_computed": round(computed / max(rows_total, 1), 4)})
    storage.remove_tree(source_uri)
    log(f"wrote {manifest.rows} rows in {len(manifest.shards)} shards ({manifest.bytes / 1e6:.1f} MB) "
        f"in {wall:.1f}s, {computed / max(wall, 1e-9):.0f} rows/s: {target.uri}")
    return PrecomputeResult(uri=target.uri, hit=False, rows_computed=computed, manifest=manifest)


def _teacher_specs(cfg: PrecomputeConfig) -> dict[str, dict]:
    return {name: t.model_dump(exclude={"fit"}) for name, t in cfg.all_teachers.items()}


def _check_taps(cfg: PrecomputeConfig, target: CacheTarget) -> None:
    """Unknown tap modules fail in the driver, listing the names, before any actor starts."""
    if not cfg.outputs.taps:
        return
    from pipeline.models.factory import build_model
    from pipeline.models.taps import find_modules

    for name, teacher in cfg.all_teachers.items():
        modules = [t.module for t in cfg.outputs.taps if t.teacher == name]
        if modules:
            model = build_model(teacher, input_shape=target.source.input_shape, num_classes=target.source.num_classes,
                                load_weights=False)
            find_modules(model, modules, owner=f"teacher {name!r} ({teacher.factory})")


def _outputs_record(cfg: PrecomputeConfig, target: CacheTarget, shapes: dict[str, list[int]],
                    bytes_per_row: dict[str, float]) -> dict:
    """The manifest's `outputs`: every stored signal with its column, shape and bytes per row."""
    logits = {name: logits_column(name) for name in cfg.all_teachers}
    if cfg.source.kind == "text":
        spec = cfg.outputs.logits
        columns, fields = TOKEN_MODE_COLUMNS[spec.mode], LOGITS_FIELDS[spec.mode]
        per_token = sum(bytes_per_row.get(c, 0.0) for c in columns) / cfg.source.seq_len
        return {"logits": {**{f: getattr(spec, f) for f in fields}, "column": LOGITS, "columns": {PRIMARY_TEACHER: columns[0]},
                           "stored": columns, "shape": [cfg.source.seq_len, target.source.num_classes],
                           "bytes_per_token": round(per_token, 2)},
                "taps": {}, "bytes_per_row": bytes_per_row}
    return {
        "logits": {**cfg.outputs.logits.model_dump(), "column": LOGITS, "shape": [target.source.num_classes],
                   "columns": logits, "bytes_per_row": {c: bytes_per_row.get(c) for c in logits.values()}},
        "taps": {t.name: {**t.model_dump(), "column": tap_column(t.name), "dtype": "float16",
                          "shape": shapes.get(tap_column(t.name)), "bytes_per_row": bytes_per_row.get(tap_column(t.name))}
                 for t in cfg.outputs.taps},
        "bytes_per_row": bytes_per_row,
    }


def _root_cause(e: BaseException) -> str:
    """The user-facing line inside a Ray error: our own DistillError if an actor raised one."""
    text = str(e)
    marker = "DistillError: "
    if marker in text:
        return text[text.rindex(marker) + len(marker):].strip().splitlines()[0]
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def _publish(cfg: PrecomputeConfig, target: CacheTarget, wall: float, resume_stats: dict) -> Manifest:
    """Checksum every shard, check the row counts against the source, then write the manifest."""
    import ray

    shards, columns, shapes, column_bytes = [], None, {}, {}
    for rel in list_shard_files(target.uri):
        facts = inspect_shard(storage.join(target.uri, rel))
        columns = columns or facts.columns
        shapes = shapes or facts.shapes
        for c, b in facts.column_bytes.items():
            column_bytes[c] = column_bytes.get(c, 0) + b
        shards.append(ShardEntry(path=rel, split=split_of_shard(rel), rows=facts.rows, bytes=facts.bytes, sha256=facts.sha256))
    rows_by_split = {s: sum(e.rows for e in shards if e.split == s) for s in SPLITS}
    if rows_by_split != target.source.rows:
        raise DistillError(f"the cache's shards hold {rows_by_split} rows, the source has {target.source.rows}",
                           "nothing was published; recompute from scratch with --force")
    devices = "cuda" if cfg.gpus_per_actor > 0 else "cpu"
    total_rows = max(sum(rows_by_split.values()), 1)
    bytes_per_row = {c: round(b / total_rows, 1) for c, b in column_bytes.items()}
    teachers = {name: {**(target.identity["teacher"] if name == PRIMARY_TEACHER else target.identity["outputs"]["teachers"][name]),
                       "weights": t.weights, "column": logits_column(name)} for name, t in cfg.all_teachers.items()}
    manifest = Manifest(
        cache_id=target.cache_id,
        teacher=teachers[PRIMARY_TEACHER],
        teachers=teachers,
        dataset={**target.identity["dataset"], **({"tokenizer": tok} if (tok := _save_tokenizer(cfg, target)) else {})},
        outputs=_outputs_record(cfg, target, shapes, bytes_per_row),
        num_classes=target.source.num_classes,
        input_shape=list(target.source.input_shape),
        rows=sum(rows_by_split.values()),
        rows_by_split=rows_by_split,
        columns=columns or {},
        shards=shards,
        stats={"wall_s": round(wall, 3), "rows_per_s": round(resume_stats["rows_computed"] / max(wall, 1e-9), 1),
               "devices": devices, "num_actors": cfg.num_actors, "ray_job_id": ray.get_runtime_context().get_job_id(),
               "teacher_nodes": _teacher_nodes(), **resume_stats},
        config=cfg.model_dump(),
    )
    write_manifest(target.uri, manifest)
    return manifest


def _save_tokenizer(cfg: PrecomputeConfig, target: CacheTarget) -> dict | None:
    """A text cache carries its tokenizer, so every student (and any later decoding) uses the same one."""
    if cfg.source.kind != "text":
        return None
    from pipeline.data import text
    from pipeline.data.sources import text_tokenizer

    tok = text_tokenizer(cfg.source)
    text.save_tokenizer(tok, storage.join(target.uri, TOKENIZER_FILE))
    return {"path": TOKENIZER_FILE, "digest": text.tokenizer_digest(tok), "vocab_size": tok.get_vocab_size(),
            "kind": cfg.source.tokenizer.kind}


def _teacher_nodes() -> list[str]:
    """Node ids where this job's teacher actors ran (from Ray's state API; empty if it is unavailable)."""
    import ray
    from ray.util.state import list_actors

    try:
        actors = list_actors(
            filters=[("class_name", "=", f"MapWorker(MapBatches({TeacherPredictor.__name__}))"),
                     ("job_id", "=", ray.get_runtime_context().get_job_id())],
            limit=10_000, timeout=10, raise_on_missing_output=False,
        )
    except Exception:  # no dashboard, or an old cluster: the stat is informative, not required
        return []
    return sorted({a.node_id for a in actors if a.node_id})


def teacher_logits_for(cfg: PrecomputeConfig, x: np.ndarray) -> np.ndarray:
    """The teacher's float32 logits on `x`, in this process (for checks and tests, not the pipeline)."""
    target = resolve_target(cfg)
    predictor = TeacherPredictor(_teacher_specs(cfg), target.source.input_shape, target.source.num_classes, "float32")
    return predictor({X: x})[LOGITS]
