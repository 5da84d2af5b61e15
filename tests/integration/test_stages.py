"""Both stages on a local Ray, through the CLI: the cache contract and a real 2-worker training run."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cache.manifest import read_manifest
from pipeline.cache.schema import LABEL, LOGITS, SAMPLE_ID, VIEWS, X
from pipeline.cache.tensors import to_numpy
from pipeline.cache.verify import list_shard_files, verify_cache
from pipeline.cli import main
from pipeline.data.sources import load_split
from pipeline.teacher.identity import resolve_target
from tests.conftest import DIGITS_KD, write_yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def column(table, name):
    """One column of a shard as numpy (tensor columns as (rows, *shape))."""
    return to_numpy(table.column(name), table.schema.field(name))


def _read_cache(uri):
    m = read_manifest(uri)
    tables = {s: pq.read_table([f"{uri}/{e.path}" for e in m.shards_of(s)]) for s in ("train", "val")}
    return m, tables


def test_cache_has_every_sample_once_with_the_teachers_logits(digits_stage1):
    cfg = digits_stage1["config"]
    uri = resolve_target(cfg).uri
    m, tables = _read_cache(uri)
    assert m.rows == 1797 and m.rows_by_split == {"train": 1438, "val": 359}
    ids = [i for t in tables.values() for i in t.column(SAMPLE_ID).to_pylist()]
    assert len(ids) == len(set(ids)) == 1797
    assert verify_cache(uri) == []
    assert m.columns[LOGITS] and m.logits().dtype == "float16"
    # Stored logits equal the teacher's own forward pass, recomputed here, within float16 tolerance.
    from pipeline.teacher.precompute import teacher_logits_for

    val = load_split(cfg.source, "val")
    order = {sid: i for i, sid in enumerate(tables["val"].column(SAMPLE_ID).to_pylist())}
    stored_logits = column(tables["val"], LOGITS)
    assert stored_logits.dtype == np.float16 and stored_logits.shape == (359, 10)
    expected = teacher_logits_for(cfg, val[X])
    rows = [order[sid] for sid in val["sample_id"]]
    np.testing.assert_allclose(stored_logits[rows].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(tables["val"].column(LABEL).to_numpy()[rows], val[LABEL])
    # The input as the package ships it (uint8 0..16), read by both stages as x/16; the cache costs no
    # more per row than the source's own file plus the teacher's logits.
    stored_x = column(tables["val"], X)
    assert stored_x.dtype == np.uint8 and m.dataset.input_dtype == "uint8" and m.dataset.input_scale == 1 / 16
    np.testing.assert_array_equal(stored_x[rows].astype(np.float32) / 16, val[X])
    # (Columns, not files: each of these 300-row shards also carries a 2 kB footer; MNIST's 5,000 rows
    # cost 213 bytes a row in whole files against the source's 221.)
    per_row = m.bytes_per_row()
    assert m.source_bytes and per_row[X] < m.source_bytes / m.rows
    assert sum(per_row.values()) <= m.source_bytes / m.rows + per_row[LOGITS]


def test_the_cache_stage_1_wrote_reads_without_ray(digits_stage1):
    """What Ray Data wrote, read by pyarrow and DuckDB in a process that never imports Ray or torch."""
    from tests.unit.test_cache_readers import check_read, read_in_fresh_process

    uri = resolve_target(digits_stage1["config"]).uri
    out = read_in_fresh_process(uri)
    check_read(out, read_manifest(uri))
    assert out["types"][LOGITS].startswith("extension<arrow.fixed_shape_tensor[value_type=halffloat, shape=[10]")


def test_second_precompute_is_a_cache_hit_and_force_recomputes(digits_stage1, capsys):
    uri = resolve_target(digits_stage1["config"]).uri
    before = list_shard_files(uri)
    created = read_manifest(uri).created
    assert main(["precompute", digits_stage1["config_path"]]) == 0
    assert f"cache hit: {uri}" in capsys.readouterr().out
    assert list_shard_files(uri) == before

    from pipeline.teacher.precompute import run_precompute

    again = run_precompute(digits_stage1["config"], force=True)
    assert not again.hit and again.rows_computed == 1797
    assert list_shard_files(uri) != before and not set(before) & set(list_shard_files(uri))  # new files, old ones gone
    assert read_manifest(uri).rows == 1797 and verify_cache(uri) == []
    assert read_manifest(uri).created >= created


def test_train_two_workers_from_cache(digits_stage1, tmp_path, capsys):
    data = yaml.safe_load(open(DIGITS_KD))
    data.update(precompute=digits_stage1["config_path"], storage_path=str(tmp_path / "runs"), name="kd-test",
                epochs=15, num_workers=2)
    data["optimizer"]["lr"] = 0.003
    path = write_yaml(tmp_path / "train.yaml", data)
    capsys.readouterr()
    assert main(["train", path]) == 0
    # A cache this small is kept decoded in each worker, not streamed again every epoch.
    out = capsys.readouterr().out
    assert "keeping the cache in the workers" in out, out
    run_dir = tmp_path / "runs" / "kd-test"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["metrics"]["val_accuracy"] >= 0.9, result["metrics"]
    assert result["num_workers"] == 2 and result["epochs"] == 15 and len(result["history"]) == 15
    assert 0 <= result["metrics"]["val_agreement"] <= 1 and result["metrics"]["val_kl"] >= 0
    # Checked inside every worker: no teacher factory built, no pipeline.teacher module imported.
    assert result["workers_with_teacher"] == 0
    assert all(h["workers_with_teacher"] == 0 for h in result["history"])
    # A checkpoint per epoch (the newest two are kept), the last one holding all 15 epochs.
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == 2
    assert result["checkpoint"] and os.path.exists(os.path.join(result["checkpoint"], "meta.pt"))
    # Every epoch trains on the whole global batches of the train split (the last partial one dropped).
    assert all(h["train_samples"] == (1438 // 64) * 64 for h in result["history"])
    assert [h["step"] for h in result["history"]] == [22 * (i + 1) for i in range(15)]
    assert result["throughput"]["samples_per_s"] > 0
    # Each epoch says how long the worker waited for batches: part of, never more than, its train time.
    assert all(0 <= h["data_wait_seconds"] <= h["train_seconds"] for h in result["history"])
    # Each worker evaluated one of the two val shards, the sums all-reduced: the metrics are those of
    # one process evaluating the whole val split with the same student.
    from pipeline.student.evaluate import evaluate_run

    alone = evaluate_run(str(run_dir), result["cache"], "val")["metrics"]
    final = result["history"][-1]
    assert final["val_rows"] == alone["val_rows"] > 300
    for k in ("val_accuracy", "val_agreement", "val_kl", "val_nll", "teacher_val_accuracy"):
        assert final[k] == pytest.approx(alone[k], rel=1e-6), k


def test_float32_logits_on_request_make_another_cache(digits_stage1):
    from pipeline.config import load_precompute_config
    from pipeline.teacher.precompute import run_precompute

    cfg = load_precompute_config(digits_stage1["config_path"], ["outputs.logits.dtype=float32"])
    result = run_precompute(cfg)
    assert result.uri != resolve_target(digits_stage1["config"]).uri
    m, tables = _read_cache(result.uri)
    assert m.logits().dtype == "float32"
    assert column(tables["val"], LOGITS).dtype == np.float32


def test_parquet_source_through_ray_data(digits_stage1, tmp_path):
    """A user's own table: id, input columns and label under their own names, read by Ray Data."""
    import pyarrow as pa

    from pipeline.config import load_precompute_config
    from pipeline.data.sources import describe
    from pipeline.teacher.precompute import run_precompute

    digits = digits_stage1["config"].source
    rows = {s: load_split(digits, s) for s in ("train", "val")}
    x = np.concatenate([rows[s]["x"] for s in rows]).reshape(-1, 64)
    table = pa.table({"uid": [f"u{i}" for i in range(len(x))], "pixels": pa.array(list(x), pa.list_(pa.float32(), 64)),
                      "digit": np.concatenate([rows[s]["label"] for s in rows])})
    (tmp_path / "data").mkdir()
    pq.write_table(table.slice(0, 900), tmp_path / "data" / "a.parquet")
    pq.write_table(table.slice(900), tmp_path / "data" / "b.parquet")
    source = {"kind": "parquet", "uri": str(tmp_path / "data"), "id_column": "uid", "input_columns": ["pixels"],
              "label_column": "digit", "input_shape": [1, 8, 8]}
    cfg = load_precompute_config(digits_stage1["config_path"], [f"source={source}", f"cache_root={tmp_path}/cache"])
    result = run_precompute(cfg)
    m, tables = _read_cache(result.uri)
    assert m.rows == 1797 and m.rows_by_split == describe(cfg.source).rows
    ids = [i for t in tables.values() for i in t.column(SAMPLE_ID).to_pylist()]
    assert sorted(ids) == sorted(table.column("uid").to_pylist())
    assert m.input_shape == [1, 8, 8]
    assert m.dataset.input_dtype == "float32" and column(tables["train"], X).dtype == np.float32  # float columns as they are
    assert m.source_bytes == sum(f.stat().st_size for f in (tmp_path / "data").iterdir())


