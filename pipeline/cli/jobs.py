"""`distill submit | jobs`: the stages as Ray Jobs on a cluster."""

from __future__ import annotations

import argparse
import json

from pipeline.errors import DistillError

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
        run = submit_pipeline(client, pre, trains, wait=args.wait, working_dir=args.working_dir)
        print(json.dumps({"cache": run.cache_uri, "teacher_job": run.teacher_job.job_id if run.teacher_job else None,
                          "student_jobs": [j.job_id for j in run.student_jobs], "statuses": run.statuses}))
        failed = [j for j in ([run.teacher_job] if run.teacher_job else []) + run.student_jobs
                  if run.statuses.get(j.job_id, "SUCCEEDED") != "SUCCEEDED"]
        for job in failed:
            report_end(client, job, run.statuses[job.job_id])
        return 1 if failed or (run.teacher_job and not run.student_jobs) else 0
    if len(args.configs) != 1:
        raise DistillError(f"`submit {args.stage}` takes one config", f"distill submit {args.stage} CONFIG")
    from pipeline.config.sweep import load_sweep_config

    load = {"precompute": load_precompute_config, "train": load_train_config, "sweep": load_sweep_config}[args.stage]
    job = submit_stage(client, args.stage, load(args.configs[0], args.overrides), force=args.force,
                       working_dir=args.working_dir)
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


def register(sub) -> None:
    p = sub.add_parser("submit", help="run a stage on a Ray cluster as a Ray Job")
    p.add_argument("stage", choices=["precompute", "train", "sweep", "pipeline"])
    p.add_argument("configs", nargs="+", help="config(s); pipeline: PRECOMPUTE then TRAIN ...")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of the (first) config")
    p.add_argument("--address", default=None, help="Jobs API address, http://HEAD:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--wait", action="store_true", help="follow the job(s) to the end, streaming logs")
    p.add_argument("--force", action="store_true", help="precompute: recompute an existing cache; train: start an existing run over "
                   "(without it a resubmitted train job resumes its run)")
    p.add_argument("--working-dir", default=None, metavar="DIR",
                   help="what travels with the job: your configs and model modules (default: the current directory)")
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
