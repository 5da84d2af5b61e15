"""Stage 1's config: the source, the teacher(s), what to store per row, and how to schedule the pass.

The logits modes are a discriminated union on `mode`: each carries only its own fields, and those
fields are exactly what goes into the cache key.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, PrivateAttr, field_validator, model_validator

from pipeline.config.augment import Flip, RandomResizedCrop, Shift
from pipeline.config.base import NAME_PATTERN, PRIMARY_TEACHER, JobOptions, ModelSpec, StorageOptions, Strict, absolute
from pipeline.config.source import ParquetSource, Source, TextSource


class FitConfig(Strict):
    """How `distill fit-teacher` trains the demo teacher (plain PyTorch, one process)."""

    epochs: int = Field(15, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    shift: int = Field(2, ge=0)  # random +-shift pixel translations as augmentation
    seed: int = 0


class TeacherConfig(ModelSpec):
    fit: FitConfig = Field(default_factory=FitConfig)


def _positive(v: list[float]) -> list[float]:
    if any(t <= 0 for t in v):
        raise ValueError("temperatures must be > 0")
    return v


class FullLogits(Strict):
    """Every logit, raw (small class counts, or small vocabularies): any temperature is exact at train time."""

    mode: Literal["full"] = "full"
    dtype: Literal["float16", "float32"] = "float16"


class TopkLogits(Strict):
    """Token caches: the k largest logits and their ids, plus logsumexp(z/T) over the full vocabulary for
    each declared T, so the mass of everything not stored is exact."""

    mode: Literal["topk"] = "topk"
    k: int = Field(32, ge=1)
    temperatures: list[float] = Field(default_factory=lambda: [1.0, 2.0], min_length=1)
    values: Literal["float16", "uint8"] = "float16"  # raw logits, or uint8 offsets below the token's max
    step: float = Field(1 / 16, gt=0)  # uint8 quantisation step, in logits

    _temperatures = field_validator("temperatures")(_positive)


class SampledLogits(Strict):
    """Token caches: a sparse unbiased estimate of the teacher's distribution per token (sampled KD).

    The defaults (25 multinomial draws: 100 raw, about 35 stored bytes per token) trained students
    within 1% of full-logit KD in `make bench-topk` (docs/benchmarks.md)."""

    mode: Literal["sampled"] = "sampled"
    k: int = Field(25, ge=1)
    temperatures: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    proposal_temperature: float | None = Field(None, gt=0)  # draw from softmax(z / this); default T
    seed: int = 0  # the draws are reproducible
    # multinomial: k draws, weight count / k; priority: priority sampling (k kept, weight max(p, tau));
    # head_tail: the `head` likeliest tokens exactly plus k - head draws from the rest (see
    # pipeline/teacher/estimators.py). All are unbiased estimates of p_T.
    estimator: Literal["multinomial", "priority", "head_tail"] = "multinomial"
    head: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _estimator_fields(self) -> "SampledLogits":
        if self.estimator == "head_tail" and not 0 < self.head < self.k:
            raise ValueError("`head_tail` needs 0 < head < k")
        if self.estimator != "head_tail" and self.head:
            raise ValueError("`head` is for the head_tail estimator")
        if self.estimator != "multinomial" and self.proposal_temperature is not None:
            raise ValueError("`proposal_temperature` is for the multinomial estimator")
        return self

    @field_validator("temperatures")
    @classmethod
    def _one_temperature(cls, v: list[float]) -> list[float]:
        if len(v) != 1:
            raise ValueError("a sampled cache is drawn at one temperature: give `outputs.logits.temperatures` one value")
        return _positive(v)


class TeacherSequences(Strict):
    """Token caches: the teacher's own continuation of each window's first `prompt_tokens` (sequence-level KD)."""

    mode: Literal["sequences"] = "sequences"
    prompt_tokens: int = Field(16, ge=1)
    new_tokens: int = Field(48, ge=1)
    strategy: Literal["greedy", "sample"] = "greedy"
    temperatures: list[float] = Field(default_factory=lambda: [1.0, 2.0], min_length=1)  # `sample` draws at the first
    seed: int = 0

    _temperatures = field_validator("temperatures")(_positive)


LogitsOutput = Annotated[Union[FullLogits, TopkLogits, SampledLogits, TeacherSequences], Field(discriminator="mode")]
LOGITS_MODES = ("full", "topk", "sampled", "sequences")
FULL_LOGITS_VOCAB = 4096  # above this, a text cache stores full logits only with an explicit `mode: full`


class TapOutput(Strict):
    """An intermediate signal of a teacher, captured by a forward hook on `module`.

    `feature` stores the activation (pooled to `pool` if set), `attention` the Zagoruyko &
    Komodakis map mean_c |A|^p (resized to `pool`), `embedding` one vector per row. All float16.
    """

    name: str = Field(pattern=NAME_PATTERN)  # what train configs call it; unique in the cache
    module: str  # qualified name from teacher.named_modules(), e.g. "5" or "layer3.1.conv2"
    kind: Literal["feature", "attention", "embedding"] = "feature"
    pool: list[int] | None = Field(None, min_length=2, max_length=2)
    p: float = Field(2.0, gt=0)
    teacher: str = PRIMARY_TEACHER  # which teacher of the cache


class ViewsOutput(Strict):
    """A view-consistent image cache (FKD, Shen & Xing 2022): `count` views per image, view 0 the
    whole image and the others drawn by `transforms` from `seed` and the image's id; the teacher runs
    on each and its logits are stored per view, so a student replays a view with the teacher's
    outputs for exactly that view."""

    count: int = Field(4, ge=2, le=64)
    seed: int = 0
    transforms: list[Annotated[Union[RandomResizedCrop, Flip, Shift], Field(discriminator="kind")]] = Field(
        default_factory=lambda: [RandomResizedCrop(), Flip()], min_length=1)


class OutputsConfig(Strict):
    """What stage 1 stores per row. Content-defining: part of the cache key."""

    logits: LogitsOutput = Field(default_factory=FullLogits)
    taps: list[TapOutput] = Field(default_factory=list)
    views: ViewsOutput | None = None

    @model_validator(mode="before")
    @classmethod
    def _full_by_default(cls, data: Any) -> Any:
        """`logits: {dtype: float32}` without a mode means full logits, as it always has."""
        if isinstance(data, dict) and isinstance(data.get("logits"), dict) and "mode" not in data["logits"]:
            data = {**data, "logits": {"mode": "full", **data["logits"]}}
        return data

    @field_validator("taps")
    @classmethod
    def _unique_names(cls, v: list[TapOutput]) -> list[TapOutput]:
        names = [t.name for t in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tap names must be unique, repeated: {dup}")
        return v


class PrecomputeConfig(Strict):
    source: Source
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
    # Full logits a text config got without writing `mode: full` (a `logits` block of only `dtype`):
    # refused above FULL_LOGITS_VOCAB tokens, where they cost kilobytes a token.
    _implicit_full: bool = PrivateAttr(False)

    @model_validator(mode="wrap")
    @classmethod
    def _token_defaults(cls, data: Any, handler: Any) -> "PrecomputeConfig":
        """A text source without `outputs.logits` gets the documented default for token caches, the
        sampled signal; a `logits` block without `mode` still means full logits."""
        implicit = False
        if isinstance(data, dict) and isinstance(data.get("source"), dict) and data["source"].get("kind") == "text":
            outputs = data.get("outputs") or {}
            if isinstance(outputs, dict):
                if outputs.get("logits") is None:
                    data = {**data, "outputs": {**outputs, "logits": {"mode": "sampled"}}}
                elif isinstance(outputs["logits"], dict) and "mode" not in outputs["logits"]:
                    implicit = True
        cfg = handler(data)
        cfg._implicit_full = implicit
        return cfg

    @model_validator(mode="after")
    def _consistent(self) -> "PrecomputeConfig":
        for name in self.teachers:
            if name == PRIMARY_TEACHER or not re.match(NAME_PATTERN, name):
                raise ValueError(f"teacher name {name!r} must match {NAME_PATTERN} and differ from {PRIMARY_TEACHER!r}")
        unknown = sorted({t.teacher for t in self.outputs.taps} - set(self.all_teachers))
        if unknown:
            raise ValueError(f"outputs.taps name unknown teacher(s) {unknown}; teachers: {list(self.all_teachers)}")
        logits = self.outputs.logits
        text = isinstance(self.source, TextSource)
        if logits.mode != "full" and not text:
            raise ValueError(f"outputs.logits.mode {logits.mode!r} is for token caches: it needs `source.kind: text`")
        if text and (self.teachers or self.outputs.taps):
            raise ValueError("a text cache holds one teacher and no taps: drop `teachers` and `outputs.taps`")
        if self.outputs.views and (text or self.outputs.taps):
            raise ValueError("`outputs.views` is for image caches without taps (a tap of the whole image would not "
                             "match a view): drop `outputs.taps`, or the views")
        if isinstance(logits, TeacherSequences) and isinstance(self.source, TextSource) and logits.prompt_tokens > self.source.seq_len:
            raise ValueError("`outputs.logits.prompt_tokens` must be at most `source.seq_len`")
        return self

    @property
    def all_teachers(self) -> dict[str, TeacherConfig]:
        return {PRIMARY_TEACHER: self.teacher, **self.teachers}

    def with_absolute_paths(self) -> "PrecomputeConfig":
        """The same config with every local path made absolute (against the current directory): what
        a job on the cluster, which runs in a copy of the working directory, must be given."""
        source = self.source
        if isinstance(source, (ParquetSource, TextSource)) and source.uri:
            source = source.model_copy(update={"uri": absolute(source.uri)})
        if isinstance(source, ParquetSource) and source.val_uri:
            source = source.model_copy(update={"val_uri": absolute(source.val_uri)})
        if isinstance(source, TextSource):
            source = source.model_copy(update={
                "files": [absolute(f) for f in source.files] if source.files else source.files,
                "tokenizer": source.tokenizer.model_copy(update={"uri": absolute(source.tokenizer.uri)})})
        return self.model_copy(update={
            "source": source, "cache_root": absolute(self.cache_root),
            "teacher": self.teacher.model_copy(update={"weights": absolute(self.teacher.weights)}),
            "teachers": {n: t.model_copy(update={"weights": absolute(t.weights)}) for n, t in self.teachers.items()},
        })

    def recipe(self) -> dict[str, Any]:
        """What this config asks the cache to hold, with local paths absolute and nothing hashed or read:
        how stage 2 finds the cache a precompute config produced (see pipeline.cache.index)."""
        cfg = self.with_absolute_paths()
        dumped = cfg.model_dump(mode="json", include={"source", "outputs"})
        dumped["outputs"]["logits"] = content_fields(dumped["outputs"]["logits"])
        return dumped | {
            "teachers": {name: t.model_dump(mode="json", exclude={"fit"}) for name, t in cfg.all_teachers.items()}}


def content_fields(logits: dict[str, Any]) -> dict[str, Any]:
    """A dumped logits block without fields at a default that older caches were made without
    (the multinomial estimator), so their keys and recipes do not change."""
    if logits.get("mode") == "sampled" and logits.get("estimator") == "multinomial":
        return {k: v for k, v in logits.items() if k not in ("estimator", "head")}
    return logits
