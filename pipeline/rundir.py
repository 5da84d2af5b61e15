"""A training run's directory, `<storage_path>/<name>`: `config.json` at its start, Ray Train's
checkpoints while it runs, `result.json` and `student.pt` when it finishes.

`RunResult` is result.json's schema: the driver writes one, and every reader (the report, `distill
evaluate`, sweeps, benchmarks) gets typed fields instead of string keys. Readers of finished runs use
this module alone: it imports no torch and no Ray.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import storage
from pipeline.errors import DistillError

CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
STUDENT_FILE = "student.pt"  # the bare student's state dict, loadable by its factory (e.g. as a later teacher)
HF_DIR = "hf"  # Hugging Face students: save_pretrained of the model and its tokenizer, loadable by transformers


class SweepRecord(BaseModel):
    """Which sweep a trial's run belongs to, and the values it varied."""

    name: str
    values: dict[str, Any] = Field(default_factory=dict)


class RunResult(BaseModel):
    """What a finished run records (result.json). Fields a later version adds are ignored by this one."""

    model_config = ConfigDict(extra="ignore")

    name: str
    metrics: dict[str, Any]  # the task's final metrics (and `calibration` bins for classification)
    task: str = "classification"
    cache: str | None = None  # the cache URI, absolute for a local cache
    cache_id: str | None = None
    student: str | None = None  # the student's factory
    alpha: float | None = None
    temperature: float | None = None
    loss_terms: dict[str, float] = Field(default_factory=dict)
    seed: int | None = None
    epochs: float = 0
    steps: int = 0
    num_workers: int | None = None
    parallel: str | None = None
    precision: str | None = None
    throughput: dict[str, float | None] = Field(default_factory=dict)
    memory_per_worker: dict[str, int | None] = Field(default_factory=dict)
    weights: str | None = None  # student.pt, when the run trained to the end
    hf_model: str | None = None  # hf/, for Hugging Face students
    workers_with_teacher: int | None = None
    wall_s: float = 0.0
    history: list[dict[str, Any]] = Field(default_factory=list)  # one entry per report
    checkpoint: str | None = None  # the latest Ray Train checkpoint
    config: dict[str, Any] = Field(default_factory=dict)  # the resolved train config
    sweep: SweepRecord | None = None

    def last(self) -> dict[str, Any]:
        """The latest report (the final one for a finished run), or the final metrics without a history."""
        return self.history[-1] if self.history else dict(self.metrics)


def write_json(uri: str, data: dict[str, Any], options: storage.Options = None) -> None:
    storage.write_bytes_atomic(uri, (json.dumps(data, indent=2) + "\n").encode(), options)


def write_config(run_dir: str, config: dict[str, Any], options: storage.Options = None) -> None:
    write_json(storage.join(run_dir, CONFIG_FILE), config, options)


def read_config(run_dir: str, options: storage.Options = None) -> dict[str, Any]:
    """The config a run was started with (written before its first epoch), for `--resume`."""
    uri = storage.join(run_dir, CONFIG_FILE)
    if not storage.exists(uri, options):
        raise DistillError(f"{run_dir} is not a run directory (no {CONFIG_FILE})",
                           "pass the directory `distill train` created: <storage_path>/<name>")
    return json.loads(storage.read_bytes(uri, options))


def started(run_dir: str, options: storage.Options = None) -> bool:
    """A run was started here (its config is written before any training)."""
    return storage.exists(storage.join(run_dir, CONFIG_FILE), options)


def finished(run_dir: str, options: storage.Options = None) -> bool:
    return storage.exists(storage.join(run_dir, RESULT_FILE), options)


def read_result(run_dir: str, options: storage.Options = None) -> RunResult:
    """The result.json of one finished run, or one error naming the directory and the fix."""
    uri = storage.join(run_dir, RESULT_FILE)
    if not storage.exists(uri, options):
        raise DistillError(f"{run_dir} has no {RESULT_FILE} (not a finished run directory)",
                           "pass directories that `distill train` finished: <storage_path>/<name>")
    fix = "train the run again, or leave it out of the report"
    try:
        return RunResult.model_validate_json(storage.read_bytes(uri, options))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise DistillError(f"{uri} is unreadable: field `{where}`: {first['msg']}", fix) from None


def write_result(run_dir: str, result: RunResult, options: storage.Options = None) -> str:
    uri = storage.join(run_dir, RESULT_FILE)
    write_json(uri, result.model_dump(mode="json", exclude_none=False), options)
    return uri