def test_uint8_pixels_stay_uint8_through_both_stages(digits_stage1, tmp_path):
    """A table of uint8 pixels is cached as uint8 (a quarter of float32) and read by the teacher, the
    student and `distill evaluate` as the same float values."""
    import pyarrow as pa

    from pipeline.config import TrainConfig, load_precompute_config
    from pipeline.student.tasks import task_for
    from pipeline.teacher.precompute import run_precompute, teacher_logits_for

    raw = load_digits_uint8()
    table = pa.table({"uid": [f"u{i}" for i in range(len(raw.data))],
                      "pixels": pa.array(list(raw.data.astype(np.uint8)), pa.list_(pa.uint8(), 64)), "digit": raw.target})
    pq.write_table(table, tmp_path / "pixels.parquet")
    source = {"kind": "parquet", "uri": str(tmp_path / "pixels.parquet"), "id_column": "uid", "input_columns": ["pixels"],
              "label_column": "digit", "input_shape": [1, 8, 8]}
    cfg = load_precompute_config(digits_stage1["config_path"], [f"source={source}", f"cache_root={tmp_path}/cache"])
    m, tables = _read_cache(run_precompute(cfg).uri)
    x = column(tables["val"], X)
    assert m.dataset.input_dtype == "uint8" and m.dataset.input_scale == 1.0 and x.dtype == np.uint8
    np.testing.assert_allclose(column(tables["val"], LOGITS).astype(np.float32),
                               teacher_logits_for(cfg, x.astype(np.float32)), rtol=2e-3, atol=2e-3)
    task = task_for(TrainConfig.model_validate({"cache": "c", "student": {"factory": "pipeline.models.builtin:mlp"}}), m)
    import torch

    assert task.dtypes()[X] == torch.uint8
    assert torch.equal(task.model_inputs({X: torch.from_numpy(x)}), torch.from_numpy(x).float())


