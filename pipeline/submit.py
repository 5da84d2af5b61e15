"""Each stage as a Ray Job: submit, follow, list, stop, and chain "precompute once, then N students".

The job runs `python -m pipeline.teacher` or `python -m pipeline.student` (the same entrypoints the
KubeRay RayJob manifests run) from the installed package on the cluster, with the user's working
directory (their configs and their own model modules) as the job's working_dir and the fully
resolved config in its environment. Credentials are never forwarded: cluster nodes take them from
their own AWS chain.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline import storage
from pipeline.cache.manifest import manifest_uri
from pipeline.config import PrecomputeConfig, TrainConfig
from pipeline.config.sweep import SweepConfig
from pipeline.entrypoint import CONFIG_ENV, MODULES
from pipeline.errors import DistillError
from pipeline.runtime import JOB_ENV, auth_error, probe, root_cause

# The module each stage's job runs, from the package installed on the cluster.
STAGE_MODULES = MODULES
# Never shipped in the working_dir (Ray also honours .gitignore and .rayignore).
# Build artefacts (wheels, sdists, eggs) never travel either: a job runs the package installed on the cluster.
EXCLUDES = [".git", ".venv", "venv", "runs", "*.pt", "__pycache__", ".pytest_cache", "*.egg-info", "build", "dist",
            "*.whl", "*.tar.gz", "*.egg", ".mypy_cache", ".ruff_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def jobs_address(address: str | None) -> str:
    """The Jobs API (dashboard) address: argument, else RAY_ADDRESS; checked to answer."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise DistillError("no cluster address", "pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    probe(address, default_port=8265)
    return address


def job_client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = jobs_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as e:  # ConnectionError, or RuntimeError from the version check
        error = auth_error(e, url)
        if error is not None:
            raise error from None
        raise DistillError(f"the Ray Jobs API at {url} does not answer: {str(e).splitlines()[0]}",
                           "pass the dashboard address (port 8265 by default)") from None


def job_python() -> str:
    """The interpreter on the cluster nodes; `python` on their PATH unless DISTILL_JOB_PYTHON says otherwise."""
    return os.environ.get("DISTILL_JOB_PYTHON", "python")


@dataclass
class SubmittedJob:
    job_id: str
    stage: str
    name: str


def _payload(cfg: PrecomputeConfig | TrainConfig | SweepConfig) -> dict:
    """The config as the job validates it again: full logits nobody asked for stay unasked for there."""
    payload = cfg.model_dump()
    if getattr(cfg, "_implicit_full", False):
        payload["outputs"]["logits"].pop("mode", None)
    return payload


def submit_stage(client, stage: str, cfg: PrecomputeConfig | TrainConfig | SweepConfig, *, force: bool = False,
                 working_dir: str | None = None, log: Callable[[str], None] = print) -> SubmittedJob:
    """Submit one stage with its resolved config; returns at once with the job id.

    `working_dir` (default: the current directory) travels with the job: the user's configs and
    model modules, importable by the job and its actors and workers.
    """
    train = cfg.train if isinstance(cfg, SweepConfig) else cfg if isinstance(cfg, TrainConfig) else None
    if train is not None and train.precompute:  # the job reads the cache the precompute config last produced
        from pipeline.student.prelude import resolve_cache_uri

        train = train.model_copy(update={"cache": resolve_cache_uri(train), "precompute": None})
        cfg = cfg.model_copy(update={"train": train}) if isinstance(cfg, SweepConfig) else train
    cfg = cfg.with_absolute_paths()  # the job runs in a copy of the working directory
    name = cfg.name if isinstance(cfg, (TrainConfig, SweepConfig)) and cfg.name else stage
    job_id = f"distill-{stage}-{name}-{uuid.uuid4().hex[:6]}".replace("_", "-")
    entrypoint = f"{job_python()} -m {STAGE_MODULES[stage]}" + (" --force" if force else "")
    job = cfg.job
    try:
        client.submit_job(
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env={"working_dir": str(Path(working_dir or os.getcwd()).resolve()), "excludes": EXCLUDES,
                         "env_vars": {**JOB_ENV, CONFIG_ENV: json.dumps(_payload(cfg))}},
            metadata={"distill_stage": stage, "distill_name": name},
            entrypoint_num_cpus=job.entrypoint_num_cpus,
            entrypoint_num_gpus=job.entrypoint_num_gpus,
            entrypoint_resources=job.entrypoint_resources or None,
        )
    except Exception as e:
        raise DistillError(f"submitting the {stage} job failed: {root_cause(e)}",
                           "check the cluster (ray status) and the job's resources") from None
    log(f"submitted {stage} job {job_id}")
    return SubmittedJob(job_id=job_id, stage=stage, name=name)


