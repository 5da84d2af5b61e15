"""The cache's rows in one seeded order that every worker agrees on, read shard by shard with pyarrow.

Why not Ray Data's `streaming_split`: it hands blocks to whichever worker asks first, so the rows a
worker sees differ from run to run and a run cannot resume in the middle of an epoch (Ray 2.60 has
no dataset checkpoint). Here the order is a pure function of (seed, epoch): shards are permuted,
then the rows of each window of several shards together. Global step s of an epoch is rows [s*B, (s+1)*B) of that order, and
worker r of W takes its contiguous part of them; so a run resumed at step s, with the same or
another number of workers, trains on exactly the rows it had not, and a worker holds at most the
shards of the window it reads and of the next (read ahead on a thread) unless `in_memory` keeps
them all.
"""

from __future__ import annotations

import functools
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from pipeline import storage

Columns = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Order:
    """The seeded row order of one split; `batch_size` global rows per optimizer step.

    Shards are permuted, then taken `window` at a time; the rows of a window's shards are
    permuted together. A window of one shard would keep a shard's rows together, and shards
    written in the source's order (MNIST sorted by label: three classes a shard) would then give
    batches of three classes; a window of several mixes them, at the memory of its decoded shards.
    """

    shard_rows: tuple[int, ...]
    batch_size: int
    seed: int
    window: int = 8

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches per epoch (the last partial one is dropped, as in most LM trainers:
        every worker then takes the same number of rows at every step)."""
        return sum(self.shard_rows) // self.batch_size

    def shards(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_rows))

    @functools.lru_cache(maxsize=2)  # read on every step: drawn once per epoch
    def windows(self, epoch: int) -> tuple[tuple[int, ...], ...]:
        order = [int(s) for s in self.shards(epoch)]
        return tuple(tuple(order[i:i + self.window]) for i in range(0, len(order), max(self.window, 1)))

    def window_rows(self, epoch: int, index: int, shards: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of each position of window `index`, in its permuted order."""
        return self._window_rows(epoch, index, tuple(shards))

    @functools.lru_cache(maxsize=4)  # every step of a window reads it; computed once per window
    def _window_rows(self, epoch: int, index: int, shards: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        sizes = np.array([self.shard_rows[s] for s in shards])
        perm = np.random.default_rng([self.seed, epoch, index + 1]).permutation(int(sizes.sum()))
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        which = np.searchsorted(starts, perm, side="right") - 1
        return np.asarray(shards)[which], perm - starts[which]

    def spans(self, epoch: int, lo: int, hi: int) -> list[tuple[int, int, int, tuple[int, ...]]]:
        """(window index, start, stop, its shards) covering positions [lo, hi) of the epoch."""
        out, pos = [], 0
        for index, shards in enumerate(self.windows(epoch)):
            n = sum(self.shard_rows[s] for s in shards)
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                out.append((index, a - pos, b - pos, shards))
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
                 dtypes: dict[str, torch.dtype], keep: bool = False, preloaded: Sequence[dict[str, np.ndarray]] | None = None) -> None:
        self.cache_uri, self.paths, self.columns, self.dtypes, self.keep = cache_uri, list(paths), list(columns), dtypes, keep
        self.preloaded = preloaded  # decoded shards already in memory (a sweep's one read, from Ray's object store)
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
        if self.preloaded is not None:
            with warnings.catch_warnings():  # the object store's arrays are read-only; batches are gathered copies
                warnings.simplefilter("ignore", UserWarning)
                return {c: torch.from_numpy(self.preloaded[shard][c]).to(self.dtypes[c]) for c in self.columns}
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
    for index, a, b, shards in order.spans(epoch, lo, hi):
        shard_of, row_of = order.window_rows(epoch, index, shards)
        shard_of, row_of = shard_of[a:b], row_of[a:b]
        pieces, positions = [], []
        for s in np.unique(shard_of):
            at = np.nonzero(shard_of == s)[0]
            cols = reader.get(int(s))
            pieces.append({c: t[torch.from_numpy(row_of[at])] for c, t in cols.items()})
            positions.append(at)
        back = torch.from_numpy(np.argsort(np.concatenate(positions), kind="stable"))
        parts.append({c: torch.cat([p[c] for p in pieces])[back] for c in pieces[0]})
    if len(parts) == 1:
        return parts[0]
    return {c: torch.cat([p[c] for p in parts]) for c in parts[0]}


def train_batches(reader: ShardReader, order: Order, epoch: int, start: int, stop: int, rank: int, world: int,
                  micro: int = 1) -> Iterator[list[Columns]]:
    """For each step in [start, stop) of `epoch`: this worker's rows as `micro` micro-batches."""
    windows = order.windows(epoch)
    for step in range(start, stop):
        lo, hi = order.worker_rows(step, rank, world)
        spans = order.spans(epoch, lo, hi)
        # The shards of this step's windows and of the next window: read ahead, the rest released.
        last = spans[-1][0]
        reader.want([s for w in windows[spans[0][0]:last + 2] for s in w])
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
