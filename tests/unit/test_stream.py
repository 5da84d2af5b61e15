"""The seeded row order and the shard reader: every row once per epoch, the same rows whatever the
number of workers, a resumed run sees the rest of the order, and streaming holds two shards at most."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cache.schema import LABEL, X
from pipeline.student.train.order import Order, deal, lanes_for, micro_slices
from pipeline.student.train.reader import ShardReader, in_order, row_range, train_batches

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


LANE_ROWS = (7, 13, 5, 11, 9, 6, 12, 8)  # 71 rows in 8 shards


def _lane_shards(order, lane):
    return {s for s in range(len(order.shard_rows)) if order.lane_of[s] == lane}


def test_shards_are_dealt_to_lanes_balanced_by_rows():
    assert deal((5, 5, 5, 5), 2).tolist() == [0, 1, 0, 1]
    for lanes in (2, 3, 4):
        order = Order(LANE_ROWS, batch_size=8, seed=0, lanes=lanes)
        assert sorted(set(order.lane_of.tolist())) == list(range(lanes))
        assert order.lane_rows.sum() == sum(LANE_ROWS) and np.ptp(order.lane_rows) <= max(LANE_ROWS)
        # Each step holds B rows, each lane in step with its size, and every lane ends with the epoch.
        steps = np.diff(order.counts, axis=0)
        assert (steps.sum(axis=1) == 8).all()
        assert (np.abs(order.counts[-1] - order.lane_rows * order.steps_per_epoch * 8 / sum(LANE_ROWS)) <= 1).all()


@pytest.mark.parametrize("lanes", [2, 4])
def test_with_one_worker_per_lane_each_row_is_read_by_one_worker(tmp_path, lanes):
    rows_of_shard = np.split(np.arange(sum(LANE_ROWS)), np.cumsum(LANE_ROWS)[:-1])
    order = Order(LANE_ROWS, batch_size=8, seed=5, window=2, lanes=lanes)
    readers = [ShardReader(str(tmp_path), _shards(tmp_path, LANE_ROWS), [LABEL, X], {LABEL: torch.int64, X: torch.float32})
               for _ in range(lanes)]
    for epoch in range(2):
        parts = [_ids(readers[r], order, epoch, 0, order.steps_per_epoch, r, lanes) for r in range(lanes)]
        if epoch == 0:
            assert sum(r.reads for r in readers) == len(LANE_ROWS)  # the workers together read each shard once
        seen = [i for p in parts for step in p for i in step]
        assert len(seen) == len(set(seen)) == order.steps_per_epoch * 8  # every row once (the tail dropped)
        for r in range(lanes):
            mine = {int(i) for s in _lane_shards(order, r) for i in rows_of_shard[s]}
            assert {i for step in parts[r] for i in step} <= mine  # only its own lane's rows
            assert all(step for step in parts[r])  # a share of every step
    # Streaming: at most once per epoch (a window still held at an epoch's end may serve the next).
    assert sum(r.reads for r in readers) <= 2 * len(LANE_ROWS)


def test_the_lanes_order_is_the_same_rows_on_any_number_of_workers(tmp_path):
    order = Order(LANE_ROWS, batch_size=8, seed=1, window=3, lanes=2)
    reader = ShardReader(str(tmp_path), _shards(tmp_path, LANE_ROWS), [LABEL, X], {LABEL: torch.int64, X: torch.float32})
    steps = order.steps_per_epoch
    two = [_ids(reader, order, 1, 0, steps, r, 2) for r in range(2)]
    step_rows = [sorted(two[0][s] + two[1][s]) for s in range(steps)]
    for world in (1, 3, 4):  # a run of 2 lanes resumed at step 3 on another worker count
        parts = [_ids(reader, order, 1, 3, steps, r, world) for r in range(world)]
        assert [sorted(sum((p[s] for p in parts), [])) for s in range(steps - 3)] == step_rows[3:]
    assert order.fewest_rows(2) >= 1 and order.fewest_rows(10) == 0  # 10 workers: some without a row


def test_a_lane_of_sorted_shards_still_mixes_every_global_batch(tmp_path):
    starts = np.cumsum((0,) + LANE_ROWS)
    order = Order(LANE_ROWS, batch_size=8, seed=0, window=4, lanes=2)
    reader = ShardReader(str(tmp_path), _shards(tmp_path, LANE_ROWS), [LABEL, X], {LABEL: torch.int64, X: torch.float32})
    parts = [_ids(reader, order, 0, 0, order.steps_per_epoch, r, 2) for r in range(2)]
    shards_per_batch = [len({int(np.searchsorted(starts, i, side="right")) for i in a + b}) for a, b in zip(*parts)]
    assert min(shards_per_batch) >= 2 and np.mean(shards_per_batch) > 3


def test_one_lane_is_the_order_every_worker_split_before():
    order = Order(SHARD_ROWS, batch_size=6, seed=0)
    for step in range(order.steps_per_epoch):
        for world in (1, 2, 3):
            for rank in range(world):
                [(lane, lo, hi)] = order.parts(step, rank, world)
                assert (lane, lo, hi) == (0, step * 6 + rank * 6 // world, step * 6 + (rank + 1) * 6 // world)


def test_lanes_follow_the_workers_where_the_shards_allow():
    assert lanes_for(LANE_ROWS, 8, 0, world=1) == 1
    assert lanes_for(LANE_ROWS, 8, 0, world=2) == 2
    assert lanes_for(LANE_ROWS, 8, 0, world=4) == 4
    assert lanes_for((100, 1), 8, 0, world=2) == 1  # a lane of 1 row would leave a worker without rows
    assert lanes_for(LANE_ROWS, 8, 0, world=2, min_rows=5) == 1  # 2 micro-batches need rows for each
    assert lanes_for((50,), 8, 0, world=4) == 1


def test_workers_evaluate_even_shares_of_the_val_rows_once_each(tmp_path):
    reader = _reader(tmp_path)
    n = sum(SHARD_ROWS)
    for world in (1, 2, 3, 5):
        shares = [row_range(SHARD_ROWS, r * n // world, (r + 1) * n // world) for r in range(world)]
        rows = [torch.cat([b[LABEL] for b in in_order(reader, 4, share)]).tolist() for share in shares]
        assert sum(rows, []) == list(range(n))  # each row once, in file order
        assert max(map(len, rows)) - min(map(len, rows)) <= 1
    assert row_range(SHARD_ROWS, 5, 22) == [(0, 5, 7), (1, 0, 13), (2, 0, 2)]


def test_a_kept_val_share_is_read_once_over_evaluations_while_train_streams(tmp_path):
    from pipeline.student.train.plan import CachePlan

    paths = _shards(tmp_path)
    shards = {"train": tuple((p, n) for p, n in zip(paths, SHARD_ROWS)), "val": tuple((p, n) for p, n in zip(paths, SHARD_ROWS))}
    dtypes = {LABEL: torch.int64, X: torch.float32}
    reads = {}
    for keep_val in (True, False):
        cache = CachePlan(str(tmp_path), shards, in_memory=False, keep_val=keep_val)
        val, train = cache.reader("val", [LABEL, X], dtypes), cache.reader("train", [LABEL, X], dtypes)
        share = row_range(SHARD_ROWS, 0, 20)  # a worker's share: shards 0 and 1
        for _ in range(3):
            assert torch.cat([b[LABEL] for b in in_order(val, 4, share)]).tolist() == list(range(20))
        reads[keep_val] = val.reads
        assert not train.keep
    assert reads[True] == 2  # kept: each shard of the share once
    assert reads[False] >= 4  # streamed: read again at later evaluations
