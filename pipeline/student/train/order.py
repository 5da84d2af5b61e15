"""The cache's rows in one seeded order that every worker agrees on.

The order is a pure function of (seed, epoch): shards are permuted, then the rows of each window
of several shards together. Global step s of an epoch is rows [s*B, (s+1)*B) of that order, and
worker r of W takes its contiguous part of them; so a run resumed at step s, with the same or
another number of workers, trains on exactly the rows it had not.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


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
