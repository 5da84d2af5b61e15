"""Bad data values, refused where they enter: non-finite inputs before any teacher runs, non-finite
teacher outputs before anything is published, and caches holding them reported by verify and show."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.cache.manifest import read_manifest
from pipeline.cache.values import nonfinite_values
from pipeline.cache.verify import verify_cache
from pipeline.config import ParquetSource
from pipeline.data.parquet import ParquetTable, standardize_batch
from pipeline.errors import DistillError
from pipeline.teacher.predictor import check_finite
from tests.conftest import make_cache
from tests.unit.test_cli_errors import assert_one_line_error, run


def _table(path, n=60, nan_rows=(), inf_rows=(), labels=None):
    rng = np.random.default_rng(0)
    x = rng.random((n, 4)).astype(np.float32)
    for r in nan_rows:
        x[r, 1] = np.nan
    for r in inf_rows:
        x[r, 3] = -np.inf
    cols = {"id": [f"r-{i}" for i in range(n)], "label": labels if labels is not None else np.arange(n) % 3}
    cols.update({f"f{j}": x[:, j] for j in range(4)})
    pq.write_table(pa.table(cols), path)
    return str(path)


def _source(uri, **extra):
    return ParquetSource(uri=uri, id_column="id", input_columns=["f*"], **extra)


def test_nonfinite_inputs_are_counted_and_named(tmp_path):
    uri = _table(tmp_path / "t.parquet", nan_rows=(7, 9), inf_rows=(9, 30))
    with pytest.raises(DistillError) as e:
        ParquetTable(_source(uri)).check_values()
    assert "3 of 60 rows" in e.value.problem and "'r-7'" in e.value.problem and "nonfinite_inputs: zero" in e.value.fix
    assert ParquetTable(_source(uri)).check_values(max_bytes=10) is False  # too big for the driver: the actors check
    assert ParquetTable(_source(uri, nonfinite_inputs="zero")).check_values() is True


def test_each_streamed_batch_refuses_or_zeroes_nonfinite_inputs(tmp_path):
    uri = _table(tmp_path / "t.parquet", nan_rows=(2,))
    batch = {n: c.to_numpy(zero_copy_only=False) for n, c in zip(pq.read_table(uri).column_names, pq.read_table(uri).columns)}
    with pytest.raises(DistillError, match=r"1 of 60 rows in a batch of .* e.g. row 'r-2'"):
        standardize_batch(batch, cfg=_source(uri))
    rows = standardize_batch(batch, cfg=_source(uri, nonfinite_inputs="zero"))
    assert np.isfinite(rows["x"]).all() and rows["x"][2, 1] == 0.0 and rows["x"][3, 1] == batch["f1"][3]


def test_zeroing_is_part_of_the_cache_key_and_the_default_is_not(tmp_path):
    uri = _table(tmp_path / "t.parquet")
    plain, zero = ParquetTable(_source(uri)), ParquetTable(_source(uri, nonfinite_inputs="zero"))
    info = plain.describe()
    assert "nonfinite_inputs" not in plain.identity(info)  # caches made before the option keep their ids
    assert zero.identity(info)["nonfinite_inputs"] == "zero"


def test_an_empty_table_and_a_table_without_training_rows(tmp_path):
    uri = _table(tmp_path / "t.parquet")
    pq.write_table(pq.read_table(uri).slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(DistillError, match="has no rows"):
        ParquetTable(_source(str(tmp_path / "empty.parquet"))).describe()
    table = pq.read_table(uri)
    pq.write_table(table.append_column("fold", pa.array(["val"] * table.num_rows)), tmp_path / "val.parquet")
    with pytest.raises(DistillError, match="all 60 rows are in the val split"):
        ParquetTable(ParquetSource(uri=str(tmp_path / "val.parquet"), id_column="id", input_columns=["f*"],
                                   split_column="fold")).describe()


def test_reading_a_table_without_its_label_column_names_it(tmp_path):
    uri = _table(tmp_path / "t.parquet")
    pq.write_table(pq.read_table(uri).drop(["label"]), uri)
    with pytest.raises(DistillError, match=r"lacks column\(s\) \['label'\]"):
        ParquetTable(_source(uri, val_fraction=0.0)).load_split("train")


def test_nonfinite_teacher_outputs_are_refused_with_a_row():
    out = {"teacher_logits": np.ones((4, 3), np.float16), "tap_f": np.ones((4, 2), np.float32), "topk_indices": np.ones((4, 2), np.uint16)}
    ids = np.array(["a", "b", "c", "d"], dtype=object)
    check_finite(out, list(out), ids)
    out["teacher_logits"][2, 1] = np.inf  # float16 overflow
    with pytest.raises(DistillError) as e:
        check_finite(out, list(out), ids)
    assert "teacher_logits are not finite" in e.value.problem and "1 of 4 rows" in e.value.problem and "'c'" in e.value.problem
    assert "float32" in e.value.fix


def test_verify_and_show_report_nonfinite_teacher_outputs(capsys, tmp_path):
    sound = make_cache(tmp_path / "a")
    assert verify_cache(sound) == [] and nonfinite_values(sound, read_manifest(sound)) == {}
    code, out, _ = run(capsys, "cache", "show", sound)
    assert code == 0 and "teacher outputs all finite" in out
    bad = make_cache(tmp_path / "b", nonfinite_rows=(3, 5))
    found = nonfinite_values(bad, read_manifest(bad))["teacher_logits"]
    assert (found.values, found.rows, found.example) == (4, 2, "s-3")
    assert verify_cache(bad) == ["teacher column teacher_logits holds 4 non-finite value(s) (NaN or inf) in 2 row(s), e.g. row 's-3'"]
    code, out, _ = run(capsys, "cache", "verify", bad)
    assert code == 1 and "non-finite" in out
    code, out, _ = run(capsys, "cache", "show", bad)
    assert code == 0 and "NOT FINITE: teacher_logits holds 4" in out


def test_labels_past_the_teachers_classes_are_named(capsys, tmp_path):
    from pipeline.models.builtin import mlp

    labels = np.arange(60) % 3
    labels[11] = 5  # a sixth class the teacher never saw
    _table(tmp_path / "t.parquet", labels=labels)
    torch.save(mlp(input_shape=(4,), num_classes=3, hidden=[8]).state_dict(), tmp_path / "teacher.pt")
    cfg = {"source": {"kind": "parquet", "uri": str(tmp_path / "t.parquet"), "id_column": "id", "input_columns": ["f*"]},
           "teacher": {"factory": "pipeline.models.builtin:mlp", "kwargs": {"hidden": [8]}, "weights": str(tmp_path / "teacher.pt")},
           "cache_root": str(tmp_path / "cache")}
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run(capsys, "validate", str(tmp_path / "pre.yaml"))
    assert_one_line_error(code, err, "labels go up to 5", "predicts 3 classes (0..2)", "rows labelled 3 or more")
    labels[11] = 1
    _table(tmp_path / "t.parquet", labels=labels, nan_rows=(4,))
    code, _, err = run(capsys, "validate", str(tmp_path / "pre.yaml"))
    assert_one_line_error(code, err, "1 of 60 rows", "non-finite input values", "'r-4'")
