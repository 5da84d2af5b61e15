"""Typed configs for the two stages, loaded from YAML and validated before any Ray work starts.

Every validation error names the field (dotted path) so a user can fix it in the file or
with `--set field=value` on the command line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import DistillError

# Loss terms the student stage knows; each maps to a function in pipeline/student/losses.py.
KNOWN_LOSS_TERMS = ("kd", "ce", "deit_hard", "hint", "attention", "rkd")
PRIMARY_TEACHER = "teacher"  # the name of `teacher:`; its logits column is `teacher_logits`
_NAME = r"^[a-z][a-z0-9_]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StorageOptions(_Strict):
    """S3-compatible endpoint override (MinIO, Ceph, a test server). Credentials never go here:
    they come from the standard AWS chain (environment, profiles, instance roles) on each node."""

    endpoint_url: str | None = None
    region: str | None = None


class JobOptions(_Strict):
    """What the stage's Ray Job entrypoint (the driver) asks for when submitted with `distill submit`.

    The default asks for nothing, so the driver never holds a CPU or GPU the teacher actors or
    train workers need; set these to pin the driver, e.g. to a node group with a custom resource.
    """

    entrypoint_num_cpus: float = Field(0.0, ge=0)
    entrypoint_num_gpus: float = Field(0.0, ge=0)
    entrypoint_resources: dict[str, float] = Field(default_factory=dict)


class TokenizerConfig(_Strict):
    """How text becomes token ids. The trained tokenizer is saved beside the cache's shards, so
    every student of the cache reads the same vocabulary."""

    kind: Literal["bpe", "byte"] = "bpe"
    vocab_size: int = Field(8192, ge=300, le=1_000_000)  # bpe only; byte is 256 + specials
    min_frequency: int = Field(2, ge=1)
    uri: str | None = None  # reuse an existing tokenizer.json instead of training one


class SourceConfig(_Strict):
    """Where the rows come from. Built-in sources ship inside packages, so nothing is downloaded."""

    kind: Literal["digits", "mnist", "parquet", "text"]
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: int = 0
    # parquet only: a user's own table with an id column, input columns and a label column.
    uri: str | None = None
    id_column: str = "sample_id"
    input_columns: list[str] | None = None
    label_column: str = "label"
    input_shape: list[int] | None = None
    version: str | None = None  # explicit dataset version; otherwise file fingerprints are used
    # text only: files (paths, directories or globs; default: the Python standard library's sources)
    # or a Parquet `uri` with `text_column`, chunked into sequences of `seq_len` + 1 tokens.
    files: list[str] | None = None
    text_column: str = "text"
    seq_len: int = Field(64, ge=2)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    max_documents: int | None = Field(None, ge=1)
    max_bytes: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _parquet_needs_uri(self) -> "SourceConfig":
        if self.kind == "parquet" and (not self.uri or not self.input_columns):
            raise ValueError("a parquet source needs `uri` and `input_columns`")
        return self


class ModelSpec(_Strict):
    """Any torch.nn.Module: `module:function` called with kwargs, weights loaded from an fsspec URI."""

    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None

    @field_validator("factory")
    @classmethod
    def _module_colon_function(cls, v: str) -> str:
        module, sep, func = v.partition(":")
        if not sep or not module or not func:
            raise ValueError(f"must look like `package.module:function`, got {v!r}")
        return v


class FitConfig(_Strict):
    """How `distill fit-teacher` trains the demo teacher (plain PyTorch, one process)."""

    epochs: int = Field(15, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    shift: int = Field(2, ge=0)  # random +-shift pixel translations as augmentation
    seed: int = 0


class TeacherConfig(ModelSpec):
    fit: FitConfig = Field(default_factory=FitConfig)


class LogitsOutput(_Strict):
    """`full` stores every logit (small vocabularies). For token caches: `topk` stores the k largest
    logits, their ids and logsumexp(z/T) for each declared temperature (exact tail mass); `sampled`
    stores k importance-weighted draws; `sequences` stores teacher continuations (sequence-level KD)."""

    mode: Literal["full", "topk", "sampled", "sequences"] = "full"
    dtype: Literal["float16", "float32"] = "float16"
    k: int = Field(32, ge=1)
    temperatures: list[float] = Field(default_factory=lambda: [1.0, 2.0], min_length=1)
    values: Literal["float16", "uint8"] = "float16"  # topk: raw logits, or uint8 offsets below the token's max
    step: float = Field(1 / 16, gt=0)  # uint8 quantisation step, in logits
    proposal_temperature: float | None = Field(None, gt=0)  # sampled: draw from softmax(z / this); default T
    seed: int = 0  # sampled and sequences: the draws are reproducible
    prompt_tokens: int = Field(16, ge=1)  # sequences: the prompt taken from each row
    new_tokens: int = Field(48, ge=1)  # sequences: continuation length
    strategy: Literal["greedy", "sample"] = "greedy"

    @field_validator("temperatures")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(t <= 0 for t in v):
            raise ValueError("temperatures must be > 0")
        return v


class TapOutput(_Strict):
    """An intermediate signal of a teacher, captured by a forward hook on `module`.

    `feature` stores the activation (pooled to `pool` if set), `attention` the Zagoruyko &
    Komodakis map mean_c |A|^p (resized to `pool`), `embedding` one vector per row. All float16.
    """

    name: str = Field(pattern=_NAME)  # what train configs call it; unique in the cache
    module: str  # qualified name from teacher.named_modules(), e.g. "5" or "layer3.1.conv2"
    kind: Literal["feature", "attention", "embedding"] = "feature"
    pool: list[int] | None = Field(None, min_length=2, max_length=2)
    p: float = Field(2.0, gt=0)
    teacher: str = PRIMARY_TEACHER  # which teacher of the cache


class OutputsConfig(_Strict):
    """What stage 1 stores per row. Content-defining: part of the cache key."""

    logits: LogitsOutput = Field(default_factory=LogitsOutput)
    taps: list[TapOutput] = Field(default_factory=list)

    @field_validator("taps")
    @classmethod
    def _unique_names(cls, v: list[TapOutput]) -> list[TapOutput]:
        names = [t.name for t in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tap names must be unique, repeated: {dup}")
        return v


class PrecomputeConfig(_Strict):
    source: SourceConfig
    teacher: TeacherConfig
    # More teachers computed in the same pass; columns are namespaced `<name>_logits`.
    teachers: dict[str, TeacherConfig] = Field(default_factory=dict)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    cache_root: str = "runs/cache"
    storage: StorageOptions = Field(default_factory=StorageOptions)
    job: JobOptions = Field(default_factory=JobOptions)
    batch_size: int = Field(256, ge=1)
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, ge=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    # Custom Ray resources each teacher actor asks for, e.g. {"teacher_gpu": 1} to pin it to such nodes.
    actor_resources: dict[str, float] = Field(default_factory=dict)
    rows_per_shard: int = Field(50_000, ge=1)

    @model_validator(mode="after")
    def _teacher_names(self) -> "PrecomputeConfig":
        for name in self.teachers:
            if name == PRIMARY_TEACHER or not re.match(_NAME, name):
                raise ValueError(f"teacher name {name!r} must match {_NAME} and differ from {PRIMARY_TEACHER!r}")
        unknown = sorted({t.teacher for t in self.outputs.taps} - set(self.all_teachers))
        if unknown:
            raise ValueError(f"outputs.taps name unknown teacher(s) {unknown}; teachers: {list(self.all_teachers)}")
        mode = self.outputs.logits.mode
        if mode != "full" and self.source.kind != "text":
            raise ValueError(f"outputs.logits.mode {mode!r} is for token caches: it needs `source.kind: text`")
        if self.source.kind == "text" and (self.teachers or self.outputs.taps):
            raise ValueError("a text cache holds one teacher and no taps: drop `teachers` and `outputs.taps`")
        if mode == "sampled" and len(self.outputs.logits.temperatures) != 1:
            raise ValueError("a sampled cache is drawn at one temperature: give `outputs.logits.temperatures` one value")
        if mode == "sequences" and self.outputs.logits.prompt_tokens > self.source.seq_len:
            raise ValueError("`outputs.logits.prompt_tokens` must be at most `source.seq_len`")
        return self

    @property
    def all_teachers(self) -> dict[str, TeacherConfig]:
        return {PRIMARY_TEACHER: self.teacher, **self.teachers}


class TapMatch(_Strict):
    """A student module paired with a tap the cache stores."""

    student: str  # qualified name from student.named_modules()
    tap: str  # the tap's `name` in the precompute config (see `distill cache show`)


class RkdOptions(TapMatch):
    distance_weight: float = Field(1.0, ge=0)  # lambda_D of Park et al. (2019)
    angle_weight: float = Field(2.0, ge=0)  # lambda_A


class LossConfig(_Strict):
    """Weighted loss terms. `kd` is alpha in alpha*T^2*KL + (1-alpha)*CE; `ce` is 1-alpha.

    `hint`, `attention` and `rkd` need their layer pairs below; `deit_hard` needs only logits.
    """

    temperature: float = Field(4.0, gt=0)
    terms: dict[str, float] = Field(default_factory=lambda: {"kd": 0.7, "ce": 0.3})
    hint: list[TapMatch] = Field(default_factory=list)  # FitNets: adapter(student) ~ teacher feature
    hint_adapter: Literal["auto", "linear", "conv1x1"] = "auto"
    attention: list[TapMatch] = Field(default_factory=list)  # attention transfer pairs
    rkd: RkdOptions | None = None  # relational KD on embeddings
    # Teachers whose logits the kd/deit_hard targets use, with weights (None: the primary `teacher` only).
    teachers: dict[str, float] | None = None
    # average: KL to the weighted mean of the teachers' softened distributions;
    # per_teacher: the weighted sum of one KL term per teacher.
    multi_teacher: Literal["average", "per_teacher"] = "average"
    # Top-k token caches: `bucket` is the exact KL over the k stored tokens + one rest bucket;
    # `uniform` also spreads the exact rest mass evenly over the tokens not stored (full-vocabulary KL).
    topk_tail: Literal["bucket", "uniform"] = "bucket"

    @model_validator(mode="after")
    def _pairs_for_terms(self) -> "LossConfig":
        for term, pairs in (("hint", self.hint), ("attention", self.attention), ("rkd", self.rkd)):
            if self.terms.get(term, 0) > 0 and not pairs:
                raise ValueError(f"loss term `{term}` needs `loss.{term}` (student module and cache tap to match)")
        if self.teachers is not None and (not self.teachers or any(w < 0 for w in self.teachers.values())
                                          or sum(self.teachers.values()) <= 0):
            raise ValueError("`loss.teachers` needs at least one teacher with a positive weight")
        return self

    @field_validator("terms")
    @classmethod
    def _known_terms(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(KNOWN_LOSS_TERMS))
        if unknown:
            raise ValueError(f"unknown loss term(s) {unknown}; known: {list(KNOWN_LOSS_TERMS)}")
        if any(w < 0 for w in v.values()):
            raise ValueError("loss weights must be >= 0")
        if sum(v.values()) <= 0:
            raise ValueError("at least one loss term needs a positive weight")
        return v


class OptimizerConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0)


class TrainConfig(_Strict):
    name: str | None = None  # run directory name under storage_path; defaults to "<config stem>-seed<seed>"
    cache: str | None = None  # URI of a cache directory (<cache_root>/<cache_id>)
    precompute: str | None = None  # or: the precompute config the cache came from
    student: ModelSpec
    loss: LossConfig = Field(default_factory=LossConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)  # global: each of the N workers takes batch_size / N
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    storage_path: str = "runs/train"
    storage: StorageOptions = Field(default_factory=StorageOptions)
    job: JobOptions = Field(default_factory=JobOptions)
    seed: int = 0
    shuffle_buffer: int = Field(4096, ge=0)
    # Read the cache once into Ray's object store and serve every epoch from there, instead of
    # streaming the shards again each epoch. None (auto): when the selected columns of both
    # splits fit in a fifth of the cluster's object store memory.
    in_memory: bool | None = None
    max_failures: int = Field(3, ge=0)  # worker-group restarts from the latest checkpoint before the run fails

    @model_validator(mode="after")
    def _one_cache_source(self) -> "TrainConfig":
        if bool(self.cache) == bool(self.precompute):
            raise ValueError("set exactly one of `cache` (a cache URI) or `precompute` (its precompute config)")
        if self.batch_size < self.num_workers:
            raise ValueError("`batch_size` is global and must be at least `num_workers`")
        return self

    @property
    def alpha(self) -> float:
        """Share of the KD term, the usual way to name a KD mix."""
        total = sum(self.loss.terms.values())
        return self.loss.terms.get("kd", 0.0) / total


AnyConfig = Union[PrecomputeConfig, TrainConfig]


def parse_overrides(pairs: list[str] | None) -> list[tuple[list[str], Any]]:
    """`a.b=value` pairs; the value is read as YAML so numbers, booleans and lists keep their type."""
    out = []
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise DistillError(f"bad override {pair!r}", "write it as --set field.sub=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip().split("."), value))
    return out


def apply_overrides(data: dict[str, Any], pairs: list[str] | None) -> dict[str, Any]:
    for path, value in parse_overrides(pairs):
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"config file {str(p)!r} does not exist", "check the path")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DistillError(f"invalid YAML in {p}{where}: {problem}", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise DistillError(f"{p} is not a YAML mapping", "a config is a mapping of field: value")
    return data


def config_kind(data: dict[str, Any]) -> str:
    if "teacher" in data or "cache_root" in data:
        return "precompute"
    if "student" in data:
        return "train"
    raise DistillError(
        "cannot tell the config's stage", "a precompute config has `teacher:`, a train config has `student:`"
    )


def _format_validation(path: str, err: ValidationError) -> DistillError:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return DistillError(
        f"invalid config {path}: field `{field}`: {msg}{more}",
        f"fix `{field}` in the file or override it with --set {field}=...",
    )


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, kind: str | None = None) -> AnyConfig:
    """Read, override and validate a stage config. Raises DistillError naming the bad field."""
    data = apply_overrides(read_yaml(path), overrides)
    kind = kind or config_kind(data)
    model = PrecomputeConfig if kind == "precompute" else TrainConfig
    if kind == "train" and not data.get("name"):
        data["name"] = f"{Path(path).stem}-seed{data.get('seed', 0)}"
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _format_validation(str(path), e) from None


def load_precompute_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PrecomputeConfig:
    cfg = load_config(path, overrides, kind="precompute")
    assert isinstance(cfg, PrecomputeConfig)
    return cfg


def load_train_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    cfg = load_config(path, overrides, kind="train")
    assert isinstance(cfg, TrainConfig)
    return cfg
