"""`distill sweep` as a user runs it: the installed command, on a `ray start` cluster, over a real digits
cache. Four trials with ASHA early stopping; then a sweep whose driver is SIGKILLed mid-trial and
finished with `--resume`, keeping the trial that had finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
import yaml

from pipeline.config import load_train_config
from tests.cli import DISTILL, distill
from tests.conftest import DIGITS_KD, DIGITS_PRECOMPUTE, write_yaml
from deploy.local.s3 import moto_s3

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
ENV = {"RAY_AUTH_MODE": "token"}


@pytest.fixture(scope="module")
def s3(head):
    with moto_s3() as (endpoint, fs):
        yield endpoint, fs


@pytest.fixture(scope="module")
def cluster(head, tmp_path_factory):
    """The one-node cluster and a digits cache computed on it."""
    gcs, url = head.gcs, head.url
    root = tmp_path_factory.mktemp("sweep")
    pre = yaml.safe_load(open(DIGITS_PRECOMPUTE))
    pre["teacher"]["weights"] = str(root / "teacher.pt")
    pre["teacher"]["fit"]["epochs"] = 5
    pre["cache_root"] = str(root / "cache")
    pre_path = write_yaml(root / "precompute.yaml", pre)
    assert distill("fit-teacher", pre_path, env=ENV).code == 0
    ran = distill("precompute", pre_path, "--address", gcs, env=ENV)
    assert ran.code == 0, ran.err[-3000:]
    train = yaml.safe_load(open(DIGITS_KD))
    train.update(precompute=pre_path, storage_path=str(root / "runs"), num_workers=1, cpus_per_worker=1)
    write_yaml(root / "train.yaml", train)
    return gcs, url, root


def _sweep(root, name: str, **fields) -> str:
    return write_yaml(root / f"{name}.yaml", {"train": "train.yaml", "name": name, "storage_path": str(root / "sweeps"), **fields})


def test_four_trials_with_early_stopping_write_results_a_table_and_the_best_config(cluster):
    gcs, _, root = cluster
    path = _sweep(root, "asha", set={"epochs": 6}, grid={"loss.temperature": [2.0, 4.0], "alpha": [0.7]},
                  also=[{"alpha": 0.0}, {"optimizer.lr": 1.0e-6}],  # hard labels; a learning rate too small to learn
                  max_concurrent_trials=1, scheduler={"grace_period": 1, "reduction_factor": 2})
    ran = distill("sweep", path, "--address", gcs, env=ENV)
    assert ran.code == 0, ran.err[-3000:]
    sweep_dir = root / "sweeps" / "asha"
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 4 and summary["trial_mode"] == "direct" and summary["metric"] == "val_accuracy"
    metrics = [t["metric"] for t in trials]
    assert metrics == sorted(metrics, reverse=True)  # best first
    slow = next(t for t in trials if t["values"] == {"optimizer.lr": 1.0e-6})
    # Last to run, it is below every recorded value at the first rung, so ASHA stops it there.
    assert slow["status"] == "stopped early" and slow["epochs"] == 1 and slow is trials[-1]
    assert any(t["status"] == "finished" and t["epochs"] == 6 for t in trials)
    for t in trials:
        result = json.loads((sweep_dir / "trials" / t["trial_id"] / "result.json").read_text())
        assert result["sweep"]["values"] == t["values"] and result["metrics"]["val_accuracy"] == pytest.approx(t["metric"])
        assert result["workers_with_teacher"] == 0 and result["history"][-1]["epoch"] == t["epochs"]
        weights = sweep_dir / "trials" / t["trial_id"] / "student.pt"
        assert weights.exists() == (t["status"] == "finished")
    best = trials[0]
    assert best["metric"] > 0.8
    best_cfg = load_train_config(str(sweep_dir / "best.yaml"))
    assert best_cfg.name == "asha-best" and best_cfg.alpha == pytest.approx(best["fields"]["alpha"])
    assert best_cfg.loss.temperature == best["fields"]["loss.temperature"] and best_cfg.epochs == 6
    table = (sweep_dir / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| rank | trial | loss.temperature | alpha | optimizer.lr | val_accuracy")
    assert f"| 1 | {best['trial_id']} |" in table[2]
    assert "Traceback" not in ran.err and "Configuration for experiment" not in ran.out  # Tune's own output stays quiet
    assert sum(" started: " in line for line in ran.out.splitlines()) == 4
    assert "best" in ran.out.splitlines()[-1]


def test_a_killed_driver_resumes_the_unfinished_trials_and_keeps_the_finished(cluster):
    gcs, _, root = cluster
    # Trials run one at a time in this order; only the second, the one the kill lands in, is long.
    long = 150
    path = _sweep(root, "killed", set={"epochs": 3}, grid={"loss.temperature": [1.0]},
                  also=[{"loss.temperature": 2.0, "epochs": long}, {"loss.temperature": 4.0}, {"alpha": 0.0}],
                  max_concurrent_trials=1)
    proc = subprocess.Popen([DISTILL, "sweep", path, "--address", gcs], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **ENV})
    lines, done_at, first = [], None, None
    deadline = time.time() + 300
    for line in proc.stdout:  # until the second trial has reported an epoch
        lines.append(line)
        if " done at epoch " in line:
            done_at, first = time.time(), line.split()[2]
        if done_at and line.startswith("trial 2/4") and ": epoch " in line:
            break
        assert time.time() < deadline, "".join(lines)[-3000:]
    assert done_at is not None, "".join(lines)[-3000:]
    time.sleep(max(0.0, done_at + 4 - time.time()))  # Tune writes its experiment state every 2 s in a sweep
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    sweep_dir = root / "sweeps" / "killed"
    assert not (sweep_dir / "sweep.json").exists()

    ran = distill("sweep", path, "--address", gcs, "--resume", env=ENV)
    assert ran.code == 0, ran.err[-3000:]
    started = [line.split()[2] for line in ran.out.splitlines() if " started: " in line]
    assert first not in started and len(started) == 3, ran.out[-3000:]  # the finished trial is kept, not run again
    trials = json.loads((sweep_dir / "sweep.json").read_text())["trials"]
    assert len(trials) == 4 and all(t["status"] == "finished" for t in trials)
    assert sorted(t["epochs"] for t in trials) == [3, 3, 3, long]
    resumed = [json.loads((sweep_dir / "trials" / t["trial_id"] / "result.json").read_text())["history"][-1]["resumed_from_step"]
               for t in trials]
    # The trial that was running went on from its checkpoint.
    assert [r > 0 for r, t in zip(resumed, trials) if t["epochs"] == long] == [True] and sum(r > 0 for r in resumed) == 1
    for t in trials:
        state = torch.load(sweep_dir / "trials" / t["trial_id"] / "student.pt", weights_only=True)
        assert state and all(torch.isfinite(v).all() for v in state.values())
    again = distill("sweep", path, "--address", gcs, env=ENV)
    assert again.code == 2 and "already exists" in again.one_line_error() and "--resume" in again.err


def test_submitted_sweep_of_multi_worker_students_runs_ray_train_trials_into_s3(cluster, s3):
    """A sweep job whose trials are 2-worker Ray Train runs, its folder in a bucket."""
    _, url, root = cluster
    endpoint, fs = s3
    train = yaml.safe_load((root / "train.yaml").read_text())
    write_yaml(root / "train-s3.yaml", {**train, "storage": {"endpoint_url": endpoint}})
    path = write_yaml(root / "submitted.yaml", {
        "train": "train-s3.yaml", "name": "submitted", "storage_path": "s3://distill/sweeps", "max_concurrent_trials": 2,
        "set": {"epochs": 2, "num_workers": 2, "cpus_per_worker": 0.5, "in_memory": False}, "grid": {"alpha": [0.0, 0.7]}})
    ran = distill("submit", "sweep", path, "--address", url, "--wait", "--working-dir", str(root), env=ENV)
    assert ran.code == 0, (ran.out + ran.err)[-3000:]
    assert "sweep job" in ran.out and "succeeded" in ran.out and "(train trials)" in ran.out and "trial 2/2" in ran.out
    sweep_dir = "distill/sweeps/submitted"
    summary = json.loads(fs.cat(f"{sweep_dir}/sweep.json"))
    trials = summary["trials"]
    assert summary["trial_mode"] == "train" and sorted(t["alpha"] for t in trials) == [0.0, 0.7]
    assert all(t["status"] == "finished" and t["epochs"] == 2 for t in trials)
    for t in trials:  # each trial a 2-worker Ray Train run, its checkpoints in the trial's folder
        trial_dir = f"{sweep_dir}/trials/{t['trial_id']}"
        assert t["run_dir"] == f"s3://{trial_dir}"
        result = json.loads(fs.cat(f"{trial_dir}/result.json"))
        assert result["num_workers"] == 2 and result["workers_with_teacher"] == 0
        assert result["checkpoint"].startswith(f"s3://{trial_dir}/") and fs.exists(f"{trial_dir}/student.pt")
    best = yaml.safe_load(fs.cat(f"{sweep_dir}/best.yaml"))
    assert best["cache"] == summary["cache"] and best["storage"]["endpoint_url"] == endpoint  # a cache URI, not the precompute config
    report = distill("report", f"s3://{sweep_dir}", "--endpoint-url", endpoint, env=ENV)
    assert report.code == 0 and fs.exists(f"{sweep_dir}/report.html"), report.err[-3000:]
