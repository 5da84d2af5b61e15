"""Check a cache against its manifest, and list the caches under a root."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow.parquet as pq

from pipeline.cache import storage
from pipeline.cache.manifest import Manifest, manifest_uri, parse_manifest, read_manifest
from pipeline.cache.schema import MANIFEST, SHARDS_DIR, SPLIT
from pipeline.errors import DistillError


@dataclass
class ShardFacts:
    rows: int
    bytes: int
    sha256: str
    columns: dict[str, str]
    column_bytes: dict[str, int]  # compressed bytes per top-level column, from the footer
    shapes: dict[str, list[int]]  # per-row shape of each tensor column


def inspect_shard(uri: str) -> ShardFacts:
    """Rows (from the Parquet footer), size, checksum, column types and bytes of one shard file."""
    fs, path = storage.filesystem(uri)
    size = fs.size(path)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        meta = pf.metadata
        rows = meta.num_rows
        columns = {field.name: str(field.type) for field in pf.schema_arrow}
        shapes = {field.name: list(field.type.shape) for field in pf.schema_arrow if hasattr(field.type, "shape")}
        column_bytes: dict[str, int] = {}
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                col = group.column(c)
                top = col.path_in_schema.split(".", 1)[0]
                column_bytes[top] = column_bytes.get(top, 0) + col.total_compressed_size
    return ShardFacts(rows=rows, bytes=int(size), sha256=storage.sha256_of(path, fs), columns=columns,
                      column_bytes=column_bytes, shapes=shapes)


def list_shard_files(cache_uri: str) -> list[str]:
    """Every Parquet file under shards/, as paths relative to the cache directory."""
    fs, root = storage.filesystem(cache_uri)
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


def check_files(cache_uri: str, manifest: Manifest) -> list[str]:
    """Cheap checks (no reading of data): every shard is there with its recorded size."""
    problems = []
    fs, root = storage.filesystem(cache_uri)
    for shard in manifest.shards:
        path = f"{root}/{shard.path}"
        if not fs.exists(path):
            problems.append(f"missing shard {shard.path}")
        elif fs.size(path) != shard.bytes:
            problems.append(f"shard {shard.path} has {fs.size(path)} bytes, manifest says {shard.bytes}")
    if sum(s.rows for s in manifest.shards) != manifest.rows:
        problems.append(f"shard rows add up to {sum(s.rows for s in manifest.shards)}, manifest says {manifest.rows}")
    return problems


def verify_cache(cache_uri: str) -> list[str]:
    """Every problem found, by name; an empty list means a sound cache."""
    if not storage.exists(manifest_uri(cache_uri)):
        return [f"no {MANIFEST}: the cache is incomplete or missing"]
    try:
        manifest = parse_manifest(storage.read_bytes(manifest_uri(cache_uri)))
    except DistillError as e:
        return [e.problem]
    problems = check_files(cache_uri, manifest)
    known = {s.path for s in manifest.shards}
    problems += [f"extra shard {rel} not in the manifest" for rel in list_shard_files(cache_uri) if rel not in known]
    for shard in manifest.shards:
        uri = storage.join(cache_uri, shard.path)
        if not storage.exists(uri):
            continue
        try:
            facts = inspect_shard(uri)
        except Exception as e:  # a truncated or corrupted Parquet file fails in many ways
            problems.append(f"shard {shard.path} is unreadable: {type(e).__name__}: {e}")
            continue
        if facts.sha256 != shard.sha256:
            problems.append(f"shard {shard.path} checksum differs from the manifest (corrupted)")
        if facts.rows != shard.rows:
            problems.append(f"shard {shard.path} has {facts.rows} rows, manifest says {shard.rows}")
        if facts.columns != manifest.columns:
            problems.append(f"shard {shard.path} schema {facts.columns} differs from the manifest's {manifest.columns}")
    return problems


@dataclass
class CacheEntry:
    cache_id: str
    uri: str
    complete: bool
    rows: int | None
    bytes: int | None
    created: str | None
    teacher: str | None


def list_caches(root: str) -> list[CacheEntry]:
    fs, path = storage.filesystem(root)
    if not fs.exists(path):
        raise DistillError(f"cache root {root} does not exist", "check the path, or run `distill precompute` to create it")
    entries = []
    for sub in sorted(fs.ls(path, detail=True), key=lambda d: d["name"]):
        if sub["type"] != "directory":
            continue
        cache_id = os.path.basename(sub["name"].rstrip("/"))
        uri = storage.join(root, cache_id)
        try:
            m = read_manifest(uri)
            entries.append(CacheEntry(cache_id, uri, True, m.rows, m.bytes, m.created, m.teacher.get("factory")))
        except DistillError:
            entries.append(CacheEntry(cache_id, uri, False, None, None, None, None))
    return entries
