"""What the driver tells the workers: each split's shards and rows, whether workers keep decoded
shards in memory (`in_memory: auto`), the step budget, and how many units (target tokens) a row
holds. `WorkerPlan` is the one typed value that crosses into every Train worker or trial."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline import storage
from pipeline.cache.manifest import Manifest
from pipeline.config import TrainConfig
from pipeline.student.tasks.base import Task
from pipeline.student.train.localcache import LocalShardCache
from pipeline.student.train.order import Order
from pipeline.student.train.reader import ShardReader
from pipeline.student.train.schedule import total_steps

IN_MEMORY_SHARE = 0.2  # of the cluster's memory, for in_memory: auto (each worker keeps its lanes' shards)
Shards = dict[str, tuple[tuple[str, int], ...]]  # split -> (path relative to the cache, rows) per shard
Preloaded = dict[str, list[dict[str, np.ndarray]]]  # split -> decoded columns per shard


@dataclass(frozen=True)
class CachePlan:
    """Which shards every worker reads, from where, and whether it keeps them decoded."""

    cache_uri: str
    shards: Shards
    in_memory: bool
    options: storage.Options = None  # the storage endpoint the shards are read through
    local_cache: tuple[str, int] | None = None  # (node-local directory, bytes) for shards of an object store
    # Streamed caches: whether each worker keeps its share of the val rows decoded after the first
    # evaluation, so later evaluations cost compute, not another read of the same rows.
    keep_val: bool = False

    def reader(self, split: str, columns: list[str], dtypes: dict, preloaded: Preloaded | None = None) -> ShardReader | None:
        """A reader of one split's shards (None for a split without shards)."""
        if not self.shards.get(split):
            return None
        local = LocalShardCache(*self.local_cache, self.cache_uri) if self.local_cache else None
        keep = self.in_memory or (split == "val" and self.keep_val)
        return ShardReader(self.cache_uri, [p for p, _ in self.shards[split]], columns, dtypes, keep,
                           (preloaded or {}).get(split), self.options, local)

    def sizes(self, split: str = "train") -> tuple[int, ...]:
        return tuple(n for _, n in self.shards[split])


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a Train worker (or a sweep trial's loop) needs, and nothing it should recompute."""

    train: TrainConfig
    manifest: Manifest  # without its shard list and source config: the cache plan holds the shards
    cache: CachePlan
    total_steps: int
    preloaded: Preloaded | None = None  # a sweep's one read of the cache, from Ray's object store


def slim(manifest: Manifest) -> Manifest:
    """The manifest as workers need it: the shard list and the source config stay in the driver."""
    return manifest.model_copy(update={"shards": [], "config": {}})


def shard_plan(manifest: Manifest) -> Shards:
    """(path relative to the cache, rows) of every shard, per split, in the manifest's order."""
    return {split: tuple((s.path, s.rows) for s in manifest.shards_of(split)) for split in ("train", "val")}


def in_memory_bytes(cache_uri: str, manifest: Manifest, columns: list[str], options: storage.Options = None,
                    split: str | None = None) -> int:
    """Decoded size of `columns` over every row (or a split's), from the first rows of one of its
    shards (Parquet's encoded sizes can be 10x smaller, e.g. for MNIST's zeros)."""
    import pyarrow.parquet as pq

    shards = manifest.shards_of(split) if split else manifest.shards
    rows = sum(s.rows for s in shards)
    fs, root = storage.arrow_filesystem(cache_uri, options)
    with fs.open_input_file(f"{root}/{shards[0].path}") as f:
        batch = next(pq.ParquetFile(f).iter_batches(batch_size=256, columns=columns))
    return int(batch.nbytes / max(batch.num_rows, 1) * rows)


def memory_budget(workers: int) -> float:
    """Bytes each worker may keep decoded: a fifth of the cluster's memory, shared by the workers."""
    import ray

    return IN_MEMORY_SHARE * ray.cluster_resources().get("memory", 0) / max(workers, 1)


def keep_in_memory(setting: bool | str, cache_uri: str, manifest: Manifest, columns: list[str], workers: int,
                   log: Callable[[str], None], options: storage.Options = None) -> bool:
    """`in_memory` resolved: auto keeps decoded shards in the workers when the cache fits in a fifth
    of the cluster's memory (each worker keeps only the shards it reads, about 1/workers of them);
    otherwise workers stream shards and their memory stays flat."""
    if setting != "auto":
        return bool(setting)
    need = in_memory_bytes(cache_uri, manifest, columns, options) / max(workers, 1)
    budget = memory_budget(workers)
    keep = need <= budget
    log(f"{'keeping' if keep else 'streaming'} the cache in the workers ({need / 1e6:.0f} MB decoded per worker, "
        f"{budget / 1e6:.0f} MB allowed per worker for in_memory: auto)")
    return keep


def units_per_row(cache: CachePlan, task: Task) -> float:
    """The mean units (samples: 1; target tokens for LMs) of a train row, from its first shard."""
    path, rows = cache.shards["train"][0]
    reader = ShardReader(cache.cache_uri, [path], task.columns(), task.dtypes(), options=cache.options)
    try:
        return float(task.units(reader.get(0))) / max(rows, 1)
    finally:
        reader.close()


def plan(cache_uri: str, manifest: Manifest, task: Task, setting: bool | str, workers: int,
         log: Callable[[str], None], options: storage.Options = None, local_cache: str | None = None,
         local_cache_gb: float = 0.0) -> CachePlan:
    """`local_cache` (a node-local directory) applies to a cache on an object store that workers stream."""
    keep = keep_in_memory(setting, cache_uri, manifest, task.columns(), workers, log, options)
    local = (local_cache, int(local_cache_gb * 1e9)) if local_cache and not keep and not storage.is_local(cache_uri) else None
    if local:
        log(f"keeping streamed shards in {local_cache} on each node (at most {local_cache_gb:g} GB): later epochs read them there")
    # Read from a val shard: a streamed epoch's train bytes are the workers' alone.
    keep_val = keep or (bool(manifest.shards_of("val")) and in_memory_bytes(cache_uri, manifest, task.columns(), options, "val")
                        / max(workers, 1) <= memory_budget(workers))
    return CachePlan(cache_uri, shard_plan(manifest), keep, options, local, keep_val)


def step_budget(cfg: TrainConfig, cache: CachePlan, units_per_row: float | None) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the run) over the planned train shards; `units_per_row`
    (target tokens of a mean row) only for a `max_tokens` budget."""
    per_epoch = Order(cache.sizes(), cfg.batch_size, cfg.seed).steps_per_epoch
    return per_epoch, total_steps(cfg, per_epoch, cfg.batch_size * units_per_row if cfg.max_tokens and units_per_row else None)
