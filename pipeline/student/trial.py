"""One sweep trial, as Ray Tune runs it: the trial's train config from the base and its point, then
either the worker loop in the trial's own process (`direct`: one worker, no Train run to start) or a
Ray Train run driven from the trial (`train`: any number of workers, Train's own restore).

`context` (from the sweep's driver, shared by every trial through Tune's `with_parameters`) holds the
base config, the manifest, the shard plan, and the decoded cache when it was read once for all trials.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from pipeline import storage
from pipeline.cache.manifest import Manifest
from pipeline.config.sweep import trial_config
from pipeline.config.train import TrainConfig
from pipeline.runtime import verbose

POINT = "point"  # the param_space key of a trial's grid point; random fields are top-level keys


def values_of(config: dict[str, Any]) -> dict[str, Any]:
    """What a trial varies: its random draws, then its grid point (which wins where both set a field)."""
    return {**{k: v for k, v in config.items() if k != POINT}, **config.get(POINT, {})}


def config_of(config: dict[str, Any], context: dict[str, Any], trial_id: str | None = None) -> TrainConfig:
    """The trial's train config: its point and random draws over the base, named after the trial."""
    if trial_id is None:
        import ray.tune

        trial_id = ray.tune.get_context().get_trial_id()
    return trial_config(context["base"], values_of(config), trial_id, context["trials_path"])


def planned(cfg: TrainConfig, context: dict[str, Any]) -> dict[str, Any]:
    """The sweep's shard plan with this trial's step budget (its epochs and batch size may be its own)."""
    from pipeline.student.run import step_budget

    _, total = step_budget(cfg, context["data"], context["units_per_row"])
    return {**context["data"], "total_steps": total}


def direct_trial(config: dict[str, Any], context: dict[str, Any], shared: dict[str, Any] | None = None) -> None:
    """The worker loop in this process; checkpoints and metrics go to Tune, which restores from them."""
    from pipeline.student.session import TuneSession
    from pipeline.student.worker import run_loop

    if not verbose():  # the driver prints one line per trial result; the loop's and Tune's would repeat it
        for name in ("pipeline.student.worker", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # DCP saves and loads one process's state without a process group, and says so every time.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    cfg = config_of(config, context)
    storage.configure(**cfg.storage.model_dump())
    run_loop({"train": cfg.model_dump(mode="json"), "manifest": context["manifest"], **planned(cfg, context),
              "preloaded": shared}, TuneSession())


def train_trial(config: dict[str, Any], context: dict[str, Any], shared: dict[str, Any] | None = None) -> None:
    """A Ray Train run per trial. Metrics reach Tune through Tune's report callback; a trial started
    again after an interrupted sweep restores its Train run from the run's own checkpoints."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.student.run import make_trainer

    cfg = config_of(config, context)
    storage.configure(**cfg.storage.model_dump())
    manifest = Manifest.model_validate(context["manifest"])
    make_trainer(cfg, manifest, planned(cfg, context), callbacks=[TuneReportCallback()]).fit()
