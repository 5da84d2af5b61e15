"""Stage 2 under faults: a killed train worker, a killed driver, a half-written checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from pipeline.cli import main
from tests.conftest import DIGITS_KD, write_yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def _train_yaml(digits_stage1, tmp_path, name, epochs, **extra):
    data = yaml.safe_load(open(DIGITS_KD))
    data.update(precompute=digits_stage1["config_path"], storage_path=str(tmp_path / "runs"), name=name, epochs=epochs, **extra)
    return write_yaml(tmp_path / f"{name}.yaml", data)


# Every mechanism of a long run at once: sharded student, bf16 autocast, accumulation, clipping,
# warmup + cosine decay, a step budget ending mid-epoch, checkpoints every 7 of the 22 steps of an epoch.
AT_SCALE = {"parallel": "fsdp", "precision": "bf16", "grad_accum_steps": 2, "max_steps": 120,
            "checkpoint_every": 7, "eval_every": 50, "num_workers": 2,
            "optimizer": {"name": "adamw", "lr": 0.003, "schedule": "cosine", "warmup_steps": 20, "grad_clip": 1.0}}


def _wait_for_checkpoint(run_dir, timeout=240):
    """Until Ray Train has registered a checkpoint (its snapshot lists one), not merely begun writing one."""
    deadline = time.time() + timeout
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while time.time() < deadline:
        if snapshot.exists() and "checkpoint_" in snapshot.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint was registered in {run_dir}")


def test_killed_worker_resumes_mid_epoch_to_the_same_bits(digits_stage1, tmp_path):
    """A worker killed mid-epoch: the run goes on from the last step checkpoint and ends with the
    very student, bit for bit, of a run that was never interrupted."""
    import torch
    from ray.util.state import list_actors

    assert main(["train", _train_yaml(digits_stage1, tmp_path, "straight", epochs=20, **AT_SCALE)]) == 0
    path = _train_yaml(digits_stage1, tmp_path, "killed", epochs=20, **AT_SCALE)
    codes = []
    thread = threading.Thread(target=lambda: codes.append(main(["train", path])))
    thread.start()
    run_dir = tmp_path / "runs" / "killed"
    _wait_for_checkpoint(run_dir)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True)
    assert workers, "no live train worker found"
    os.kill(workers[-1].pid, signal.SIGKILL)
    thread.join(timeout=360)
    assert codes == [0]
    killed = json.loads((run_dir / "result.json").read_text())
    straight = json.loads((tmp_path / "runs" / "straight" / "result.json").read_text())
    resumed = [h["resumed_from_step"] for h in killed["history"] if h["resumed_from_step"]]
    assert resumed and resumed[0] % 7 == 0 and resumed[0] % 22, "a restart from a mid-epoch step checkpoint"
    assert killed["steps"] == straight["steps"] == AT_SCALE["max_steps"]
    a = torch.load(run_dir / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "runs" / "straight" / "student.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert killed["metrics"]["val_accuracy"] == straight["metrics"]["val_accuracy"] > 0.7
    # FSDP: each of the two workers holds half the parameters and half the optimizer state.
    full = sum(v.numel() * 4 for v in b.values())
    assert killed["memory_per_worker"]["param_bytes"] == pytest.approx(full / 2, rel=0.02)
    assert killed["memory_per_worker"]["optimizer_bytes"] == pytest.approx(full, rel=0.02)  # AdamW: 2 moments


def test_killed_driver_then_resume_finishes_all_epochs(digits_stage1, tmp_path):
    import ray

    path = _train_yaml(digits_stage1, tmp_path, "kill-driver", epochs=12)
    # A second driver attached to the same cluster, as `distill train` on a cluster would be.
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", path,
                             "--address", ray.get_runtime_context().gcs_address],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "runs" / "kill-driver"
    try:
        _wait_for_checkpoint(run_dir)
        time.sleep(1.0)
    finally:
        proc.kill()
        proc.wait()
    assert not (run_dir / "result.json").exists()
    assert main(["train", str(tmp_path / "runs" / "new-name")]) == 2  # a config path is needed, or --resume
    assert main(["train", path]) == 2  # the run exists: resume it or overwrite it
    assert main(["train", "--resume", str(run_dir)]) == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["epochs"] == 12 and result["history"][-1]["step"] == 12 * 22
    assert any(h["resumed_from_step"] > 0 for h in result["history"])  # a restart really happened
    assert result["metrics"]["val_accuracy"] > 0.5
    # Resuming a finished run does no work and keeps the result.
    before = (run_dir / "result.json").read_text()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert (run_dir / "result.json").read_text() == before


def test_sharded_run_resumes_on_another_worker_count_and_skips_half_written_checkpoints(digits_stage1, tmp_path):
    """Two FSDP workers stop at step 44; one worker carries on from their sharded checkpoint to 88,
    never from a newer checkpoint that was cut off while being written."""
    path = _train_yaml(digits_stage1, tmp_path, "partial", epochs=2, parallel="fsdp", num_workers=2)
    assert main(["train", path]) == 0
    run_dir = tmp_path / "runs" / "partial"
    newest = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]
    assert sorted(f.name for f in (newest / "model").iterdir() if f.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
    broken = run_dir / "checkpoint_2099-01-01_00-00-00.000000"
    shutil.copytree(newest, broken)
    with open(broken / "meta.pt", "r+b") as f:
        f.truncate(100)
    os.remove(run_dir / "result.json")
    config = json.loads((run_dir / "config.json").read_text())
    config.update(epochs=4, num_workers=1)
    (run_dir / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(run_dir)]) == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert [h["step"] for h in result["history"]] == [22, 44, 66, 88]
    assert result["history"][-1]["resumed_from_step"] == 44 and result["num_workers"] == 1
    assert result["metrics"]["val_accuracy"] > result["history"][0]["val_accuracy"] - 0.05


def _heavy_precompute_yaml(tmp_path, width=128):
    """A teacher slow enough here (about 20 s for 5,000 rows at width 128, a third of that at 64) that a run can be interrupted."""
    import torch

    from pipeline.models.builtin import heavy_cnn
    from pipeline.models.factory import save_state

    torch.manual_seed(0)
    save_state(heavy_cnn(width=width), str(tmp_path / "heavy.pt"))
    return write_yaml(tmp_path / "pre.yaml", {
        "source": {"kind": "mnist"}, "cache_root": str(tmp_path / "cache"), "batch_size": 128,
        "teacher": {"factory": "pipeline.models.builtin:heavy_cnn", "kwargs": {"width": width},
                    "weights": str(tmp_path / "heavy.pt")}})


def _driver(path):
    """`distill precompute` in another process, attached to this session's cluster."""
    import ray

    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "precompute", path,
                             "--address", ray.get_runtime_context().gcs_address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _shard_ids(uri):
    import glob

    import pyarrow.parquet as pq

    return [i for f in glob.glob(f"{uri}/shards/split=*/*.parquet") for i in pq.read_table(f).column("sample_id").to_pylist()]


