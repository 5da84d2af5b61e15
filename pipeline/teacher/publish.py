"""The end of a teacher pass: checksum every shard, check the rows against the source, assemble the
typed manifest, write it last, and record which config produced the cache."""

from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.cache.index import record_cache
from pipeline.cache.manifest import (
    FullLogitsRecord,
    Manifest,
    Output,
    PrecomputeStats,
    SampledRecord,
    SequencesRecord,
    ShardEntry,
    TapRecord,
    TeacherRecord,
    TopkRecord,
    ViewsRecord,
    write_manifest,
)
from pipeline.cache.packing import index_bits
from pipeline.cache.schema import TOKEN_MODE_COLUMNS, TOKENIZER_FILE, VIEWS, logits_column, tap_column
from pipeline.cache.shards import inspect_shard, list_shard_files, split_of_shard
from pipeline.config import PRIMARY_TEACHER, ModelSpec, PrecomputeConfig, TextSource
from pipeline.data.sources import SPLITS
from pipeline.errors import DistillError
from pipeline.teacher.identity import CacheTarget

_TOKEN_RECORDS = {"full": FullLogitsRecord, "topk": TopkRecord, "sampled": SampledRecord, "sequences": SequencesRecord}


def outputs_records(cfg: PrecomputeConfig, target: CacheTarget, shapes: dict[str, list[int]],
                    per_row: dict[str, float]) -> list[Output]:
    """Every stored signal with its columns, shape and compressed bytes per row (and per token)."""
    vocab = target.source.num_classes
    if isinstance(cfg.source, TextSource):
        spec = cfg.outputs.logits
        columns = TOKEN_MODE_COLUMNS[spec.mode]
        row_bytes = sum(per_row.get(c, 0.0) for c in columns)
        fields = spec.model_dump(exclude={"mode"})
        if spec.mode in ("topk", "sampled"):
            fields["index_bits"] = index_bits(vocab)
        return [_TOKEN_RECORDS[spec.mode](teacher=PRIMARY_TEACHER, columns=columns, shape=[cfg.source.seq_len, vocab],
                                          bytes_per_row=round(row_bytes, 1),
                                          bytes_per_token=round(row_bytes / cfg.source.seq_len, 2), **fields)]
    views = cfg.outputs.views
    records: list[Output] = [
        FullLogitsRecord(teacher=name, columns=[logits_column(name)], dtype=cfg.outputs.logits.dtype,
                         shape=[views.count, vocab] if views else [vocab], bytes_per_row=per_row.get(logits_column(name)))
        for name in cfg.all_teachers]
    if views:
        records.append(ViewsRecord(columns=[VIEWS], count=views.count, seed=views.seed, shape=[views.count, 5],
                                   transforms=[t.model_dump() for t in views.transforms], bytes_per_row=per_row.get(VIEWS)))
    records += [TapRecord(columns=[tap_column(t.name)], shape=shapes.get(tap_column(t.name), []),
                          bytes_per_row=per_row.get(tap_column(t.name)), **t.model_dump()) for t in cfg.outputs.taps]
    return records


def publish(cfg: PrecomputeConfig, target: CacheTarget, stats: PrecomputeStats) -> Manifest:
    """Checksum every shard, check the row counts against the source, then write the manifest."""
    shards, columns, shapes, column_bytes = [], None, {}, {}
    for rel in list_shard_files(target.uri, cfg.storage):
        facts = inspect_shard(storage.join(target.uri, rel), cfg.storage)
        columns = columns or facts.columns
        shapes = shapes or facts.shapes
        for c, b in facts.column_bytes.items():
            column_bytes[c] = column_bytes.get(c, 0) + b
        shards.append(ShardEntry(path=rel, split=split_of_shard(rel), rows=facts.rows, bytes=facts.bytes, sha256=facts.sha256))
    rows_by_split = {s: sum(e.rows for e in shards if e.split == s) for s in SPLITS}
    if rows_by_split != target.source.rows:
        raise DistillError(f"the cache's shards hold {rows_by_split} rows, the source has {target.source.rows}",
                           "nothing was published; recompute from scratch with --force")
    rows = sum(rows_by_split.values())
    per_row = {c: round(b / max(rows, 1), 1) for c, b in column_bytes.items()}
    text = isinstance(cfg.source, TextSource)
    manifest = Manifest(
        cache_id=target.cache_id,
        task="tokens" if text else "classification",
        teachers={name: _teacher_record(target, name, t, text, cfg.storage) for name, t in cfg.all_teachers.items()},
        dataset={**target.identity["dataset"], **({"tokenizer": _save_tokenizer(target, cfg.storage)} if text else {})},
        outputs=outputs_records(cfg, target, shapes, per_row),
        num_classes=target.source.num_classes,
        input_shape=list(target.source.input_shape),
        rows=rows,
        rows_by_split=rows_by_split,
        columns=columns or {},
        column_bytes=column_bytes,
        source_bytes=target.source.bytes,
        shards=shards,
        stats=stats,
        config=cfg.model_dump(mode="json"),
    )
    write_manifest(target.uri, manifest, cfg.storage)
    record_cache(cfg.cache_root, cfg.recipe(), target.cache_id, cfg.storage)
    return manifest


def _teacher_record(target: CacheTarget, name: str, spec: ModelSpec, text: bool, options: storage.Options) -> TeacherRecord:
    identity: dict[str, Any] = (target.identity["teacher"] if name == PRIMARY_TEACHER
                                else target.identity["outputs"]["teachers"][name])
    width = None
    if text:  # an HF teacher may have more logit rows than its tokenizer has tokens
        from pipeline.models.hf import hf_logit_width

        path = spec.kwargs.get("path")
        width = (hf_logit_width(str(path), options) if path and spec.factory.endswith(":hf_causal_lm") else None) or target.source.num_classes
    return TeacherRecord(**identity, weights=spec.weights, logit_width=width,
                         dropped_logit_rows=max((width or 0) - target.source.num_classes, 0))


def _save_tokenizer(target: CacheTarget, options: storage.Options) -> dict[str, Any]:
    """A text cache carries its tokenizer, so every student (and any later decoding) uses the same one."""
    from pipeline.data.tokenizer import save_tokenizer, tokenizer_digest

    tok = target.rows.tokenizer()  # type: ignore[attr-defined]
    save_tokenizer(tok, storage.join(target.uri, TOKENIZER_FILE), options)
    return {"path": TOKENIZER_FILE, "digest": tokenizer_digest(tok), "vocab_size": tok.get_vocab_size(),
            "kind": target.rows.cfg.tokenizer.kind}  # type: ignore[attr-defined]
