"""`distill sweep` configs: a base train config, the fields to vary, and how Ray Tune searches them.

Fields are named as in `--set` (`loss.temperature`, `optimizer.lr`, `student`), plus `alpha`: the KD
share of a kd + ce mix (`loss.terms` becomes {kd: alpha, ce: 1 - alpha}; 0 is hard labels alone).
Every trial's train config is built and validated in the driver before any trial starts.
"""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.config.base import Strict, absolute
from pipeline.config.load import apply_overrides, format_validation, load_train_config, read_yaml
from pipeline.config.train import TrainConfig
from pipeline.errors import DistillError

RANDOM_KINDS = ("uniform", "loguniform", "randint", "choice")
# Every trial reads the same cache and writes under the sweep's folder.
FIXED_FIELDS = ("cache", "precompute", "storage_path", "name", "storage", "job")


class Asha(Strict):
    """Asynchronous successive halving: at each rung (grace_period x reduction_factor^i epochs) only
    the best 1/reduction_factor of the trials that reached it go on."""

    grace_period: float = Field(1.0, gt=0)  # epochs every trial trains before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)
    max_t: float | None = Field(None, gt=0)  # epochs; default: the base config's epochs


class SweepConfig(Strict):
    train: TrainConfig  # the base config every trial starts from (`set:` in the file changes fields of it)
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage_path: str = "runs/sweeps"  # the sweep's folder is storage_path/name
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    grid: dict[str, list[Any]] = Field(default_factory=dict)  # every combination of these values
    random: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)  # {field: {uniform|loguniform|randint|choice: [...]}}
    also: list[dict[str, Any]] = Field(default_factory=list)  # single trials besides the grid (e.g. hard labels)
    num_samples: int = Field(1, ge=1)  # draws of `random` per grid point (the grid repeated)
    max_concurrent_trials: int | None = Field(None, ge=1)  # default: as many as the cluster's resources fit
    scheduler: Asha | None = None  # early stopping; None trains every trial to the end
    trial: Literal["auto", "direct", "train"] = "auto"  # see docs/sweeps.md#trials
    seed: int | None = None  # of Tune's random draws

    @field_validator("random")
    @classmethod
    def _domains(cls, value: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for field, domain in value.items():
            if len(domain) != 1 or next(iter(domain)) not in RANDOM_KINDS:
                raise ValueError(f"`random.{field}` must be one of {{{' | '.join(RANDOM_KINDS)}: [...]}}")
            kind, args = next(iter(domain.items()))
            if kind != "choice" and len(args) != 2:
                raise ValueError(f"`random.{field}.{kind}` takes [low, high]")
        return value

    @model_validator(mode="after")
    def _fields(self) -> "SweepConfig":
        for field in [*self.grid, *self.random, *(k for point in self.also for k in point)]:
            if field.split(".")[0] in FIXED_FIELDS:
                raise ValueError(f"`{field}` cannot vary within a sweep: every trial reads one cache into one folder")
        for field, values in self.grid.items():
            if not values:
                raise ValueError(f"`grid.{field}` is empty")
        if not (self.grid or self.random or self.also):
            raise ValueError("nothing varies: give `grid`, `random` or `also`")
        return self

    @property
    def job(self):
        """What the sweep's Ray Job driver asks for (`distill submit sweep`): the base config's `job:`."""
        return self.train.job

    def with_absolute_paths(self) -> "SweepConfig":
        return self.model_copy(update={"train": self.train.with_absolute_paths(), "storage_path": absolute(self.storage_path)})

    def points(self) -> list[dict[str, Any]]:
        """The grid's combinations, then the `also` trials: each a {field: value} override."""
        keys = list(self.grid)
        grid = [dict(zip(keys, combo)) for combo in itertools.product(*self.grid.values())] if keys else []
        return grid + [dict(p) for p in self.also] or [{}]

    def varied(self) -> list[str]:
        return list(dict.fromkeys([*self.grid, *self.random, *(k for p in self.also for k in p)]))


def apply_point(base: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The base train config (JSON form) with a trial's values set: dotted fields as in `--set`; `alpha`
    as the kd + ce mix; a mapping value replaces the field whole (a student with its kwargs)."""
    data = copy.deepcopy(base)
    for field, value in point.items():
        if field == "alpha":
            alpha = float(value)
            data.setdefault("loss", {})["terms"] = {"ce": 1.0} if alpha == 0 else (
                {"kd": 1.0} if alpha == 1 else {"kd": alpha, "ce": 1.0 - alpha})
            continue
        node, parts = data, field.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = copy.deepcopy(value)
    return data


def trial_config(base: dict[str, Any], point: dict[str, Any], name: str, storage_path: str) -> TrainConfig:
    return TrainConfig.model_validate({**apply_point(base, point), "name": name, "storage_path": storage_path})


def check_points(cfg: SweepConfig, path: str) -> None:
    """Every grid point and `also` trial, with each random field at its bounds, is a valid train config."""
    base = cfg.train.model_dump(mode="json")
    bounds = [{f: d[k][0] for f, d in cfg.random.items() for k in d}, {f: d[k][-1] for f, d in cfg.random.items() for k in d}]
    for point in cfg.points():
        for extreme in bounds:
            try:
                trial = trial_config(base, {**extreme, **point}, "check", cfg.storage_path)
            except ValidationError as e:
                err = format_validation(path, e)
                raise DistillError(f"{err.problem} (trial {point_label(point) or 'base'})",
                                   "fix the sweep's `grid`, `random` or `also` values, or the base train config") from None
            if (trial.eval_every or 0) != (trial.checkpoint_every or 0):
                raise DistillError(f"sweep {path}: trials must evaluate whenever they report (eval_every "
                                   f"{trial.eval_every} vs checkpoint_every {trial.checkpoint_every})",
                                   "set eval_every equal to checkpoint_every in the base train config, or leave both unset")


def value_label(value: Any) -> str:
    """A swept value in a line or a table cell: a student as `factory(kwargs)`, anything else without spaces."""
    if isinstance(value, dict) and "factory" in value:
        kwargs = ",".join(f"{k}={str(v).replace(' ', '')}" for k, v in (value.get("kwargs") or {}).items())
        return f"{value['factory'].split(':')[-1]}({kwargs})"
    return str(value).replace(" ", "")


def point_label(point: dict[str, Any]) -> str:
    """`loss.temperature=4 alpha=0.9 student=mlp(hidden=[128])`: what a trial varies, for lines and tables."""
    return " ".join(f"{k}={value_label(v)}" for k, v in point.items())


def load_sweep_config(path: str | os.PathLike, overrides: list[str] | None = None) -> SweepConfig:
    """Read a sweep file: `train:` is a train config file (relative to the sweep's folder) or one inline;
    `set:` changes fields of it for every trial (dotted names, as `grid` uses)."""
    data = apply_overrides(read_yaml(path), overrides)
    train, changes = data.get("train"), data.pop("set", None) or {}
    if isinstance(train, str):
        train_path = Path(train) if os.path.isabs(train) else Path(path).resolve().parent / train
        train = load_train_config(train_path).model_dump(mode="json")
    elif not isinstance(train, dict):
        raise DistillError(f"sweep {path} has no `train:`", "name the base train config file, or write it inline")
    if not isinstance(changes, dict):
        raise DistillError(f"sweep {path}: `set:` must map fields to values", "e.g. set: {epochs: 10, num_workers: 1}")
    data["train"] = apply_point(train, changes)
    try:
        cfg = SweepConfig.model_validate(data)
    except ValidationError as e:
        raise format_validation(str(path), e) from None
    check_points(cfg, str(path))
    return cfg
