"""The manifest (format v2): typed records of what a cache holds, written last, so its presence
means the cache is complete.

Readers use attributes, never `.get` fallbacks: a malformed manifest fails here, naming the
field. A v1 manifest is read through `pipeline.cache.manifest_v1.upgrade`, the one converter.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import storage
from pipeline.cache.schema import FORMAT_VERSION, MANIFEST, PRIMARY_TEACHER
from pipeline.errors import DistillError


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherRecord(Record):
    """A teacher's identity: what built it and the digest of what it loaded."""

    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    weights_sha256: str | None = None
    files_sha256: str | None = None  # a saved Hugging Face model directory
    # Language-model teachers: the width of the model's logits, and how many of its rows past the
    # tokenizer's vocabulary (padding of the embedding) were dropped at capture.
    logit_width: int | None = None
    dropped_logit_rows: int = 0


class SplitRecord(Record):
    val_fraction: float
    split_seed: int


class TokenizerRecord(Record):
    """Text caches: the tokenizer the ids come from, saved beside the manifest."""

    path: str
    digest: str
    vocab_size: int
    kind: str


class DatasetRecord(Record):
    """The source's identity (part of the cache key) and, for text, its tokenizer."""

    kind: str
    uri: str | None = None
    fingerprint: str
    split: SplitRecord
    transform: str
    columns: dict[str, Any] | None = None  # parquet: the user's id, input and label columns
    text: dict[str, Any] | None = None  # text: files, text column, window length, tokenizer settings, limits
    input_shape: list[int]
    tokenizer: TokenizerRecord | None = None
    input_dtype: str = "float32"  # how `x` is stored; a model reads float32(x) * input_scale (pipeline.cache.inputs)
    input_scale: float = 1.0


class _Output(Record):
    columns: list[str]  # what this output stores
    bytes_per_row: float | None = None  # compressed, all of its columns


class FullLogitsRecord(_Output):
    """Raw logits of one teacher: (classes,) per row, or (tokens, vocabulary) for a text cache."""

    mode: Literal["full"] = "full"
    teacher: str
    dtype: Literal["float16", "float32"]
    shape: list[int]
    bytes_per_token: float | None = None


class TopkRecord(_Output):
    """Top-k logits with ids and logsumexp(z/T) per declared T (columns: indices, values, lse)."""

    mode: Literal["topk"] = "topk"
    teacher: str
    k: int
    temperatures: list[float]
    values: Literal["float16", "uint8"]
    step: float
    shape: list[int]
    bytes_per_token: float
    index_bits: int | None = None  # ids packed at this width (pipeline/cache/packing.py); None: uint columns


class SampledRecord(_Output):
    """k importance-weighted draws per token (columns: ids, weights)."""

    mode: Literal["sampled"] = "sampled"
    teacher: str
    k: int
    temperatures: list[float]
    proposal_temperature: float | None = None
    seed: int
    estimator: Literal["multinomial", "priority", "head_tail"] = "multinomial"
    head: int = 0
    shape: list[int]
    bytes_per_token: float
    index_bits: int | None = None  # ids packed at this width (pipeline/cache/packing.py); None: uint columns


class SequencesRecord(_Output):
    """The teacher's continuations: `prompt_tokens` from the row, then `new_tokens` generated."""

    mode: Literal["sequences"] = "sequences"
    teacher: str
    prompt_tokens: int
    new_tokens: int
    strategy: Literal["greedy", "sample"]
    temperatures: list[float]
    seed: int
    shape: list[int]
    bytes_per_token: float


class TapRecord(_Output):
    """An intermediate signal of a teacher: a feature, an attention map or an embedding (float16)."""

    mode: Literal["tap"] = "tap"
    name: str
    teacher: str
    module: str
    kind: Literal["feature", "attention", "embedding"]
    pool: list[int] | None = None
    p: float = 2.0
    dtype: Literal["float16"] = "float16"
    shape: list[int]

    @property
    def column(self) -> str:
        return self.columns[0]


class ViewsRecord(_Output):
    """A view cache's views: (count, 5) float32 (cx, cy, w, h, flip) per row, view 0 the whole image; the
    teachers' logits are then (count, classes), one row per view (pipeline/data/views.py applies them)."""

    mode: Literal["views"] = "views"
    count: int
    seed: int
    transforms: list[dict[str, Any]]
    shape: list[int]


Output = Annotated[Union[FullLogitsRecord, TopkRecord, SampledRecord, SequencesRecord, TapRecord, ViewsRecord],
                   Field(discriminator="mode")]
