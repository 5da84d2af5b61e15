"""Both stages against a real S3 endpoint (moto's server on 127.0.0.1), and the bad-bucket cases."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline import storage
from pipeline.cli import main
from tests.conftest import DIGITS_KD, write_yaml
from deploy.local.s3 import S3Proxy, moto_s3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


@pytest.fixture
def s3(ray_session):
    with moto_s3() as (endpoint, fs):
        yield endpoint, fs


def test_both_stages_on_s3(digits_stage1, s3, tmp_path, capsys):
    endpoint, fs = s3
    fs.put(str(digits_stage1["root"] / "teacher.pt"), "distill/teachers/digits.pt")
    pre = yaml.safe_load(open(digits_stage1["config_path"]))
    pre.update(cache_root="s3://distill/cache", storage={"endpoint_url": endpoint})
    pre["teacher"]["weights"] = "s3://distill/teachers/digits.pt"
    pre_path = write_yaml(tmp_path / "pre.yaml", pre)
    assert main(["precompute", pre_path]) == 0
    caches = [p for p in fs.ls("distill/cache") if not p.rsplit("/", 1)[1].startswith("_")]  # _configs: the config records
    assert len(caches) == 1
    manifest = json.loads(fs.cat(f"{caches[0]}/manifest.json"))
    assert manifest["rows"] == 1797 and all(fs.exists(f"{caches[0]}/{s['path']}") for s in manifest["shards"])
    # Same key as the local cache: the weights are the same bytes, only their location differs.
    assert manifest["cache_id"] == caches[0].rsplit("/", 1)[1]
    assert "testing" not in json.dumps(manifest)  # no credentials in the manifest
    assert main(["cache", "verify", f"s3://{caches[0]}", "--endpoint-url", endpoint]) == 0
    capsys.readouterr()
    assert main(["precompute", pre_path]) == 0
    assert "cache hit: s3://distill/cache/" in capsys.readouterr().out

    # Two workers stream the cache through a proxy that counts what the bucket serves; each keeps the
    # shards it read in a node-local directory for the second epoch.
    proxy = S3Proxy(endpoint)
    train = yaml.safe_load(open(DIGITS_KD))
    train.update(precompute=pre_path, storage_path="s3://distill/runs", storage={"endpoint_url": proxy.endpoint},
                 name="s3-kd", epochs=2, num_workers=2, in_memory=False, local_cache=str(tmp_path / "node-cache"))
    capsys.readouterr()
    try:
        assert main(["train", write_yaml(tmp_path / "train.yaml", train)]) == 0
    finally:
        proxy.close()
    out = capsys.readouterr().out
    assert "object store" not in out and "keeping streamed shards in" in out
    train_bytes = sum(s["bytes"] for s in manifest["shards"] if s["split"] == "train")
    served = sum(n for path, n in proxy.served.items() if "/split=train/" in path)
    # Each train byte served once in two epochs: one worker per shard, and the second epoch from disk.
    assert 0.5 * train_bytes < served <= 1.05 * train_bytes, (served, train_bytes)
    assert len(list((tmp_path / "node-cache").rglob("*.parquet"))) == len(manifest["shards"])  # val shards too
    result = json.loads(fs.cat("distill/runs/s3-kd/result.json"))
    assert result["epochs"] == 2 and result["cache"].startswith("s3://distill/cache/")
    assert result["checkpoint"].startswith("s3://distill/runs/s3-kd/checkpoint_")
    assert fs.exists(result["checkpoint"].removeprefix("s3://") + "/meta.pt")


def test_missing_bucket_and_credentials_are_one_line(digits_stage1, s3, tmp_path, capsys, monkeypatch):
    endpoint, fs = s3
    pre = yaml.safe_load(open(digits_stage1["config_path"]))
    pre.update(cache_root="s3://no-such-bucket/cache", storage={"endpoint_url": endpoint})
    path = write_yaml(tmp_path / "pre.yaml", pre)
    assert main(["precompute", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bucket 'no-such-bucket'" in err and "does not exist" in err
    assert not fs.exists("no-such-bucket")

    pre.update(cache_root="s3://distill/cache2")
    path = write_yaml(tmp_path / "pre.yaml", pre)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    assert main(["precompute", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no S3 credentials" in err
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.undo()
    assert fs.ls("distill") == [] or not any("cache2" in p for p in fs.ls("distill"))

    pre.update(storage={"endpoint_url": "http://127.0.0.1:9"})
    assert main(["precompute", write_yaml(tmp_path / "pre.yaml", pre)]) == 2
    assert "does not answer" in capsys.readouterr().err


def test_transient_s3_errors_are_retried_without_losing_or_duplicating_rows(digits_stage1, s3, tmp_path):
    """Every 4th request to the bucket is throttled (503 SlowDown), every 9th dropped without an answer."""
    from pipeline.cache.verify import verify_cache

    endpoint, fs = s3

    def fail(method, path, n):
        if n % 9 == 0:
            return "drop"
        return (503, "SlowDown") if n % 4 == 0 else None

    proxy = S3Proxy(endpoint, fail)
    try:
        fs.put(str(digits_stage1["root"] / "teacher.pt"), "distill/teachers/digits.pt")
        pre = yaml.safe_load(open(digits_stage1["config_path"]))
        pre.update(cache_root="s3://distill/flaky", storage={"endpoint_url": proxy.endpoint})
        pre["teacher"]["weights"] = "s3://distill/teachers/digits.pt"
        pre_path = write_yaml(tmp_path / "pre.yaml", pre)
        assert main(["precompute", pre_path]) == 0
        [cache] = [p for p in fs.ls("distill/flaky") if not p.rsplit("/", 1)[1].startswith("_")]
        import pyarrow.parquet as pq

        manifest = json.loads(fs.cat(f"{cache}/manifest.json"))
        ids = [i for s in manifest["shards"] for i in pq.read_table(fs.open(f"{cache}/{s['path']}")).column("sample_id").to_pylist()]
        assert len(ids) == len(set(ids)) == 1797
        assert verify_cache(f"s3://{cache}", storage.StorageOptions(endpoint_url=endpoint)) == []
        train = yaml.safe_load(open(DIGITS_KD))
        train.update(precompute=pre_path, storage_path="s3://distill/flaky-runs", storage={"endpoint_url": proxy.endpoint},
                     name="flaky", epochs=2)
        assert main(["train", write_yaml(tmp_path / "train.yaml", train)]) == 0
        assert json.loads(fs.cat("distill/flaky-runs/flaky/result.json"))["epochs"] == 2
        assert len(proxy.failed) > 10  # the faults really happened
    finally:
        proxy.close()


def test_permanent_s3_error_stops_clearly_and_publishes_nothing(digits_stage1, s3, tmp_path, capsys):

    endpoint, fs = s3
    proxy = S3Proxy(endpoint, lambda method, path, n: (403, "AccessDenied")
                       if method in ("PUT", "POST") and "/denied/" in path else None)
    try:
        fs.put(str(digits_stage1["root"] / "teacher.pt"), "distill/teachers/digits.pt")
        pre = yaml.safe_load(open(digits_stage1["config_path"]))
        pre.update(cache_root="s3://distill/denied", storage={"endpoint_url": proxy.endpoint})
        pre["teacher"]["weights"] = "s3://distill/teachers/digits.pt"
        assert main(["precompute", write_yaml(tmp_path / "pre.yaml", pre)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ") and "nothing was published" in err
        assert not fs.exists("distill/denied") or not fs.glob("distill/denied/**/manifest.json")
    finally:
        proxy.close()


def test_a_sweep_writes_its_folder_to_s3(digits_stage1, s3, tmp_path, capsys):
    """Direct trials; tests/e2e/test_sweep.py submits a sweep of Ray Train trials into a bucket."""
    trial = "direct"
    endpoint, fs = s3
    train = yaml.safe_load(open(DIGITS_KD))
    train.update(precompute=digits_stage1["config_path"], storage={"endpoint_url": endpoint}, epochs=2, num_workers=1,
                 cpus_per_worker=1)
    write_yaml(tmp_path / "train.yaml", train)
    sweep = write_yaml(tmp_path / "sweep.yaml", {"train": "train.yaml", "name": f"s3-{trial}", "storage_path": "s3://distill/sweeps",
                                                  "grid": {"alpha": [0.0, 0.7]}, "trial": trial, "max_concurrent_trials": 1})
    assert main(["sweep", sweep]) == 0
    root = f"distill/sweeps/s3-{trial}"
    summary = json.loads(fs.cat(f"{root}/sweep.json"))
    assert summary["trial_mode"] == trial and [t["status"] for t in summary["trials"]] == ["finished", "finished"]
    for t in summary["trials"]:
        assert t["run_dir"] == f"s3://{root}/trials/{t['trial_id']}"
        result = json.loads(fs.cat(f"{root}/trials/{t['trial_id']}/result.json"))
        assert result["epochs"] == 2 and result["checkpoint"].startswith(f"s3://{root}/")
        assert fs.exists(f"{root}/trials/{t['trial_id']}/student.pt")
    best = yaml.safe_load(fs.cat(f"{root}/best.yaml"))
    assert best["storage"]["endpoint_url"] == endpoint and best["cache"] == summary["cache"]
    assert main(["report", f"s3://{root}", "--endpoint-url", endpoint]) == 0
    assert fs.exists(f"{root}/report.html")
