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


# ---- format v2: typed records, and v1 read through the one converter

V1 = {name: json.load(open(f"tests/unit/data/manifest_v1_{name}.json")) for name in ("digits", "taps", "topk", "sampled", "sequences")}


def test_v2_outputs_are_typed_by_mode(tiny_cache):
    from pipeline.cache.manifest import FullLogitsRecord

    m = read_manifest(tiny_cache)
    assert m.format_version == 2 and m.task == "classification"
    assert isinstance(m.logits(), FullLogitsRecord) and m.logits().columns == ["teacher_logits"]
    assert m.teacher.factory == "pipeline.models.builtin:digits_cnn"
    assert set(m.bytes_per_row()) == set(m.columns)  # recorded from the footers when the cache was written
    with pytest.raises(DistillError, match="no logits of teacher 'wide'"):
        m.logits("wide")


def test_a_bad_output_mode_or_field_fails_at_parse_time_naming_it(tiny_cache):
    data = json.loads(open(manifest_uri(tiny_cache)).read())
    data["outputs"][0]["mode"] = "topq"
    with pytest.raises(DistillError, match=r"field `outputs.0`.*tag 'topq'"):
        parse_manifest(json.dumps(data))
    data["outputs"][0] = {**data["outputs"][0], "mode": "topk"}  # a top-k record without k, temperatures, ...
    with pytest.raises(DistillError, match=r"field `outputs.0.topk.k`"):
        parse_manifest(json.dumps(data))
    data = json.loads(open(manifest_uri(tiny_cache)).read())
    data["teachers"]["teacher"]["weigths"] = "typo.pt"
    with pytest.raises(DistillError, match=r"field `teachers.teacher.weigths`"):
        parse_manifest(json.dumps(data))


def test_a_newer_format_is_refused_in_one_line():
    data = {**V1["digits"], "format_version": 3}
    with pytest.raises(DistillError, match="format v3; this distill reads v1 and v2") as e:
        parse_manifest(json.dumps(data))
    assert "upgrade" in e.value.fix


@pytest.mark.parametrize("name", sorted(V1))
def test_every_real_v1_manifest_reads_as_v2(name):
    v1 = V1[name]
    m = parse_manifest(json.dumps(v1))
    assert m.format_version == 2 and m.cache_id == v1["cache_id"] and m.rows == v1["rows"]
    assert m.shards[0].sha256 == v1["shards"][0]["sha256"] and m.columns == v1["columns"]
    assert m.teacher.factory == v1["teacher"]["factory"] and set(m.teachers) == set(v1["teachers"])
    assert m.task == ("tokens" if "input_ids" in v1["columns"] else "classification")
    logits = m.logits()
    assert logits.mode == v1["outputs"]["logits"]["mode"]
    stored = [c for o in m.outputs for c in o.columns]
    assert set(stored) | {"sample_id", "x", "label", "input_ids", "length"} >= set(v1["columns"])
    assert set(stored) <= set(v1["columns"])
    per_row = m.bytes_per_row()
    for column, b in v1["outputs"]["bytes_per_row"].items():
        assert per_row[column] == pytest.approx(b, abs=0.01)
    again = parse_manifest(m.to_json())  # a converted manifest is a valid v2 one
    assert again == m


def test_v1_token_and_tap_records_keep_their_fields():
    topk = parse_manifest(json.dumps(V1["topk"])).logits()
    assert (topk.k, topk.values, topk.temperatures, topk.step) == (32, "uint8", [1.0, 2.0], 0.0625)
    assert topk.columns == ["topk_indices", "topk_values", "topk_lse"] and topk.bytes_per_token == 56.47
    seq = parse_manifest(json.dumps(V1["sequences"])).logits()
    assert (seq.prompt_tokens, seq.new_tokens, seq.strategy) == (8, 4, "greedy")
    taps = parse_manifest(json.dumps(V1["taps"])).taps()
    assert taps["attn1"].pool == [7, 7] and taps["attn1"].column == "tap_attn1" and taps["block2"].shape == [64, 7, 7]
    assert parse_manifest(json.dumps(V1["taps"])).logits_columns() == {"teacher": "teacher_logits", "wide": "wide_logits"}


def test_the_oldest_v1_manifests_without_teachers_or_sizes_still_read():
    old = json.loads(json.dumps(V1["digits"]))
    del old["teachers"], old["outputs"]["bytes_per_row"], old["stats"]["teacher_nodes"]
    old["outputs"]["logits"] = {"mode": "full", "dtype": "float16"}
    old["teacher"].pop("column")
    m = parse_manifest(json.dumps(old))
    assert m.logits_columns() == {"teacher": "teacher_logits"} and m.teacher.weights is None
    assert m.column_bytes == {} and m.stats.teacher_nodes == []


def test_a_v1_cache_on_disk_is_read_as_it_is(tiny_cache):
    """The converter runs on read; the file on disk stays v1 (never rewritten)."""
    v2 = json.loads(open(manifest_uri(tiny_cache)).read())
    v1 = {**V1["digits"], "cache_id": v2["cache_id"], "rows": v2["rows"], "rows_by_split": v2["rows_by_split"],
          "columns": v2["columns"], "shards": v2["shards"], "num_classes": v2["num_classes"], "input_shape": v2["input_shape"]}
    with open(manifest_uri(tiny_cache), "w") as f:
        json.dump(v1, f)
    assert read_manifest(tiny_cache).format_version == 2 and verify_cache(tiny_cache) == []
    assert json.loads(open(manifest_uri(tiny_cache)).read())["format_version"] == 1
