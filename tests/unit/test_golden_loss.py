"""The worker loop's numbers, pinned (torchtune's golden-loss standard): a seeded 20-step run on the
bundled digits through `run_loop` with a fake session, no Ray. Its per-step `train_loss` must match
the stored history to 1e-6, so a change to micro-batch weighting, the per-step reseed, the row order
or the scheduler fails here even when "the loss still falls".

A deliberate change to the numbers rewrites the file: DISTILL_WRITE_GOLDEN=1 pytest tests/unit/test_golden_loss.py
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cache.manifest import ShardEntry, write_manifest
from pipeline.cache.schema import LABEL, LOGITS, SAMPLE_ID, X
from pipeline.cache.shards import inspect_shard
from pipeline.cache.tensors import tensor_array
from pipeline.config import TrainConfig, parse_source
from pipeline.data.sources import load_split
from pipeline.student.train.plan import CachePlan, WorkerPlan, shard_plan, slim, step_budget
from pipeline.student.train.worker import run_loop
from tests.conftest import full_logits, make_manifest

# DCP saves one process's state without a process group, and says so every time.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
GOLDEN = Path(__file__).parent / "data" / "golden_loss_digits.json"
SHARD_ROWS, SHARDS, VAL_ROWS = 96, 4, 128
CONFIG = {
    "cache": "set-by-the-test", "name": "golden", "seed": 0, "batch_size": 32, "max_steps": 20, "epochs": 100,
    "grad_accum_steps": 3, "shuffle_shards": 2, "eval_every": 1, "checkpoint_every": 10, "num_workers": 1,
    "student": {"factory": "pipeline.models.builtin:mlp", "kwargs": {"hidden": [32]}},
    "loss": {"temperature": 4.0, "terms": {"kd": 0.7, "ce": 0.3}},
    "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01, "schedule": "cosine", "warmup_steps": 4,
                  "grad_clip": 1.0},
}


class FakeSession:
    """One worker on the CPU: reports are kept, checkpoints copied aside (as Ray Train persists them)."""

    rank, world, device = 0, 1, torch.device("cpu")

    def __init__(self, keep: Path, restore_from: Path | None = None) -> None:
        self.keep, self.restore_from, self.reports = keep, restore_from, []

    def checkpoint_dir(self):
        return contextlib.nullcontext(str(self.restore_from) if self.restore_from else None)

    def report(self, metrics: dict, directory: str | None) -> None:
        self.reports.append(metrics)
        if directory:
            shutil.copytree(directory, self.keep / f"step-{metrics['step']}")


def digits_cache(root: Path) -> str:
    """The bundled digits (the pipeline's own source and split) with fixed teacher-like logits:
    a seeded linear map of the pixels plus the label, so the run does not depend on a trained teacher."""
    source = parse_source({"kind": "digits", "val_fraction": 0.2, "split_seed": 0})
    rng = np.random.default_rng(0)
    weights = rng.normal(scale=0.05, size=(64, 10))
    uri, shards, columns, sizes = str(root / "cachegolden00000"), [], {}, {}
    for split, parts in (("train", [slice(i * SHARD_ROWS, (i + 1) * SHARD_ROWS) for i in range(SHARDS)]),
                         ("val", [slice(0, VAL_ROWS)])):
        rows = load_split(source, split)
        (root / "cachegolden00000" / "shards" / f"split={split}").mkdir(parents=True)
        for i, part in enumerate(parts):
            x, label = rows[X][part], rows[LABEL][part]
            logits = x.reshape(len(x), -1) @ weights + 4.0 * np.eye(10)[label]
            rel = f"shards/split={split}/part-{i:04d}.parquet"
            pq.write_table(pa.table({SAMPLE_ID: pa.array(rows[SAMPLE_ID][part].astype(str)), X: tensor_array(x),
                                     LABEL: pa.array(label, pa.int64()), LOGITS: tensor_array(logits.astype(np.float16))}),
                           f"{uri}/{rel}")
            facts = inspect_shard(f"{uri}/{rel}")
            columns = facts.columns
            sizes = {c: sizes.get(c, 0) + b for c, b in facts.column_bytes.items()}
            shards.append(ShardEntry(path=rel, split=split, rows=len(x), bytes=facts.bytes, sha256=facts.sha256))
    rows_by_split = {"train": SHARD_ROWS * SHARDS, "val": VAL_ROWS}
    write_manifest(uri, make_manifest([full_logits()], rows=rows_by_split, columns=columns, shards=shards,
                                      column_bytes=sizes, cache_id="cachegolden00000"))
    return uri


def run(cache_uri: str, keep: Path, restore_from: Path | None = None, **changes) -> list[dict]:
    from pipeline.cache.manifest import read_manifest

    cfg = TrainConfig.model_validate({**CONFIG, "cache": cache_uri, **changes})
    manifest = read_manifest(cache_uri)
    cache = CachePlan(cache_uri, shard_plan(manifest), in_memory=False)
    _, total = step_budget(cfg, cache, None)
    session = FakeSession(keep, restore_from)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums on every machine
    try:
        run_loop(WorkerPlan(cfg, slim(manifest), cache, total), session)
    finally:
        torch.set_num_threads(threads)
    return session.reports


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    cache = digits_cache(root)
    (root / "ckpt").mkdir()
    return cache, root, run(cache, root / "ckpt")


def test_the_loss_history_of_a_seeded_run_is_pinned(golden_run):
    _, _, reports = golden_run
    history = {"step": [r["step"] for r in reports], "train_loss": [r["train_loss"] for r in reports],
               "val_accuracy": [r.get("val_accuracy") for r in reports], "lr": [r["lr"] for r in reports]}
    if os.environ.get("DISTILL_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"config": CONFIG, **history}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["config"] == CONFIG, "the run's config changed: rewrite the file (see the module docstring)"
    assert history["step"] == golden["step"] == list(range(1, 21))
    assert history["train_loss"] == pytest.approx(golden["train_loss"], abs=1e-6, rel=0)
    assert history["lr"] == pytest.approx(golden["lr"], abs=1e-9, rel=0)
    assert history["val_accuracy"] == pytest.approx(golden["val_accuracy"], abs=1e-6, rel=0)


def test_a_run_resumed_from_its_step_10_checkpoint_repeats_the_same_numbers(golden_run, tmp_path):
    cache, root, reports = golden_run
    resumed = run(cache, tmp_path, restore_from=root / "ckpt" / "step-10")
    assert [r["step"] for r in resumed] == list(range(11, 21)) and all(r["resumed_from_step"] == 10 for r in resumed)
    assert [r["train_loss"] for r in resumed] == pytest.approx([r["train_loss"] for r in reports[10:]], abs=1e-6, rel=0)


def _gap(a: list[dict], b: list[dict]) -> float:
    return max(abs(x["train_loss"] - y["train_loss"]) for x, y in zip(a, b, strict=True))


def test_three_unequal_micro_batches_train_as_one_batch(golden_run, tmp_path):
    """Micro-batches of 10, 11 and 11 rows are weighted by their rows: the same steps as one batch of 32."""
    assert _gap(golden_run[2], run(golden_run[0], tmp_path, grad_accum_steps=1)) < 1e-5


@pytest.mark.parametrize("change", [{"shuffle_shards": 4}, {"seed": 1}, {"optimizer": {**CONFIG["optimizer"], "warmup_steps": 0}}])
def test_the_pinned_numbers_see_a_change_of_order_seed_or_schedule(golden_run, tmp_path, change):
    """The golden test can fail: each of these changes moves the history by far more than 1e-6."""
    assert _gap(golden_run[2], run(golden_run[0], tmp_path, **change)) > 1e-4
