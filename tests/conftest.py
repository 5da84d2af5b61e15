"""Shared fixtures: configs pointed at a temporary directory, and a hand-built cache for tests without Ray."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cache.manifest import Manifest, ShardEntry, write_manifest
from pipeline.cache.schema import LABEL, LOGITS, SAMPLE_ID, X
from pipeline.cache.shards import inspect_shard
from tests.raycluster import RAY_TEST_ENV

os.environ.update(RAY_TEST_ENV)  # before any Ray starts: its workers inherit it

DIGITS_PRECOMPUTE = "jobs/configs/digits/precompute.yaml"
DIGITS_KD = "jobs/configs/digits/train-kd.yaml"


def in_memory_task(terms: dict[str, float], temperature: float = 4.0, num_classes: int = 10, input_shape=(1, 8, 8),
                   student: str = "pipeline.models.builtin:mlp"):
    """The classification task over tensors in memory: the seam the worker loop runs through, without a cache."""
    from pipeline.config import TrainConfig
    from pipeline.student.tasks.classification import ClassificationTask

    cfg = TrainConfig.model_validate({"cache": "in-memory", "student": {"factory": student},
                                      "loss": {"terms": terms, "temperature": temperature}})
    return ClassificationTask.in_memory(cfg, num_classes, tuple(input_shape))


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.fixture
def digits_precompute_yaml(tmp_path):
    """The shipped digits precompute config with its outputs redirected under tmp_path."""
    data = yaml.safe_load(open(DIGITS_PRECOMPUTE))
    data["cache_root"] = str(tmp_path / "cache")
    data["teacher"]["weights"] = str(tmp_path / "teacher.pt")
    return write_yaml(tmp_path / "precompute.yaml", data)


def _tensor_column(arr: np.ndarray):
    from pyarrow import FixedShapeTensorArray

    return FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(arr))


def make_manifest(outputs: list[dict], *, num_classes: int = 10, input_shape=(1, 8, 8), rows: dict[str, int] | None = None,
                  columns: dict[str, str] | None = None, shards: list | None = None, task: str = "classification",
                  teachers: list[str] = ("teacher",), **extra) -> Manifest:
    """A valid v2 manifest with only what a test cares about spelled out."""
    rows = rows or {"train": 8, "val": 2}
    return Manifest(
        cache_id=extra.pop("cache_id", "cachetest0000000"), task=task,
        teachers={name: {"factory": "pipeline.models.builtin:digits_cnn"} for name in teachers},
        dataset={"kind": "test", "fingerprint": "f", "split": {"val_fraction": 0.2, "split_seed": 0}, "transform": "none",
                 "input_shape": list(input_shape)},
        outputs=outputs, num_classes=num_classes, input_shape=list(input_shape), rows=sum(rows.values()), rows_by_split=rows,
        columns=columns or {}, shards=shards or [], **extra)


def full_logits(teacher: str = "teacher", column: str = LOGITS, num_classes: int = 10) -> dict:
    return {"mode": "full", "teacher": teacher, "columns": [column], "dtype": "float16", "shape": [num_classes]}


def make_cache(root, *, rows: dict[str, int] | None = None, num_classes: int = 10, shape=(1, 8, 8), seed: int = 0,
               nonfinite_rows: tuple[int, ...] = ()) -> str:
    """A small, valid cache written with pyarrow alone (no Ray), for tests of readers and checks;
    `nonfinite_rows` of the first split get a NaN and an inf teacher logit (a sound file, unsound values)."""
    rows = rows or {"train": 40, "val": 10}
    rng = np.random.default_rng(seed)
    cache_uri = str(root / "cachetest0000000")
    for split in rows:
        (root / "cachetest0000000" / "shards" / f"split={split}").mkdir(parents=True)
    shards, columns, column_bytes, start = [], None, {}, 0
    for split, n in rows.items():
        logits = rng.normal(size=(n, num_classes)).astype(np.float16)
        if start == 0:
            for r in nonfinite_rows:
                logits[r, 0], logits[r, 1] = np.nan, np.inf
        table = pa.table({
            SAMPLE_ID: pa.array([f"s-{i}" for i in range(start, start + n)]),
            X: _tensor_column(rng.normal(size=(n, *shape)).astype(np.float32)),
            LABEL: pa.array(rng.integers(0, num_classes, n), pa.int64()),
            LOGITS: _tensor_column(logits),
        })
        start += n
        rel = f"shards/split={split}/part-0000-000000-0.parquet"
        pq.write_table(table, f"{cache_uri}/{rel}")
        facts = inspect_shard(f"{cache_uri}/{rel}")
        columns = facts.columns
        column_bytes = {c: column_bytes.get(c, 0) + b for c, b in facts.column_bytes.items()}
        shards.append(ShardEntry(path=rel, split=split, rows=n, bytes=facts.bytes, sha256=facts.sha256))
    write_manifest(cache_uri, make_manifest([full_logits(num_classes=num_classes)], num_classes=num_classes, input_shape=shape,
                                            rows=rows, columns=columns, shards=shards, column_bytes=column_bytes))
    return cache_uri


@pytest.fixture
def tiny_cache(tmp_path) -> str:
    return make_cache(tmp_path)


# Seconds spent per marker (setup, call and teardown), printed at the end of every run: where the
# suite's time goes, in CI's output.
_MARKERS = ("e2e", "integration", "gpu")
_seconds: dict[str, float] = {}
_tests: dict[str, set[str]] = {}


def _marker_of(keywords) -> str:
    return next((m for m in _MARKERS if m in keywords), "unit")


def pytest_runtest_logreport(report) -> None:
    marker = _marker_of(report.keywords)
    _seconds[marker] = _seconds.get(marker, 0.0) + report.duration
    _tests.setdefault(marker, set()).add(report.nodeid)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _seconds:
        return
    terminalreporter.section("time per marker")
    for marker in ("unit", *_MARKERS):
        if marker in _seconds:
            terminalreporter.write_line(f"{marker:<12} {_seconds[marker]:8.1f} s  {len(_tests[marker]):4d} tests")
    terminalreporter.write_line(f"{'total':<12} {sum(_seconds.values()):8.1f} s")
