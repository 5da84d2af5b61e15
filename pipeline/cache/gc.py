"""Housekeeping: remove a cache, and collect incomplete caches left by runs that never finished."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from pipeline import storage
from pipeline.cache.manifest import manifest_uri
from pipeline.cache.catalog import list_caches
from pipeline.errors import DistillError


def remove_cache(uri: str, options: storage.Options = None) -> None:
    """Delete a cache, manifest first, so no reader ever sees a complete-looking cache lose its shards."""
    if not storage.exists(uri, options):
        raise DistillError(f"no cache at {uri}", "check the URI (distill cache ls ROOT)")
    storage.remove_file(manifest_uri(uri), options)
    storage.remove_tree(uri, options)


def _modified(info: dict) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or 0
    return value.timestamp() if isinstance(value, datetime) else float(value)


def newest_change(uri: str, options: storage.Options = None) -> float:
    """Seconds since the epoch of the newest file under `uri` (its last sign of life)."""
    fs, path = storage.filesystem(uri, options)
    infos = fs.find(path, detail=True).values()
    return max((_modified(i) for i in infos), default=0.0)


@dataclass
class Collected:
    uri: str
    age_s: float
    removed: bool


def collect_garbage(root: str, older_than_s: float, dry_run: bool = False,
                    options: storage.Options = None) -> list[Collected]:
    """Remove incomplete caches (no manifest) untouched for longer than `older_than_s`.

    The age guard keeps a precompute that is still writing (or will resume) from being removed.
    """
    now = time.time()
    out = []
    for entry in list_caches(root, options):
        if entry.complete:
            continue
        age = now - newest_change(entry.uri, options)
        old = age > older_than_s
        if old and not dry_run:
            storage.remove_tree(entry.uri, options)
        out.append(Collected(entry.uri, age, old and not dry_run))
    return out


def parse_age(text: str) -> float:
    """`90s`, `30m`, `24h`, `7d` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise DistillError(f"bad age {text!r}", "write it like 90s, 30m, 24h or 7d") from None
