"""A user's own Parquet table: an id column, input columns and a label column, split by a hash of the id.

What can be checked on the table is checked here, in the driver, before any Ray work: the columns
exist, ids are unique, labels are integer class ids, the inputs fill `input_shape`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.schema import LABEL, SAMPLE_ID, SPLIT, X
from pipeline.config import ParquetSource
from pipeline.data.sources import SourceInfo, identity_record
from pipeline.data.split import hash_split
from pipeline.errors import DistillError
from pipeline.storage import arrow_filesystem

TRANSFORM = "float32 reshape"
_SHOWN = 5  # offending values named in an error


class ParquetTable:
    """Streamed by stage 1 (`standardize` per batch); read whole only where it fits (fit-teacher, tests)."""

    streams = True

    def __init__(self, cfg: ParquetSource) -> None:
        self.cfg = cfg

    def _dataset(self) -> pq.ParquetDataset:
        fs, path = arrow_filesystem(self.cfg.uri)
        try:
            return pq.ParquetDataset(path, filesystem=fs)
        except (FileNotFoundError, OSError) as e:
            raise DistillError(f"cannot read the parquet source {self.cfg.uri!r}: {e}", "check `source.uri`") from None

    def describe(self) -> SourceInfo:
        cfg = self.cfg
        dataset = self._dataset()
        inputs = input_columns(cfg, dataset.schema)
        missing = [c for c in [cfg.id_column, cfg.label_column] if c not in dataset.schema.names]
        if missing:
            raise DistillError(f"parquet source {cfg.uri} lacks column(s) {missing}",
                               f"set `source.id_column` / `source.label_column` to one of {dataset.schema.names}")
        table = dataset.read(columns=[cfg.id_column, cfg.label_column])
        ids = table.column(cfg.id_column).to_numpy(zero_copy_only=False)
        check_unique_ids(ids, f"parquet source {cfg.uri}, column `{cfg.id_column}`")
        labels = class_labels(table.column(cfg.label_column).to_numpy(zero_copy_only=False), f"`{cfg.label_column}` of {cfg.uri}")
        in_val = hash_split(ids, cfg.val_fraction, cfg.split_seed) == "val"
        width = _input_width(dataset, inputs, cfg)
        if cfg.input_shape and math.prod(cfg.input_shape) != width:
            raise DistillError(f"`source.input_shape` {cfg.input_shape} holds {math.prod(cfg.input_shape)} values per row, "
                               f"the input columns of {cfg.uri} give {width}",
                               f"set `source.input_shape` to a shape of {width} values, e.g. [{width}]")
        shape = tuple(cfg.input_shape) if cfg.input_shape else (width,)
        return SourceInfo(kind="parquet", fingerprint=self._fingerprint(dataset), num_classes=int(labels.max()) + 1,
                          input_shape=shape, rows={"train": int((~in_val).sum()), "val": int(in_val.sum())})

    def _fingerprint(self, dataset: pq.ParquetDataset) -> str:
        """The content of the files, cheaply: each file's Parquet footer (row groups, column sizes and
        statistics) and size, independent of the files' paths and times, so re-exporting identical
        data finds the same cache. `source.version` names a version explicitly instead."""
        if self.cfg.version:
            return f"version:{self.cfg.version}"
        fs, _ = arrow_filesystem(self.cfg.uri)
        digests = []
        for f in dataset.files:
            with fs.open_input_file(f) as fh:
                size = fh.size()
                fh.seek(size - 8)
                tail = fh.read(8)
                length = int.from_bytes(tail[:4], "little")
                fh.seek(size - 8 - length)
                footer = fh.read(length)
            digests.append(hashlib.sha256(footer + size.to_bytes(8, "little")).hexdigest())
        return "footers:" + hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()[:16]

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        table = self._dataset().read()
        rows = self.standardize({name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names})
        keep = rows.pop(SPLIT) == split
        return {k: v[keep] for k, v in rows.items()}

    def standardize(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """User columns -> `sample_id`, `x` (float32, optionally reshaped), `label` (int64) and `split`."""
        return standardize_batch(batch, cfg=self.cfg)

    def identity(self, info: SourceInfo) -> dict[str, Any]:
        columns = {"id": self.cfg.id_column, "inputs": self.cfg.input_columns, "label": self.cfg.label_column}
        return identity_record(self.cfg, info, TRANSFORM, columns=columns)


def input_columns(cfg: ParquetSource, schema: pa.Schema) -> list[str]:
    """`input_columns` with glob patterns (`pixel_*`) expanded, in the table's column order."""
    out: list[str] = []
    for entry in cfg.input_columns:
        if any(c in entry for c in "*?["):
            found = [n for n in schema.names if fnmatch.fnmatchcase(n, entry) and n not in (cfg.id_column, cfg.label_column)]
            if not found:
                raise DistillError(f"`source.input_columns` pattern {entry!r} matches no column of {cfg.uri}",
                                   f"its columns: {schema.names}")
            out += [n for n in found if n not in out]
        elif entry not in schema.names:
            raise DistillError(f"parquet source {cfg.uri} lacks input column {entry!r}", f"its columns: {schema.names}")
        elif entry not in out:
            out.append(entry)
    for name in out:
        t = schema.field(name).type
        value = t.value_type if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) else t
        if not (pa.types.is_integer(value) or pa.types.is_floating(value) or pa.types.is_boolean(value)):
            raise DistillError(f"input column {name!r} of {cfg.uri} is {t}, not numbers",
                               "inputs must be numeric (or lists of numbers); encode the column before exporting")
    return out


