"""A user's own Parquet table: an id column, input columns and a label column, split by a hash of the id."""

from __future__ import annotations

import hashlib
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
        missing = [c for c in [cfg.id_column, cfg.label_column, *cfg.input_columns] if c not in dataset.schema.names]
        if missing:
            raise DistillError(f"parquet source lacks column(s) {missing}", f"available: {dataset.schema.names}")
        table = dataset.read(columns=[cfg.id_column, cfg.label_column])
        ids = table.column(cfg.id_column).to_numpy(zero_copy_only=False)
        labels = table.column(cfg.label_column).to_numpy(zero_copy_only=False)
        in_val = hash_split(ids, cfg.val_fraction, cfg.split_seed) == "val"
        shape = tuple(cfg.input_shape) if cfg.input_shape else (_input_width(dataset.schema, cfg),)
        return SourceInfo(kind="parquet", fingerprint=self._fingerprint(dataset), num_classes=int(labels.max()) + 1,
                          input_shape=shape, rows={"train": int((~in_val).sum()), "val": int(in_val.sum())})

    def _fingerprint(self, dataset: pq.ParquetDataset) -> str:
        if self.cfg.version:
            return f"version:{self.cfg.version}"
        fs, _ = arrow_filesystem(self.cfg.uri)
        h = hashlib.sha256()
        for f in sorted(dataset.files):
            info = fs.get_file_info(f)
            h.update(f"{f}:{info.size}:{info.mtime_ns}".encode())
        return h.hexdigest()[:16]

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


def _input_width(schema: pa.Schema, cfg: ParquetSource) -> int:
    if len(cfg.input_columns) > 1:
        return len(cfg.input_columns)
    field = schema.field(cfg.input_columns[0])
    if pa.types.is_fixed_size_list(field.type):
        return field.type.list_size
    return 1


def standardize_batch(batch: dict[str, np.ndarray], *, cfg: ParquetSource) -> dict[str, np.ndarray]:
    """`ParquetTable.standardize` as a plain function, for Ray Data's `map_batches` (pickled to its tasks)."""
    ids = np.asarray(batch[cfg.id_column])
    cols = cfg.input_columns
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
