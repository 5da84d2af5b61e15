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
from pipeline.data.checks import check_unique_ids, class_labels, nonfinite_error, nonfinite_rows, split_values
from pipeline.data.sources import SourceInfo, identity_record
from pipeline.data.split import hash_split
from pipeline.errors import DistillError
from pipeline.storage import Options, arrow_filesystem

TRANSFORM = "float32 reshape"


class ParquetTable:
    """Streamed by stage 1 (`standardize` per batch); read whole only where it fits (fit-teacher, tests)."""

    streams = True
    input_scale = 1.0  # a table's values are read as they are (uint8 stays uint8 in the cache)

    def __init__(self, cfg: ParquetSource, options: Options = None) -> None:
        self.cfg = cfg
        self.options = options

    def tables(self) -> list[tuple[str, str | None]]:
        """(uri, the split all its rows belong to, or None when the rows say it themselves)."""
        if self.cfg.val_uri:
            return [(self.cfg.uri, "train"), (self.cfg.val_uri, "val")]
        return [(self.cfg.uri, None)]

    def _dataset(self, uri: str) -> pq.ParquetDataset:
        fs, path = arrow_filesystem(uri, self.options)
        try:
            return pq.ParquetDataset(path, filesystem=fs)
        except (FileNotFoundError, OSError) as e:
            field = "source.val_uri" if uri == self.cfg.val_uri else "source.uri"
            raise DistillError(f"cannot read the parquet source {uri!r}: {e}", f"check `{field}`") from None

    def describe(self) -> SourceInfo:
        cfg = self.cfg
        ids, labels, splits, widths, digests, dtypes, source_bytes = [], [], [], set(), [], set(), 0
        for uri, split in self.tables():
            dataset = self._dataset(uri)
            inputs = input_columns(cfg, dataset.schema, uri)
            wanted = self._check_columns(dataset, uri)
            table = dataset.read(columns=wanted)
            part_ids = table.column(cfg.id_column).to_numpy(zero_copy_only=False)
            ids.append(part_ids)
            labels.append(class_labels(table.column(cfg.label_column).to_numpy(zero_copy_only=False), f"`{cfg.label_column}` of {uri}"))
            if split is not None:
                splits.append(np.full(len(part_ids), split, dtype=object))
            elif cfg.split_column:
                splits.append(split_values(table.column(cfg.split_column).to_numpy(zero_copy_only=False), cfg.split_column, uri))
            else:
                splits.append(hash_split(part_ids, cfg.val_fraction, cfg.split_seed))
            widths.add(_input_width(dataset, inputs))
            dtypes.add(stored_dtype(dataset.schema, inputs))
            fs, _ = arrow_filesystem(uri, self.options)
            source_bytes += sum(info.size for info in fs.get_file_info(dataset.files))
            digests.append(f"{split or 'all'}:{_footers_digest(uri, dataset, self.options)}")
        all_ids, all_labels, all_splits = np.concatenate(ids), np.concatenate(labels), np.concatenate(splits)
        if not len(all_ids):
            raise DistillError(f"parquet source {cfg.uri} has no rows", "check `source.uri` (an export that wrote no rows, "
                               "or a filter that matched none)")
        if not (all_splits == "train").any():
            raise DistillError(f"parquet source {cfg.uri}: all {len(all_ids)} rows are in the val split, none to train on",
                               "give the training split rows (`split_column` values `train`, or a smaller `val_fraction`)")
        check_unique_ids(all_ids, f"parquet source {cfg.uri}" + (f" with {cfg.val_uri}" if cfg.val_uri else "")
                         + f", column `{cfg.id_column}`")
        if len(widths) > 1:
            raise DistillError(f"the training and validation tables give {sorted(widths)} input values per row",
                               "export both with the same input columns")
        width = widths.pop()
        if len(dtypes) > 1:
            raise DistillError("the training table's inputs are uint8 and the validation table's are not (or the reverse)",
                               "export both with the same input types")
        if cfg.input_shape and math.prod(cfg.input_shape) != width:
            raise DistillError(f"`source.input_shape` {cfg.input_shape} holds {math.prod(cfg.input_shape)} values per row, "
                               f"the input columns of {cfg.uri} give {width}",
                               f"set `source.input_shape` to a shape of {width} values, e.g. [{width}]")
        fingerprint = f"version:{cfg.version}" if cfg.version else (
            digests[0].split(":", 1)[1] if len(digests) == 1 else hashlib.sha256("|".join(digests).encode()).hexdigest()[:16])
        return SourceInfo(kind="parquet", fingerprint=fingerprint, num_classes=int(all_labels.max()) + 1,
                          input_shape=tuple(cfg.input_shape) if cfg.input_shape else (width,),
                          rows={s: int((all_splits == s).sum()) for s in ("train", "val")},
                          input_dtype="uint8" if dtypes == {"uint8"} else "float32", bytes=source_bytes)

    def _check_columns(self, dataset: pq.ParquetDataset, uri: str) -> list[str]:
        """The id, label and split columns, which must exist: one error naming the table's columns."""
        cfg = self.cfg
        wanted = [cfg.id_column, cfg.label_column, *([cfg.split_column] if cfg.split_column else [])]
        missing = [c for c in wanted if c not in dataset.schema.names]
        if missing:
            raise DistillError(f"parquet source {uri} lacks column(s) {missing}",
                               f"set `source.id_column` / `source.label_column` / `source.split_column` to one of "
                               f"{dataset.schema.names}")
        return wanted

    def check_values(self, max_bytes: int | None = None) -> bool:
        """Refuse non-finite inputs with their count and a row id, reading only the id and input columns.
        A table whose inputs exceed `max_bytes` (uncompressed, from the footers) is not read here: the
        teacher's actors check each batch instead. Returns whether the table was scanned."""
        if self.cfg.nonfinite_inputs != "refuse":
            return True
        found, total, example = 0, 0, None
        for uri, _ in self.tables():
            dataset = self._dataset(uri)
            cols = input_columns(self.cfg, dataset.schema, uri)
            if max_bytes is not None and _uncompressed_bytes(dataset, cols) > max_bytes:
                return False
            for fragment in dataset.fragments:
                for batch in fragment.to_batches(columns=[self.cfg.id_column, *cols]):
                    bad = nonfinite_rows({c: batch.column(c).to_numpy(zero_copy_only=False) for c in cols}, cols)
                    total += batch.num_rows
                    if bad.any():
                        found += int(bad.sum())
                        example = example or str(batch.column(self.cfg.id_column)[int(np.argmax(bad))].as_py())
        if found:
            raise nonfinite_error(found, total, example, self.cfg.uri)
        return True

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        parts = []
        for uri, forced in self.tables():
            if forced not in (None, split):
                continue
            dataset = self._dataset(uri)
            self._check_columns(dataset, uri)
            input_columns(self.cfg, dataset.schema, uri)
            table = dataset.read()
            rows = self.standardize({n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}, forced)
            keep = rows.pop(SPLIT) == split
            parts.append({k: v[keep] for k, v in rows.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def standardize(self, batch: dict[str, np.ndarray], split: str | None = None) -> dict[str, np.ndarray]:
        """User columns -> `sample_id`, `x` (float32, optionally reshaped), `label` (int64) and `split`."""
        return standardize_batch(batch, cfg=self.cfg, split=split)

    def identity(self, info: SourceInfo) -> dict[str, Any]:
        columns = {"id": self.cfg.id_column, "inputs": self.cfg.input_columns, "label": self.cfg.label_column}
        extra = {"nonfinite_inputs": "zero"} if self.cfg.nonfinite_inputs == "zero" else {}  # the default keeps old keys
        record = identity_record(self.cfg, info, TRANSFORM, columns=columns, **extra)
        if self.cfg.split_column:  # the user's own split: hash settings do not apply (and default ids stay as they were)
            record["split"] = {"column": self.cfg.split_column}
        elif self.cfg.val_uri:
            record["split"] = {"val_uri": self.cfg.val_uri}
        return record


def _footers_digest(uri: str, dataset: pq.ParquetDataset, options: Options = None) -> str:
    """The content of a table's files, cheaply: each file's Parquet footer (row groups, column sizes and
    statistics) and size, independent of the files' paths and times, so re-exporting identical data
    finds the same cache. `source.version` names a version explicitly instead."""
    fs, _ = arrow_filesystem(uri, options)
    digests = []
    for f in dataset.files:
        with fs.open_input_file(f) as fh:
            size = fh.size()
            fh.seek(size - 8)
            length = int.from_bytes(fh.read(8)[:4], "little")
            fh.seek(size - 8 - length)
            footer = fh.read(length)
        digests.append(hashlib.sha256(footer + size.to_bytes(8, "little")).hexdigest())
    return "footers:" + hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()[:16]


def input_columns(cfg: ParquetSource, schema: pa.Schema, uri: str | None = None) -> list[str]:
    """`input_columns` with glob patterns (`pixel_*`) expanded, in the table's column order."""
    uri = uri or cfg.uri
    out: list[str] = []
    reserved = (cfg.id_column, cfg.label_column, cfg.split_column)
    for entry in cfg.input_columns:
        if any(c in entry for c in "*?["):
            found = [n for n in schema.names if fnmatch.fnmatchcase(n, entry) and n not in reserved]
            if not found:
                raise DistillError(f"`source.input_columns` pattern {entry!r} matches no column of {uri}",
                                   f"its columns: {schema.names}")
            out += [n for n in found if n not in out]
        elif entry not in schema.names:
            raise DistillError(f"parquet source {uri} lacks input column {entry!r}", f"its columns: {schema.names}")
        elif entry not in out:
            out.append(entry)
    for name in out:
        t = schema.field(name).type
        value = t.value_type if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) else t
        if not (pa.types.is_integer(value) or pa.types.is_floating(value) or pa.types.is_boolean(value)):
            raise DistillError(f"input column {name!r} of {uri} is {t}, not numbers",
                               "inputs must be numeric (or lists of numbers); encode the column before exporting")
    return out


def _input_width(dataset: pq.ParquetDataset, columns: list[str]) -> int:
    if len(columns) > 1:
        return len(columns)
    t = dataset.schema.field(columns[0]).type
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    if pa.types.is_list(t) or pa.types.is_large_list(t):  # variable-size lists: the first row says
        first = dataset.read(columns=columns).column(0).slice(0, 1).to_pylist()
        return len(first[0]) if first and first[0] is not None else 0
    return 1


def standardize_batch(batch: dict[str, np.ndarray], *, cfg: ParquetSource, split: str | None = None) -> dict[str, np.ndarray]:
    """`ParquetTable.standardize` as a plain function, for Ray Data's `map_batches` (pickled to its tasks).
    `split` is the split of every row (a separate validation table), else the split column or the id's hash."""
    ids = np.asarray(batch[cfg.id_column])
    schema = pa.schema([(name, _arrow_type(values)) for name, values in batch.items()])
    cols = input_columns(cfg, schema)
    dtype = np.uint8 if stored_dtype(schema, cols) == "uint8" else np.float32  # uint8 pixels stay uint8
    if len(cols) == 1:
        raw = batch[cols[0]]
        x = np.stack([np.asarray(v, dtype=dtype) for v in raw]) if raw.dtype == object else raw
        x = np.asarray(x, dtype=dtype).reshape(len(ids), -1)
    else:
        x = np.stack([np.asarray(batch[c], dtype=dtype) for c in cols], axis=1)
    bad = ~np.isfinite(x.reshape(len(ids), -1)).all(axis=1)
    if bad.any():  # the driver scanned tables that fit its budget; this is every other batch's check
        if cfg.nonfinite_inputs == "refuse":
            raise nonfinite_error(int(bad.sum()), len(ids), str(ids[int(np.argmax(bad))]), cfg.uri, batch=True)
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    if cfg.input_shape:
        x = x.reshape(len(ids), *cfg.input_shape)
    return {
        SAMPLE_ID: np.array([str(i) for i in ids], dtype=object),
        X: x,
        LABEL: np.asarray(batch[cfg.label_column], dtype=np.int64),
        SPLIT: (np.full(len(ids), split, dtype=object) if split is not None
                else split_values(batch[cfg.split_column], cfg.split_column, cfg.uri) if cfg.split_column
                else hash_split(ids, cfg.val_fraction, cfg.split_seed)),
    }


def stored_dtype(schema: pa.Schema, columns: list[str]) -> str:
    """How the cache stores the inputs: uint8 where every input column holds uint8 (image pixels: a
    quarter of float32, and no bigger than the source), float32 otherwise. Models read them as float32."""
    def value_type(t: pa.DataType) -> pa.DataType:
        nested = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
        return t.value_type if nested else t
    return "uint8" if all(pa.types.is_uint8(value_type(schema.field(c).type)) for c in columns) else "float32"


def _uncompressed_bytes(dataset: pq.ParquetDataset, columns: list[str]) -> int:
    wanted, total = set(columns), 0
    for fragment in dataset.fragments:
        meta = fragment.metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            total += sum(group.column(c).total_uncompressed_size for c in range(group.num_columns)
                         if group.column(c).path_in_schema.split(".", 1)[0] in wanted)
    return total


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
