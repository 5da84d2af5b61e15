"""The `distill` command. A user error or a failed stage prints one line and exits 2; `submit --wait`
exits 1 when a job failed.

Subcommands live by group: `stages` (validate, fit-teacher, precompute, train, report), `cache`
and `jobs` (submit, jobs).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from pipeline.cli import cache, jobs, stages
from pipeline.errors import DistillError
from pipeline.runtime import VERBOSE_ENV
from pipeline.storage import storage_error

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Distributed knowledge distillation on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's own progress bars and INFO logs")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (stages, jobs, cache):
        group.register(sub)
    return parser


def _location(args: argparse.Namespace) -> str:
    """The URI a command works on, to name it in a storage error."""
    for name in ("uri", "root", "resume"):
        if isinstance(getattr(args, name, None), str):
            return getattr(args, name)
    return (getattr(args, "run_dirs", None) or [""])[0]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Progress lines reach a pipe or a log file as they happen, not when a block buffer fills.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    # The current directory is importable (after installed packages): `factory: my_models:student` finds
    # ./my_models.py (a local Ray's workers get the driver's directory on their path from Ray itself).
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except DistillError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # an object store failing mid-command is one line too; anything else is a bug: traceback
        error = storage_error(e, _location(args))
        if error is None:
            raise
        print(f"error: {error.line()}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
