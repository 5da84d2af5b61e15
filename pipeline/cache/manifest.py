"""The manifest: written last, so its presence means the cache is complete."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.cache import storage
from pipeline.cache.schema import FORMAT_VERSION, MANIFEST
from pipeline.errors import DistillError


class ShardEntry(BaseModel):
    path: str  # relative to the cache directory
    split: str
    rows: int
    bytes: int
    sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    cache_id: str
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    teacher: dict[str, Any]  # the primary teacher (logits column `teacher_logits`)
    teachers: dict[str, dict[str, Any]] = Field(default_factory=dict)  # every teacher by name, the primary included
    dataset: dict[str, Any]
    outputs: dict[str, Any]
    num_classes: int
    input_shape: list[int]
    rows: int
    rows_by_split: dict[str, int]
    columns: dict[str, str]
    shards: list[ShardEntry]
    stats: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def logits_columns(self) -> dict[str, str]:
        """teacher name -> its logits column (caches from before multi-teacher have one)."""
        return dict(self.outputs.get("logits", {}).get("columns") or {"teacher": self.outputs.get("logits", {}).get("column", "teacher_logits")})

    def taps(self) -> dict[str, dict[str, Any]]:
        """tap name -> {teacher, module, kind, column, shape, bytes_per_row, ...}."""
        return dict(self.outputs.get("taps") or {})

    def shards_of(self, split: str) -> list[ShardEntry]:
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=2, sort_keys=False) + "\n"


def manifest_uri(cache_uri: str) -> str:
    return storage.join(cache_uri, MANIFEST)


def write_manifest(cache_uri: str, manifest: Manifest) -> None:
    storage.write_bytes_atomic(manifest_uri(cache_uri), manifest.to_json().encode())


def parse_manifest(text: str | bytes, where: str = "manifest") -> Manifest:
    try:
        return Manifest.model_validate(json.loads(text))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistillError(f"{where} does not parse as JSON: {e}", "the cache is damaged; recompute it with --force") from None
    except ValidationError as e:
        field = ".".join(str(p) for p in e.errors()[0]["loc"])
        raise DistillError(f"{where} is not a valid v{FORMAT_VERSION} manifest (field `{field}`)", "recompute the cache with --force") from None


def read_manifest(cache_uri: str) -> Manifest:
    """The manifest of a complete cache; a clear error for a missing or incomplete one."""
    uri = manifest_uri(cache_uri)
    if not storage.exists(cache_uri):
        raise DistillError(f"no cache at {cache_uri}", "run `distill precompute` first, or fix the cache URI")
    if not storage.exists(uri):
        raise DistillError(
            f"incomplete cache at {cache_uri}: no {MANIFEST} (a precompute did not finish)",
            "run `distill precompute` again to complete it",
        )
    return parse_manifest(storage.read_bytes(uri), where=uri)
