"""Feature taps and several teachers through both stages on a local Ray: what is stored equals the
teacher's activations, every feature term trains on 2 workers, and a run's student is the next
generation's teacher."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.cache.manifest import read_manifest
from pipeline.cache.schema import SAMPLE_ID, X
from pipeline.cache.tensors import to_numpy
from pipeline.cli import main
from pipeline.config import load_precompute_config
from pipeline.data.sources import load_split
from pipeline.models.factory import build_model
from tests.conftest import DIGITS_KD, write_yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def column(table, name):
    """One column of a shard as numpy (tensor columns as (rows, *shape))."""
    return to_numpy(table.column(name), table.schema.field(name))

# digits_cnn: "1" is the first ReLU (32x8x8), "4" the pooled block (64x4x4), "8" the 128-d ReLU.
TAPS = [
    {"name": "block", "module": "4", "kind": "feature"},
    {"name": "attn", "module": "1", "kind": "attention", "pool": [4, 4]},
    {"name": "emb", "module": "8", "kind": "embedding"},
]


@pytest.fixture(scope="module")
def tapped_cache(digits_stage1, tmp_path_factory):
    root = tmp_path_factory.mktemp("taps")
    data = yaml.safe_load(open(digits_stage1["config_path"]))
    # The same weights under a second name: one pass must give both teachers identical logits.
    data["teachers"] = {"twin": dict(data["teacher"])}
    data["outputs"]["taps"] = TAPS
    path = write_yaml(root / "precompute.yaml", data)
    assert main(["precompute", path]) == 0
    cfg = load_precompute_config(path)
    from pipeline.teacher.identity import resolve_target

    return {"path": path, "config": cfg, "uri": resolve_target(cfg).uri, "root": root}


def test_stored_taps_equal_the_teachers_activations(tapped_cache):
    m = read_manifest(tapped_cache["uri"])
    taps = m.taps()
    assert {t: taps[t].shape for t in taps} == {"block": [64, 4, 4], "attn": [16], "emb": [128]}
    assert all(taps[t].bytes_per_row > 0 for t in taps) and set(m.teachers) == {"teacher", "twin"}
    table = pq.read_table([f"{tapped_cache['uri']}/{e.path}" for e in m.shards_of("val")])
    val = load_split(tapped_cache["config"].source, "val")
    order = {sid: i for i, sid in enumerate(table.column(SAMPLE_ID).to_pylist())}
    rows = [order[s] for s in val["sample_id"]]
    col = {c: column(table, c)[rows].astype(np.float32)
           for c in ("tap_block", "tap_attn", "tap_emb", "teacher_logits", "twin_logits")}
    # Recompute the activations here, walking the teacher's layers by hand (no hooks).
    teacher = build_model(tapped_cache["config"].teacher, input_shape=(1, 8, 8), num_classes=10).eval()
    h = torch.from_numpy(val[X])
    acts = {}
    with torch.inference_mode():
        for i, layer in enumerate(teacher):
            h = layer(h)
            acts[str(i)] = h
    np.testing.assert_allclose(col["tap_block"], acts["4"].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(col["tap_emb"], acts["8"].numpy(), rtol=2e-3, atol=2e-3)
    q = torch.nn.functional.avg_pool2d(acts["1"].pow(2).mean(1, keepdim=True), 2).flatten(1)
    np.testing.assert_allclose(col["tap_attn"], (q / q.norm(dim=1, keepdim=True)).numpy(), atol=2e-3)
    np.testing.assert_array_equal(col["teacher_logits"], col["twin_logits"])


def test_every_feature_term_trains_on_two_workers_and_feeds_a_born_again_teacher(tapped_cache, tmp_path):
    data = yaml.safe_load(open(DIGITS_KD))
    data.update(cache=tapped_cache["uri"], precompute=None, storage_path=str(tmp_path / "runs"), name="all-terms",
                epochs=4, num_workers=2, optimizer={"name": "adam", "lr": 0.01},
                student={"factory": "pipeline.models.builtin:cnn_student", "kwargs": {"width": 8, "hidden": 32}})
    data["loss"] = {"temperature": 4.0, "terms": {"kd": 0.5, "ce": 0.5, "deit_hard": 0.2, "hint": 1.0, "attention": 100.0, "rkd": 0.5},
                    "hint": [{"student": "pool1", "tap": "block"}], "attention": [{"student": "pool1", "tap": "attn"}],
                    "rkd": {"student": "relu3", "tap": "emb"}, "teachers": {"teacher": 1.0, "twin": 1.0}}
    assert main(["train", write_yaml(tmp_path / "train.yaml", data)]) == 0
    result = json.loads((tmp_path / "runs" / "all-terms" / "result.json").read_text())
    hist = result["history"]
    assert result["workers_with_teacher"] == 0 and len(hist) == 4
    for term in ("kd", "ce", "deit_hard", "hint", "attention", "rkd"):
        assert np.isfinite(hist[-1][f"train_{term}"]), term
    assert hist[-1]["train_hint"] < hist[0]["train_hint"]  # the adapter and the student learn the hint
    assert result["metrics"]["val_accuracy"] > 0.5
    calib = result["metrics"]["calibration"]
    assert sum(calib["student"]["count"]) == sum(calib["teacher"]["count"]) == 359
    # The bare student (no adapters) is written beside the result and loads into its factory.
    assert result["weights"].endswith("student.pt")
    state = torch.load(result["weights"], weights_only=True)
    assert not any(k.startswith("adapters") for k in state)
    pre = yaml.safe_load(open(tapped_cache["path"]))
    pre.pop("teachers")
    pre["outputs"] = {"logits": {"mode": "full", "dtype": "float16"}}
    pre["teacher"] = {"factory": data["student"]["factory"], "kwargs": data["student"]["kwargs"], "weights": result["weights"]}
    pre["cache_root"] = str(tmp_path / "cache")
    gen2 = write_yaml(tmp_path / "gen2.yaml", pre)
    assert main(["precompute", gen2]) == 0
    from pipeline.teacher.identity import resolve_target

    m = read_manifest(resolve_target(load_precompute_config(gen2)).uri)
    assert m.teacher.factory.endswith("cnn_student") and m.rows == 1797


def test_a_term_the_cache_cannot_serve_fails_before_any_worker(digits_stage1, tmp_path, capsys):
    data = yaml.safe_load(open(DIGITS_KD))
    data.update(precompute=digits_stage1["config_path"], storage_path=str(tmp_path / "runs"), name="no-taps",
                student={"factory": "pipeline.models.builtin:cnn_student", "kwargs": {"width": 4}})
    data["loss"] = {"terms": {"ce": 1.0, "hint": 1.0}, "hint": [{"student": "pool1", "tap": "block"}]}
    assert main(["train", write_yaml(tmp_path / "train.yaml", data)]) == 2
    err = capsys.readouterr().err
    assert "needs the tap 'block'" in err and "taps: none" in err
    assert not (tmp_path / "runs" / "no-taps").exists()
