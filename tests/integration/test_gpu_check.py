"""`make gpu-check`'s script, at its tiny size on whatever device this machine has: both stages
through the product (HF teacher and student, FSDP, bf16, fused losses, ids above 65,535) and
the bare loops beside them, into the JSON the docs quote."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_gpu_check_runs_both_stages_and_their_bare_loops(ray_session, tmp_path):
    from jobs.benchmarks import gpu

    assert gpu.main(["--tiny", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-tiny.json").read_text())
    pre, train = report["rows"]
    assert report["vocab"] == 70_000 and report["command"] == "make gpu-check ARGS=--tiny"
    assert pre["stage"] == "precompute" and pre["index_bits"] == 17  # ids above 65,535 packed, as at 131k
    assert pre["rows_per_s"] > 0 and pre["bare_rows_per_s"] > 0 and pre["ratio"] > 0
    assert train["stage"] == "train" and train["parallel"] == "fsdp" and train["precision"] == "bf16"
    assert train["tokens_per_s"] > 0 and train["bare_tokens_per_s"] > 0 and train["val_perplexity"] > 1
    gpu_run = report["device"] != "cpu"
    assert (pre["peak_gpu_gib"] is not None) == gpu_run and (train["bare_peak_gpu_gib"] is not None) == gpu_run
    assert "| train (tokens/s) |" in (tmp_path / "gpu-tiny.md").read_text()
