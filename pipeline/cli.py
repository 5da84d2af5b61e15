"""The `distill` command. User errors print one line and exit 2; a failed stage exits 1."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from pipeline.errors import DistillError

EXIT_USAGE = 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set epochs=5 (repeatable)")


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.config import PrecomputeConfig, load_config
    from pipeline.models.factory import resolve_factory

    cfg = load_config(args.config, args.overrides)
    kind = "precompute" if isinstance(cfg, PrecomputeConfig) else "train"
    resolve_factory(cfg.teacher.factory if isinstance(cfg, PrecomputeConfig) else cfg.student.factory)
    print(f"ok: {args.config} is a valid {kind} config")
    if args.show:
        print(json.dumps(cfg.model_dump(), indent=2))
    return 0


def cmd_fit_teacher(args: argparse.Namespace) -> int:
    from pipeline.config import load_precompute_config
    from pipeline.teacher.fit import fit_teacher

    fit_teacher(load_precompute_config(args.config, args.overrides))
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from pipeline.config import load_precompute_config
    from pipeline.teacher.plan import run_precompute

    run_precompute(load_precompute_config(args.config, args.overrides), force=args.force, address=args.address)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_train_config
    from pipeline.student.trainer import run_train

    run_train(load_train_config(args.config, args.overrides), address=args.address, overwrite=args.overwrite)
    return 0


def cmd_cache_ls(args: argparse.Namespace) -> int:
    from pipeline.cache.verify import list_caches

    entries = list_caches(args.root)
    if not entries:
        print(f"no caches under {args.root}")
    print(f"{'cache_id':<18} {'state':<10} {'rows':>8} {'MB':>9}  {'created':<25} teacher")
    for e in entries:
        state = "complete" if e.complete else "INCOMPLETE"
        rows = f"{e.rows}" if e.rows is not None else "-"
        mb = f"{e.bytes / 1e6:.2f}" if e.bytes is not None else "-"
        print(f"{e.cache_id:<18} {state:<10} {rows:>8} {mb:>9}  {e.created or '-':<25} {e.teacher or '-'}")
    return 0


def cmd_cache_show(args: argparse.Namespace) -> int:
    from pipeline.cache.manifest import read_manifest

    m = read_manifest(args.uri)
    if args.json:
        print(m.to_json(), end="")
        return 0
    print(f"cache {m.cache_id} (format v{m.format_version}) created {m.created}")
    print(f"  teacher  {m.teacher.get('factory')} weights={m.teacher.get('weights')} sha256={m.teacher.get('weights_sha256')}")
    print(f"  dataset  {m.dataset.get('kind')} fingerprint={m.dataset.get('fingerprint')}")
    print(f"  outputs  {json.dumps(m.outputs)}")
    print(f"  rows     {m.rows} ({', '.join(f'{k} {v}' for k, v in m.rows_by_split.items())}); classes {m.num_classes}; input {m.input_shape}")
    print(f"  shards   {len(m.shards)}, {m.bytes / 1e6:.2f} MB, {m.bytes / max(m.rows, 1):.0f} bytes/row")
    print(f"  columns  {', '.join(f'{k}: {v}' for k, v in m.columns.items())}")
    print(f"  stats    {json.dumps(m.stats)}")
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from pipeline.cache.verify import verify_cache

    problems = verify_cache(args.uri)
    if not problems:
        print(f"ok: {args.uri} is sound")
        return 0
    for p in problems:
        print(f"problem: {p}")
    print(f"{len(problems)} problem(s) in {args.uri}; recompute it with `distill precompute CONFIG --force`")
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Distributed knowledge distillation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a config without running it")
    _add_config_args(p)
    p.add_argument("--show", action="store_true", help="print the resolved config")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("fit-teacher", help="train and save the teacher named in a precompute config")
    _add_config_args(p)
    p.set_defaults(func=cmd_fit_teacher)

    p = sub.add_parser("precompute", help="stage 1: run the teacher once and write the cache")
    _add_config_args(p)
    _add_address(p)
    p.add_argument("--force", action="store_true", help="recompute even if the cache exists")
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("train", help="stage 2: train a student from the cache")
    _add_config_args(p)
    _add_address(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=cmd_train)

    cache = sub.add_parser("cache", help="inspect caches").add_subparsers(dest="cache_command", required=True)
    p = cache.add_parser("ls", help="list the caches under a root")
    p.add_argument("root")
    p.set_defaults(func=cmd_cache_ls)
    p = cache.add_parser("show", help="print a cache's manifest")
    p.add_argument("uri")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache_show)
    p = cache.add_parser("verify", help="check every shard against the manifest (exit 0 only when sound)")
    p.add_argument("uri")
    p.set_defaults(func=cmd_cache_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except DistillError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
