import json

import pytest

from pipeline.cache.manifest import manifest_uri, parse_manifest, read_manifest
from pipeline.cache.verify import verify_cache
from pipeline.errors import DistillError


def test_manifest_round_trip(tiny_cache):
    m = read_manifest(tiny_cache)
    again = parse_manifest(m.to_json())
    assert again == m
    assert m.rows == 50 and m.rows_by_split == {"train": 40, "val": 10}
    assert m.bytes == sum(s.bytes for s in m.shards) > 0
    assert [s.split for s in m.shards_of("val")] == ["val"]


def test_sound_cache_verifies(tiny_cache):
    assert verify_cache(tiny_cache) == []


def test_missing_cache_is_clear(tmp_path):
    with pytest.raises(DistillError, match="no cache at"):
        read_manifest(str(tmp_path / "nope"))


def test_incomplete_cache_is_clear(tiny_cache):
    import os

    os.remove(manifest_uri(tiny_cache))
    with pytest.raises(DistillError, match="incomplete cache"):
        read_manifest(tiny_cache)
    assert "incomplete" in verify_cache(tiny_cache)[0]


def test_unparseable_manifest_is_named(tiny_cache):
    with open(manifest_uri(tiny_cache), "w") as f:
        f.write("{not json")
    with pytest.raises(DistillError, match="does not parse"):
        read_manifest(tiny_cache)
    assert "does not parse" in verify_cache(tiny_cache)[0]


def test_manifest_with_wrong_fields_is_named(tiny_cache):
    data = json.loads(open(manifest_uri(tiny_cache)).read())
    del data["rows"]
    with pytest.raises(DistillError, match="field `rows`"):
        parse_manifest(json.dumps(data))


def test_verify_names_corrupted_truncated_missing_and_extra_shards(tiny_cache):
    import os
    import shutil

    train, val = "shards/split=train/part-0000-000000-0.parquet", "shards/split=val/part-0000-000000-0.parquet"
    extra = "shards/split=train/part-extra.parquet"
    shutil.copy(f"{tiny_cache}/{train}", f"{tiny_cache}/{extra}")
    with open(f"{tiny_cache}/{train}", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    os.remove(f"{tiny_cache}/{val}")
    problems = "\n".join(verify_cache(tiny_cache))
    assert f"shard {train} checksum differs" in problems
    assert f"missing shard {val}" in problems
    assert f"extra shard {extra}" in problems
    size = os.path.getsize(f"{tiny_cache}/{train}")
    with open(f"{tiny_cache}/{train}", "r+b") as f:
        f.truncate(size // 2)
    problems = "\n".join(verify_cache(tiny_cache))
    assert "bytes, manifest says" in problems and "unreadable" in problems