def test_killed_precompute_driver_resumes_without_loss_or_duplicates(ray_session, tmp_path, monkeypatch):
    """Stage 1 killed once its first shards are committed; the rerun computes only what is missing."""
    import glob

    from pipeline.teacher.identity import resolve_target
    from pipeline.cache.verify import verify_cache
    from pipeline.config import load_precompute_config
    from pipeline.teacher.precompute import run_precompute

    path = _heavy_precompute_yaml(tmp_path, width=64)
    uri = resolve_target(load_precompute_config(path)).uri
    proc = _driver(path)
    from pipeline.teacher.resume import committed_rows

    try:
        # Kill once a first block is committed (a shard file alone may still be uncommitted).
        deadline = time.time() + 240
        while committed_rows(uri) == 0 and time.time() < deadline:
            time.sleep(0.2)
        assert glob.glob(f"{uri}/shards/split=*/*.parquet") and committed_rows(uri) > 0, "nothing committed in time"
    finally:
        proc.kill()
        proc.wait()
    assert not os.path.exists(f"{uri}/manifest.json")
    from pipeline.cache.manifest import read_manifest
    from pipeline.errors import DistillError

    with pytest.raises(DistillError, match="incomplete cache"):
        read_manifest(uri)  # a reader never takes the partial cache for a complete one

    monkeypatch.setattr("pipeline.cache.lock.STALE_S", 2.0)  # the dead driver's lock goes stale quickly
    result = run_precompute(load_precompute_config(path))
    stats = result.manifest.stats
    assert 0 < result.rows_computed < 5000 and stats.rows_resumed == 5000 - result.rows_computed
    assert stats.fraction_computed < 1.0
    ids = _shard_ids(uri)
    assert len(ids) == len(set(ids)) == 5000  # rows lost 0, rows duplicated 0
    assert verify_cache(uri) == []
    assert not os.path.exists(f"{uri}/_checkpoint") and not os.path.exists(f"{uri}/_source")


