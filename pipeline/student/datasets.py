"""The cache as Ray Datasets for Ray Train: both splits, streamed from the shards every epoch or read
once into the object store when they are small, and a timer of how long the student waits on them."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

from pipeline import storage
from pipeline.cache.manifest import Manifest

IN_MEMORY_SHARE = 0.2  # of the cluster's object store memory, for in_memory: auto


def cache_dataset(cache_uri: str, manifest: Manifest, split: str, columns: list[str]):
    import ray

    fs, root = storage.arrow_filesystem(cache_uri)
    paths = [f"{root}/{s.path}" for s in manifest.shards_of(split)]
    return ray.data.read_parquet(paths, filesystem=fs, shuffle="files" if split == "train" else None).select_columns(columns)


def in_memory_bytes(cache_uri: str, manifest: Manifest, columns: list[str]) -> int:
    """Decoded size of `columns` over every row, from the first rows of one shard (Parquet's encoded
    sizes can be 10x smaller, e.g. for MNIST's zeros)."""
    import pyarrow.parquet as pq

    fs, root = storage.arrow_filesystem(cache_uri)
    with fs.open_input_file(f"{root}/{manifest.shards[0].path}") as f:
        batch = next(pq.ParquetFile(f).iter_batches(batch_size=256, columns=columns))
    return int(batch.nbytes / max(batch.num_rows, 1) * manifest.rows)


def load_datasets(cache_uri: str, manifest: Manifest, columns: list[str], in_memory: bool | None,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """Both splits as Ray Datasets; materialised once in the object store when they fit (see
    TrainConfig.in_memory): a small cache then costs one read instead of one per epoch."""
    import ray

    # A cache whose source has no validation split (val_fraction 0) trains without per-epoch evaluation.
    datasets = {split: cache_dataset(cache_uri, manifest, split, columns) for split in ("train", "val")
                if manifest.shards_of(split)}
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
