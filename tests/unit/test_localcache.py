"""The node-local shard cache: a shard fetched once, served locally after, bounded in bytes."""

import os

import pyarrow.fs as pafs

from pipeline.student.train.localcache import LocalShardCache




def _remote(tmp_path, sizes):
    src = tmp_path / "bucket"
    src.mkdir()
    for i, n in enumerate(sizes):
        (src / f"s{i}.parquet").write_bytes(bytes([i]) * n)
    return src


def test_a_shard_is_fetched_once_then_read_locally(tmp_path):
    src = _remote(tmp_path, [100, 200])
    fs = pafs.LocalFileSystem()
    cache = LocalShardCache(str(tmp_path / "local"), 10_000, "s3://bucket/cache")
    first = cache.path(fs, str(src / "s0.parquet"), "shards/s0.parquet")
    again = cache.path(fs, str(src / "s0.parquet"), "shards/s0.parquet")
    assert first == again and open(first, "rb").read() == bytes([0]) * 100
    assert (cache.misses, cache.hits) == (1, 1)
    assert not [p for p in os.listdir(os.path.dirname(first)) if p.endswith(".part")]  # nothing half-written left
    other = LocalShardCache(str(tmp_path / "local"), 10_000, "s3://bucket/another-cache")
    assert other.path(fs, str(src / "s1.parquet"), "shards/s0.parquet") != first  # one folder per cache


def test_the_least_recently_used_shards_go_past_the_budget(tmp_path):
    src = _remote(tmp_path, [400, 400, 400, 2000])
    fs = pafs.LocalFileSystem()
    cache = LocalShardCache(str(tmp_path / "local"), 1000, "s3://bucket/cache")
    paths = [cache.path(fs, str(src / f"s{i}.parquet"), f"s{i}.parquet") for i in range(2)]
    os.utime(paths[0], (1, 1))  # s0 used longest ago
    os.utime(paths[1], (2, 2))
    third = cache.path(fs, str(src / "s2.parquet"), "s2.parquet")
    assert not os.path.exists(paths[0]) and os.path.exists(paths[1]) and os.path.exists(third)
    assert cache.path(fs, str(src / "s3.parquet"), "s3.parquet") is None  # larger than the budget: read directly
    assert sum(os.path.getsize(os.path.join(d, f)) for d, _, fs_ in os.walk(cache.root) for f in fs_) <= 1000
