"""Non-finite values in a cache's teacher outputs. One NaN logit turns every student trained on it
into NaN, so `cache verify` calls such a cache unsound and `cache show` counts them. Plain pyarrow
and numpy: the teacher columns are read, the inputs are not."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.cache.manifest import Manifest
from pipeline.cache.schema import SAMPLE_ID
from pipeline.cache.tensors import to_numpy


@dataclass
class NonFinite:
    values: int  # NaN or inf values in the column
    rows: int  # rows holding at least one
    example: str  # the first such row's sample_id


def teacher_columns(manifest: Manifest) -> list[str]:
    """Every column a teacher output stores (logits, top-k values and normalisers, weights, taps)."""
    return list(dict.fromkeys(c for out in manifest.outputs for c in out.columns if c in manifest.columns))


def nonfinite_values(cache_uri: str, manifest: Manifest, options: storage.Options = None) -> dict[str, NonFinite]:
    """Per teacher column with any, its non-finite values, shard by shard (one shard in memory at a time)."""
    found: dict[str, NonFinite] = {}
    columns = teacher_columns(manifest)
    if not columns:
        return found
    fs, root = storage.arrow_filesystem(cache_uri, options)
    for shard in manifest.shards:
        table = pq.read_table(f"{root}/{shard.path}", filesystem=fs, columns=[SAMPLE_ID, *columns])
        ids = table.column(SAMPLE_ID)
        for name in columns:
            values = to_numpy(table.column(name), table.schema.field(name))
            if values.dtype.kind != "f" or not len(values):
                continue
            bad = ~np.isfinite(values.reshape(len(values), -1))
            rows = bad.any(axis=1)
            if rows.any():
                prev = found.get(name) or NonFinite(0, 0, str(ids[int(np.argmax(rows))].as_py()))
                found[name] = NonFinite(prev.values + int(bad.sum()), prev.rows + int(rows.sum()), prev.example)
    return found


def describe_nonfinite(found: dict[str, NonFinite]) -> list[str]:
    return [f"{name} holds {f.values} non-finite value(s) (NaN or inf) in {f.rows} row(s), e.g. row {f.example!r}"
            for name, f in found.items()]
