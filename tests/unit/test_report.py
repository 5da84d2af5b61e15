"""The HTML report from synthetic run directories and a hand-built cache: no Ray, no training."""

from __future__ import annotations

import base64
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cache.manifest import read_manifest
from pipeline.errors import DistillError
from pipeline.report import group_of, reliability, write_report
from tests.conftest import make_cache

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EDGES = [i / 10 for i in range(11)]


def calibration_bins(confidence: np.ndarray, correct: np.ndarray) -> dict[str, list[float]]:
    index = np.minimum((confidence * 10).astype(int), 9)
    return {"count": np.bincount(index, minlength=10).tolist(),
            "confidence_sum": np.bincount(index, weights=confidence, minlength=10).tolist(),
            "correct": np.bincount(index, weights=correct, minlength=10).tolist()}


def fake_result(name: str, cache: str, seed: int, calibration: bool) -> dict:
    rng = np.random.default_rng(seed)
    history = [{"epoch": e, "train_loss": 2.0 / e, "train_kd": 1.5 / e, "train_samples": 40, "train_seconds": 0.1,
                "eval_seconds": 0.05, "samples_per_s": 400.0, "val_accuracy": 0.5 + 0.1 * e + 0.01 * seed,
                "val_agreement": 0.55 + 0.1 * e, "val_kl": 0.3 / e, "val_nll": 1.0 / e, "teacher_val_accuracy": 0.95}
               for e in (1, 2, 3)]
    metrics = {k: history[-1][k] for k in ("val_accuracy", "val_agreement", "val_kl", "teacher_val_accuracy")}
    if calibration:
        conf = rng.uniform(0.1, 1.0, 200)
        metrics["calibration"] = {"edges": EDGES,
                                  "student": calibration_bins(conf, rng.uniform(size=200) < conf),
                                  "teacher": calibration_bins(conf, rng.uniform(size=200) < conf ** 0.5)}
    return {"name": name, "cache": cache, "cache_id": cache.rsplit("/", 1)[-1], "student": "pipeline.models.builtin:mlp",
            "alpha": 0.7, "temperature": 4.0, "loss_terms": {"kd": 0.7, "ce": 0.3}, "seed": seed, "epochs": 3,
            "num_workers": 1, "metrics": metrics, "workers_with_teacher": 0, "wall_s": 12.5, "history": history,
            "checkpoint": None, "config": {}}


def write_run(root, result: dict) -> str:
    run_dir = root / "train" / result["name"]
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps(result))
    return str(run_dir)


@pytest.fixture
def runs(tmp_path):
    """Two seeds of one student on a real cache (one with calibration), and one run whose cache was deleted."""
    cache = make_cache(tmp_path)
    gone = str(tmp_path / "deleted-cache")
    return cache, [write_run(tmp_path, fake_result("kd-seed0", cache, 0, calibration=True)),
                   write_run(tmp_path, fake_result("kd-seed1", cache, 1, calibration=False)),
                   write_run(tmp_path, fake_result("hard-label", gone, 0, calibration=False))]


def images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_is_one_self_contained_page(runs, tmp_path):
    _, run_dirs = runs
    path = write_report(run_dirs)
    assert path == str(tmp_path / "train" / "report.html")
    page = Path(path).read_text()
    for name in ("kd-seed0", "kd-seed1", "hard-label", "teacher"):
        assert name in page
    pngs = images(page)
    assert len(pngs) == 4  # curves, accuracy bars, calibration, the one cache still there
    assert all(png.startswith(PNG_SIGNATURE) for png in pngs)
    assert page.count("<img") == 4
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page
    assert "cache not available" in page  # the deleted cache
    assert "No calibration recorded for: kd-seed1, hard-label" in page


def test_cache_bytes_per_row_match_the_parquet_footers(runs):
    cache, run_dirs = runs
    page = Path(write_report(run_dirs)).read_text()
    manifest = read_manifest(cache)
    sizes: dict[str, int] = defaultdict(int)
    for shard in manifest.shards:
        meta = pq.read_metadata(f"{cache}/{shard.path}")
        for i in range(meta.num_row_groups):
            for j in range(meta.num_columns):
                column = meta.row_group(i).column(j)
                sizes[column.path_in_schema.split(".")[0]] += column.total_compressed_size
    assert set(sizes) == {"sample_id", "x", "label", "teacher_logits"}
    for column, size in sizes.items():
        cell = f"{size / manifest.rows:.1f}"
        assert re.search(rf"<tr class=''><td>{column}</td>(<td>[^<]*</td>)*<td class=n>{cell}</td></tr>", page), column
    assert f"{manifest.rows:,} rows" in page


def test_runs_without_calibration_or_a_cache_still_report(tmp_path):
    run_dirs = [write_run(tmp_path, fake_result(f"ce-seed{s}", str(tmp_path / "nowhere"), s, calibration=False)) for s in (0, 1)]
    out = str(tmp_path / "elsewhere" / "r.html")
    assert write_report(run_dirs, out) == out
    page = Path(out).read_text()
    assert len(images(page)) == 2  # curves and bars only
    assert "No calibration recorded" in page and "cache not available" in page


def test_missing_result_names_the_directory(runs, tmp_path):
    _, run_dirs = runs
    empty = tmp_path / "train" / "unfinished"
    empty.mkdir()
    with pytest.raises(DistillError, match="unfinished has no result.json") as e:
        write_report([*run_dirs, str(empty)])
    assert e.value.fix


def test_unreadable_result_names_the_file(tmp_path):
    run_dir = tmp_path / "broken"
    run_dir.mkdir()
    (run_dir / "result.json").write_text("{not json")
    with pytest.raises(DistillError, match=r"broken/result.json is unreadable"):
        write_report([str(run_dir)])
    with pytest.raises(DistillError, match="no run directories"):
        write_report([])


def test_reliability_matches_ece_from_samples():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.1, 1.0, 1000)
    correct = rng.uniform(size=1000) < conf ** 2
    _, acc, ece = reliability(calibration_bins(conf, correct))
    index = np.minimum((conf * 10).astype(int), 9)
    expected = sum(np.mean(index == b) * abs(correct[index == b].mean() - conf[index == b].mean())
                   for b in range(10) if np.any(index == b))
    assert ece == pytest.approx(expected)
    assert len(acc) == len(set(index.tolist()))


def test_seeds_group_by_name():
    assert group_of("kd-T2-seed12") == "kd-T2"
    assert group_of("kd-seedless") == "kd-seedless"


def test_runs_on_an_fsspec_filesystem():
    """Run directories on any fsspec URI (here in memory): the report lands beside them by default."""
    import fsspec

    fs = fsspec.filesystem("memory")
    result = fake_result("remote-seed0", "memory://nowhere/cache", 0, calibration=True)
    fs.pipe("/bucket/train/remote-seed0/result.json", json.dumps(result).encode())
    try:
        path = write_report(["memory://bucket/train/remote-seed0"])
        assert path == "memory://bucket/train/report.html"
        page = fs.cat(path).decode()
        assert "remote-seed0" in page and len(images(page)) == 3 and "cache not available" in page
    finally:
        fs.rm("/bucket", recursive=True)
