"""What pipeline.runtime relies on that Ray does not publish, checked against the installed Ray
(no cluster started): an upgrade that moves one of these fails here, loudly, instead of silently
slowing epochs down or flooding the logs."""

import inspect
import logging
from pathlib import Path

import pytest

from pipeline import runtime


def test_every_internal_is_listed_once():
    assert set(runtime.RAY_INTERNALS) == {runtime.TRAIN_HEALTH_CHECK_ENV, runtime.WORKERS_SOFT_LIMIT_ENV,
                                         "train report logger", "map worker actor name", runtime.RAY_DATA_LOGGING_ENV,
                                         runtime.TUNE_NEW_OUTPUT_ENV}


def test_our_ray_data_logging_config_loads_with_this_ray(tmp_path):
    """The YAML names Ray Data's own handler and filter classes; Ray Data still reads the variable."""
    import importlib

    import yaml
    from ray.data._internal import logging as data_logging

    assert data_logging.RAY_DATA_LOGGING_CONFIG_ENV_VAR_NAME == runtime.RAY_DATA_LOGGING_ENV
    config = yaml.safe_load(open(runtime.RAY_DATA_LOGGING))
    for spec in [*config["handlers"].values(), *config["filters"].values()]:
        module, _, name = (spec.get("class") or spec["()"]).rpartition(".")
        assert hasattr(importlib.import_module(module), name), spec
    assert config["handlers"]["console"]["level"] == "CRITICAL" and config["loggers"]["ray.data"]["level"] == "DEBUG"


def test_tune_reads_the_output_switch_and_the_old_reporter_is_silent_at_verbose_0(monkeypatch):
    from ray.tune.experimental import output

    monkeypatch.setenv(runtime.TUNE_NEW_OUTPUT_ENV, "0")
    assert output.get_air_verbosity(0) is None  # the older reporter, which prints nothing at verbose=0
    monkeypatch.setenv(runtime.TUNE_NEW_OUTPUT_ENV, "1")
    assert output.get_air_verbosity(0) is not None
    assert runtime.TUNE_NEW_OUTPUT_ENV in inspect.getsource(output.get_air_verbosity)


def test_train_health_check_interval_is_still_read_from_that_variable():
    from ray.train.v2._internal import constants

    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR == runtime.TRAIN_HEALTH_CHECK_ENV
    assert runtime.JOB_ENV[runtime.TRAIN_HEALTH_CHECK_ENV] == "0.25"


def test_workers_soft_limit_is_still_a_raylet_setting():
    import ray

    raylet = Path(ray.__file__).parent / "_raylet.so"
    name = runtime.WORKERS_SOFT_LIMIT_ENV.removeprefix("RAY_").encode()
    with open(raylet, "rb") as f:
        assert name in f.read(), f"{name!r} is no longer in {raylet}: check Ray's RayConfig and pipeline/runtime.py"


def test_train_reports_are_logged_by_the_logger_we_quiet(monkeypatch):
    from ray.train.v2._internal.execution import context

    assert isinstance(context.logger, logging.Logger)
    assert "logger.info" in inspect.getsource(context.TrainContext.report) or "logger.info" in inspect.getsource(context)
    monkeypatch.delenv(runtime.VERBOSE_ENV, raising=False)
    context.logger.setLevel(logging.NOTSET)
    runtime.quiet_train_worker()
    assert context.logger.level == logging.WARNING
    monkeypatch.setenv(runtime.VERBOSE_ENV, "1")
    context.logger.setLevel(logging.NOTSET)
    runtime.quiet_train_worker()
    assert context.logger.level == logging.NOTSET


def test_map_worker_actor_name_is_what_ray_data_gives_the_teacher_actors():
    from ray.data._internal.execution.operators.actor_pool_map_operator import get_map_worker_cls_name

    class TeacherPredictor:
        pass

    assert runtime.map_worker_class_name(TeacherPredictor) == get_map_worker_cls_name("MapBatches(TeacherPredictor)")


@pytest.mark.parametrize("error,line", [
    (RuntimeError("ray.exceptions.RayTaskError(DistillError): ...\npipeline.errors.DistillError: weights 'x' do not exist — fix\nmore"),
     "weights 'x' do not exist — fix"),
    (RuntimeError("wrapper"), "RuntimeError: wrapper"),
])
def test_root_cause_finds_our_line_inside_a_ray_error(error, line):
    assert runtime.root_cause(error) == line


def test_root_cause_follows_the_cause_chain():
    try:
        try:
            raise ValueError("inner problem\nthe last line")
        except ValueError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as e:
        assert runtime.root_cause(e) == "ValueError: the last line"


def test_root_cause_unwraps_a_ray_task_error_to_the_workers_exception():
    from ray.exceptions import RayTaskError

    from pipeline.errors import DistillError

    wrapped = RayTaskError("train_fn", "Traceback ...\nlong text\n", KeyError("teacher_logits"))
    outer = RuntimeError("Training failed")
    outer.__cause__ = wrapped
    assert runtime.root_cause(outer) == "KeyError: 'teacher_logits'"
    ours = RayTaskError("train_fn", "Traceback ...", DistillError("shard 3 is missing", "recompute"))
    assert runtime.root_cause(ours) == "shard 3 is missing — recompute"
