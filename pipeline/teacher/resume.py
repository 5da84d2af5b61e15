"""What an interrupted precompute keeps: Ray Data's checkpoint of the committed sample_ids.

A rerun of the same config finds the checkpoint beside the cache and computes only the rows not
yet committed; `--force` clears every trace of earlier attempts instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.cache.manifest import manifest_uri
from pipeline.cache.schema import CHECKPOINT_DIR, SAMPLE_ID, SHARDS_DIR, SOURCE_DIR


@contextmanager
def checkpointing(cache_uri: str, options: storage.Options = None) -> Iterator[None]:
    """Ray Data checkpointing keyed by sample_id for datasets built inside the block."""
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    fs, path = storage.arrow_filesystem(storage.join(cache_uri, CHECKPOINT_DIR), options)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.checkpoint_config
    ctx.checkpoint_config = CheckpointConfig(id_column=SAMPLE_ID, checkpoint_path=path, override_filesystem=fs,
                                             delete_checkpoint_on_success=True)
    try:
        yield
    finally:
        ctx.checkpoint_config = saved


def committed_rows(cache_uri: str, options: storage.Options = None) -> int:
    """Rows an earlier, interrupted attempt committed (Ray Data skips them on resume)."""
    fs, path = storage.filesystem(storage.join(cache_uri, CHECKPOINT_DIR), options)
    if not fs.exists(path):
        return 0
    total = 0
    for f in fs.find(path):
        if f.endswith(".parquet") and not f.endswith(".pending.parquet"):
            with fs.open(f, "rb") as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
    return total


def clear_attempts(cache_uri: str, options: storage.Options = None) -> None:
    """Remove every trace of earlier attempts. The manifest goes first, so no reader sees a
    complete cache while the shards change."""
    storage.remove_file(manifest_uri(cache_uri), options)
    for sub in (SHARDS_DIR, SOURCE_DIR, CHECKPOINT_DIR):
        storage.remove_tree(storage.join(cache_uri, sub), options)