def follow(client, job_id: str, *, stream: bool = True, poll_s: float = 1.0,
           log: Callable[[str], None] = print) -> str:
    """Wait for the job to end, printing its logs as they grow; returns the final status."""
    shown = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if stream:
            logs = client.get_job_logs(job_id)
            if len(logs) > shown:
                log(logs[shown:].rstrip("\n"))
                shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def report_end(client, job: SubmittedJob, status: str, log: Callable[[str], None] = print, tail: int = 30) -> int:
    """0 for a job that succeeded; else the tail of its logs and 1."""
    if status == "SUCCEEDED":
        log(f"{job.stage} job {job.job_id} succeeded")
        return 0
    lines = client.get_job_logs(job.job_id).rstrip("\n").splitlines()[-tail:]
    log(f"--- last {len(lines)} log lines of {job.job_id} ---")
    for line in lines:
        log(line)
    log(f"{job.stage} job {job.job_id} {status.lower()}")
    return 1


@dataclass
class PipelineRun:
    cache_uri: str
    teacher_job: SubmittedJob | None
    student_jobs: list[SubmittedJob] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)


def submit_pipeline(client, pre: PrecomputeConfig, trains: list[TrainConfig], *, wait: bool = True,
                    working_dir: str | None = None, log: Callable[[str], None] = print) -> PipelineRun:
    """The teacher job only when the cache is missing, then every student job on that one cache."""
    from pipeline.teacher.identity import resolve_target

    pre = pre.with_absolute_paths()  # as the job will see it, so both compute the same cache id
    storage.check_reachable(pre.cache_root, "cache root", pre.storage)
    target = resolve_target(pre)
    run = PipelineRun(cache_uri=target.uri, teacher_job=None)
    if storage.exists(manifest_uri(target.uri), pre.storage):
        log(f"cache hit: {target.uri} (no teacher job)")
    else:
        run.teacher_job = submit_stage(client, "precompute", pre, working_dir=working_dir, log=log)
        status = follow(client, run.teacher_job.job_id, stream=wait, log=log)
        run.statuses[run.teacher_job.job_id] = status
        if status != "SUCCEEDED" or not storage.exists(manifest_uri(target.uri), pre.storage):
            report_end(client, run.teacher_job, status, log=log)
            return run
    for cfg in trains:
        cfg = cfg.model_copy(update={"cache": target.uri, "precompute": None})
        run.student_jobs.append(submit_stage(client, "train", cfg, working_dir=working_dir, log=log))
    if wait:
        for job in run.student_jobs:
            run.statuses[job.job_id] = follow(client, job.job_id, log=log)
    return run


def list_jobs(client) -> list[dict[str, Any]]:
    rows = []
    for info in client.list_jobs():
        if not info.submission_id:  # a plain driver connection, not a submitted job
            continue
        rows.append({"job_id": info.submission_id, "status": str(info.status).split(".")[-1],
                     "stage": (info.metadata or {}).get("distill_stage", "-"), "entrypoint": info.entrypoint,
                     "start_time": info.start_time})
    return sorted(rows, key=lambda r: r["start_time"] or 0)