def load_digits_uint8():
    from sklearn.datasets import load_digits

    return load_digits()


def test_a_view_cache_through_ray_data_and_a_student_replaying_it(digits_stage1, tmp_path):
    """Stage 1 with `outputs.views`: one Ray Data pass, R logits per image; then a student's loop
    (in-process, the worker's code) replays the stored views."""
    from pipeline.config import load_precompute_config
    from pipeline.teacher.precompute import run_precompute, teacher_logits_for
    from tests.unit.test_golden_loss import run

    views = {"count": 3, "seed": 0, "transforms": [{"kind": "random_resized_crop", "scale": [0.5, 1.0]}, {"kind": "flip"}]}
    cfg = load_precompute_config(digits_stage1["config_path"], [f"outputs.views={views}", f"cache_root={tmp_path}/cache"])
    result = run_precompute(cfg)
    m, tables = _read_cache(result.uri)
    assert result.uri != resolve_target(digits_stage1["config"]).uri and verify_cache(result.uri) == []
    record = next(o for o in m.outputs if o.mode == "views")
    assert record.count == 3 and m.logits().shape == [3, 10] and column(tables["val"], LOGITS).shape == (359, 3, 10)
    stored = column(tables["val"], VIEWS)
    assert stored.shape == (359, 3, 5) and (stored[:, 0] == [0.5, 0.5, 1.0, 1.0, 0.0]).all()
    x = column(tables["val"], X).astype(np.float32) / 16  # view 0's logits are the whole image's
    np.testing.assert_allclose(column(tables["val"], LOGITS)[:, 0].astype(np.float32), teacher_logits_for(cfg, x),
                               rtol=2e-3, atol=2e-3)
    (tmp_path / "ckpt").mkdir()
    reports = run(result.uri, tmp_path / "ckpt", max_steps=120, grad_accum_steps=1, shuffle_shards=0, eval_every=60,
                  checkpoint_every=120, optimizer={"name": "adam", "lr": 0.01})
    assert [r["step"] for r in reports] == [60, 120] and all(np.isfinite(r["train_loss"]) for r in reports)
    assert reports[-1]["val_agreement"] > 0.7 and reports[-1]["val_accuracy"] > 0.7  # against view 0, the whole image
