"""The cache key: a short hash of everything that determines a cache's content, and nothing else.

Batch size, actor count or the cache root do not change what the teacher outputs, so they
are not part of the key; the teacher weights' digest, the data fingerprint, the transform
and the outputs spec are.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.cache.schema import KEY_VERSION


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def cache_identity(*, teacher: dict[str, Any], dataset: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    return {"format_version": KEY_VERSION, "teacher": teacher, "dataset": dataset, "outputs": outputs}


def cache_key(identity: dict[str, Any], length: int = 16) -> str:
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:length]
