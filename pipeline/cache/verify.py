"""Check a cache against its manifest: cheaply (files and sizes) before training, fully on demand."""

from __future__ import annotations

from pipeline import storage
from pipeline.cache.manifest import Manifest, manifest_uri, parse_manifest
from pipeline.cache.schema import MANIFEST
from pipeline.cache.shards import inspect_shard, list_shard_files
from pipeline.errors import DistillError


def check_files(cache_uri: str, manifest: Manifest, options: storage.Options = None) -> list[str]:
    """Cheap checks (no reading of data): every shard is there with its recorded size."""
    problems = []
    fs, root = storage.filesystem(cache_uri, options)
    for shard in manifest.shards:
        path = f"{root}/{shard.path}"
        if not fs.exists(path):
            problems.append(f"missing shard {shard.path}")
        elif fs.size(path) != shard.bytes:
            problems.append(f"shard {shard.path} has {fs.size(path)} bytes, manifest says {shard.bytes}")
    if sum(s.rows for s in manifest.shards) != manifest.rows:
        problems.append(f"shard rows add up to {sum(s.rows for s in manifest.shards)}, manifest says {manifest.rows}")
    return problems


def verify_cache(cache_uri: str, options: storage.Options = None) -> list[str]:
    """Every problem found, by name; an empty list means a sound cache."""
    if not storage.exists(manifest_uri(cache_uri), options):
        return [f"no {MANIFEST}: the cache is incomplete or missing"]
    try:
        manifest = parse_manifest(storage.read_bytes(manifest_uri(cache_uri), options))
    except DistillError as e:
        return [e.problem]
    problems = check_files(cache_uri, manifest, options)
    known = {s.path for s in manifest.shards}
    problems += [f"extra shard {rel} not in the manifest" for rel in list_shard_files(cache_uri, options) if rel not in known]
    for shard in manifest.shards:
        uri = storage.join(cache_uri, shard.path)
        if not storage.exists(uri, options):
            continue
        try:
            facts = inspect_shard(uri, options)
        except Exception as e:  # a truncated or corrupted Parquet file fails in many ways
            problems.append(f"shard {shard.path} is unreadable: {type(e).__name__}: {e}")
            continue
        if facts.sha256 != shard.sha256:
            problems.append(f"shard {shard.path} checksum differs from the manifest (corrupted)")
        if facts.rows != shard.rows:
            problems.append(f"shard {shard.path} has {facts.rows} rows, manifest says {shard.rows}")
        if facts.columns != manifest.columns:
            problems.append(f"shard {shard.path} schema {facts.columns} differs from the manifest's {manifest.columns}")
    if not problems:  # the shards are the manifest's: their teacher values must be finite too
        from pipeline.cache.values import describe_nonfinite, nonfinite_values

        problems += [f"teacher column {line}" for line in describe_nonfinite(nonfinite_values(cache_uri, manifest, options))]
    return problems
