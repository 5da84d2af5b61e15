"""Which cache a precompute config produces: its identity, key and URI (stage 1 alone computes these:
they hash the teacher's weights and read the data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.cache.key import cache_identity, cache_key
from pipeline.config import ModelSpec, PrecomputeConfig, TopkLogits
from pipeline.config.precompute import content_fields
from pipeline.data.sources import RowSource, SourceInfo, open_source
from pipeline.models.factory import weights_digest


@dataclass(frozen=True)
class CacheTarget:
    cache_id: str
    uri: str
    identity: dict[str, Any]
    source: SourceInfo
    rows: RowSource


def teacher_identity(teacher: ModelSpec, options: storage.Options = None) -> dict[str, Any]:
    identity = {"factory": teacher.factory, "kwargs": teacher.kwargs, "weights_sha256": weights_digest(teacher.weights, options)}
    if teacher.factory.endswith(":hf_causal_lm") and "path" in teacher.kwargs:
        from pipeline.models.hf import hf_weights_digest

        identity["files_sha256"] = hf_weights_digest(teacher.kwargs["path"], options)  # a saved HF model directory
    return identity


def outputs_identity(cfg: PrecomputeConfig) -> dict[str, Any]:
    """The outputs spec as the key sees it: each logits mode's own fields, and nothing that does not
    change the content (a float16 top-k cache has no quantisation step; no taps means no `taps`)."""
    outputs = cfg.outputs.model_dump()
    logits = cfg.outputs.logits
    if isinstance(logits, TopkLogits) and logits.values == "float16":
        del outputs["logits"]["step"]
    outputs["logits"] = content_fields(outputs["logits"])
    if not outputs["taps"]:
        del outputs["taps"]  # caches made before taps existed keep their ids
    if outputs.get("views") is None:
        outputs.pop("views", None)  # and caches without views theirs
    if cfg.teachers:
        outputs["teachers"] = {name: teacher_identity(t, cfg.storage) for name, t in cfg.teachers.items()}
    return outputs


def resolve_target(cfg: PrecomputeConfig) -> CacheTarget:
    rows = open_source(cfg.source, cfg.storage)
    source = rows.describe()
    identity = cache_identity(teacher=teacher_identity(cfg.teacher, cfg.storage), dataset=rows.identity(source), outputs=outputs_identity(cfg))
    cache_id = cache_key(identity)
    return CacheTarget(cache_id=cache_id, uri=storage.join(cfg.cache_root, cache_id), identity=identity, source=source, rows=rows)
