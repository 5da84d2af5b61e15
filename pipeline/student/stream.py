"""The cache's rows in one seeded order that every worker agrees on, read shard by shard with pyarrow.

Why not Ray Data's `streaming_split`: it hands blocks to whichever worker asks first, so the rows a
worker sees differ from run to run and a run cannot resume in the middle of an epoch (Ray 2.60 has
no dataset checkpoint). Here the order is a pure function of (seed, epoch): shards are permuted,
then the rows of each shard. Global step s of an epoch is rows [s*B, (s+1)*B) of that order, and
worker r of W takes its contiguous part of them; so a run resumed at step s, with the same or
another number of workers, trains on exactly the rows it had not, and a worker holds at most the
shard it reads and the next (read ahead on a thread) unless `in_memory` keeps them all.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from pipeline import storage

Columns = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Order:
    """The seeded row order of one split; `batch_size` global rows per optimizer step."""

    shard_rows: tuple[int, ...]
    batch_size: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches per epoch (the last partial one is dropped, as in most LM trainers:
        every worker then takes the same number of rows at every step)."""
        return sum(self.shard_rows) // self.batch_size

    def shards(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_rows))

    def rows(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, shard + 1]).permutation(self.shard_rows[shard])

    def spans(self, epoch: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(shard, start, stop) positions in the shards' permuted rows covering [lo, hi) of the epoch."""
        out, pos = [], 0
        for shard in self.shards(epoch):
            n = self.shard_rows[shard]
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                out.append((int(shard), a - pos, b - pos))
            pos += n
            if pos >= hi:
                break
        return out

    def worker_rows(self, step: int, rank: int, world: int) -> tuple[int, int]:
        """The part [lo, hi) of the epoch's order that worker `rank` of `world` trains on at `step`."""
        base = step * self.batch_size
        return base + rank * self.batch_size // world, base + (rank + 1) * self.batch_size // world


def micro_slices(n: int, parts: int) -> list[slice]:
    """n rows in `parts` contiguous, near-equal micro-batches (none empty)."""
    edges = [i * n // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(edges, edges[1:]) if b > a]


class ShardReader:
    """Decoded shards as column tensors, read on a background thread ahead of use.

    `keep` holds every shard once read (a small cache, read once per run); otherwise only the
    shards asked for in `want` stay, so memory does not grow with the cache.
    """

    def __init__(self, cache_uri: str, paths: Sequence[str], columns: Sequence[str],
                 dtypes: dict[str, torch.dtype], keep: bool = False) -> None:
        self.cache_uri, self.paths, self.columns, self.dtypes, self.keep = cache_uri, list(paths), list(columns), dtypes, keep
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-reader")
        self._loaded: dict[int, Future[Columns]] = {}
        self._lock = threading.Lock()
        self.reads = 0  # shard files read: a test's check that `keep` reads each once

    def want(self, shards: Sequence[int]) -> None:
        """Start reading these shards (in order) and, unless `keep`, drop every other one."""
        with self._lock:
            for s in shards:
                if s not in self._loaded:
                    self._loaded[s] = self._pool.submit(self._read, s)
            if not self.keep:
                for s in [s for s in self._loaded if s not in shards]:
                    del self._loaded[s]

    def get(self, shard: int) -> Columns:
        with self._lock:
            future = self._loaded.get(shard)
            if future is None:
                future = self._loaded[shard] = self._pool.submit(self._read, shard)
        return future.result()

    def _read(self, shard: int) -> Columns:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.cache.shards import register_tensor_types

        register_tensor_types()
        fs, root = storage.arrow_filesystem(self.cache_uri)
        with fs.open_input_file(f"{root}/{self.paths[shard]}") as f:
            table = pq.read_table(f, columns=self.columns)
        self.reads += 1
        out = {}
        for c in self.columns:
            column = table.column(c).combine_chunks()
            # Arrow's own fixed-shape tensors, or Ray Data's tensor type (whose to_numpy gives the ndarray).
            array = column.to_numpy_ndarray() if isinstance(column.type, pa.FixedShapeTensorType) else column.to_numpy(zero_copy_only=False)
            array = array if array.flags.writeable else array.copy()  # read-only Arrow buffers
            out[c] = torch.from_numpy(np.ascontiguousarray(array)).to(self.dtypes[c])
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def gather(reader: ShardReader, order: Order, epoch: int, lo: int, hi: int) -> Columns:
    """Rows [lo, hi) of the epoch's order as one batch of column tensors."""
    parts = []
    for shard, a, b in order.spans(epoch, lo, hi):
        idx = torch.from_numpy(order.rows(epoch, shard)[a:b])
        cols = reader.get(shard)
        parts.append({c: t[idx] for c, t in cols.items()})
    if len(parts) == 1:
        return parts[0]
    return {c: torch.cat([p[c] for p in parts]) for c in parts[0]}


def train_batches(reader: ShardReader, order: Order, epoch: int, start: int, stop: int, rank: int, world: int,
                  micro: int = 1) -> Iterator[list[Columns]]:
    """For each step in [start, stop) of `epoch`: this worker's rows as `micro` micro-batches."""
    shards = [int(s) for s in order.shards(epoch)]
    for step in range(start, stop):
        lo, hi = order.worker_rows(step, rank, world)
        spans = order.spans(epoch, lo, hi)
        # The shards of this step and the next one after it: read ahead, the rest released.
        first = shards.index(spans[0][0])
        reader.want(shards[first:first + len(spans) + 1])
        batch = gather(reader, order, epoch, lo, hi)
        n = hi - lo
        yield [{c: t[s] for c, t in batch.items()} for s in micro_slices(n, micro)]


def in_order(reader: ShardReader, batch_size: int) -> Iterator[Columns]:
    """Every row of the reader's shards in file order, in batches (evaluation)."""
    for shard in range(len(reader.paths)):
        reader.want(list(range(shard, min(shard + 2, len(reader.paths)))))
        cols = reader.get(shard)
        n = len(next(iter(cols.values())))
        for a in range(0, n, batch_size):
            yield {c: t[a:a + batch_size] for c, t in cols.items()}
