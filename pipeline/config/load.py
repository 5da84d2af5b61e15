"""Configs from YAML files plus `--set` overrides, validated before any Ray work starts.

Every validation error names the field (dotted path) so a user can fix it in the file or with
`--set field=value` on the command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import yaml
from pydantic import ValidationError

from pipeline.config.precompute import LOGITS_MODES, PrecomputeConfig
from pipeline.config.source import SOURCE_KINDS
from pipeline.config.train import TrainConfig
from pipeline.errors import DistillError
from pipeline.storage import is_local, local_path

if TYPE_CHECKING:
    from pipeline.config.sweep import SweepConfig

AnyConfig = Union[PrecomputeConfig, TrainConfig, "SweepConfig"]
# A discriminated union puts the chosen tag into an error's location (`source.parquet.uri`); users
# write `source.uri`, so the tag is dropped from the field name they are told to fix.
_UNION_TAGS = {"source": SOURCE_KINDS, "logits": LOGITS_MODES}


def parse_overrides(pairs: list[str] | None) -> list[tuple[list[str], Any]]:
    """`a.b=value` pairs; the value is read as YAML so numbers, booleans and lists keep their type."""
    out = []
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise DistillError(f"bad override {pair!r}", "write it as --set field.sub=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip().split("."), value))
    return out


def apply_overrides(data: dict[str, Any], pairs: list[str] | None) -> dict[str, Any]:
    for path, value in parse_overrides(pairs):
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"config file {str(p)!r} does not exist", "check the path")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DistillError(f"invalid YAML in {p}{where}: {problem}", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise DistillError(f"{p} is not a YAML mapping", "a config is a mapping of field: value")
    return data


def config_kind(data: dict[str, Any]) -> str:
    if "teacher" in data or "cache_root" in data:
        return "precompute"
    if "student" in data:
        return "train"
    if "train" in data:
        return "sweep"
    raise DistillError(
        "cannot tell the config's stage",
        "a precompute config has `teacher:`, a train config has `student:`, a sweep has `train:`",
    )


def field_name(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the dotted field a user writes (union tags dropped)."""
    parts: list[str] = []
    for part in loc:
        part = str(part)
        if parts and part in _UNION_TAGS.get(parts[-1], ()):
            continue
        if part.startswith("function-"):  # a validator's wrapper, not a field
            continue
        parts.append(part)
    return ".".join(parts)


def format_validation(path: str, err: ValidationError) -> DistillError:
    first = err.errors()[0]
    field = field_name(first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return DistillError(
        f"invalid config {path}: field `{field}`: {msg}{more}",
        f"fix `{field}` in the file or override it with --set {field}=...",
    )


# Fields that name another config file: a relative path there is relative to the file that names it.
CONFIG_REFERENCES = ("precompute",)


def _resolve_references(data: dict[str, Any], path: str | os.PathLike, overrides: list[str] | None) -> dict[str, Any]:
    """A reference written in the file is relative to the file's folder; one given with --set, to the
    current directory (where the command line was typed). Either must exist."""
    base = Path(path).resolve().parent
    written = {name: data.get(name) for name in CONFIG_REFERENCES}
    for name, value in written.items():
        if isinstance(value, str) and value and is_local(value) and not os.path.isabs(value):
            data[name] = str(base / value)
    in_file = {name: data.get(name) for name in CONFIG_REFERENCES}
    data = apply_overrides(data, overrides)
    for name in CONFIG_REFERENCES:
        value = data.get(name)
        if not (isinstance(value, str) and value and is_local(value)):
            continue
        resolved = local_path(value)
        if not os.path.isfile(resolved):
            if value != in_file[name]:
                raise DistillError(f"`--set {name}={value}` names a config that does not exist ({resolved})",
                                   "a path given with --set is relative to the current directory")
            raise DistillError(f"config {path} names `{name}: {written[name]}`, which does not exist ({resolved})",
                               f"a relative `{name}:` is relative to the folder of the config that names it ({base})")
        data[name] = resolved
    return data


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, kind: str | None = None) -> AnyConfig:
    """Read, override and validate a stage config (or a sweep). Raises DistillError naming the bad field."""
    kind = kind or config_kind(read_yaml(path))
    if kind == "sweep":
        from pipeline.config.sweep import load_sweep_config

        return load_sweep_config(path, overrides)
    data = _resolve_references(read_yaml(path), path, overrides)
    model = PrecomputeConfig if kind == "precompute" else TrainConfig
    if kind == "train" and not data.get("name"):
        data["name"] = f"{Path(path).stem}-seed{data.get('seed', 0)}"
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise format_validation(str(path), e) from None


def load_precompute_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PrecomputeConfig:
    cfg = load_config(path, overrides, kind="precompute")
    assert isinstance(cfg, PrecomputeConfig)
    return cfg


def load_train_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    cfg = load_config(path, overrides, kind="train")
    assert isinstance(cfg, TrainConfig)
    return cfg
