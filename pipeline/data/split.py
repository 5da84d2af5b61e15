"""The deterministic train/val split every source uses."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

SPLITS = ("train", "val")
_BUCKETS = 1_000_000


def hash_split(keys: Iterable[object], val_fraction: float, seed: int = 0) -> np.ndarray:
    """"train" or "val" per key by a salted hash: stable under reordering and resharding of the rows.

    A user's table splits by row id; a text corpus by document id, so a document's windows stay together.
    """
    salt = str(seed).encode()
    buckets = np.array(
        [int.from_bytes(hashlib.blake2b(salt + str(k).encode(), digest_size=8).digest(), "little") for k in keys],
        dtype=np.uint64,
    )
    val = (buckets % np.uint64(_BUCKETS)) < np.uint64(int(val_fraction * _BUCKETS))
    return np.where(val, "val", "train")


def permutation_split(n: int, val_fraction: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices of each split of a fixed, in-memory dataset: an exact val share from a seeded permutation."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return {"train": np.sort(order[n_val:]), "val": np.sort(order[:n_val])}
