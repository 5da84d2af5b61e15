"""A real two-node Ray cluster with the Jobs API, and a real S3 endpoint, both on 127.0.0.1.

The second node carries a custom resource standing in for a GPU node; the teacher actors ask
for it. `distill submit pipeline` runs the teacher job, then two student jobs; everything lands
in the bucket. Run alone with: pytest -m e2e
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import DIGITS_KD, DIGITS_PRECOMPUTE, write_yaml
from deploy.local.s3 import moto_s3

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as (endpoint, fs):
        yield endpoint, fs


@pytest.fixture(scope="module")
def cluster(s3):
    import ray

    from deploy.local.cluster import start_cluster

    if ray.is_initialized():  # the integration session's local Ray; this test needs its own cluster
        ray.shutdown()
    c, url, gpu_node = start_cluster(head_cpus=2, worker_cpus=2)
    try:
        yield url, gpu_node
    finally:
        c.shutdown()


def _configs(tmp_path, endpoint, fs):
    from pipeline.config import load_precompute_config
    from pipeline.teacher.fit import fit_teacher

    pre = yaml.safe_load(open(DIGITS_PRECOMPUTE))
    pre["teacher"]["weights"] = "s3://distill/teachers/digits.pt"
    pre["teacher"]["fit"]["epochs"] = 5
    pre.update(cache_root="s3://distill/cache", storage={"endpoint_url": endpoint},
               actor_resources={"teacher_gpu": 1})
    pre_path = write_yaml(tmp_path / "precompute.yaml", pre)
    fit_teacher(load_precompute_config(pre_path))
    trains = []
    for name, terms in (("kd", {"kd": 0.7, "ce": 0.3}), ("hard", {"kd": 0.0, "ce": 1.0})):
        t = yaml.safe_load(open(DIGITS_KD))
        t.pop("precompute")
        t.update(cache="s3://distill/cache/placeholder", storage_path="s3://distill/runs", name=f"e2e-{name}",
                 epochs=3, storage={"endpoint_url": endpoint})
        t["loss"]["terms"] = terms
        trains.append(write_yaml(tmp_path / f"train-{name}.yaml", t))
    return pre_path, trains


@pytest.fixture(scope="module")
def pipeline(cluster, s3, tmp_path_factory):
    """`distill submit pipeline` once for the module: its summary line, the configs and the output."""
    import contextlib
    import io

    from pipeline.cli import main

    url, _ = cluster
    endpoint, fs = s3
    pre, trains = _configs(tmp_path_factory.mktemp("pipeline"), endpoint, fs)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["submit", "pipeline", pre, *trains, "--address", url, "--wait"])
    assert code == 0, out.getvalue()[-3000:]
    summary = json.loads([line for line in out.getvalue().splitlines() if line.startswith('{"cache"')][-1])
    return summary, pre, trains


def test_pipeline_on_a_cluster_with_s3(cluster, s3, pipeline, capsys):
    from pipeline.cli import main
    from pipeline.submit import job_client, list_jobs

    url, gpu_node = cluster
    endpoint, fs = s3
    summary, pre, trains = pipeline
    assert summary["teacher_job"] and len(summary["student_jobs"]) == 2
    assert set(summary["statuses"].values()) == {"SUCCEEDED"}

    cache_key = summary["cache"].removeprefix("s3://")
    manifest = json.loads(fs.cat(f"{cache_key}/manifest.json"))
    assert manifest["rows"] == 1797 and all(fs.exists(f"{cache_key}/{s['path']}") for s in manifest["shards"])
    assert manifest["stats"]["teacher_nodes"] == [gpu_node]  # the teacher ran on the "GPU" node only
    for name in ("kd", "hard"):
        result = json.loads(fs.cat(f"distill/runs/e2e-{name}/result.json"))
        assert result["cache"] == summary["cache"] and result["epochs"] == 3
        assert result["workers_with_teacher"] == 0
    # No credential in what the jobs carried.
    client = job_client(url)
    for job_id in [summary["teacher_job"], *summary["student_jobs"]]:
        info = client.get_job_info(job_id)
        assert "testing" not in json.dumps({"env": info.runtime_env, "meta": info.metadata, "ep": info.entrypoint})

    # Again: the cache exists, so no teacher job at all; the finished student is not retrained.
    before = fs.cat("distill/runs/e2e-kd/result.json")
    precompute_jobs = [j for j in list_jobs(client) if j["stage"] == "precompute"]
    capsys.readouterr()
    assert main(["submit", "pipeline", pre, trains[0], "--address", url, "--wait"]) == 0
    out = capsys.readouterr().out
    again = json.loads([line for line in out.splitlines() if line.startswith('{"cache"')][-1])
    assert again["teacher_job"] is None and len(again["student_jobs"]) == 1
    assert [j for j in list_jobs(client) if j["stage"] == "precompute"] == precompute_jobs
    assert "e2e-kd already finished, not retrained" in out
    assert fs.cat("distill/runs/e2e-kd/result.json") == before


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    import time

    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_resubmitted_train_job_resumes_from_its_latest_checkpoint(cluster, s3, pipeline, tmp_path, capsys):
    """A train job stopped mid-run (a lost driver, a RayJob retried by KubeRay) and submitted again
    continues from its latest checkpoint: the checkpoints and history of the first job survive."""
    from pipeline.cli import main
    from pipeline.submit import job_client

    url, _ = cluster
    endpoint, fs = s3
    summary, _, _ = pipeline
    t = yaml.safe_load(open(DIGITS_KD))
    t.pop("precompute")
    t.update(cache=summary["cache"], storage_path="s3://distill/runs", name="e2e-resume", epochs=15,
             storage={"endpoint_url": endpoint})
    path = write_yaml(tmp_path / "resume.yaml", t)
    capsys.readouterr()
    assert main(["submit", "train", path, "--address", url]) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1].split()[-1]
    checkpoints = lambda: [p for p in fs.ls("distill/runs/e2e-resume", refresh=True) if "/checkpoint_" in p] \
        if fs.exists("distill/runs/e2e-resume") else []  # noqa: E731
    _wait_for(lambda: any(fs.exists(f"{c}/meta.pt") for c in checkpoints()), 240, "the first checkpoint")
    client = job_client(url)
    client.stop_job(job_id)
    _wait_for(lambda: str(client.get_job_status(job_id)).endswith(("STOPPED", "FAILED")), 120, "the job to stop")
    assert not fs.exists("distill/runs/e2e-resume/result.json")
    kept = sorted(checkpoints())
    assert kept

    assert main(["submit", "train", path, "--address", url, "--wait"]) == 0
    out = capsys.readouterr().out
    assert "resuming e2e-resume from its latest checkpoint" in out
    fs.invalidate_cache()  # the listings above predate result.json
    result = json.loads(fs.cat("distill/runs/e2e-resume/result.json"))
    steps_per_epoch = 1438 // 64
    assert result["epochs"] == 15 and result["history"][-1]["step"] == 15 * steps_per_epoch
    resumed = result["history"][-1]["resumed_from_step"]
    assert resumed > 0 and resumed % steps_per_epoch == 0  # from a checkpoint the first job wrote
    assert [h["step"] for h in result["history"]] == [steps_per_epoch * (e + 1) for e in range(15)]  # none lost, none twice


def test_failed_job_shows_its_logs_and_exits_1(cluster, s3, tmp_path, capsys):
    from pipeline.cli import main

    url, _ = cluster
    endpoint, _ = s3
    t = yaml.safe_load(open(DIGITS_KD))
    t.pop("precompute")
    t.update(cache="s3://distill/cache/does-not-exist", storage_path="s3://distill/runs", name="e2e-broken",
             storage={"endpoint_url": endpoint})
    code = main(["submit", "train", write_yaml(tmp_path / "broken.yaml", t), "--address", url, "--wait"])
    out = capsys.readouterr().out
    assert code == 1
    assert "no cache at s3://distill/cache/does-not-exist" in out and "failed" in out
    assert not __import__("s3fs").S3FileSystem(endpoint_url=endpoint).exists("distill/runs/e2e-broken")


def test_unreachable_address_is_one_line(capsys):
    from pipeline.cli import main

    assert main(["jobs", "ls", "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not answer" in err


def test_jobs_status_logs_and_stop(cluster, s3, tmp_path, capsys):
    import time

    from pipeline.cli import main

    url, _ = cluster
    endpoint, _ = s3
    t = yaml.safe_load(open(DIGITS_KD))
    t.pop("precompute")
    t.update(cache="s3://distill/cache/none", storage={"endpoint_url": endpoint}, name="e2e-stop")
    assert main(["submit", "train", write_yaml(tmp_path / "t.yaml", t), "--address", url]) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert job_id.startswith("distill-train-e2e-stop-")
    assert main(["jobs", "stop", job_id, "--address", url]) == 0
    for _ in range(60):
        main(["jobs", "status", job_id, "--address", url])
        status = capsys.readouterr().out.strip()
        if status in ("STOPPED", "FAILED", "SUCCEEDED"):
            break
        time.sleep(1)
    assert status in ("STOPPED", "FAILED")  # stopped, or it had already failed on the missing cache
    assert main(["jobs", "ls", "--address", url]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["jobs", "logs", job_id, "--address", url]) == 0
    assert main(["jobs", "status", "no-such-job", "--address", url]) == 2


def test_ray_address_from_environment(monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    assert main(["jobs", "ls"]) == 2
    assert "http://127.0.0.1:9" in capsys.readouterr().err
