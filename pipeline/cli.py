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

    fit_teacher(load_precompute_config(args.config, args.overrides), name=args.name)
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from pipeline.config import load_precompute_config
    from pipeline.teacher.plan import run_precompute

    run_precompute(load_precompute_config(args.config, args.overrides), force=args.force, address=args.address)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_train_config
    from pipeline.student.trainer import load_run_config, run_train

    if args.resume:
        if args.config or args.overrides:
            raise DistillError("--resume takes the run directory alone", "drop CONFIG and --set: the run keeps its config")
        run_train(load_run_config(args.resume), address=args.address, resume=True)
    elif not args.config:
        raise DistillError("no config", "distill train CONFIG, or distill train --resume RUN_DIR")
    else:
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
    for name, t in (m.teachers or {"teacher": m.teacher}).items():
        print(f"  teacher  {name}: {t.get('factory')} weights={t.get('weights')} sha256={t.get('weights_sha256')}")
    print(f"  dataset  {m.dataset.get('kind')} fingerprint={m.dataset.get('fingerprint')}")
    per_row = m.outputs.get("bytes_per_row", {})
    logits = m.outputs.get("logits", {})
    for name, col in m.logits_columns().items():
        print(f"  output   {col}: logits of {name}, {logits.get('dtype')} {logits.get('shape')}, {per_row.get(col, '?')} bytes/row")
    for name, tap in m.taps().items():
        pool = f", pooled to {tap['pool']}" if tap.get("pool") else ""
        print(f"  output   {tap['column']}: tap {name!r} ({tap['kind']} of {tap['teacher']} module {tap['module']!r}{pool}), "
              f"float16 {tap.get('shape')}, {tap.get('bytes_per_row', '?')} bytes/row")
    print(f"  rows     {m.rows} ({', '.join(f'{k} {v}' for k, v in m.rows_by_split.items())}); classes {m.num_classes}; input {m.input_shape}")
    print(f"  shards   {len(m.shards)}, {m.bytes / 1e6:.2f} MB, {m.bytes / max(m.rows, 1):.0f} bytes/row")
    print(f"  columns  {', '.join(f'{k}: {v}' for k, v in m.columns.items())}")
    print(f"  stats    {json.dumps(m.stats)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import write_report

    print(f"wrote {write_report(args.run_dirs, args.out)}")
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


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.config import load_precompute_config, load_train_config
    from pipeline.submit import follow, job_client, report_end, submit_pipeline, submit_stage

    client = job_client(args.address)
    if args.stage == "pipeline":
        if len(args.configs) < 2:
            raise DistillError("`submit pipeline` needs a precompute config and at least one train config",
                               "distill submit pipeline PRECOMPUTE.yaml TRAIN.yaml [TRAIN.yaml ...]")
        pre = load_precompute_config(args.configs[0], args.overrides)
        trains = [load_train_config(p) for p in args.configs[1:]]
        run = submit_pipeline(client, pre, trains, wait=args.wait)
        print(json.dumps({"cache": run.cache_uri, "teacher_job": run.teacher_job.job_id if run.teacher_job else None,
                          "student_jobs": [j.job_id for j in run.student_jobs], "statuses": run.statuses}))
        failed = [j for j in ([run.teacher_job] if run.teacher_job else []) + run.student_jobs
                  if run.statuses.get(j.job_id, "SUCCEEDED") != "SUCCEEDED"]
        for job in failed:
            report_end(client, job, run.statuses[job.job_id])
        return 1 if failed or (run.teacher_job and not run.student_jobs) else 0
    if len(args.configs) != 1:
        raise DistillError(f"`submit {args.stage}` takes one config", f"distill submit {args.stage} CONFIG")
    load = load_precompute_config if args.stage == "precompute" else load_train_config
    job = submit_stage(client, args.stage, load(args.configs[0], args.overrides), force=args.force)
    print(job.job_id)
    if not args.wait:
        return 0
    return report_end(client, job, follow(client, job.job_id))


def cmd_jobs(args: argparse.Namespace) -> int:
    from pipeline.submit import follow, job_client, list_jobs

    client = job_client(args.address)
    if args.jobs_command == "ls":
        rows = list_jobs(client)
        print(f"{'job_id':<44} {'status':<10} {'stage':<11} entrypoint")
        for r in rows:
            print(f"{r['job_id']:<44} {r['status']:<10} {r['stage']:<11} {r['entrypoint']}")
        return 0
    try:
        if args.jobs_command == "status":
            print(str(client.get_job_status(args.job_id)).split(".")[-1])
        elif args.jobs_command == "logs":
            if args.follow:
                follow(client, args.job_id)
            else:
                print(client.get_job_logs(args.job_id), end="")
        elif args.jobs_command == "stop":
            print("stopped" if client.stop_job(args.job_id) else "already finished")
    except RuntimeError as e:  # the SDK's way of saying "no such job"
        raise DistillError(f"job {args.job_id}: {str(e).splitlines()[0]}", "list jobs with `distill jobs ls`") from None
    return 0


def cmd_cache_rm(args: argparse.Namespace) -> int:
    from pipeline.cache.gc import remove_cache

    remove_cache(args.uri)
    print(f"removed {args.uri}")
    return 0


def cmd_cache_gc(args: argparse.Namespace) -> int:
    from pipeline.cache.gc import collect_garbage, parse_age

    found = collect_garbage(args.root, parse_age(args.older_than), dry_run=args.dry_run)
    for c in found:
        verb = "removed" if c.removed else ("would remove" if args.dry_run and c.age_s > parse_age(args.older_than) else "kept (recent)")
        print(f"{verb}: {c.uri} (incomplete, last change {c.age_s / 3600:.1f} h ago)")
    if not found:
        print(f"no incomplete caches under {args.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Distributed knowledge distillation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a config without running it")
    _add_config_args(p)
    p.add_argument("--show", action="store_true", help="print the resolved config")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("fit-teacher", help="train and save the teachers named in a precompute config")
    _add_config_args(p)
    p.add_argument("--name", help="fit only this teacher (`teacher` or a key of `teachers`); default: all")
    p.set_defaults(func=cmd_fit_teacher)

    p = sub.add_parser("precompute", help="stage 1: run the teacher once and write the cache")
    _add_config_args(p)
    _add_address(p)
    p.add_argument("--force", action="store_true", help="recompute even if the cache exists")
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("train", help="stage 2: train a student from the cache")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set epochs=5 (repeatable)")
    _add_address(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="an HTML page with plots for finished runs (curves, accuracy, calibration, cache size)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (<storage_path>/<name>)")
    p.add_argument("--out", help="where to write the page (default: report.html beside the first run)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("submit", help="run a stage on a Ray cluster as a Ray Job")
    p.add_argument("stage", choices=["precompute", "train", "pipeline"])
    p.add_argument("configs", nargs="+", help="config(s); pipeline: PRECOMPUTE then TRAIN ...")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of the (first) config")
    p.add_argument("--address", default=None, help="Jobs API address, http://HEAD:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--wait", action="store_true", help="follow the job(s) to the end, streaming logs")
    p.add_argument("--force", action="store_true", help="precompute: recompute an existing cache")
    p.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="list, inspect and stop Ray Jobs").add_subparsers(dest="jobs_command", required=True)
    for name, text in (("ls", "list jobs"), ("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job")):
        p = jobs.add_parser(name, help=text)
        if name != "ls":
            p.add_argument("job_id")
        if name == "logs":
            p.add_argument("--follow", action="store_true")
        p.add_argument("--address", default=None, help="Jobs API address (default: $RAY_ADDRESS)")
        p.set_defaults(func=cmd_jobs)

    cache = sub.add_parser("cache", help="inspect caches").add_subparsers(dest="cache_command", required=True)
    p = cache.add_parser("ls", help="list the caches under a root")
    p.add_argument("root")
    p.set_defaults(func=cmd_cache_ls)
    p = cache.add_parser("show", help="print a cache's manifest")
    p.add_argument("uri")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache_show)
    p = cache.add_parser("rm", help="delete a cache (manifest first)")
    p.add_argument("uri")
    p.set_defaults(func=cmd_cache_rm)
    p = cache.add_parser("gc", help="delete incomplete caches (no manifest) older than an age")
    p.add_argument("root")
    p.add_argument("--older-than", default="24h", help="age like 90s, 30m, 24h, 7d (default 24h)")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_cache_gc)
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
