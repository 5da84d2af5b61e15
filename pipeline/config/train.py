"""Stage 2's config: which cache, which student, the loss terms, the optimiser and the Ray Train scaling."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.augment import MIXING, Augment
from pipeline.config.base import JobOptions, ModelSpec, StorageOptions, Strict, absolute

# Loss terms the student stage knows; each maps to a function in pipeline/student/losses.py.
KNOWN_LOSS_TERMS = ("kd", "ce", "deit_hard", "hint", "attention", "rkd")


class TapMatch(Strict):
    """A student module paired with a tap the cache stores."""

    student: str  # qualified name from student.named_modules()
    tap: str  # the tap's `name` in the precompute config (see `distill cache show`)


class RkdOptions(TapMatch):
    distance_weight: float = Field(1.0, ge=0)  # lambda_D of Park et al. (2019)
    angle_weight: float = Field(2.0, ge=0)  # lambda_A


class LossConfig(Strict):
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
    # Token students that expose their output head (built-in and HF language models): the loss applies
    # it a chunk of positions at a time, so no (batch, length, vocabulary) logits tensor is held.
    fused_head: bool = True

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


class OptimizerConfig(Strict):
    """The optimiser and its learning-rate schedule, per optimizer step (not per micro-batch)."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0)
    # Linear warmup from 0 over `warmup_steps`, then constant or a decay to min_lr_ratio * lr at the last step.
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)  # max global L2 norm of the gradients, before each step


class TrainConfig(Strict):
    name: str | None = None  # run directory name under storage_path; defaults to "<config stem>-seed<seed>"
    cache: str | None = None  # URI of a cache directory (<cache_root>/<cache_id>)
    precompute: str | None = None  # or: the precompute config the cache came from
    student: ModelSpec
    loss: LossConfig = Field(default_factory=LossConfig)
    # Image transforms applied to each training batch, in order (pipeline/student/augment.py); the
    # teacher's stored outputs are those of the unaugmented image.
    augment: list[Augment] = Field(default_factory=list)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    epochs: int = Field(10, ge=1)
    # A step budget instead of epochs: stop after this many optimizer steps, or (token caches) once
    # this many target tokens have been trained on; epochs is then only an upper bound.
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)  # global rows per optimizer step: each of the N workers takes batch_size / N
    grad_accum_steps: int = Field(1, ge=1)  # each worker's share of a step in this many micro-batches (memory, not maths)
    # Autocast to bf16/fp16 for the forward pass (bf16 runs on CPU too); weights, optimizer state and
    # losses stay float32; fp16 adds a gradient scaler.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # ddp: every worker holds the whole student; fsdp: parameters, gradients and optimizer state
    # are sharded across the workers (PyTorch FSDP2), checkpoints saved sharded.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    checkpoint_every: int | None = Field(None, ge=1)  # optimizer steps between checkpoints (default: each epoch's end)
    eval_every: int | None = Field(None, ge=1)  # optimizer steps between evaluations (default: each epoch's end)
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    storage_path: str = "runs/train"
    storage: StorageOptions = Field(default_factory=StorageOptions)
    job: JobOptions = Field(default_factory=JobOptions)
    seed: int = 0  # the student's init and the data order (shards and rows shuffled per epoch from it)
    # Shards whose rows are shuffled together (one window at a time); more mix rows written in the
    # source's order better, each costs a decoded shard of a streaming worker's memory. 0: all.
    shuffle_shards: int = Field(8, ge=0)
    # Keep the decoded shards in each worker after their first read instead of streaming them again
    # every epoch. auto: when a worker's share of both splits is small (see docs/methods.md).
    in_memory: bool | Literal["auto"] = "auto"
    # A node-local directory where workers keep the shards they stream from an object store: each
    # worker reads the same shards every epoch, so later epochs read local disk, not the bucket
    # again. At most `local_cache_gb` per node (least recently used shards dropped). Off by default.
    local_cache: str | None = None
    local_cache_gb: float = Field(50.0, gt=0)
    max_failures: int = Field(3, ge=0)  # worker-group restarts from the latest checkpoint before the run fails

    @model_validator(mode="after")
    def _one_cache_source(self) -> "TrainConfig":
        if bool(self.cache) == bool(self.precompute):
            raise ValueError("set exactly one of `cache` (a cache URI) or `precompute` (its precompute config)")
        if self.batch_size < self.num_workers * self.grad_accum_steps:
            raise ValueError("`batch_size` is global and must be at least `num_workers` x `grad_accum_steps`")
        if self.max_steps and self.max_tokens:
            raise ValueError("set at most one of `max_steps` and `max_tokens`")
        kinds = [t.kind for t in self.augment]
        if sum(k in MIXING for k in kinds) > 1:
            raise ValueError("`augment` takes one of mixup and cutmix, not both")
        if any(k in MIXING for k in kinds) and kinds[-1] not in MIXING:
            raise ValueError("`augment`: put mixup or cutmix last (it mixes the transformed images)")
        if self.augment and any(self.loss.terms.get(t, 0) > 0 for t in ("hint", "attention", "rkd")):
            raise ValueError("`augment` with feature terms (hint, attention, rkd): the stored features are the "
                             "unaugmented image's; drop one or the other")
        return self

    def with_absolute_paths(self) -> "TrainConfig":
        """The same config with every local path made absolute (see PrecomputeConfig.with_absolute_paths)."""
        return self.model_copy(update={"cache": absolute(self.cache), "precompute": absolute(self.precompute),
                                       "storage_path": absolute(self.storage_path),
                                       "student": self.student.model_copy(update={"weights": absolute(self.student.weights)})})

    @property
    def alpha(self) -> float:
        """Share of the KD term, the usual way to name a KD mix."""
        total = sum(self.loss.terms.values())
        return self.loss.terms.get("kd", 0.0) / total


