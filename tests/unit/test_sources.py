import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DigitsSource, MnistSource, ParquetSource
from pipeline.data.sources import describe, load_split


def test_digits_split_is_deterministic_and_disjoint():
    cfg = DigitsSource()
    train, val = load_split(cfg, "train"), load_split(cfg, "val")
    assert len(train["label"]) + len(val["label"]) == 1797
    assert len(val["label"]) == round(1797 * 0.2)
    assert not set(train["sample_id"]) & set(val["sample_id"])
    again = load_split(cfg, "val")
    assert list(again["sample_id"]) == list(val["sample_id"])
    np.testing.assert_array_equal(again["x"], val["x"])
    assert val["x"].shape[1:] == (1, 8, 8) and val["x"].dtype == np.float32 and val["x"].max() <= 1.0
    info = describe(cfg)
    assert info.num_classes == 10 and info.rows == {"train": 1438, "val": 359} and info.input_shape == (1, 8, 8)


def test_split_seed_changes_split_and_fingerprint_is_stable():
    a = load_split(DigitsSource(split_seed=0), "val")["sample_id"]
    b = load_split(DigitsSource(split_seed=1), "val")["sample_id"]
    assert set(a) != set(b)
    assert describe(DigitsSource()).fingerprint == describe(DigitsSource(split_seed=1)).fingerprint


def test_mnist_subset_is_4000_train_1000_val():
    info = describe(MnistSource())
    assert info.rows == {"train": 4000, "val": 1000}
    assert info.input_shape == (1, 28, 28)


def test_parquet_source_standardises_columns_and_splits_by_id(tmp_path):
    n = 200
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, 6)).astype(np.float32)
    table = pa.table({"id": [f"row{i}" for i in range(n)], "f": pa.array(list(feats), pa.list_(pa.float32(), 6)),
                      "y": rng.integers(0, 3, n)})
    pq.write_table(table, tmp_path / "data.parquet")
    cfg = ParquetSource(uri=str(tmp_path / "data.parquet"), id_column="id", input_columns=["f"],
                       label_column="y", input_shape=[2, 3])
    train, val = load_split(cfg, "train"), load_split(cfg, "val")
    assert len(train["label"]) + len(val["label"]) == n
    assert 20 <= len(val["label"]) <= 60  # hash split, about 20%
    assert train["x"].shape[1:] == (2, 3)
    i = list(train["sample_id"]).index("row0") if "row0" in train["sample_id"] else None
    if i is not None:
        np.testing.assert_allclose(train["x"][i].ravel(), feats[0])
    info = describe(cfg)
    assert info.rows == {"train": len(train["label"]), "val": len(val["label"])}
    assert info.num_classes == 3 and info.input_shape == (2, 3)
    # Reordering the file's rows does not move any row to another split.
    pq.write_table(table.take(list(reversed(range(n)))), tmp_path / "data.parquet")
    assert set(load_split(cfg, "val")["sample_id"]) == set(val["sample_id"])


def test_parquet_source_missing_column_is_clear(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "y": [0]}), tmp_path / "d.parquet")
    cfg = ParquetSource(uri=str(tmp_path / "d.parquet"), id_column="id", input_columns=["f"], label_column="y")
    from pipeline.errors import DistillError

    with pytest.raises(DistillError, match=r"lacks input column 'f'"):
        describe(cfg)
