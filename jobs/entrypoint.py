"""Shared glue for the Ray Job entrypoints: the config comes from a file (+ --set) or, when
submitted by `distill submit`, fully resolved from the job's environment."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from pipeline.config import load_config
from pipeline.errors import DistillError
from pipeline.submit import CONFIG_ENV


def run_entrypoint(stage: str, model, run: Callable, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{stage}", description=f"Ray Job entrypoint: {stage}")
    parser.add_argument("config", nargs="?", help=f"YAML config (default: the JSON in ${CONFIG_ENV})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--force", action="store_true", help="precompute only: recompute an existing cache")
    args = parser.parse_args(argv)
    try:
        if args.config:
            cfg = load_config(args.config, args.overrides, kind=stage)
        elif os.environ.get(CONFIG_ENV):
            cfg = model.model_validate(json.loads(os.environ[CONFIG_ENV]))
        else:
            raise DistillError("no config", f"pass a config path or set {CONFIG_ENV}")
        run(cfg, args)
    except DistillError as e:
        print(f"error: {e.line()}", file=sys.stderr, flush=True)
        return 2
    return 0
