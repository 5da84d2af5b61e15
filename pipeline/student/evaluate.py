"""`distill evaluate`: score a trained student on any dataset — the val split of a cache or of a
precompute config's source, or a user's own held-out Parquet table — in this process, without Ray.

Classification: accuracy, NLL and calibration bins, plus agreement and KL with the teacher when the
rows come from a cache. Tokens: perplexity and next-token accuracy, plus agreement from a full or
top-k cache.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import rundir, storage
from pipeline.cache.manifest import Manifest, manifest_uri, read_manifest
from pipeline.cache.inputs import decode_inputs
from pipeline.cache.schema import TOKENIZER_FILE, X
from pipeline.cache.tensors import to_numpy
from pipeline.config import TextSource, TrainConfig, load_precompute_config, parse_source
from pipeline.data.sources import SPLITS, open_source
from pipeline.errors import DistillError
from pipeline.models.factory import load_state
from pipeline.student.tasks import Task, task_for

SPLIT_CHOICES = ("train", "val", "all")


def evaluate_run(run_dir: str, source: str, split: str | None = None, options: storage.Options = None) -> dict[str, Any]:
    """Metrics of the run's student on `source`: a cache URI, a precompute config (its source), or a
    Parquet table read with the run's cache's source settings. Returns {"metrics", "rows", "split", ...}.

    `options` reach the run directory and `source`; the run's own cache and weights are read through
    the storage options it was trained with."""
    result = rundir.read_result(run_dir, options)
    cfg = TrainConfig.model_validate(result.config)
    if not result.weights or not result.cache:
        raise DistillError(f"{run_dir} has no trained student weights (student.pt)", "train the run to the end first")
    manifest = read_manifest(result.cache, cfg.storage)  # the run's own cache: shapes, classes, task, tokenizer
    task = task_for(cfg, manifest)
    model = task.student(task.build_model())
    load_state(model, result.weights, cfg.storage)
    columns, split, kind = _rows(source, split, manifest, task, result.cache, options)
    metrics = task.evaluate(model, _batches(columns, task))
    return {"run": run_dir, "source": source, "source_kind": kind, "split": split,
            "rows": int(len(next(iter(columns.values())))), "metrics": metrics}


def _rows(source: str, split: str | None, manifest: Manifest, task: Task, cache: str,
          options: storage.Options) -> tuple[dict[str, np.ndarray], str, str]:
    if split is not None and split not in SPLIT_CHOICES:
        raise DistillError(f"unknown split {split!r}", f"use one of {list(SPLIT_CHOICES)}")
    if source.endswith((".yaml", ".yml")):
        pre = load_precompute_config(source)
        split = split or "val"
        source_of = open_source(_with_tokenizer(pre.source, cache), pre.storage)
        columns = _concat([source_of.load_split(s) for s in _splits(split)])
        scale = source_of.input_scale
        kind = "config"
    elif storage.exists(manifest_uri(source), options):
        split = split or "val"
        columns = _cache_rows(source, split, task, options)
        scale = read_manifest(source, options).dataset.input_scale
        kind = "cache"
    else:
        split = split or "all"
        table = _table_source(source, manifest, options)
        try:
            columns = open_source(_with_tokenizer(table, cache), options).load_split("train")
            scale = 1.0  # a user's table: its values as they are
        except DistillError as e:
            if "lacks" not in e.problem:
                raise
            raise DistillError(f"{e.problem.replace('parquet source ', 'table ', 1)}",
                               "score a table with the columns of the run's own source: "
                               + ", ".join(f"{k} {v!r}" for k, v in _named_columns(table).items())) from None
        kind = "table"
    wanted = [c for c in task.columns() if c in columns]
    if not wanted or len(next(iter(columns.values()))) == 0:
        raise DistillError(f"{source} has no rows in split {split!r}", f"pick another --split ({', '.join(SPLIT_CHOICES)})")
    if X in columns:  # stored as that source stores it; float32 model inputs whatever the run's cache stores
        columns[X] = decode_inputs(columns[X], scale)
    return {c: columns[c] for c in wanted}, split, kind


def _splits(split: str) -> tuple[str, ...]:
    return SPLITS if split == "all" else (split,)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _cache_rows(uri: str, split: str, task: Task, options: storage.Options) -> dict[str, np.ndarray]:
    """Another cache's rows of `split`; its classes and inputs must be the run's."""
    other = read_manifest(uri, options)
    mine = task.manifest
    if other.num_classes != mine.num_classes or other.input_shape != mine.input_shape:
        raise DistillError(f"cache {uri} has {other.num_classes} classes and inputs {other.input_shape}; the student "
                           f"was trained on {mine.num_classes} and {mine.input_shape}", "evaluate on a cache of the same task")
    fs, root = storage.arrow_filesystem(uri, options)
    wanted = [c for c in task.columns() if c in other.columns]
    tables = [pq.read_table(f"{root}/{s.path}", filesystem=fs, columns=wanted) for sp in _splits(split) for s in other.shards_of(sp)]
    if not tables:
        return {c: np.zeros((0,)) for c in wanted}
    return {c: np.concatenate([to_numpy(t.column(c), t.schema.field(c)) for t in tables]) for c in wanted}


def _table_source(uri: str, manifest: Manifest, options: storage.Options):
    """A user's table, read as the run's cache read its own source (same columns), every row evaluated."""
    recorded = manifest.config.get("source") or {}
    if recorded.get("kind") not in ("parquet", "text"):
        raise DistillError(f"{uri} is neither a cache nor a precompute config, and the run's cache was not made from a "
                           f"table (its source is {recorded.get('kind', 'unknown')})",
                           "give a precompute config whose source describes the table, or a cache URI")
    if not storage.exists(uri, options):
        raise DistillError(f"{uri} does not exist", "give a cache URI, a precompute config or a Parquet table")
    # Every row of the table is scored: no split of its own (one read of the table).
    fields = {"uri": uri, "val_fraction": 0.0}
    if recorded["kind"] == "parquet":
        fields.update(val_uri=None, split_column=None)
    else:
        fields.update(files=None)
    return parse_source({**recorded, **fields})


def _named_columns(source) -> dict[str, str]:
    if isinstance(source, TextSource):
        return {"text": source.text_column}
    return {"id": source.id_column, "label": source.label_column, "inputs": ", ".join(source.input_columns)}


def _with_tokenizer(source, cache: str):
    """Text is tokenised with the run's cache's own tokenizer, whatever the source config says."""
    if not isinstance(source, TextSource):
        return source
    return source.model_copy(update={"tokenizer": source.tokenizer.model_copy(update={"uri": storage.join(cache, TOKENIZER_FILE)})})


def _batches(columns: dict[str, np.ndarray], task: Task) -> Iterator[dict[str, torch.Tensor]]:
    dtypes = {**task.dtypes(), X: torch.float32}  # inputs arrive decoded (see _rows)
    n = len(next(iter(columns.values())))
    for i in range(0, n, task.eval_batch_size):
        yield {c: torch.as_tensor(np.ascontiguousarray(v[i:i + task.eval_batch_size])).to(dtypes[c]) for c, v in columns.items()}
