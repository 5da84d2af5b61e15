"""The seeded row order and the shard reader: every row once per epoch, the same rows whatever the
number of workers, a resumed run sees the rest of the order, and streaming holds two shards at most."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cache.schema import LABEL, X
from pipeline.student.train.order import Order, micro_slices
from pipeline.student.train.reader import ShardReader, in_order, train_batches

SHARD_ROWS = (7, 13, 5, 11)


def _shards(tmp_path, rows=SHARD_ROWS):
    """Shards whose LABEL is the row's global id (so tests can see exactly which rows came)."""
    paths, start = [], 0
    for i, n in enumerate(rows):
        ids = np.arange(start, start + n)
        table = pa.table({LABEL: pa.array(ids, pa.int64()),
                          X: pa.FixedShapeTensorArray.from_numpy_ndarray(np.repeat(ids[:, None], 3, 1).astype(np.float32))})
        pq.write_table(table, tmp_path / f"part-{i}.parquet")
        paths.append(f"part-{i}.parquet")
        start += n
    return paths


def _reader(tmp_path, keep=False):
    return ShardReader(str(tmp_path), _shards(tmp_path), [LABEL, X], {LABEL: torch.int64, X: torch.float32}, keep)


def _ids(reader, order, epoch, start, stop, rank=0, world=1, micro=1):
    out = []
    for step in train_batches(reader, order, epoch, start, stop, rank, world, micro):
        out.append(torch.cat([m[LABEL] for m in step]).tolist())
    return out


def test_an_epoch_is_every_row_once_in_a_seeded_order(tmp_path):
    order = Order(SHARD_ROWS, batch_size=6, seed=3)
    assert order.steps_per_epoch == 36 // 6
    reader = _reader(tmp_path)
    steps = _ids(reader, order, 0, 0, order.steps_per_epoch)
    rows = [r for s in steps for r in s]
    assert len(rows) == len(set(rows)) == 36 and set(rows) <= set(range(36))
    assert rows != sorted(rows)  # shuffled
    assert _ids(reader, order, 0, 0, 6) == steps  # same seed and epoch: same order
    assert _ids(reader, order, 1, 0, 6) != steps  # another epoch: another order
    assert _ids(reader, Order(SHARD_ROWS, 6, seed=4), 0, 0, 6) != steps
    batch = next(train_batches(reader, order, 0, 0, 1, 0, 1))[0]
    assert torch.equal(batch[X][:, 0].long(), batch[LABEL])  # columns stay aligned row by row


@pytest.mark.parametrize("world", [2, 3])
def test_workers_split_each_global_batch_whatever_their_number(tmp_path, world):
    order = Order(SHARD_ROWS, batch_size=6, seed=0)
    reader = _reader(tmp_path)
    alone = _ids(reader, order, 0, 0, 6)
    parts = [_ids(reader, order, 0, 0, 6, rank, world) for rank in range(world)]
    assert [sum((p[s] for p in parts), []) for s in range(6)] == alone


def test_a_resumed_run_sees_the_rest_of_the_same_order(tmp_path):
    order = Order(SHARD_ROWS, batch_size=4, seed=1)
    reader = _reader(tmp_path)
    full = _ids(reader, order, 2, 0, order.steps_per_epoch)
    assert _ids(_reader(tmp_path), order, 2, 5, order.steps_per_epoch) == full[5:]
    # ... also on another number of workers (2 -> 3), micro-batched.
    parts = [_ids(reader, order, 2, 5, 9, rank, 3, micro=2) for rank in range(3)]
    assert [sum((p[s] for p in parts), []) for s in range(4)] == full[5:9]


def test_streaming_holds_at_most_the_current_and_next_window(tmp_path):
    order = Order(SHARD_ROWS, batch_size=3, seed=0, window=1)
    reader = _reader(tmp_path)
    held = []
    for _ in train_batches(reader, order, 0, 0, order.steps_per_epoch, 0, 1):
        held.append(len(reader._loaded))
    assert max(held) <= 3  # a step spanning a shard boundary: both shards, plus the next
    assert sum(h == 3 for h in held) <= len(SHARD_ROWS)


def test_in_memory_reads_each_shard_once_over_epochs(tmp_path):
    order = Order(SHARD_ROWS, batch_size=6, seed=0, window=1)
    keep = _reader(tmp_path, keep=True)
    stream = _reader(tmp_path, keep=False)
    for epoch in range(3):
        _ids(keep, order, epoch, 0, order.steps_per_epoch)
        _ids(stream, order, epoch, 0, order.steps_per_epoch)
    assert keep.reads == len(SHARD_ROWS)
    assert stream.reads >= 3 * len(SHARD_ROWS) - 2


def test_a_window_of_shards_mixes_rows_written_in_order(tmp_path):
    # Shards hold consecutive ids (a source sorted by label gives shards of few classes): a window
    # of one shard keeps each batch inside one shard, a window of all mixes every batch.
    starts = np.cumsum((0,) + SHARD_ROWS)

    def shards_per_batch(window):
        order = Order(SHARD_ROWS, batch_size=6, seed=0, window=window)
        steps = _ids(_reader(tmp_path), order, 0, 0, order.steps_per_epoch)
        return [len({int(np.searchsorted(starts, r, side="right")) for r in s}) for s in steps]

    assert np.mean(shards_per_batch(1)) < 1.5
    assert np.mean(shards_per_batch(4)) > 2.5


def test_evaluation_reads_every_row_in_file_order(tmp_path):
    rows = [b[LABEL] for b in in_order(_reader(tmp_path), 4)]
    assert torch.cat(rows).tolist() == list(range(sum(SHARD_ROWS)))


def test_micro_slices_are_contiguous_near_equal_and_never_empty():
    assert micro_slices(10, 3) == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert micro_slices(2, 4) == [slice(0, 1), slice(1, 2)]
