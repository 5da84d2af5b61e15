"""What a submitted stage runs on the cluster (`python -m pipeline.teacher` / `python -m pipeline.student`,
also what the KubeRay RayJob manifests run): the config from a file plus `--set`, or fully resolved
from the job's environment when `distill submit` sent it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from pydantic import BaseModel, ValidationError

from pipeline.config import load_config
from pipeline.config.load import format_validation
from pipeline.errors import DistillError

CONFIG_ENV = "DISTILL_CONFIG_JSON"


MODULES = {"precompute": "pipeline.teacher", "train": "pipeline.student", "sweep": "pipeline.student.sweep"}


def run_entrypoint(stage: str, model: type[BaseModel], run: Callable[[BaseModel, argparse.Namespace], object],
                   argv: list[str] | None = None, load: Callable[[str, list[str]], BaseModel] | None = None) -> int:
    """Exit 0 on success, 2 with one line for a user error (any other failure raises: a traceback in the job's logs)."""
    module = MODULES[stage]
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=f"Ray Job entrypoint: {stage}")
    parser.add_argument("config", nargs="?", help=f"YAML config (default: the JSON in ${CONFIG_ENV})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--force", action="store_true", help="precompute: recompute an existing cache; train: start an existing run over")
    args = parser.parse_args(argv)
    try:
        if args.config:
            cfg = load(args.config, args.overrides) if load else load_config(args.config, args.overrides, kind=stage)
        elif os.environ.get(CONFIG_ENV):
            try:
                cfg = model.model_validate(json.loads(os.environ[CONFIG_ENV]))
            except ValidationError as e:
                raise format_validation(f"${CONFIG_ENV}", e) from None
        else:
            raise DistillError("no config", f"pass a config path or set {CONFIG_ENV}")
        run(cfg, args)
    except DistillError as e:
        print(f"error: {e.line()}", file=sys.stderr, flush=True)
        return 2
    return 0
