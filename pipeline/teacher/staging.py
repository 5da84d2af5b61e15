"""The source's rows staged as Parquet beside the cache, so stage 1's Ray Data plan starts with a
Read (Ray Data checkpoints only such plans, which is what makes a precompute resumable)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.cache.schema import SAMPLE_ID, SOURCE_DIR, SPLIT
from pipeline.cache.tensors import tensor_array
from pipeline.config import PrecomputeConfig
from pipeline.data.sources import SPLITS, RowSource

STAGE_BATCHES = 16


def stage_source(cfg: PrecomputeConfig, rows: RowSource, cache_uri: str) -> tuple[str, int]:
    """Stage all source rows (standard columns plus `split`) once; returns (uri, number of files).

    A streamed source (a user's table) is standardised by Ray Data tasks; an in-memory one is
    written split by split, in several files, so more than one teacher actor has work, progress
    is visible, a resumed run loses at most a file's worth of rows, and an actor's memory does
    not grow with the source.
    """
    import ray

    options = cfg.storage
    uri = storage.join(cache_uri, SOURCE_DIR)
    marker = storage.join(uri, "_SUCCESS")
    fs, path = storage.arrow_filesystem(uri, options)
    if not storage.exists(marker, options):
        storage.remove_tree(uri, options)
        if rows.streams:  # a user's table, and its validation table if it has one
            for table_uri, split in rows.tables():
                src_fs, src_path = storage.arrow_filesystem(table_uri, options)
                ray.data.read_parquet(src_path, filesystem=src_fs).map_batches(
                    rows.standardize, fn_kwargs={"split": split}, batch_format="numpy").write_parquet(path, filesystem=fs)
        else:
            fs.create_dir(path)
            for split in SPLITS:
                cols = rows.load_split(split)
                n = len(cols[SAMPLE_ID])
                # At most STAGE_BATCHES batches per file: a file is one Ray Data block, and an actor
                # buffers a block's outputs, so its memory would otherwise grow with the source.
                step = max(cfg.batch_size, min(math.ceil(n / (4 * cfg.num_actors)), STAGE_BATCHES * cfg.batch_size))
                for i in range(0, n, step):
                    part = {name: arrow_column(values[i:i + step]) for name, values in cols.items()}
                    part[SPLIT] = pa.array([split] * len(part[SAMPLE_ID]), pa.string())
                    pq.write_table(pa.table(part), f"{path}/{split}-{i // step:05d}.parquet", filesystem=fs)
        storage.write_bytes_atomic(marker, b"", options)
    listing_fs, listing_path = storage.filesystem(uri, options)
    return uri, len([p for p in listing_fs.find(listing_path) if p.endswith(".parquet")])


def arrow_column(values: np.ndarray):
    """Ids as strings, per-row arrays as Arrow's canonical tensor columns, scalars as they are."""
    if values.dtype == object:
        return pa.array(values.tolist(), pa.string())
    if values.ndim > 1:
        return tensor_array(values)
    return pa.array(values)
