"""Cache ids are a contract with every cache already on disk: the same config gives the same id
as the code that wrote those caches. The ids below were computed before the configs became typed
unions and the manifest format v2 (tests/unit/data/cache_ids_v1.json); those of the bundled image
sources were computed again when their shards changed (`x` stored as the packages ship it, uint8)."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import PrecomputeConfig, load_precompute_config
from pipeline.teacher.identity import resolve_target

GOLDEN = json.load(open("tests/unit/data/cache_ids_v1.json"))


def _config(name: str, spec: dict) -> PrecomputeConfig:
    config = spec["config"]
    if "path" in config:
        return load_precompute_config(config["path"], config["overrides"])
    if name == "parquet":  # the table the id was computed on; its fingerprint is its explicit version
        os.makedirs("/tmp/distill-golden", exist_ok=True)
        n = 50
        pq.write_table(pa.table({"sample_id": [f"u{i}" for i in range(n)], "label": np.arange(n) % 10,
                                 "a": np.linspace(0, 1, n), "b": np.linspace(1, 0, n)}), "/tmp/distill-golden/users.parquet")
    return PrecomputeConfig.model_validate(config)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_cache_id_is_unchanged(name):
    spec = GOLDEN[name]
    target = resolve_target(_config(name, spec))
    assert json.loads(json.dumps(target.identity, default=str)) == spec["identity"]
    assert target.cache_id == spec["cache_id"]


def test_shipped_precompute_configs_are_all_pinned():
    shipped = {p for p in GOLDEN if p.startswith("jobs/configs/")}
    for path in ("jobs/configs/digits/precompute.yaml", "jobs/configs/mnist/precompute.yaml", "jobs/configs/text/precompute-topk.yaml"):
        assert path in shipped
    assert yaml.safe_load(open("jobs/configs/mnist/precompute.yaml"))["outputs"]["logits"]["mode"] == "full"
