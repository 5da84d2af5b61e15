"""A user's own table and models, run as a user runs them (the installed `distill` in a fresh process):
what can be checked on the data is checked in the driver before any Ray work, and every problem is
one line with exit 2 naming the row, column or value and the fix."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tests.cli import distill

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MODELS = '''
import torch
from torch import nn


class Picky(nn.Module):
    """A teacher that refuses inputs above 2: it can only fail on the data, inside a teacher actor."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x):
        if (x > 2).any():
            raise ValueError("an input value above 2")
        return self.net(x)


def picky(input_shape=(1, 8, 8), num_classes=10):
    return Picky(num_classes)
'''


def _table(path, n=1797, ids=None, labels=None, nan_row=None, big_row=None):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data[:n].astype(np.float32) / 16
    if nan_row is not None:
        x[nan_row, 5] = np.nan
    if big_row is not None:
        x[big_row, 5] = 7.0
    cols = {"id": ids if ids is not None else [f"r-{i}" for i in range(n)],
            "label": labels if labels is not None else d.target[:n]}
    cols.update({f"pixel_{j}": x[:, j] for j in range(64)})
    pq.write_table(pa.table(cols), path)


@pytest.fixture
def folder(tmp_path):
    """A user's folder: a table of the 8x8 digits with 64 pixel columns, a teacher's weights, configs."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _table(tmp_path / "digits.parquet")
    from pipeline.models.builtin import digits_cnn

    torch.manual_seed(0)
    torch.save(digits_cnn(width=32).state_dict(), tmp_path / "teacher.pt")
    (tmp_path / "my_models.py").write_text(MODELS)
    return tmp_path


def _config(folder, name="pre.yaml", source=None, teacher=None):
    data = {"source": {"kind": "parquet", "uri": "digits.parquet", "id_column": "id", "input_columns": ["pixel_*"],
                       "input_shape": [1, 8, 8], **(source or {})},
            "teacher": {"factory": "pipeline.models.builtin:digits_cnn", "kwargs": {"width": 32}, "weights": "teacher.pt",
                        **(teacher or {})},
            "cache_root": "cache"}
    (folder / name).write_text(yaml.safe_dump(data))
    return name


def test_a_sound_table_validates_with_its_shape_and_classes(folder):
    ran = distill("validate", _config(folder), cwd=str(folder))
    assert ran.code == 0, ran.err
    assert "train 1" in ran.out and "10 classes" in ran.out and "input [1, 8, 8]" in ran.out and "(not computed yet)" in ran.out


def _fails(folder, config, *needles, command="validate"):
    started = time.time()
    ran = distill(command, config, cwd=str(folder))
    line = ran.one_line_error()
    assert ran.code == 2 and all(n in line for n in needles), line
    return time.time() - started


def test_a_wrong_input_shape_is_one_line_before_ray(folder):
    for command in ("validate", "precompute"):
        took = _fails(folder, _config(folder, source={"input_shape": [1, 28, 28]}), "[1, 28, 28] holds 784 values",
                      "give 64", command=command)
        assert took < 20  # no Ray started, no source staged


def test_string_labels_are_one_line(folder):
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    from sklearn.datasets import load_digits

    _table(folder / "digits.parquet", labels=names[load_digits().target])
    _fails(folder, _config(folder), "labels in `label`", "are not integers", "'zero'")


def test_duplicate_ids_are_refused_naming_them(folder):
    _table(folder / "digits.parquet", ids=[f"r-{i % 1000}" for i in range(1797)])  # 1,797 rows under 1,000 ids
    _fails(folder, _config(folder), "797 duplicate id(s)", "'r-0'", "exactly once")
    _fails(folder, _config(folder), "797 duplicate id(s)", command="precompute")


def test_a_table_without_its_label_column_fails_validate(folder):
    pq.write_table(pq.read_table(folder / "digits.parquet").drop(["label"]), folder / "digits.parquet")
    _fails(folder, _config(folder), "lacks column(s) ['label']")


def test_a_pattern_that_matches_nothing_names_the_columns(folder):
    _fails(folder, _config(folder, source={"input_columns": ["pix_*"]}), "pattern 'pix_*' matches no column", "pixel_0")


def test_weights_that_do_not_fit_the_factory_fail_in_seconds(folder):
    took = _fails(folder, _config(folder, teacher={"kwargs": {"width": 16}}), "teacher.pt do not fit",
                  "size mismatch", command="precompute")
    assert took < 20


def test_identical_data_exported_again_is_the_same_cache(folder):
    """The table's fingerprint is its content (Parquet footers), not its file times."""
    cache = lambda ran: ran.out.split("cache ")[-1].split(" (")[0]  # noqa: E731
    first = distill("validate", _config(folder), cwd=str(folder))
    time.sleep(1.1)
    _table(folder / "digits.parquet")  # exported again: a new file, a new mtime, the same content
    again = distill("validate", "pre.yaml", cwd=str(folder))
    assert first.code == again.code == 0 and cache(first) == cache(again)
    _table(folder / "digits.parquet", n=1796)  # different content, a different cache
    changed = distill("validate", "pre.yaml", cwd=str(folder))
    assert changed.code == 0 and cache(changed) != cache(first)


def test_bad_values_are_one_line_before_ray(folder):
    """NaN inputs, an empty table and labels past the teacher's classes, as a user first meets them."""
    _table(folder / "digits.parquet", nan_row=17)
    for command in ("validate", "precompute"):
        took = _fails(folder, _config(folder), "1 of 1797 rows of ", "digits.parquet hold non-finite input values",
                      "'r-17'", "nonfinite_inputs: zero", command=command)
        assert took < 20 and not any((folder / "cache").glob("*/manifest.json"))
    ran = distill("validate", _config(folder, source={"nonfinite_inputs": "zero"}), cwd=str(folder))
    assert ran.code == 0, ran.err
    pq.write_table(pq.read_table(folder / "digits.parquet").slice(0, 0), folder / "digits.parquet")
    _fails(folder, _config(folder), "digits.parquet has no rows", command="precompute")
    from sklearn.datasets import load_digits

    target = load_digits().target
    _table(folder / "digits.parquet", labels=np.where(target == 9, 12, target))
    _fails(folder, _config(folder), "labels go up to 12", "teacher.pt predicts 10 classes (0..9)",
           "rows labelled 10 or more", command="precompute")


def test_a_row_the_teacher_fails_on_inside_an_actor_is_named(folder):
    _table(folder / "digits.parquet", big_row=17)
    name = _config(folder, teacher={"factory": "my_models:picky", "kwargs": {}, "weights": None})
    ran = distill("precompute", name, cwd=str(folder))
    assert ran.code == 2 and "Traceback" not in ran.err
    last = ran.err.strip().splitlines()[-1]
    assert last.startswith("error: the teacher stage failed: the teacher failed on row 'r-17': ValueError: an input value above 2"), last
    assert not any((folder / "cache").glob("*/manifest.json"))  # nothing published


def _counts(ran) -> tuple[int, int]:
    part = ran.out.split("source parquet: ")[1].split(" rows")[0]  # "train N, val M"
    train, val = (int(p.split()[1]) for p in part.split(", "))
    return train, val


def test_the_users_own_split_column(folder):
    table = pq.read_table(folder / "digits.parquet")
    fold = np.where(np.arange(table.num_rows) % 4 == 0, "val", "train")
    pq.write_table(table.append_column("fold", pa.array(fold)), folder / "digits.parquet")
    ran = distill("validate", _config(folder, source={"split_column": "fold"}), cwd=str(folder))
    assert ran.code == 0 and _counts(ran) == (int((fold == "train").sum()), int((fold == "val").sum())), ran.err
    bad = np.where(fold == "val", "validation", "train")
    pq.write_table(table.append_column("fold", pa.array(bad)), folder / "digits.parquet")
    _fails(folder, "pre.yaml", "split column 'fold'", "['validation']", "'train' and 'val'")
    _fails(folder, _config(folder, source={"split_column": "fold", "val_fraction": 0.3}), "field `source`",
           "drop them with `split_column` or `val_uri`")


def test_a_separate_validation_table(folder):
    _table(folder / "val.parquet", n=300, ids=[f"v-{i}" for i in range(300)])
    ran = distill("validate", _config(folder, source={"val_uri": "val.parquet"}), cwd=str(folder))
    assert ran.code == 0 and _counts(ran) == (1797, 300), ran.err
    _table(folder / "val.parquet", n=300)  # ids r-0..r-299 are in the training table too
    _fails(folder, "pre.yaml", "300 duplicate id(s)")


def test_all_rows_for_training_then_evaluate_on_a_held_out_table(folder, head):
    """val_fraction 0: a cache with no validation split, a student trained without per-epoch evaluation,
    then scored with `distill evaluate` on the user's own held-out table. Both stages run on a cluster
    the shell names in RAY_ADDRESS (the other tests' commands start a local Ray of their own)."""
    _table(folder / "digits.parquet", n=1500)
    from sklearn.datasets import load_digits

    d = load_digits()
    held = {"id": [f"h-{i}" for i in range(1500, 1797)], "label": d.target[1500:]}
    held.update({f"pixel_{j}": (d.data[1500:, j] / 16).astype(np.float32) for j in range(64)})
    pq.write_table(pa.table(held), folder / "heldout.parquet")
    name = _config(folder, source={"val_fraction": 0.0})
    assert _counts(distill("validate", name, cwd=str(folder))) == (1500, 0)
    (folder / "train.yaml").write_text(yaml.safe_dump({
        "precompute": name, "student": {"factory": "pipeline.models.builtin:mlp", "kwargs": {"hidden": [32]}},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 4, "num_workers": 1, "cpus_per_worker": 0.5,
        "storage_path": "runs", "name": "all-rows"}))
    for args in (["precompute", name], ["train", "train.yaml"]):
        ran = distill(*args, cwd=str(folder), env=head.env)
        assert ran.code == 0, ran.err[-3000:]
    import json

    result = json.loads((folder / "runs" / "all-rows" / "result.json").read_text())
    assert result["epochs"] == 4 and result["metrics"]["val_accuracy"] is None  # nothing to evaluate on during training
    ran = distill("evaluate", "runs/all-rows", "--source", "heldout.parquet", "--out", "eval.json", cwd=str(folder))
    assert ran.code == 0, ran.err[-3000:]
    assert "(table, split all, 297 rows)" in ran.out and "accuracy" in ran.out and "ece" in ran.out
    scored = json.loads((folder / "eval.json").read_text())
    assert scored["rows"] == 297 and scored["metrics"]["val_accuracy"] > 0.7 and "val_agreement" not in scored["metrics"]
    cache = distill("evaluate", "runs/all-rows", "--source", result["cache"], "--split", "train", cwd=str(folder))
    assert cache.code == 0 and "(cache, split train, 1500 rows)" in cache.out and "agreement" in cache.out
    missing = distill("evaluate", "runs/all-rows", "--source", "nope.parquet", cwd=str(folder))
    assert missing.code == 2 and "nope.parquet does not exist" in missing.one_line_error()
    for column in ("label", "id"):
        pq.write_table(pq.read_table(folder / "heldout.parquet").drop([column]), folder / f"no-{column}.parquet")
        line = distill("evaluate", "runs/all-rows", "--source", f"no-{column}.parquet", cwd=str(folder)).one_line_error()
        assert f"table no-{column}.parquet lacks column(s) ['{column}']" in line and "id 'id', label 'label'" in line, line


def test_a_relative_precompute_is_found_from_any_directory(folder):
    """A train config in a sub-folder names `precompute: pre.yaml` beside it; commands run from elsewhere."""
    configs = folder / "configs"
    configs.mkdir()
    pre = yaml.safe_load((folder / _config(folder)).read_text())
    pre["source"]["uri"] = str(folder / "digits.parquet")
    (configs / "pre.yaml").write_text(yaml.safe_dump(pre))
    train = {"precompute": "pre.yaml", "student": {"factory": "pipeline.models.builtin:mlp"}}
    (configs / "train.yaml").write_text(yaml.safe_dump(train))
    ran = distill("validate", "configs/train.yaml", cwd=str(folder))
    assert ran.code == 0 and "its cache is not computed yet" in ran.out and str(configs / "pre.yaml") in ran.out, ran.err
    (configs / "broken.yaml").write_text(yaml.safe_dump({**train, "precompute": "missing.yaml"}))
    line = distill("validate", "configs/broken.yaml", cwd=str(folder)).one_line_error()
    assert "config configs/broken.yaml names `precompute: missing.yaml`, which does not exist" in line and str(configs) in line
