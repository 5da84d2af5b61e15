"""Inputs stored as the source holds them: uint8 pixels stay uint8 in the cache, and every reader
decodes them to the same float32 values the model was always given."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline.cache.inputs import decode_inputs
from pipeline.cache.schema import X
from pipeline.config import DigitsSource, ParquetSource
from pipeline.data.images import BundledImages
from pipeline.data.parquet import standardize_batch, stored_dtype
from pipeline.data.sources import load_split
from pipeline.student.tasks.classification import decode


def test_decode_is_float32_times_the_scale():
    x = np.array([[0, 8, 16]], np.uint8)
    out = decode_inputs(x, 1 / 16)
    assert out.dtype == np.float32 and out.tolist() == [[0.0, 0.5, 1.0]]
    assert decode_inputs(np.array([0.25], np.float32)).tolist() == [0.25]  # float32 as is (older caches)
    t = decode(torch.from_numpy(x), 1 / 16)
    assert t.dtype == torch.float32 and torch.equal(t, torch.from_numpy(out))


def test_bundled_digits_are_stored_raw_and_read_as_before():
    from sklearn.datasets import load_digits

    source = BundledImages(DigitsSource())
    info = source.describe()
    assert (info.input_dtype, info.input_scale) == ("uint8", 1 / 16) and info.bytes and info.bytes > 10_000
    stored = source.load_split("val")[X]
    decoded = load_split(DigitsSource(), "val")[X]
    assert stored.dtype == np.uint8 and decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, stored.astype(np.float32) / 16)
    assert set(np.unique(load_digits().data / 16).astype(np.float32)) >= set(np.unique(decoded))
    identity = source.identity(info)
    assert identity["input_dtype"] == "uint8" and identity["input_scale"] == 1 / 16


def test_a_tables_uint8_inputs_stay_uint8_and_other_types_become_float32():
    cfg = ParquetSource(uri="t.parquet", id_column="id", input_columns=["p*"], val_fraction=0.0)
    batch = {"id": np.array(["a", "b"], dtype=object), "label": np.array([0, 1]),
             "p0": np.array([0, 255], np.uint8), "p1": np.array([7, 9], np.uint8)}
    rows = standardize_batch(batch, cfg=cfg)
    assert rows[X].dtype == np.uint8 and rows[X].tolist() == [[0, 7], [255, 9]]
    batch["p1"] = batch["p1"].astype(np.int32)
    assert standardize_batch(batch, cfg=cfg)[X].dtype == np.float32
    schema = pa.schema([("img", pa.list_(pa.uint8(), 4)), ("f", pa.float64())])
    assert stored_dtype(schema, ["img"]) == "uint8" and stored_dtype(schema, ["img", "f"]) == "float32"
