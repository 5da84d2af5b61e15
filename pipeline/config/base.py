"""What both stages' configs share: strict models, storage and job options, model specs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline import storage
from pipeline.cache.schema import PRIMARY_TEACHER  # its logits column is `teacher_logits`
from pipeline.storage import StorageOptions  # a config's `storage:` section is what every storage call takes

__all__ = ["PRIMARY_TEACHER", "NAME_PATTERN", "Strict", "StorageOptions", "JobOptions", "ModelSpec", "absolute"]
NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


class Strict(BaseModel):
    """Unknown fields are errors: a typo in a config fails validation instead of being ignored."""

    model_config = ConfigDict(extra="forbid")


class JobOptions(Strict):
    """What the stage's Ray Job entrypoint (the driver) asks for when submitted with `distill submit`.

    The default asks for nothing, so the driver never holds a CPU or GPU the teacher actors or
    train workers need; set these to pin the driver, e.g. to a node group with a custom resource.
    """

    entrypoint_num_cpus: float = Field(0.0, ge=0)
    entrypoint_num_gpus: float = Field(0.0, ge=0)
    entrypoint_resources: dict[str, float] = Field(default_factory=dict)


class ModelSpec(Strict):
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


def absolute(uri: str | None) -> str | None:
    """A local path made absolute against the current directory; URIs (s3://...) and None as they are."""
    return storage.local_path(uri) if uri and storage.is_local(uri) else uri
