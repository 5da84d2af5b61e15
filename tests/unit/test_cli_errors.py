"""Every bad input a user can hit: one line naming the problem and the fix, exit code 2, nothing written."""

import os

import yaml

from pipeline.cache.manifest import manifest_uri
from pipeline.cli import main
from tests.conftest import DIGITS_KD, write_yaml


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def train_yaml(tmp_path, **changes):
    data = yaml.safe_load(open(DIGITS_KD))
    data.pop("precompute")
    data.update(storage_path=str(tmp_path / "runs"), **changes)
    return write_yaml(tmp_path / "train.yaml", data)


def test_invalid_yaml(capsys, tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("student: [unclosed\n")
    assert_one_line_error(*run(capsys, "validate", str(p))[::2], "invalid YAML", "line")


def test_invalid_field_is_named(capsys):
    code, _, err = run(capsys, "validate", DIGITS_KD, "--set", "batch_size=-4")
    assert_one_line_error(code, err, "field `batch_size`", "--set batch_size=")


def test_unknown_model_factory(capsys, tiny_cache, tmp_path):
    cfg = train_yaml(tmp_path, cache=tiny_cache, student={"factory": "pipeline.models.builtin:no_such_net"})
    code, _, err = run(capsys, "train", cfg)
    assert_one_line_error(code, err, "unknown model factory", "no_such_net")
    code, _, err = run(capsys, "validate", cfg)
    assert_one_line_error(code, err, "unknown model factory")
    code, _, err = run(capsys, "train", cfg, "--set", "student.factory=not.a.module:mlp")
    assert_one_line_error(code, err, "cannot import module 'not.a.module'")


def test_missing_cache(capsys, tmp_path):
    code, _, err = run(capsys, "train", train_yaml(tmp_path, cache=str(tmp_path / "nowhere")))
    assert_one_line_error(code, err, "no cache at", "distill precompute")


def test_incomplete_cache(capsys, tiny_cache, tmp_path):
    os.remove(manifest_uri(tiny_cache))
    code, _, err = run(capsys, "train", train_yaml(tmp_path, cache=tiny_cache))
    assert_one_line_error(code, err, "incomplete cache", "manifest.json")
    assert not (tmp_path / "runs").exists()


def test_student_class_count_mismatch(capsys, tiny_cache, tmp_path):
    cfg = train_yaml(tmp_path, cache=tiny_cache,
                     student={"factory": "pipeline.models.builtin:mlp", "kwargs": {"num_classes": 7}})
    code, _, err = run(capsys, "train", cfg)
    assert_one_line_error(code, err, "predicts 7 classes, the cache has 10", "num_classes=10")
    assert not (tmp_path / "runs").exists()


def test_damaged_cache_refused_before_workers(capsys, tiny_cache, tmp_path):
    shard = "shards/split=train/part-0000-000000-0.parquet"
    os.remove(f"{tiny_cache}/{shard}")
    code, _, err = run(capsys, "train", train_yaml(tmp_path, cache=tiny_cache))
    assert_one_line_error(code, err, "is damaged", f"missing shard {shard}")


def test_cluster_address_that_does_not_answer(capsys, tmp_path, digits_precompute_yaml, monkeypatch):
    import torch

    from pipeline.config import load_precompute_config
    from pipeline.models.builtin import digits_cnn
    from pipeline.models.factory import save_state

    save_state(digits_cnn(), load_precompute_config(digits_precompute_yaml).teacher.weights)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, _, err = run(capsys, "precompute", digits_precompute_yaml, "--address", "127.0.0.1:1")
    assert code == 2 and "127.0.0.1:1 does not answer" in err and "Traceback" not in err
    # The environment variable is honoured the same way.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    code, _, err = run(capsys, "precompute", digits_precompute_yaml)
    assert code == 2 and "does not answer" in err
    assert not any((tmp_path / "cache").glob("*/manifest.json"))
    del torch


def test_missing_teacher_weights(capsys, digits_precompute_yaml):
    code, _, err = run(capsys, "precompute", digits_precompute_yaml)
    assert_one_line_error(code, err, "teacher weights", "distill fit-teacher")


def test_cache_verify_exit_codes(capsys, tiny_cache):
    assert run(capsys, "cache", "verify", tiny_cache)[0] == 0
    os.remove(manifest_uri(tiny_cache))
    code, out, _ = run(capsys, "cache", "verify", tiny_cache)
    assert code == 1 and "incomplete" in out


def test_cache_ls_and_show(capsys, tiny_cache, tmp_path):
    code, out, _ = run(capsys, "cache", "ls", str(tmp_path))
    assert code == 0 and "cachetest0000000" in out and "complete" in out
    code, out, _ = run(capsys, "cache", "show", tiny_cache)
    assert code == 0 and "rows     50" in out
    # A root whose caches were all removed (on S3 the prefix is then gone) lists none.
    code, out, _ = run(capsys, "cache", "ls", str(tmp_path / "nope"))
    assert code == 0 and out.strip() == f"no caches under {tmp_path / 'nope'}"
