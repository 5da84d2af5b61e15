"""Which cache a precompute config produced, recorded under the cache root.

Stage 1 knows a cache's id only after hashing the teacher's weights and the data (and, for text,
training a tokenizer). Stage 2, given the precompute config instead of a cache URI, must not
repeat that work: stage 1 writes `<cache_root>/_configs/<digest of the config's recipe>.json`
naming the cache id, and stage 2 reads it. The recipe is what the config asks for, as written
(source, teachers, outputs; no scheduling knobs), so the record points at the cache the latest
precompute of that config published.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from pipeline import storage
from pipeline.cache.key import cache_key, canonical_json
from pipeline.cache.schema import INDEX_DIR


def record_uri(cache_root: str, recipe: dict[str, Any]) -> str:
    return storage.join(cache_root, INDEX_DIR, f"{cache_key(recipe)}.json")


def record_cache(cache_root: str, recipe: dict[str, Any], cache_id: str, options: storage.Options = None) -> None:
    """Remember that this recipe produced `cache_id` (written on every publish and cache hit)."""
    record = {"cache_id": cache_id, "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "recipe": json.loads(canonical_json(recipe))}
    storage.write_bytes_atomic(record_uri(cache_root, recipe), (json.dumps(record, indent=2) + "\n").encode(), options)


def recorded_cache(cache_root: str, recipe: dict[str, Any], options: storage.Options = None) -> str | None:
    """The id of the cache this recipe last produced under `cache_root`, or None if none was recorded."""
    uri = record_uri(cache_root, recipe)
    if not storage.exists(uri, options):
        return None
    return json.loads(storage.read_bytes(uri, options))["cache_id"]
