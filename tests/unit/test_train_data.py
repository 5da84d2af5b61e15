"""The driver's choice to hold a cache in the object store, and the worker's data-wait clock (no Ray)."""

import time

import pyarrow.parquet as pq
import pytest

from pipeline.cache.manifest import read_manifest
from pipeline.cache.schema import LABEL, LOGITS, X
from pipeline.config import TrainConfig
from pipeline.student.train.plan import in_memory_bytes
from pipeline.student.train.meter import Meter
from tests.conftest import make_cache


def test_in_memory_bytes_is_the_decoded_size_of_the_selected_columns(tmp_path):
    uri = make_cache(tmp_path, rows={"train": 300, "val": 100}, shape=(1, 8, 8))
    m = read_manifest(uri)
    # x: 64 float32 = 256 B, label: int64 = 8 B, logits: 10 float16 = 20 B per row, over all 400 rows.
    assert in_memory_bytes(uri, m, [X, LABEL, LOGITS]) == pytest.approx(400 * (256 + 8 + 20), rel=0.05)
    assert in_memory_bytes(uri, m, [LABEL]) == pytest.approx(400 * 8, rel=0.05)


def test_in_memory_bytes_counts_compressible_columns_at_their_decoded_size(tmp_path):
    # All-zero images (much of MNIST): Parquet stores a few bytes per row, memory holds 256.
    import numpy as np
    import pyarrow as pa

    uri = make_cache(tmp_path, rows={"train": 200, "val": 50}, shape=(1, 8, 8))
    m = read_manifest(uri)
    path = f"{uri}/{m.shards[0].path}"
    table = pq.read_table(path)
    zeros = pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((200, 1, 8, 8), np.float32))
    pq.write_table(table.set_column(table.schema.get_field_index(X), X, zeros), path)
    assert pq.ParquetFile(path).metadata.row_group(0).column(1).total_compressed_size < 200 * 256 / 10
    assert in_memory_bytes(uri, m, [X]) == pytest.approx(250 * 256, rel=0.05)


def test_timed_counts_only_the_waits_for_batches():
    def slow(n, pause):
        for i in range(n):
            time.sleep(pause)
            yield i

    window = Meter("samples")
    seen = []
    for item in window.timed(slow(4, 0.05)):
        seen.append(item)
        time.sleep(0.1)  # the consumer's compute: not counted
    assert seen == [0, 1, 2, 3]
    assert 0.19 <= window.waited < 0.35


def test_in_memory_is_auto_by_default_and_settable():
    base = {"cache": "runs/cache/x", "student": {"factory": "pipeline.models.builtin:mlp"}}
    assert TrainConfig.model_validate(base).in_memory == "auto"
    assert TrainConfig.model_validate({**base, "in_memory": False}).in_memory is False
