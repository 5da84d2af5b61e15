"""The cache's shards read with pyarrow, in the order `Order` gives every worker.

Why not Ray Data's `streaming_split`: it hands blocks to whichever worker asks first, so the rows a
worker sees differ from run to run and a run cannot resume in the middle of an epoch (Ray 2.60 has
no dataset checkpoint). A worker reads only the shards of its lanes (see order.py): each row of an
epoch is read by one worker. It holds at most the shards of the windows it reads and of the next
(read ahead on a thread) unless `in_memory` keeps them all; kept, they are its lanes' shards only.
"""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from pipeline import storage
from pipeline.cache.tensors import to_numpy
from pipeline.student.train.localcache import LocalShardCache
from pipeline.student.train.order import Order, Span, micro_slices

Columns = dict[str, torch.Tensor]
# Shards up to this size are fetched from an object store in one GET (all columns); larger ones with
# ranged reads of the footer and of the columns the task reads.
WHOLE_OBJECT_BYTES = 64 << 20


class ShardReader:
    """Decoded shards as column tensors, read on a background thread ahead of use.

    `keep` holds every shard once read (a small cache, read once per run); otherwise only the
    shards asked for in `want` stay, so memory does not grow with the cache.
    """

    def __init__(self, cache_uri: str, paths: Sequence[str], columns: Sequence[str],
                 dtypes: dict[str, torch.dtype], keep: bool = False, preloaded: Sequence[dict[str, np.ndarray]] | None = None,
                 options: storage.Options = None, local: LocalShardCache | None = None) -> None:
        self.cache_uri, self.paths, self.columns, self.dtypes, self.keep = cache_uri, list(paths), list(columns), dtypes, keep
        self.options = options  # the run's storage endpoint
        self.preloaded = preloaded  # decoded shards already in memory (a sweep's one read, from Ray's object store)
        self.local = local  # a node-local copy of shards streamed from an object store
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
        import pyarrow.parquet as pq

        fs, root = storage.arrow_filesystem(self.cache_uri, self.options)
        remote = f"{root}/{self.paths[shard]}"
        local = self.local.path(fs, remote, self.paths[shard]) if self.local else None
        if local:
            table = pq.read_table(local, columns=self.columns)
        elif not storage.is_local(self.cache_uri) and (fs.get_file_info(remote).size or 0) <= WHOLE_OBJECT_BYTES:
            # One GET of the whole object: Parquet's reader would first fetch its last 64 kB for the
            # footer, then the columns, which for a shard of a few hundred kB is nearly twice the bytes.
            import pyarrow as pa

            with fs.open_input_stream(remote) as f:
                table = pq.read_table(pa.BufferReader(f.read()), columns=self.columns)
        else:
            with fs.open_input_file(remote) as f:
                table = pq.read_table(f, columns=self.columns)
        self.reads += 1
        out = {}
        for c in self.columns:
            array = to_numpy(table.column(c), table.schema.field(c))
            array = array if array.flags.writeable else array.copy()  # read-only Arrow buffers
            out[c] = torch.from_numpy(np.ascontiguousarray(array)).to(self.dtypes[c])
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def gather(reader: ShardReader, order: Order, epoch: int, spans: Sequence[Span]) -> Columns:
    """The rows of these spans of the epoch's order as one batch of column tensors."""
    parts = []
    for index, a, b, shards in spans:
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


def step_spans(order: Order, epoch: int, step: int, rank: int, world: int) -> list[Span]:
    """The window pieces worker `rank` of `world` trains on at `step`, lane after lane."""
    return [span for lane, lo, hi in order.parts(step, rank, world) for span in order.spans(epoch, lane, lo, hi)]


def ahead(order: Order, epoch: int, spans: Sequence[Span]) -> list[int]:
    """The shards of these spans' windows and of the next window of each of their lanes: what a
    worker reads now and next, and nothing of another lane."""
    windows, wanted = order.windows(epoch), []
    for index in sorted({span[0] for span in spans}):
        wanted += windows[index][1]
        nxt = index + 1
        if nxt < len(windows) and windows[nxt][0] == windows[index][0] and not any(s[0] == nxt for s in spans):
            wanted += windows[nxt][1]
    return list(dict.fromkeys(wanted))


def train_batches(reader: ShardReader, order: Order, epoch: int, start: int, stop: int, rank: int, world: int,
                  micro: int = 1) -> Iterator[list[Columns]]:
    """For each step in [start, stop) of `epoch`: this worker's rows as `micro` micro-batches."""
    for step in range(start, stop):
        spans = step_spans(order, epoch, step, rank, world)
        reader.want(ahead(order, epoch, spans))  # read ahead; the rest released (unless kept)
        batch = gather(reader, order, epoch, spans)
        n = len(next(iter(batch.values())))
        yield [{c: t[s] for c, t in batch.items()} for s in micro_slices(n, micro)]


def row_range(sizes: Sequence[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(shard, start, stop) pieces of rows [lo, hi) of shards of these sizes taken in file order."""
    out, pos = [], 0
    for shard, n in enumerate(sizes):
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append((shard, a - pos, b - pos))
        pos += n
    return out


def in_order(reader: ShardReader, batch_size: int, pieces: Sequence[tuple[int, int, int]] | None = None) -> Iterator[Columns]:
    """Every row of these (shard, start, stop) pieces (default: all of the reader's shards) in file
    order, in batches (evaluation)."""
    if pieces is None:
        pieces = [(shard, 0, None) for shard in range(len(reader.paths))]
    shards = [p[0] for p in pieces]
    for i, (shard, a, b) in enumerate(pieces):
        reader.want(shards[i:i + 2])
        cols = reader.get(shard)
        b = len(next(iter(cols.values()))) if b is None else b
        for start in range(a, b, batch_size):
            yield {c: t[start:min(start + batch_size, b)] for c, t in cols.items()}
