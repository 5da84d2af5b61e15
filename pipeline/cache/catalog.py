"""The caches under a root: complete ones (a manifest) and incomplete ones left by unfinished runs."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline import storage
from pipeline.cache.manifest import read_manifest
from pipeline.errors import DistillError


@dataclass
class CacheEntry:
    cache_id: str
    uri: str
    complete: bool
    rows: int | None
    bytes: int | None
    created: str | None
    teacher: str | None


def list_caches(root: str, options: storage.Options = None) -> list[CacheEntry]:
    """Every cache directory under `root`; bookkeeping directories (`_configs`) are not caches. A root
    that does not exist holds none (on an object store a prefix whose caches were all removed is gone)."""
    fs, path = storage.filesystem(root, options)
    if not fs.exists(path):
        return []
    entries = []
    for sub in sorted(fs.ls(path, detail=True), key=lambda d: d["name"]):
        cache_id = os.path.basename(sub["name"].rstrip("/"))
        if sub["type"] != "directory" or cache_id.startswith("_"):
            continue
        uri = storage.join(root, cache_id)
        try:
            m = read_manifest(uri, options)
            entries.append(CacheEntry(cache_id, uri, True, m.rows, m.bytes, m.created, m.teacher.factory))
        except DistillError:
            entries.append(CacheEntry(cache_id, uri, False, None, None, None, None))
    return entries
