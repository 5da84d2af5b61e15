"""Stage 1: the Ray Data plan that runs the teacher once and publishes the cache.

source rows -> actor pool running the teacher -> Parquet shards -> checksums -> manifest (last).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.cache import storage
from pipeline.cache.identity import CacheTarget, resolve_target
from pipeline.cache.manifest import Manifest, ShardEntry, manifest_uri, read_manifest, write_manifest
from pipeline.cache.schema import LABEL, LOGITS, SAMPLE_ID, SHARDS_DIR, SPLIT, X
from pipeline.cache.verify import inspect_shard, list_shard_files, split_of_shard
from pipeline.config import PrecomputeConfig
from pipeline.data.sources import SPLITS, load_split, standardize_parquet_batch
from pipeline.errors import DistillError
from pipeline.models.factory import resolve_factory
from pipeline.runtime import ensure_ray
from pipeline.teacher.inference import TeacherPredictor
from pipeline.teacher.writer import ShardNames


@dataclass
class PrecomputeResult:
    uri: str
    hit: bool
    rows_computed: int  # rows the teacher ran on in this call (0 on a cache hit)
    manifest: Manifest


def _source_dataset(cfg: PrecomputeConfig):
    """All source rows as one Ray dataset with the standard columns plus `split`."""
    import ray
    from ray.data.extensions import ArrowTensorArray

    if cfg.source.kind == "parquet":
        fs, path = storage.arrow_filesystem(cfg.source.uri or "")
        return ray.data.read_parquet(path, filesystem=fs).map_batches(
            standardize_parquet_batch, fn_kwargs={"cfg": cfg.source}, batch_format="numpy"
        )
    tables = []
    for split in SPLITS:
        cols = load_split(cfg.source, split)
        n = len(cols[LABEL])
        # Several blocks, so that more than one teacher actor has work and progress is visible.
        step = max(cfg.batch_size, math.ceil(n / (4 * cfg.num_actors)))
        tables += [
            pa.table({
                SAMPLE_ID: pa.array(cols[SAMPLE_ID][i:i + step].tolist(), pa.string()),
                X: ArrowTensorArray.from_numpy(cols[X][i:i + step]),
                LABEL: pa.array(cols[LABEL][i:i + step]),
                SPLIT: pa.array([split] * len(cols[LABEL][i:i + step]), pa.string()),
            })
            for i in range(0, n, step)
        ]
    return ray.data.from_arrow(tables)


def _clear(uri: str) -> None:
    """Remove a previous attempt. The manifest goes first, so no reader sees a complete cache while shards change."""
    fs, path = storage.filesystem(manifest_uri(uri))
    if fs.exists(path):
        fs.rm(path)
    storage.remove_tree(storage.join(uri, SHARDS_DIR))


def run_precompute(cfg: PrecomputeConfig, *, force: bool = False, address: str | None = None,
                   log=print) -> PrecomputeResult:
    """Compute (or find) the cache for `cfg`. A second call with the same content inputs does no teacher work."""
    resolve_factory(cfg.teacher.factory)  # fail on a typo before hashing weights or starting Ray
    storage.configure(**cfg.storage.model_dump())
    storage.check_reachable(cfg.cache_root, "cache root")
    target = resolve_target(cfg)
    if not force and storage.exists(manifest_uri(target.uri)):
        log(f"cache hit: {target.uri}")
        return PrecomputeResult(uri=target.uri, hit=True, rows_computed=0, manifest=read_manifest(target.uri))
    if cfg.teacher.weights is None:
        log("warning: the teacher has no `weights`; its outputs come from random initialisation")
    log(f"cache miss: computing {target.uri} ({sum(target.source.rows.values())} rows)")
    _clear(target.uri)
    ensure_ray(address)

    import ray

    shards_uri = storage.join(target.uri, SHARDS_DIR)
    fs, shards_path = storage.arrow_filesystem(shards_uri)
    started = time.time()
    ds = _source_dataset(cfg).map_batches(
        TeacherPredictor,
        fn_constructor_kwargs={
            "teacher": cfg.teacher.model_dump(exclude={"fit"}),
            "input_shape": target.source.input_shape,
            "num_classes": target.source.num_classes,
            "logits_dtype": cfg.outputs.logits.dtype,
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
        ds.write_parquet(shards_path, filesystem=fs, partition_cols=[SPLIT], filename_provider=ShardNames(),
                         max_rows_per_file=cfg.rows_per_shard)
    except Exception as e:
        raise DistillError(f"the teacher stage failed: {_root_cause(e)}",
                           "see the Ray logs above; nothing was published, run again once fixed") from None
    wall = time.time() - started
    manifest = _publish(cfg, target, wall)
    log(f"wrote {manifest.rows} rows in {len(manifest.shards)} shards ({manifest.bytes / 1e6:.1f} MB) "
        f"in {wall:.1f}s, {manifest.rows / max(wall, 1e-9):.0f} rows/s: {target.uri}")
    return PrecomputeResult(uri=target.uri, hit=False, rows_computed=manifest.rows, manifest=manifest)


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


def _publish(cfg: PrecomputeConfig, target: CacheTarget, wall: float) -> Manifest:
    """Checksum every shard, check the row counts against the source, then write the manifest."""
    import ray

    shards, columns = [], None
    for rel in list_shard_files(target.uri):
        facts = inspect_shard(storage.join(target.uri, rel))
        columns = columns or facts.columns
        shards.append(ShardEntry(path=rel, split=split_of_shard(rel), rows=facts.rows, bytes=facts.bytes, sha256=facts.sha256))
    rows_by_split = {s: sum(e.rows for e in shards if e.split == s) for s in SPLITS}
    if rows_by_split != target.source.rows:
        raise DistillError(f"the teacher stage wrote {rows_by_split} rows, the source has {target.source.rows}",
                           "nothing was published; run again with --force")
    devices = "cuda" if cfg.gpus_per_actor > 0 else "cpu"
    manifest = Manifest(
        cache_id=target.cache_id,
        teacher={**target.identity["teacher"], "weights": cfg.teacher.weights},
        dataset=target.identity["dataset"],
        outputs={"logits": {**cfg.outputs.logits.model_dump(), "column": LOGITS, "shape": [target.source.num_classes]}},
        num_classes=target.source.num_classes,
        input_shape=list(target.source.input_shape),
        rows=sum(rows_by_split.values()),
        rows_by_split=rows_by_split,
        columns=columns or {},
        shards=shards,
        stats={"wall_s": round(wall, 3), "rows_per_s": round(sum(rows_by_split.values()) / max(wall, 1e-9), 1),
               "devices": devices, "num_actors": cfg.num_actors, "ray_job_id": ray.get_runtime_context().get_job_id(),
               "teacher_nodes": _teacher_nodes()},
        config=cfg.model_dump(),
    )
    write_manifest(target.uri, manifest)
    return manifest


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
    predictor = TeacherPredictor(cfg.teacher.model_dump(exclude={"fit"}), target.source.input_shape, target.source.num_classes, "float32")
    return predictor({X: x})[LOGITS]
