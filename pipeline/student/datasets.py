"""What the driver tells the workers about the cache: each split's shards and rows, whether workers
keep decoded shards in memory (`in_memory: auto`), and how many units (target tokens) a row holds."""

from __future__ import annotations

from typing import Any, Callable

from pipeline import storage
from pipeline.cache.manifest import Manifest
from pipeline.student.stream import ShardReader
from pipeline.student.tasks.base import Task

IN_MEMORY_SHARE = 0.2  # of the cluster's memory, for in_memory: auto (every worker keeps its own copy)


def shard_plan(manifest: Manifest) -> dict[str, list[tuple[str, int]]]:
    """(path relative to the cache, rows) of every shard, per split, in the manifest's order."""
    return {split: [(s.path, s.rows) for s in manifest.shards_of(split)] for split in ("train", "val")}


def in_memory_bytes(cache_uri: str, manifest: Manifest, columns: list[str]) -> int:
    """Decoded size of `columns` over every row, from the first rows of one shard (Parquet's encoded
    sizes can be 10x smaller, e.g. for MNIST's zeros)."""
    import pyarrow.parquet as pq

    fs, root = storage.arrow_filesystem(cache_uri)
    with fs.open_input_file(f"{root}/{manifest.shards[0].path}") as f:
        batch = next(pq.ParquetFile(f).iter_batches(batch_size=256, columns=columns))
    return int(batch.nbytes / max(batch.num_rows, 1) * manifest.rows)


def keep_in_memory(setting: bool | str, cache_uri: str, manifest: Manifest, columns: list[str], workers: int,
                   log: Callable[[str], None]) -> bool:
    """`in_memory` resolved: auto keeps the decoded cache in every worker when all copies fit in a
    fifth of the cluster's memory; otherwise workers stream shards and their memory stays flat."""
    if setting != "auto":
        return bool(setting)
    import ray

    need = in_memory_bytes(cache_uri, manifest, columns)
    budget = IN_MEMORY_SHARE * ray.cluster_resources().get("memory", 0) / max(workers, 1)
    keep = need <= budget
    log(f"{'keeping' if keep else 'streaming'} the cache in each worker ({need / 1e6:.0f} MB decoded, "
        f"{budget / 1e6:.0f} MB allowed per worker for in_memory: auto)")
    return keep


def units_per_row(cache_uri: str, manifest: Manifest, task: Task) -> float:
    """The mean units (samples: 1; target tokens for LMs) of a train row, from its first shard."""
    path, rows = shard_plan(manifest)["train"][0]
    reader = ShardReader(cache_uri, [path], task.columns(), task.dtypes())
    try:
        return float(task.units(reader.get(0))) / max(rows, 1)
    finally:
        reader.close()


def plan(cache_uri: str, manifest: Manifest, task: Task, setting: bool | str, workers: int,
         log: Callable[[str], None]) -> dict[str, Any]:
    return {"cache_uri": cache_uri, "shards": shard_plan(manifest),
            "in_memory": keep_in_memory(setting, cache_uri, manifest, task.columns(), workers, log)}