LogitsRecord = Union[FullLogitsRecord, TopkRecord, SampledRecord, SequencesRecord]


class PrecomputeStats(Record):
    """How the teacher pass went (informative: no reader depends on these)."""

    wall_s: float | None = None
    rows_per_s: float | None = None
    devices: str | None = None
    num_actors: int | None = None
    ray_job_id: str | None = None
    teacher_nodes: list[str] = Field(default_factory=list)
    rows_computed: int | None = None
    rows_resumed: int | None = None
    fraction_computed: float | None = None


class ShardEntry(Record):
    path: str  # relative to the cache directory
    split: str
    rows: int
    bytes: int
    sha256: str


class Manifest(Record):
    format_version: Literal[2] = FORMAT_VERSION
    cache_id: str
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    task: str  # which student task reads it: "classification" or "tokens"
    teachers: dict[str, TeacherRecord]  # by name; the primary is "teacher"
    dataset: DatasetRecord
    outputs: list[Output]
    num_classes: int  # classes, or the vocabulary size of a text cache
    input_shape: list[int]
    rows: int
    rows_by_split: dict[str, int]
    columns: dict[str, str]  # column -> Arrow type
    column_bytes: dict[str, int] = Field(default_factory=dict)  # compressed bytes of each column over every shard
    source_bytes: int | None = None  # the source's own stored bytes (its files), against which the cache's size is judged
    shards: list[ShardEntry]
    stats: PrecomputeStats = Field(default_factory=PrecomputeStats)
    config: dict[str, Any] = Field(default_factory=dict)  # the resolved precompute config that made it

    @property
    def teacher(self) -> TeacherRecord:
        return self.teachers[PRIMARY_TEACHER]

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def bytes_per_row(self) -> dict[str, float]:
        return {c: b / max(self.rows, 1) for c, b in self.column_bytes.items()}

    def logits(self, teacher: str = PRIMARY_TEACHER) -> LogitsRecord:
        """A teacher's stored logits signal (full, top-k, sampled or sequences)."""
        for out in self.outputs:
            if not isinstance(out, (TapRecord, ViewsRecord)) and out.teacher == teacher:
                return out
        raise DistillError(f"cache {self.cache_id} stores no logits of teacher {teacher!r}",
                           f"its teachers: {sorted(self.teachers)}")

    def logits_columns(self) -> dict[str, str]:
        """teacher name -> its full-logits column."""
        return {o.teacher: o.columns[0] for o in self.outputs if isinstance(o, FullLogitsRecord)}

    def taps(self) -> dict[str, TapRecord]:
        return {o.name: o for o in self.outputs if isinstance(o, TapRecord)}

    def shards_of(self, split: str) -> list[ShardEntry]:
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def manifest_uri(cache_uri: str) -> str:
    return storage.join(cache_uri, MANIFEST)


def write_manifest(cache_uri: str, manifest: Manifest, options: storage.Options = None) -> None:
    storage.write_bytes_atomic(manifest_uri(cache_uri), manifest.to_json().encode(), options)


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def parse_manifest(text: str | bytes, where: str = "manifest") -> Manifest:
    """A v2 manifest, or a v1 one converted; a one-line error naming the field otherwise."""
    from pipeline.cache.manifest_v1 import upgrade

    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistillError(f"{where} does not parse as JSON: {e}", "the cache is damaged; recompute it with --force") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version == 1:
        data = upgrade(data)
    elif isinstance(version, int) and version > FORMAT_VERSION:
        raise DistillError(f"{where} is format v{version}; this distill reads v1 and v{FORMAT_VERSION}",
                           "upgrade distill-pipeline to read it")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise DistillError(f"{where} is not a valid v{FORMAT_VERSION} manifest: field `{_field(first['loc'])}`: {first['msg']}",
                           "recompute the cache with --force") from None


def read_manifest(cache_uri: str, options: storage.Options = None) -> Manifest:
    """The manifest of a complete cache; a clear error for a missing or incomplete one."""
    uri = manifest_uri(cache_uri)
    if not storage.exists(cache_uri, options):
        raise DistillError(f"no cache at {cache_uri}", "run `distill precompute` first, or fix the cache URI")
    if not storage.exists(uri, options):
        raise DistillError(
            f"incomplete cache at {cache_uri}: no {MANIFEST} (a precompute did not finish)",
            "run `distill precompute` again to complete it",
        )
    return parse_manifest(storage.read_bytes(uri, options), where=uri)
