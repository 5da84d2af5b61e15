"""Sweep configs without Ray: what each trial's train config is, and every refusal in the driver."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config.sweep import SweepConfig, apply_point, load_sweep_config, point_label
from pipeline.errors import DistillError
from pipeline.student.sweep import trial_mode
from pipeline.student.sweep.results import _rank_key, field_value, table_lines
from pipeline.config.sweep import trial_config
from tests.conftest import write_yaml

BASE = {"cache": "/tmp/cache", "student": {"factory": "pipeline.models.builtin:mlp", "kwargs": {"hidden": [64]}},
        "loss": {"temperature": 4.0, "terms": {"kd": 0.7, "ce": 0.3}}, "epochs": 5, "batch_size": 32,
        "num_workers": 1, "cpus_per_worker": 1}


def sweep(tmp_path, **fields) -> str:
    write_yaml(tmp_path / "train.yaml", BASE)
    return write_yaml(tmp_path / "sweep.yaml", {"train": "train.yaml", **fields})


def test_grid_is_every_combination_then_the_also_trials(tmp_path):
    cfg = load_sweep_config(sweep(tmp_path, grid={"loss.temperature": [1.0, 4.0], "alpha": [0.5, 0.9]},
                                  also=[{"alpha": 0.0}]))
    points = cfg.points()
    assert points == [{"loss.temperature": 1.0, "alpha": 0.5}, {"loss.temperature": 1.0, "alpha": 0.9},
                      {"loss.temperature": 4.0, "alpha": 0.5}, {"loss.temperature": 4.0, "alpha": 0.9}, {"alpha": 0.0}]
    assert cfg.varied() == ["loss.temperature", "alpha"]


def test_a_point_sets_dotted_fields_alpha_and_whole_students():
    base = SweepConfig.model_validate({"train": BASE, "grid": {"alpha": [0.5]}}).train.model_dump(mode="json")
    student = {"factory": "pipeline.models.builtin:cnn_student", "kwargs": {"width": 8}}
    cfg = trial_config(base, {"loss.temperature": 2.0, "alpha": 0.25, "student": student, "optimizer.lr": 0.01}, "t1", "/tmp/s")
    assert cfg.loss.temperature == 2.0 and cfg.loss.terms == {"kd": 0.25, "ce": 0.75} and cfg.alpha == 0.25
    assert cfg.student.factory == student["factory"] and cfg.student.kwargs == {"width": 8}
    assert cfg.optimizer.lr == 0.01 and cfg.name == "t1" and cfg.storage_path == "/tmp/s"
    assert trial_config(base, {"alpha": 0.0}, "t", "/s").loss.terms == {"ce": 1.0}
    assert trial_config(base, {"alpha": 1.0}, "t", "/s").loss.terms == {"kd": 1.0}
    assert base["loss"]["terms"] == {"kd": 0.7, "ce": 0.3}  # the base is never changed in place
    assert apply_point(base, {"student.kwargs.hidden": [8, 8]})["student"]["kwargs"]["hidden"] == [8, 8]


def test_set_changes_the_base_for_every_trial_and_the_train_path_is_relative_to_the_sweep(tmp_path):
    (tmp_path / "sub").mkdir()
    write_yaml(tmp_path / "sub" / "train.yaml", BASE)
    path = write_yaml(tmp_path / "sub" / "sweep.yaml", {"train": "train.yaml", "set": {"epochs": 2, "optimizer.lr": 0.5},
                                                         "grid": {"seed": [0, 1]}})
    cfg = load_sweep_config(path)
    assert cfg.train.epochs == 2 and cfg.train.optimizer.lr == 0.5


@pytest.mark.parametrize("fields, needle", [
    ({"grid": {"cache": ["/a", "/b"]}}, "`cache` cannot vary"),
    ({"grid": {"loss.temperature": []}}, "`grid.loss.temperature` is empty"),
    ({}, "nothing varies"),
    ({"random": {"optimizer.lr": {"normal": [0, 1]}}}, "must be one of"),
    ({"random": {"optimizer.lr": {"loguniform": [0.1]}}}, "takes [low, high]"),
    ({"grid": {"loss.temperature": [2.0, -1.0]}}, "loss.temperature"),
    ({"grid": {"epochs": [1]}, "set": {"eval_every": 3}}, "evaluate whenever they report"),
    ({"grid": {"epochs": [1]}, "metric": "val_accuracy", "mode": "up"}, "mode"),
])
def test_bad_sweeps_are_one_error_naming_the_field(tmp_path, fields, needle):
    with pytest.raises(DistillError) as e:
        load_sweep_config(sweep(tmp_path, **fields))
    assert needle in e.value.line()


def test_a_bad_random_bound_is_found_before_any_trial(tmp_path):
    with pytest.raises(DistillError, match="optimizer.lr"):
        load_sweep_config(sweep(tmp_path, random={"optimizer.lr": {"uniform": [-1.0, 0.1]}}))


def test_trial_mode_direct_only_for_single_worker_students():
    cfg = SweepConfig.model_validate({"train": BASE, "grid": {"seed": [0]}})
    assert trial_mode(cfg, {1}) == "direct" and trial_mode(cfg, {1, 2}) == "train"
    with pytest.raises(DistillError, match="one worker per trial"):
        trial_mode(cfg.model_copy(update={"trial": "direct"}), {2})
    assert trial_mode(cfg.model_copy(update={"trial": "train"}), {1}) == "train"


def test_table_is_sorted_by_metric_with_each_field_as_the_trial_ran_it():
    cfg = SweepConfig.model_validate({"train": BASE, "grid": {"loss.temperature": [1.0, 4.0]}, "also": [{"alpha": 0.0}]})
    base = cfg.train.model_dump(mode="json")
    hard = trial_config(base, {"alpha": 0.0}, "c", "/s")
    assert field_value(hard, "alpha") == 0.0 and field_value(hard, "loss.temperature") == 4.0
    trials = [{"trial_id": "a", "values": {}, "fields": {"loss.temperature": 1.0, "alpha": 0.7}, "metric": 0.9, "epochs": 5,
               "status": "finished"},
              {"trial_id": "b", "values": {}, "fields": {"loss.temperature": 4.0, "alpha": 0.0}, "metric": None,
               "status": "failed"},
              {"trial_id": "c", "values": {}, "fields": {"loss.temperature": 4.0, "alpha": 0.0}, "metric": 0.95, "epochs": 2,
               "status": "stopped early"}]
    ranked = sorted(trials, key=lambda t: _rank_key(t, "max"))
    assert [t["trial_id"] for t in ranked] == ["c", "a", "b"]
    assert [t["trial_id"] for t in sorted(trials, key=lambda t: _rank_key(t, "min"))] == ["a", "c", "b"]
    lines = table_lines(cfg, ranked)
    assert lines[0] == "| rank | trial | loss.temperature | alpha | val_accuracy | epochs | status |"
    assert lines[2] == "| 1 | c | 4.0 | 0.0 | 0.9500 | 2 | stopped early |"
    assert lines[4] == "| 3 | b | 4.0 | 0.0 | - | - | failed |"


def test_point_labels_name_students_by_factory_and_kwargs():
    student = {"factory": "pipeline.models.builtin:mlp", "kwargs": {"hidden": [512, 512]}}
    assert point_label({"alpha": 0.5, "student": student}) == "alpha=0.5 student=mlp(hidden=[512,512])"


def test_the_shipped_mnist_sweep_is_valid():
    cfg = load_sweep_config("jobs/configs/mnist/sweep-kd.yaml")
    points = cfg.points()
    assert len(points) == 10 and sum(p.get("alpha") == 0.0 for p in points) == 2
    assert cfg.train.num_workers == 1 and cfg.train.epochs == 20 and cfg.scheduler is None
    assert yaml.safe_load(open("jobs/configs/mnist/sweep-kd.yaml"))["train"] == "train-kd.yaml"


def test_the_progress_callback_pickles_after_ray_train_replaced_print(monkeypatch):
    """Tune pickles its callbacks with the experiment; after a Ray Train run in the same process
    `print` is Ray's replacement, which pickle cannot save by reference."""
    import builtins
    import pickle

    from pipeline.student.sweep import Progress

    original = builtins.print
    monkeypatch.setattr(builtins, "print", lambda *a, **k: original(*a, **k))
    cfg = SweepConfig.model_validate({"train": BASE, "grid": {"seed": [0]}})
    restored = pickle.loads(pickle.dumps(Progress(cfg, 1, original)))
    assert restored.total == 1 and restored.cfg == cfg and callable(restored.log)


def test_a_sweep_saved_when_progress_lived_in_the_package_still_restores(monkeypatch):
    """Tune pickles the callback with the experiment, by module path: sweeps saved before the sweep
    package was split name `pipeline.student.sweep.Progress`, which must still resolve."""
    import pickle

    from pipeline.student.sweep import progress
    from pipeline.student.sweep.progress import Progress

    cfg = SweepConfig.model_validate({"train": BASE, "grid": {"seed": [0]}})
    for old in (Progress, progress._say):  # as the old module pickled them
        monkeypatch.setattr(old, "__module__", "pipeline.student.sweep")
    saved = pickle.dumps(Progress(cfg, 2, print))
    monkeypatch.undo()
    assert b"pipeline.student.sweep\x94" in saved and b"pipeline.student.sweep.progress" not in saved
    restored = pickle.loads(saved)
    assert type(restored) is Progress and restored.total == 2 and restored.log is progress._say
