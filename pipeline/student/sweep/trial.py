"""One sweep trial, as Ray Tune runs it: the trial's train config from the base and its point, then
either the worker loop in the trial's own process (`direct`: one worker, no Train run to start) or a
Ray Train run driven from the trial (`train`: any number of workers, Train's own restore).

`SweepContext` (from the sweep's driver, shared by every trial through Tune's `with_parameters`) is
the one value that crosses into trials: the base config, the manifest and the cache plan.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

from pipeline.cache.manifest import Manifest
from pipeline.config.sweep import trial_config
from pipeline.config.train import TrainConfig
from pipeline.runtime import quiet_stopped_process, verbose
from pipeline.student.train.plan import CachePlan, Preloaded, WorkerPlan, step_budget

POINT = "point"  # the param_space key of a trial's grid point; random fields are top-level keys


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares."""

    base: dict[str, Any]  # the base train config as JSON: each trial applies its point over it
    manifest: Manifest  # without its shard list and source config: the cache plan holds the shards
    cache: CachePlan
    trials_path: str  # <sweep>/trials: each trial's run directory is trials_path/<trial id>
    units_per_row: float | None = None  # for trials with a max_tokens budget


def values_of(config: dict[str, Any]) -> dict[str, Any]:
    """What a trial varies: its random draws, then its grid point (which wins where both set a field)."""
    return {**{k: v for k, v in config.items() if k != POINT}, **config.get(POINT, {})}


def config_of(config: dict[str, Any], context: SweepContext, trial_id: str | None = None) -> TrainConfig:
    """The trial's train config: its point and random draws over the base, named after the trial."""
    if trial_id is None:
        import ray.tune

        trial_id = ray.tune.get_context().get_trial_id()
    return trial_config(context.base, values_of(config), trial_id, context.trials_path)


def planned(cfg: TrainConfig, context: SweepContext, preloaded: Preloaded | None = None) -> WorkerPlan:
    """The sweep's cache plan with this trial's step budget (its epochs and batch size may be its own)."""
    _, total = step_budget(cfg, context.cache, context.units_per_row)
    return WorkerPlan(cfg, context.manifest, context.cache, total, preloaded)


def direct_trial(config: dict[str, Any], context: SweepContext, shared: Preloaded | None = None) -> None:
    """The worker loop in this process; checkpoints and metrics go to Tune, which restores from them."""
    from pipeline.student.train.session import TuneSession
    from pipeline.student.train.worker import run_loop

    if not verbose():  # the driver prints one line per trial result; the loop's and Tune's would repeat it
        for name in ("pipeline.student.train.worker", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # DCP saves and loads one process's state without a process group, and says so every time.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        quiet_stopped_process()  # ASHA stops trials: their exit is no error
    cfg = config_of(config, context)
    run_loop(planned(cfg, context, shared), TuneSession())


def train_trial(config: dict[str, Any], context: SweepContext, shared: Preloaded | None = None) -> None:
    """A Ray Train run per trial. Metrics reach Tune through Tune's report callback; a trial started
    again after an interrupted sweep restores its Train run from the run's own checkpoints."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.student.train.driver import make_trainer

    cfg = config_of(config, context)
    make_trainer(cfg, planned(cfg, context), callbacks=[TuneReportCallback()]).fit()
