"""`distill validate | fit-teacher | precompute | train | sweep | evaluate | report`: the stages and their results."""

from __future__ import annotations

import argparse
import json

from pipeline.cli.options import add_address, add_config_args, add_storage_args, storage_options
from pipeline.errors import DistillError

def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.config import PrecomputeConfig, load_config

    from pipeline.config.sweep import SweepConfig

    cfg = load_config(args.config, args.overrides)
    if isinstance(cfg, SweepConfig):
        from pipeline.student.prelude import validate_train

        kind, summary = "sweep", f"{len(cfg.points()) * cfg.num_samples} trials; base: {validate_train(cfg.train)}"
    elif isinstance(cfg, PrecomputeConfig):
        from pipeline.teacher.checks import validate_precompute

        kind, summary = "precompute", validate_precompute(cfg)
    else:
        from pipeline.student.prelude import validate_train

        kind, summary = "train", validate_train(cfg)
    print(f"ok: {args.config} is a valid {kind} config; {summary}")
    if args.show:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


def cmd_fit_teacher(args: argparse.Namespace) -> int:
    from pipeline.config import load_precompute_config
    from pipeline.teacher.fit import fit_teacher

    fit_teacher(load_precompute_config(args.config, args.overrides), name=args.name)
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from pipeline.config import load_precompute_config
    from pipeline.teacher.precompute import run_precompute

    run_precompute(load_precompute_config(args.config, args.overrides), force=args.force, address=args.address)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_train_config
    from pipeline.student.train.driver import load_run_config, run_train

    if args.resume:
        if args.config or args.overrides:
            raise DistillError("--resume takes the run directory alone", "drop CONFIG and --set: the run keeps its config")
        cfg = load_run_config(args.resume, storage_options(args, args.resume, "run directory"))
        if args.endpoint_url or args.region:  # the flags say where the run's storage is, as they did to find it
            cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={
                k: v for k, v in (("endpoint_url", args.endpoint_url), ("region", args.region)) if v})})
        run_train(cfg, address=args.address, existing="resume")
    elif not args.config:
        raise DistillError("no config", "distill train CONFIG, or distill train --resume RUN_DIR")
    else:
        run_train(load_train_config(args.config, args.overrides), address=args.address,
                  existing="overwrite" if args.overwrite else "fail")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.config.sweep import load_sweep_config
    from pipeline.student.sweep.driver import run_sweep

    run_sweep(load_sweep_config(args.config, args.overrides), address=args.address, resume=args.resume,
              overwrite=args.overwrite)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.report import reliability
    from pipeline.rundir import write_json
    from pipeline.student.evaluate import evaluate_run

    options = storage_options(args, args.run_dir, "run directory")
    out = evaluate_run(args.run_dir, args.source, args.split, options)
    m = out["metrics"]
    calibration = m.pop("calibration", None)
    if calibration and calibration.get("student"):
        m["val_ece"] = reliability(calibration["student"])[2]
    shown = "  ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in m.items()
                      if isinstance(v, float) and k not in ("val_rows", "val_tokens"))
    print(f"{args.run_dir} on {args.source} ({out['source_kind']}, split {out['split']}, {out['rows']} rows): {shown}")
    if args.out:
        write_json(args.out, {**out, "metrics": {**m, **({"calibration": calibration} if calibration else {})}}, options)
        print(f"wrote {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import write_report
    from pipeline.report.sweep import is_sweep, write_sweep_report

    options = storage_options(args, args.run_dirs[0], "run directory")
    sweeps = [d for d in args.run_dirs if is_sweep(d, options)]
    if sweeps and len(args.run_dirs) > 1:
        raise DistillError("a sweep's report covers one sweep folder", "pass the sweep folder alone: distill report runs/sweeps/NAME")
    out = write_sweep_report(sweeps[0], args.out, options) if sweeps else write_report(args.run_dirs, args.out, options)
    print(f"wrote {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("validate", help="check a config and its data, weights or cache without running a stage")
    add_config_args(p)
    p.add_argument("--show", action="store_true", help="print the resolved config")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("fit-teacher", help="train and save the teachers named in a precompute config")
    add_config_args(p)
    p.add_argument("--name", help="fit only this teacher (`teacher` or a key of `teachers`); default: all")
    p.set_defaults(func=cmd_fit_teacher)

    p = sub.add_parser("precompute", help="stage 1: run the teacher once and write the cache")
    add_config_args(p)
    add_address(p)
    p.add_argument("--force", action="store_true", help="recompute even if the cache exists")
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("train", help="stage 2: train a student from the cache")
    add_config_args(p, required=False)
    add_address(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its latest checkpoint")
    add_storage_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="many students from one cache in one Ray Tune run: grid, random, early stopping")
    add_config_args(p)
    add_address(p)
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep, keeping its finished trials")
    p.add_argument("--overwrite", action="store_true", help="replace an existing sweep folder")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("evaluate", help="score a trained student on any dataset: a cache, a precompute config's source, "
                                        "or your own Parquet table")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory (<storage_path>/<name>)")
    p.add_argument("--source", required=True, metavar="CONFIG_OR_URI",
                   help="a cache URI, a precompute config (its source), or a Parquet table read like the run's own source")
    p.add_argument("--split", choices=["train", "val", "all"], default=None,
                   help="rows to score (default: val of a cache or config, all rows of a table)")
    p.add_argument("--out", metavar="FILE", help="also write the metrics (and calibration bins) as JSON")
    add_storage_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="an HTML page with plots for finished runs (curves, accuracy, calibration, cache size), "
                                      "or over one sweep's trials")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (<storage_path>/<name>), or one sweep folder")
    p.add_argument("--out", help="where to write the page (default: report.html beside the first run)")
    add_storage_args(p)
    p.set_defaults(func=cmd_report)