def test_two_precomputes_of_one_cache_at_once(ray_session, tmp_path):
    """One publishes; the other waits on the lock and finds the hit. Nothing is written twice."""
    from pipeline.teacher.identity import resolve_target
    from pipeline.cache.verify import verify_cache
    from pipeline.config import load_precompute_config
    from pipeline.teacher.precompute import run_precompute

    path = _heavy_precompute_yaml(tmp_path, width=64)
    uri = resolve_target(load_precompute_config(path)).uri
    other = _driver(path)
    try:
        deadline = time.time() + 120
        while not os.path.exists(f"{uri}/_lock.json") and time.time() < deadline:
            time.sleep(0.1)
        lines = []
        result = run_precompute(load_precompute_config(path), log=lines.append)
        output, _ = other.communicate(timeout=300)
    finally:
        other.kill()
    assert other.returncode == 0, output
    assert result.hit and result.rows_computed == 0
    assert any(line.startswith("waiting: another precompute") for line in lines)
    assert "wrote 5000 rows" in output
    ids = _shard_ids(uri)
    assert len(ids) == len(set(ids)) == 5000
    assert verify_cache(uri) == [] and not os.path.exists(f"{uri}/_lock.json")


def test_lost_teacher_actor_is_restarted_without_losing_rows(ray_session, tmp_path):
    from ray.util.state import list_actors

    from pipeline.teacher.identity import resolve_target
    from pipeline.cache.verify import verify_cache
    from pipeline.config import load_precompute_config
    from pipeline.teacher.precompute import run_precompute

    path = _heavy_precompute_yaml(tmp_path, width=64)
    cfg = load_precompute_config(path)
    uri = resolve_target(cfg).uri
    results = []
    thread = threading.Thread(target=lambda: results.append(run_precompute(cfg, log=lambda _: None)))
    thread.start()
    deadline = time.time() + 120
    victims = []
    while not victims and time.time() < deadline:
        victims = list_actors(filters=[("class_name", "=", "MapWorker(MapBatches(TeacherPredictor))"),
                                       ("state", "=", "ALIVE")], detail=True)
        time.sleep(0.5)
    assert victims, "the teacher actor never started"
    time.sleep(1)  # mid-batch
    os.kill(victims[0].pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert results and not results[0].hit
    [victim] = list_actors(filters=[("actor_id", "=", victims[0].actor_id)], detail=True)
    assert victim.num_restarts >= 1  # the kill landed mid-run, and Ray restarted the actor
    ids = _shard_ids(uri)
    assert len(ids) == len(set(ids)) == 5000
    assert verify_cache(uri) == []
