"""Which cache a precompute config produces: its identity, key and URI.

Lives in the cache package (not in the teacher stage) because a train config may name
the precompute config it came from, and stage 2 must find the cache without importing
stage 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.cache import storage
from pipeline.cache.key import cache_identity, cache_key
from pipeline.cache.schema import LOGITS_FIELDS
from pipeline.config import ModelSpec, PrecomputeConfig
from pipeline.data.sources import SourceInfo, describe
from pipeline.models.factory import weights_digest


@dataclass(frozen=True)
class CacheTarget:
    cache_id: str
    uri: str
    identity: dict[str, Any]
    source: SourceInfo


def teacher_identity(teacher: ModelSpec) -> dict[str, Any]:
    identity = {"factory": teacher.factory, "kwargs": teacher.kwargs, "weights_sha256": weights_digest(teacher.weights)}
    if teacher.factory.endswith(":hf_causal_lm") and "path" in teacher.kwargs:
        from pipeline.models.lm import hf_weights_digest

        identity["files_sha256"] = hf_weights_digest(teacher.kwargs["path"])  # a saved HF model directory
    return identity


def outputs_identity(cfg: PrecomputeConfig) -> dict[str, Any]:
    outputs = cfg.outputs.model_dump()
    logits = outputs["logits"]
    fields = LOGITS_FIELDS[logits["mode"]]
    if logits["mode"] == "topk" and logits["values"] == "float16":
        fields = tuple(f for f in fields if f != "step")
    outputs["logits"] = {f: logits[f] for f in fields}
    if not outputs["taps"]:
        del outputs["taps"]  # caches made before taps existed keep their ids
    if cfg.teachers:
        outputs["teachers"] = {name: teacher_identity(t) for name, t in cfg.teachers.items()}
    return outputs


def resolve_target(cfg: PrecomputeConfig) -> CacheTarget:
    source = describe(cfg.source)
    identity = cache_identity(
        teacher=teacher_identity(cfg.teacher),
        dataset=source.identity(cfg.source),
        outputs=outputs_identity(cfg),
    )
    cache_id = cache_key(identity)
    return CacheTarget(cache_id=cache_id, uri=storage.join(cfg.cache_root, cache_id), identity=identity, source=source)
