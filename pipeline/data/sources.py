"""Row sources with a stable `sample_id` and a deterministic train/val split: one protocol, one
class per source kind (`images`, `parquet`, `text`), chosen by the config's `kind`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline import storage
from pipeline.config import DigitsSource, MnistSource, ParquetSource, Source, TextSource
from pipeline.cache.inputs import decode_inputs
from pipeline.cache.schema import X
from pipeline.data.split import SPLITS

__all__ = ["SPLITS", "SourceInfo", "RowSource", "open_source", "describe", "load_split", "identity_record"]


@dataclass(frozen=True)
class SourceInfo:
    """What the cache key and the manifest need to know about a source."""

    kind: str
    fingerprint: str
    num_classes: int  # classes, or the vocabulary size of a text source
    input_shape: tuple[int, ...]
    rows: dict[str, int]
    # How `x` is stored: the source's own form (uint8 pixels stay uint8); a model reads float32(x) * input_scale.
    input_dtype: str = "float32"
    input_scale: float = 1.0
    bytes: int | None = None  # the source's own stored bytes (files), for the cache-size comparison


class RowSource(Protocol):
    """One kind of source. `streams` sources are too big to hold: stage 1 reads each of their `tables()`
    through Ray Data with `standardize`; the others build each split in memory with `load_split`."""

    streams: bool
    input_scale: float  # a model reads float32(x) * input_scale (known without describing the source)

    def describe(self) -> SourceInfo:
        """Fingerprint, class count, shape and split sizes, without materialising a streamed source."""

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        """One split in memory, as the cache stores its passthrough columns (`sample_id`, inputs in
        `input_dtype`, label or ids)."""

    def identity(self, info: SourceInfo) -> dict[str, Any]:
        """The content-defining description of the dataset and its transform (goes into the cache key)."""


def identity_record(cfg: Source, info: SourceInfo, transform: str, **extra: Any) -> dict[str, Any]:
    """The fields every source's identity has; `extra` adds the kind's own (key order is irrelevant)."""
    return {"kind": info.kind, "uri": getattr(cfg, "uri", None), "fingerprint": info.fingerprint,
            "split": {"val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed}, "transform": transform,
            "columns": None, **extra, "input_shape": list(info.input_shape),
            # Only where they differ from float32 as is, so caches made before inputs were stored by reference keep their ids.
            **({"input_dtype": info.input_dtype, "input_scale": info.input_scale}
               if (info.input_dtype, info.input_scale) != ("float32", 1.0) else {})}


def open_source(cfg: Source, options: storage.Options = None) -> RowSource:
    """The source a config describes; `options` reach the store its files are on."""
    from pipeline.data.images import BundledImages
    from pipeline.data.parquet import ParquetTable
    from pipeline.data.text import TextWindows

    kinds: dict[type, type] = {DigitsSource: BundledImages, MnistSource: BundledImages, ParquetSource: ParquetTable,
                               TextSource: TextWindows}
    return kinds[type(cfg)](cfg, options)


def describe(cfg: Source, options: storage.Options = None) -> SourceInfo:
    return open_source(cfg, options).describe()


def load_split(cfg: Source, split: str, options: storage.Options = None) -> dict[str, np.ndarray]:
    """One split as models see it: inputs decoded to float32 (fitting a teacher, benchmarks, tests)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    source = open_source(cfg, options)
    rows = source.load_split(split)
    if X in rows and rows[X].dtype != np.float32:
        rows[X] = decode_inputs(rows[X], source.input_scale)
    return rows
