"""The cache's rows in one seeded order that every worker agrees on, each row read by one worker.

The shards are dealt once per run to `lanes` (the run's first worker count), balanced by rows. Each
epoch, every lane takes its shards in the epoch's seeded permutation, a `window` of them at a time,
and permutes the rows of each window together. The lanes are merged into one global sequence by
pace (row j of a lane of n rows comes at time (j + 1/2) / n), and global step s is positions
[s*B, (s+1)*B) of it: so step s holds a known count of each lane's rows, and every lane ends with
the epoch. With as many workers as lanes, worker r trains on lane r's part of each step and reads
only lane r's shards. With fewer, a worker takes several lanes; with more, workers split a lane.
The order is a pure function of (seed, epoch, lanes): a run resumed at step s, with the same or
another number of workers, trains on exactly the rows it had not.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

Part = tuple[int, int, int]  # (lane, start, stop) of that lane's positions in the epoch
Span = tuple[int, int, int, tuple[int, ...]]  # (window index, start, stop in the window, its shards)


def deal(rows: tuple[int, ...], parts: int, order: np.ndarray | None = None) -> np.ndarray:
    """The part of each item, largest first onto the lightest part (ties: `order`, then the lower
    part), so parts' row totals differ by at most the largest item."""
    order = np.arange(len(rows)) if order is None else order
    by_size = sorted((int(i) for i in order), key=lambda i: -rows[i])  # stable: `order` breaks ties
    load, out = [0] * parts, np.zeros(len(rows), dtype=np.int64)
    for i in by_size:
        p = min(range(parts), key=lambda q: (load[q], q))
        out[i], load[p] = p, load[p] + rows[i]
    return out


@dataclass(frozen=True)
class Order:
    """The seeded row order of one split; `batch_size` global rows per optimizer step.

    A window of one shard would keep a shard's rows together, and shards written in the source's
    order (MNIST sorted by label: three classes a shard) would then give batches of three classes;
    a window of several mixes them, at the memory of its decoded shards. A global batch holds rows
    of every lane.
    """

    shard_rows: tuple[int, ...]
    batch_size: int
    seed: int
    window: int = 8
    lanes: int = 1

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches per epoch (the last partial one is dropped, as in most LM trainers)."""
        return sum(self.shard_rows) // self.batch_size

    @functools.cached_property
    def lane_of(self) -> np.ndarray:
        """Each shard's lane, fixed for the run: a worker keeps (or finds on its node) the same shards every epoch."""
        if self.lanes == 1:
            return np.zeros(len(self.shard_rows), dtype=np.int64)
        ties = np.random.default_rng([self.seed, self.lanes]).permutation(len(self.shard_rows))
        return deal(self.shard_rows, self.lanes, ties)

    @functools.cached_property
    def lane_rows(self) -> np.ndarray:
        return np.bincount(self.lane_of, weights=self.shard_rows, minlength=self.lanes).astype(np.int64)

    def shards(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_rows))

    @functools.lru_cache(maxsize=2)  # read on every step: drawn once per epoch
    def windows(self, epoch: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """(lane, shards) of each window of the epoch, lane after lane; a window's index seeds the
        permutation of its rows."""
        order, step, out = [int(s) for s in self.shards(epoch)], max(self.window, 1), []
        for lane in range(self.lanes):
            mine = [s for s in order if self.lane_of[s] == lane]
            out += [(lane, tuple(mine[i:i + step])) for i in range(0, len(mine), step)]
        return tuple(out)

    def window_rows(self, epoch: int, index: int, shards: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of each position of window `index`, in its permuted order."""
        return self._window_rows(epoch, index, tuple(shards))

    @functools.lru_cache(maxsize=64)  # every step of a window reads it; computed once per window (and lane)
    def _window_rows(self, epoch: int, index: int, shards: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        sizes = np.array([self.shard_rows[s] for s in shards])
        perm = np.random.default_rng([self.seed, epoch, index + 1]).permutation(int(sizes.sum()))
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        which = np.searchsorted(starts, perm, side="right") - 1
        return np.asarray(shards)[which], perm - starts[which]

    def spans(self, epoch: int, lane: int, lo: int, hi: int) -> list[Span]:
        """The windows' pieces covering positions [lo, hi) of `lane` in the epoch."""
        out, pos = [], 0
        for index, (owner, shards) in enumerate(self.windows(epoch)):
            if owner != lane:
                continue
            n = sum(self.shard_rows[s] for s in shards)
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                out.append((index, a - pos, b - pos, shards))
            pos += n
            if pos >= hi:
                break
        return out

    @functools.cached_property
    def counts(self) -> np.ndarray:
        """(steps + 1, lanes): how many of each lane's positions come before each step."""
        steps, b = self.steps_per_epoch, self.batch_size
        bounds = np.arange(steps + 1, dtype=np.int64) * b
        if self.lanes == 1:
            return bounds[:, None]
        n = self.lane_rows
        times = np.concatenate([(np.arange(k) + 0.5) / k for k in n])
        merged = np.repeat(np.arange(self.lanes), n)[np.argsort(times, kind="stable")]  # ties: the lower lane
        out = np.empty((steps + 1, self.lanes), dtype=np.int64)
        for lane in range(self.lanes):
            out[:, lane] = np.searchsorted(np.nonzero(merged == lane)[0], bounds)
        return out

    def parts(self, step: int, rank: int, world: int) -> list[Part]:
        """The lanes' positions that worker `rank` of `world` trains on at `step`."""
        c0, c1 = self.counts[step], self.counts[step + 1]
        if world <= self.lanes:
            return [(lane, int(c0[lane]), int(c1[lane])) for lane in range(rank, self.lanes, world)]
        lane, j = rank % self.lanes, rank // self.lanes
        share, n = len(range(lane, world, self.lanes)), int(c1[lane] - c0[lane])
        return [(lane, int(c0[lane]) + j * n // share, int(c0[lane]) + (j + 1) * n // share)]

    def fewest_rows(self, world: int) -> int:
        """The fewest rows any of `world` workers gets at any step of an epoch."""
        per_lane = np.diff(self.counts, axis=0)
        if world <= self.lanes:
            return int(min(per_lane[:, r::world].sum(axis=1).min() for r in range(world)))
        return int(min((per_lane[:, lane] // len(range(lane, world, self.lanes))).min() for lane in range(self.lanes)))


def lanes_for(shard_rows: tuple[int, ...], batch_size: int, seed: int, world: int, min_rows: int = 1) -> int:
    """The lanes a run starting on `world` workers uses: one per worker where the shards allow it (at
    least `min_rows` rows for every worker at every step), else the most that do."""
    for lanes in range(min(world, len(shard_rows)), 1, -1):
        if Order(shard_rows, batch_size, seed, lanes=lanes).fewest_rows(world) >= min_rows:
            return lanes
    return 1


def micro_slices(n: int, parts: int) -> list[slice]:
    """n rows in `parts` contiguous, near-equal micro-batches (none empty)."""
    edges = [i * n // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(edges, edges[1:]) if b > a]
