"""The sweep's console output, as a Tune callback: one line when a trial starts, at most one per
trial every 10 s while it trains, one when it ends."""

from __future__ import annotations

import time
from typing import Any, Callable

from ray.tune import Callback

from pipeline.config.sweep import SweepConfig, point_label
from pipeline.student.sweep.trial import values_of

Log = Callable[[str], None]


def _say(line: str) -> None:
    print(line, flush=True)


class Progress(Callback):
    """Tune pickles this with the experiment (what `--resume` restores), so it keeps its module path."""

    def __init__(self, cfg: SweepConfig, total: int, log: Log) -> None:
        self.cfg, self.total, self.log = cfg, total, log
        self.index: dict[str, int] = {}
        self.last: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment (what --resume restores). The caller's `log`
        # need not pickle: after a Ray Train run in the same process, `print` itself is Ray's
        # replacement, which pickle refuses. A restored sweep prints.
        return {**self.__dict__, "log": _say}

    def _name(self, trial) -> str:
        n = self.index.setdefault(trial.trial_id, len(self.index) + 1)
        return f"trial {n}/{self.total} {trial.trial_id}"

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.log(f"{self._name(trial)} started: {point_label(values_of(trial.config))}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        now = time.monotonic()
        if now - self.last.get(trial.trial_id, -1e9) >= 10.0:
            self.last[trial.trial_id] = now
            self.log(f"{self._name(trial)}: epoch {result.get('epoch', 0):g}  {self.cfg.metric} "
                     f"{result.get(self.cfg.metric, float('nan')):.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        epochs = self.cfg.train.epochs
        stopped = " (stopped early)" if self.cfg.scheduler and last.get("epoch", epochs) < epochs else ""
        self.log(f"{self._name(trial)} done at epoch {last.get('epoch', 0):g}{stopped}: {self.cfg.metric} "
                 f"{last.get(self.cfg.metric, float('nan')):.4f}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.log(f"{self._name(trial)} FAILED: see its traceback above ({trial.path})")