def _input_width(dataset: pq.ParquetDataset, columns: list[str], cfg: ParquetSource) -> int:
    if len(columns) > 1:
        return len(columns)
    t = dataset.schema.field(columns[0]).type
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    if pa.types.is_list(t) or pa.types.is_large_list(t):  # variable-size lists: the first row says
        first = dataset.read(columns=columns).column(0).slice(0, 1).to_pylist()
        return len(first[0]) if first and first[0] is not None else 0
    return 1


def check_unique_ids(ids: np.ndarray, where: str) -> None:
    """The cache holds every sample_id exactly once: duplicates are refused, the first few named."""
    values, counts = np.unique(np.asarray([str(i) for i in ids]), return_counts=True)
    dup = values[counts > 1]
    if len(dup):
        shown = ", ".join(repr(str(v)) for v in dup[:_SHOWN])
        raise DistillError(f"{where} has {len(dup)} duplicate id(s) ({int(counts[counts > 1].sum())} rows), e.g. {shown}",
                           "give every row its own id: a cache holds every sample_id exactly once")


def class_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """Labels as int64 class ids 0..C-1; strings, fractions and negatives are one error with examples."""
    if labels.dtype.kind in "OUS":
        examples = ", ".join(repr(v) for v in list(dict.fromkeys(labels.tolist()))[:_SHOWN])
        raise DistillError(f"labels in {where} are not integers ({examples})",
                           "map each class to an integer id 0..C-1 before exporting the table")
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels) & (labels == np.round(labels))):
        raise DistillError(f"labels in {where} are not whole numbers (e.g. {labels[labels != np.round(labels)][:_SHOWN].tolist()})",
                           "labels are class ids 0..C-1")
    out = labels.astype(np.int64)
    if len(out) and out.min() < 0:
        raise DistillError(f"labels in {where} include negative values (e.g. {out[out < 0][:_SHOWN].tolist()})",
                           "labels are class ids 0..C-1")
    return out


def standardize_batch(batch: dict[str, np.ndarray], *, cfg: ParquetSource) -> dict[str, np.ndarray]:
    """`ParquetTable.standardize` as a plain function, for Ray Data's `map_batches` (pickled to its tasks)."""
    ids = np.asarray(batch[cfg.id_column])
    cols = input_columns(cfg, pa.schema([(name, _arrow_type(values)) for name, values in batch.items()]))
    if len(cols) == 1:
        raw = batch[cols[0]]
        x = np.stack([np.asarray(v, dtype=np.float32) for v in raw]) if raw.dtype == object else raw
        x = np.asarray(x, dtype=np.float32).reshape(len(ids), -1)
    else:
        x = np.stack([np.asarray(batch[c], dtype=np.float32) for c in cols], axis=1)
    if cfg.input_shape:
        x = x.reshape(len(ids), *cfg.input_shape)
    return {
        SAMPLE_ID: np.array([str(i) for i in ids], dtype=object),
        X: x,
        LABEL: np.asarray(batch[cfg.label_column], dtype=np.int64),
        SPLIT: hash_split(ids, cfg.val_fraction, cfg.split_seed),
    }


def _arrow_type(values: np.ndarray) -> pa.DataType:
    """The Arrow type of a numpy batch column, enough for pattern matching and the numeric check."""
    if values.dtype == object:
        first = next((v for v in values if v is not None), None)
        if first is None or isinstance(first, (str, bytes)):
            return pa.string()
        return pa.list_(pa.from_numpy_dtype(np.asarray(first).dtype))
    if values.ndim > 1:
        return pa.list_(pa.from_numpy_dtype(values.dtype))
    return pa.from_numpy_dtype(values.dtype)
