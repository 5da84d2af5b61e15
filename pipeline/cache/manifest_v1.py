"""The one converter from format v1 manifests (untyped `teacher`, `outputs` and `stats` dicts) to v2.

v1 and v2 caches hold the same shards under the same cache ids; only the manifest's shape
changed, so a v1 cache is read as it is, converted in memory, and never rewritten.
"""

from __future__ import annotations

from typing import Any

from pipeline.cache.schema import FORMAT_VERSION, INPUT_IDS, LOGITS, PRIMARY_TEACHER, TOKEN_MODE_COLUMNS

_TEACHER_FIELDS = ("factory", "kwargs", "weights", "weights_sha256", "files_sha256")
_DATASET_FIELDS = ("kind", "uri", "fingerprint", "split", "transform", "columns", "text", "input_shape", "tokenizer")
_MODE_FIELDS = {
    "full": ("dtype",),
    "topk": ("k", "temperatures", "values", "step", "bytes_per_token"),
    "sampled": ("k", "temperatures", "proposal_temperature", "seed", "bytes_per_token"),
    "sequences": ("prompt_tokens", "new_tokens", "strategy", "temperatures", "seed", "bytes_per_token"),
}
_TAP_FIELDS = ("name", "teacher", "module", "kind", "pool", "p", "shape")
_STATS_FIELDS = ("wall_s", "rows_per_s", "devices", "num_actors", "ray_job_id", "teacher_nodes", "rows_computed",
                 "rows_resumed", "fraction_computed")


def _pick(d: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {f: d[f] for f in fields if f in d}


def _outputs(v1: dict[str, Any], tokens: bool, per_row: dict[str, float]) -> list[dict[str, Any]]:
    logits = v1.get("outputs", {}).get("logits", {})
    mode = logits.get("mode", "full")
    shape = logits.get("shape") or ([v1["input_shape"][0], v1["num_classes"]] if tokens else [v1["num_classes"]])
    out: list[dict[str, Any]] = []
    if mode == "full":
        by_teacher = logits.get("columns") or {PRIMARY_TEACHER: logits.get("column", LOGITS)}
        for teacher, column in by_teacher.items():
            record = {"mode": "full", "teacher": teacher, "columns": [column], "dtype": logits.get("dtype", "float16"),
                      "shape": shape, "bytes_per_row": per_row.get(column)}
            if tokens and column in per_row:
                record["bytes_per_token"] = round(per_row[column] / shape[0], 2)
            out.append(record)
    else:
        columns = logits.get("stored") or TOKEN_MODE_COLUMNS[mode]
        out.append({"mode": mode, "teacher": PRIMARY_TEACHER, "columns": columns, "shape": shape,
                    "bytes_per_row": round(sum(per_row.get(c, 0.0) for c in columns), 1) if per_row else None,
                    **_pick(logits, _MODE_FIELDS[mode])})
    for tap in (v1.get("outputs", {}).get("taps") or {}).values():
        out.append({"mode": "tap", "columns": [tap["column"]], "bytes_per_row": tap.get("bytes_per_row"),
                    **_pick(tap, _TAP_FIELDS)})
    return out


def upgrade(v1: dict[str, Any]) -> dict[str, Any]:
    """A v1 manifest as a v2 dict (validated by the caller like any v2 manifest)."""
    tokens = INPUT_IDS in v1.get("columns", {})
    teachers = v1.get("teachers") or {PRIMARY_TEACHER: v1.get("teacher", {})}
    per_row = v1.get("outputs", {}).get("bytes_per_row") or {}
    dataset = _pick(v1.get("dataset", {}), _DATASET_FIELDS)
    dataset.setdefault("input_shape", v1.get("input_shape"))
    return {
        "format_version": FORMAT_VERSION,
        "cache_id": v1.get("cache_id"),
        "created": v1.get("created"),
        "task": "tokens" if tokens else "classification",
        "teachers": {name: _pick(t, _TEACHER_FIELDS) for name, t in teachers.items()},
        "dataset": dataset,
        "outputs": _outputs(v1, tokens, per_row),
        "num_classes": v1.get("num_classes"),
        "input_shape": v1.get("input_shape"),
        "rows": v1.get("rows"),
        "rows_by_split": v1.get("rows_by_split"),
        "columns": v1.get("columns"),
        "column_bytes": {c: round(b * v1.get("rows", 0)) for c, b in per_row.items()},
        "shards": v1.get("shards"),
        "stats": _pick(v1.get("stats") or {}, _STATS_FIELDS),
        "config": v1.get("config") or {},
    }
