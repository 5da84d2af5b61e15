"""`distill sweep`: many students from one cache in one Ray Tune run.

The driver checks every trial's config against the cache, plans the shards once, and (when the
decoded cache fits, `in_memory`) reads it once into Ray's object store for every trial. Each trial is
the worker loop run in the trial's own process (`direct`, single-worker students) or a Ray Train run
(`train`). Tune schedules them, stops the weak ones early (ASHA) and restores an interrupted sweep
(`--resume`). The sweep's folder gets a result.json per trial, a table sorted by the metric, and the
best trial's train config ready for `distill train`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray.tune

from pipeline import storage
from pipeline.config.sweep import SweepConfig, apply_point
from pipeline.errors import DistillError
from pipeline.runtime import TUNE_NEW_OUTPUT_ENV, ensure_ray, root_cause, verbose
from pipeline.student.prelude import check_student, prepare
from pipeline.student.sweep.progress import Progress
from pipeline.student.sweep.results import collect, write_outputs
from pipeline.student.sweep.trial import POINT, SweepContext, direct_trial, train_trial
from pipeline.student.train.plan import CachePlan, Preloaded, plan, slim, units_per_row

Log = Callable[[str], None]
TRAIN_TRIAL_CPU = 0.01
STATE_EVERY_S = 2  # seconds between saves of Tune's experiment state: what --resume restores
TRIALS_DIR = "trials"  # <sweep>/trials/<trial id>/: each trial's config.json, result.json, student.pt
TUNER_FILE = "tuner.pkl"  # Tune's saved Tuner: a sweep folder that can be resumed


@dataclass
class SweepResult:
    sweep_dir: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None


def sweep_dir_of(cfg: SweepConfig) -> str:
    root = storage.local_path(cfg.storage_path) if storage.is_local(cfg.storage_path) else cfg.storage_path
    return storage.join(root, cfg.name)


def trial_mode(cfg: SweepConfig, workers: set[int]) -> str:
    if cfg.trial != "auto":
        if cfg.trial == "direct" and workers != {1}:
            raise DistillError(f"`trial: direct` runs one worker per trial; the sweep's trials ask for {sorted(workers)}",
                               "set num_workers: 1, or `trial: train` (a Ray Train run per trial)")
        return cfg.trial
    return "direct" if workers == {1} else "train"


def materialise(cache: CachePlan, tasks: list, log: Log) -> Preloaded:
    """Every shard decoded once, with the columns any trial reads: Tune puts this in the object store
    once and each trial maps the same arrays instead of reading the cache again."""
    columns = list(dict.fromkeys(c for t in tasks for c in t.columns()))
    dtypes = {c: dt for t in tasks for c, dt in t.dtypes().items()}
    out: Preloaded = {}
    started = time.time()
    for split, shards in cache.shards.items():
        reader = cache.reader(split, columns, dtypes)
        if reader is None:
            continue
        try:
            out[split] = [{c: t.numpy() for c, t in reader.get(i).items()} for i in range(len(shards))]
        finally:
            reader.close()
    size = sum(a.nbytes for parts in out.values() for shard in parts for a in shard.values())
    log(f"read the cache once for every trial: {size / 1e6:.0f} MB decoded in {time.time() - started:.1f}s")
    return out


def run_sweep(cfg: SweepConfig, *, address: str | None = None, resume: bool = False, overwrite: bool = False,
              log: Log = print) -> SweepResult:
    """Run (or, with `resume`, finish) the sweep; returns its trials sorted by the metric."""
    base, options = cfg.train, cfg.train.storage
    ready = prepare(base, "sweep storage path")
    cache_uri, manifest, task = ready.cache_uri, ready.manifest, ready.task
    sweep_dir = sweep_dir_of(cfg)
    base_json = base.model_dump(mode="json")
    points = cfg.points()
    trial_cfgs = [base.model_validate({**apply_point(base_json, p), "name": "check"}) for p in points]
    tasks = [check_student(c, manifest) for c in trial_cfgs]
    mode = trial_mode(cfg, {c.num_workers for c in trial_cfgs})
    if resume:
        if not storage.exists(storage.join(sweep_dir, TUNER_FILE), options):
            raise DistillError(f"no sweep to resume at {sweep_dir}", "start it without --resume")
    elif storage.exists(sweep_dir, options):
        if not overwrite:
            raise DistillError(f"sweep folder {sweep_dir} already exists",
                               "finish it with --resume, pick another name (--set name=...) or pass --overwrite")
        storage.remove_tree(sweep_dir, options)
    if not verbose():  # Tune's own console output (experiment box, tables); ours is one line per trial event
        os.environ.setdefault(TUNE_NEW_OUTPUT_ENV, "0")
    # How stale the experiment state on storage may be when the driver dies (Tune's default: >= 10 s).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(STATE_EVERY_S))
    ensure_ray(address)
    cache = plan(cache_uri, manifest, task, base.in_memory, max(c.num_workers for c in trial_cfgs), log, options)
    shared = materialise(cache, tasks, log) if cache.in_memory and mode == "direct" else None
    context = SweepContext(base=base_json, manifest=slim(manifest), cache=cache,
                           trials_path=storage.join(sweep_dir, TRIALS_DIR),
                           units_per_row=units_per_row(cache, task) if any(c.max_tokens for c in trial_cfgs) else None)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(direct_trial if mode == "direct" else train_trial,
                                                                 context=context, shared=shared),
                                        _resources(mode, base_json))
    param_space = {POINT: ray.tune.grid_search(points), **{f: _domain(d) for f, d in cfg.random.items()}}
    total = len(points) * cfg.num_samples
    log(f"sweep {cfg.name}: {total} trials of {base.student.factory} on cache {manifest.cache_id} "
        f"({mode} trials{', ASHA early stopping' if cfg.scheduler else ''}) -> {sweep_dir}")
    started = time.time()
    if resume:
        fs, path = (None, sweep_dir) if storage.is_local(sweep_dir) else storage.arrow_filesystem(sweep_dir, options)
        tuner = ray.tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True,
                                       param_space=param_space, storage_filesystem=fs)
    else:
        tuner = ray.tune.Tuner(trainable, param_space=param_space, tune_config=_tune_config(cfg, mode, base.epochs),
                               run_config=_run_config(cfg, sweep_dir, total, log))
    try:
        grid = tuner.fit()
    except Exception as e:  # Tune wraps what went wrong; show the cause
        raise DistillError(f"sweep {cfg.name} failed: {root_cause(e)}", "see the trial tracebacks above") from None
    trials = collect(cfg, grid, context, manifest, cache_uri, mode, log)
    best = write_outputs(cfg, sweep_dir, trials, time.time() - started, mode, cache_uri, log)
    return SweepResult(sweep_dir=sweep_dir, trials=trials, best=best)


def _resources(mode: str, base: dict[str, Any]) -> dict[str, float]:
    """A direct trial holds its worker's CPUs and GPUs; a train trial only drives its Train run (whose
    workers ask for their own), so it holds a token share of a CPU (Tune refuses an empty request)."""
    if mode == "train":
        return {"cpu": TRAIN_TRIAL_CPU}
    return {"cpu": base["cpus_per_worker"], **({"gpu": base["gpus_per_worker"]} if base["gpus_per_worker"] else {})}


def _domain(spec: dict[str, list[Any]]):
    kind, args = next(iter(spec.items()))
    return ray.tune.choice(args) if kind == "choice" else getattr(ray.tune, kind)(*args)


def _tune_config(cfg: SweepConfig, mode: str, epochs: int):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    scheduler = None
    if cfg.scheduler:
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.scheduler.max_t or epochs,
                                  grace_period=cfg.scheduler.grace_period, reduction_factor=cfg.scheduler.reduction_factor)
    return ray.tune.TuneConfig(
        metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples, scheduler=scheduler,
        # Tune ignores TuneConfig's max_concurrent_trials once a generator is given: the generator holds it.
        search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials or 0),
        # One process serves trial after trial: no Python and torch start-up per direct trial.
        reuse_actors=mode == "direct",
        trial_dirname_creator=lambda trial: trial.trial_id,
    )


def _run_config(cfg: SweepConfig, sweep_dir: str, total: int, log: Log):
    if storage.is_local(sweep_dir):
        root, fs = storage.local_path(cfg.storage_path), None
    else:
        fs, root = storage.arrow_filesystem(cfg.storage_path, cfg.train.storage)
    return ray.tune.RunConfig(
        name=cfg.name, storage_path=root, storage_filesystem=fs, callbacks=[Progress(cfg, total, log)],
        verbose=None if verbose() else 0, failure_config=ray.tune.FailureConfig(max_failures=cfg.train.max_failures),
    )
