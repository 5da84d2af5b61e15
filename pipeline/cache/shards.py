"""The shard files of a cache: where they are and what their Parquet footers say."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.cache.schema import SHARDS_DIR, SPLIT
from pipeline.cache.tensors import row_shape, type_name
from pipeline.errors import DistillError


@dataclass
class ShardFacts:
    rows: int
    bytes: int
    sha256: str
    columns: dict[str, str]
    column_bytes: dict[str, int]  # compressed bytes per top-level column, from the footer
    shapes: dict[str, list[int]]  # per-row shape of each tensor column


def inspect_shard(uri: str, options: storage.Options = None) -> ShardFacts:
    """Rows (from the Parquet footer), size, checksum, column types and bytes of one shard file.

    A tensor column is stored as nested leaves (`x.list.element`), so leaves are grouped by the
    part of their path before the first dot.
    """
    fs, path = storage.filesystem(uri, options)
    size = fs.size(path)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        meta = pf.metadata
        columns = {field.name: type_name(field) for field in pf.schema_arrow}
        shapes = {field.name: shape for field in pf.schema_arrow if (shape := row_shape(field)) is not None}
        column_bytes: dict[str, int] = {}
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                col = group.column(c)
                top = col.path_in_schema.split(".", 1)[0]
                column_bytes[top] = column_bytes.get(top, 0) + col.total_compressed_size
    return ShardFacts(rows=meta.num_rows, bytes=int(size), sha256=storage.sha256_of(path, fs), columns=columns,
                      column_bytes=column_bytes, shapes=shapes)


def list_shard_files(cache_uri: str, options: storage.Options = None) -> list[str]:
    """Every Parquet file under shards/, as paths relative to the cache directory."""
    fs, root = storage.filesystem(cache_uri, options)
    shards = f"{root}/{SHARDS_DIR}"
    if not fs.exists(shards):
        return []
    prefix = root.rstrip("/") + "/"  # string-relative: works for object-store keys and needs no cwd
    return sorted(p[len(prefix):] for p in fs.find(shards) if p.endswith(".parquet") and p.startswith(prefix))


def split_of_shard(rel_path: str) -> str:
    """`shards/split=train/part-....parquet` -> `train`."""
    for part in rel_path.split("/"):
        if part.startswith(f"{SPLIT}="):
            return part.split("=", 1)[1]
    raise DistillError(f"shard {rel_path} is not under a {SPLIT}=<name>/ directory", "recompute the cache with --force")
