"""The cache is plain Parquet that any Arrow tool reads without Ray or torch: pyarrow, and DuckDB,
in a fresh process; caches written with Ray Data's own tensor types before stay readable and sound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cache.manifest import read_manifest, write_manifest
from pipeline.cache.schema import LABEL, LOGITS, X
from pipeline.cache.shards import inspect_shard
from pipeline.cache.tensors import table_to_numpy
from pipeline.cache.verify import verify_cache

# Run in a fresh interpreter: verify the cache and read every shard with the contract's own code and
# with pyarrow alone, query it with DuckDB, and prove neither Ray nor torch was ever imported.
READ_WITHOUT_RAY = r"""
import json, sys
import duckdb, numpy as np, pyarrow.parquet as pq
from pipeline.cache.manifest import read_manifest
from pipeline.cache.tensors import table_to_numpy
from pipeline.cache.verify import verify_cache

uri = sys.argv[1]
manifest = read_manifest(uri)
out = {"problems": verify_cache(uri), "splits": {}}
for split in ("train", "val"):
    paths = [f"{uri}/{s.path}" for s in manifest.shards_of(split)]
    cols = [table_to_numpy(pq.read_table(p)) for p in paths]
    logits = np.concatenate([c["teacher_logits"] for c in cols]).astype(np.float64)
    label = np.concatenate([c["label"] for c in cols])
    row = duckdb.sql(f"SELECT count(*), sum(label), sum(list_sum(teacher_logits::DOUBLE[])), "
                     f"min(len(teacher_logits)) FROM read_parquet({paths!r})").fetchall()[0]
    out["splits"][split] = {"rows": len(label), "label_sum": int(label.sum()), "logit_sum": float(logits.sum()),
                            "logit_shape": list(logits.shape[1:]), "duckdb": [row[0], int(row[1]), float(row[2]), row[3]]}
out["types"] = {f.name: str(f.type) for f in pq.read_schema(f"{uri}/{manifest.shards[0].path}")}
out["imported"] = sorted(m for m in ("ray", "torch") if m in sys.modules)
print(json.dumps(out))
"""


def read_in_fresh_process(uri: str) -> dict:
    run = subprocess.run([sys.executable, "-c", READ_WITHOUT_RAY, uri], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def check_read(out: dict, manifest) -> None:
    assert out["problems"] == [] and out["imported"] == []
    for split, got in out["splits"].items():
        assert got["rows"] == manifest.rows_by_split[split] == got["duckdb"][0]
        assert got["label_sum"] == got["duckdb"][1]
        assert got["logit_sum"] == pytest.approx(got["duckdb"][2], rel=1e-9, abs=1e-6)
        assert got["logit_shape"] == [manifest.num_classes] == [got["duckdb"][3]]


def test_a_cache_reads_with_pyarrow_and_duckdb_in_a_process_without_ray(tiny_cache):
    out = read_in_fresh_process(tiny_cache)
    check_read(out, read_manifest(tiny_cache))
    assert out["types"][LOGITS].startswith("extension<arrow.fixed_shape_tensor")


def _ray_typed(values: np.ndarray, version: str) -> pa.Array:
    """A column as Ray Data wrote tensors before the cache used Arrow's canonical type."""
    from ray.data._internal.tensor_extensions.arrow import ArrowTensorType, ArrowTensorTypeV2

    kind, list_type = (ArrowTensorType, pa.list_) if version == "v1" else (ArrowTensorTypeV2, pa.large_list)
    flat = values.reshape(len(values), -1)
    storage = pa.array([row for row in flat], type=list_type(pa.from_numpy_dtype(values.dtype)))
    return pa.ExtensionArray.from_storage(kind(values.shape[1:], pa.from_numpy_dtype(values.dtype)), storage)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_cache_written_with_rays_tensor_types_stays_readable_and_sound(tiny_cache, version):
    """Rewrite the tiny cache's shards with Ray's extension types (as caches made before were), then
    read them here (Ray's types registered) and in a fresh process that never imports Ray."""
    manifest = read_manifest(tiny_cache)
    expected = {}
    for shard in manifest.shards:
        path = f"{tiny_cache}/{shard.path}"
        table = pq.read_table(path)
        columns = table_to_numpy(table)
        expected[shard.path] = columns
        pq.write_table(table.set_column(table.schema.get_field_index(X), X, _ray_typed(columns[X], version))
                       .set_column(table.schema.get_field_index(LOGITS), LOGITS, _ray_typed(columns[LOGITS], version)), path)
        facts = inspect_shard(path)
        shard.sha256, shard.bytes = facts.sha256, facts.bytes
    manifest.columns = inspect_shard(f"{tiny_cache}/{manifest.shards[0].path}").columns
    # What manifests of such caches recorded: Ray's str() of its type.
    assert manifest.columns[LOGITS] == f"ArrowTensorType{'V2' if version == 'v2' else ''}(shape=(10,), dtype=halffloat)"
    write_manifest(tiny_cache, manifest)

    assert verify_cache(tiny_cache) == []
    for shard in manifest.shards:
        got = table_to_numpy(pq.read_table(f"{tiny_cache}/{shard.path}"))
        for column in (X, LABEL, LOGITS):
            np.testing.assert_array_equal(got[column], expected[shard.path][column])
    out = read_in_fresh_process(tiny_cache)
    assert out["problems"] == [] and out["imported"] == []
    assert out["splits"]["train"]["logit_shape"] == [manifest.num_classes]
