"""The code that runs in each Ray Train worker: restore, train optimizer steps through the task seam,
evaluate and checkpoint every N steps, report.

No teacher is ever built or imported here; each worker checks that and reports what it found.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from typing import Any

import torch

from pipeline import storage
from pipeline.cache.manifest import Manifest
from pipeline.config import TrainConfig
from pipeline.models.factory import BUILT_IN_THIS_PROCESS, LOADED_IN_THIS_PROCESS
from pipeline.progress import Throttle
from pipeline.runtime import quiet_train_worker
from pipeline.student import parallel
from pipeline.student.loop import make_optimizer, train_step
from pipeline.student.precision import Precision
from pipeline.student.schedule import scheduler
from pipeline.student.session import Session, TrainSession
from pipeline.student.stream import Order, ShardReader, in_order, train_batches
from pipeline.student.tasks import task_for
from pipeline.student.window import Window

META_FILE = "meta.pt"  # step, history, scaler: rank 0's
STUDENT_FILE = "student.pt"  # the gathered bare student, in the final checkpoint
logger = logging.getLogger(__name__)


def teacher_evidence(teacher_factory: str | None, teacher_weights: str | None = None) -> list[str]:
    """Signs that a teacher was loaded into this process: its weights were read (or, for a teacher
    without weights file, its factory was built), or stage 1 was imported. A student of the
    teacher's own architecture (born-again) is not a teacher: it does not read the teacher's weights."""
    if teacher_weights:
        found = [f"loaded {w}" for w in LOADED_IN_THIS_PROCESS if w == teacher_weights]
    else:
        found = [f"built {f}" for f in BUILT_IN_THIS_PROCESS if teacher_factory and f == teacher_factory]
    found += [f"imported {m}" for m in sorted(sys.modules) if m == "pipeline.teacher" or m.startswith("pipeline.teacher.")]
    return found


def load_checkpoint(directory: str) -> dict[str, Any]:
    """Rank 0's metadata of a checkpoint, and the gathered student when it is the final one."""
    state = torch.load(os.path.join(directory, META_FILE), map_location="cpu", weights_only=False)
    path = os.path.join(directory, STUDENT_FILE)
    if os.path.exists(path):
        state["student"] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def _all_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker: `config` holds the train config, the manifest, the shards and the step budget."""
    quiet_train_worker()
    run_loop(config, TrainSession())


def run_loop(config: dict[str, Any], session: Session) -> None:
    """Train, evaluate, checkpoint and report through `session` (a Train worker's or a Tune trial's)."""
    cfg = TrainConfig.model_validate(config["train"])
    storage.configure(**cfg.storage.model_dump())  # the shards are read here, through the run's endpoint
    rank, world, device = session.rank, session.world, session.device
    torch.manual_seed(cfg.seed)
    manifest = Manifest.model_validate(config["manifest"])
    task = task_for(cfg, manifest)
    model = parallel.wrap(task.build_model(), cfg.parallel, device)
    opt = cfg.optimizer
    optimizer = make_optimizer(model.parameters(), opt.name, opt.lr, opt.weight_decay, opt.momentum)
    total = int(config["total_steps"])
    schedule = scheduler(optimizer, cfg, total)
    precision = Precision(cfg.precision, device)

    step, history, meta = 0, [], None
    with session.checkpoint_dir() as d:
        if d is not None:
            parallel.load(d, model, optimizer)
            meta = load_checkpoint(d)
    if meta is not None:
        step, history = meta["step"], meta["history"]
        schedule.load_state_dict(meta["scheduler"])
        precision.load_state_dict(meta["scaler"])
    resumed_from = step

    # Checked inside the worker: how many workers show any sign of a teacher.
    evidence = teacher_evidence(manifest.teacher.factory, manifest.teacher.weights)
    workers_with_teacher = int(_all_sum([1.0 if evidence else 0.0])[0])

    shards = config["shards"]
    keep = bool(config["in_memory"])
    dtypes = task.dtypes()
    preloaded = config.get("preloaded") or {}
    train = ShardReader(config["cache_uri"], [p for p, _ in shards["train"]], task.columns(), dtypes, keep, preloaded.get("train"))
    val = (ShardReader(config["cache_uri"], [p for p, _ in shards["val"]], task.columns(), dtypes, keep, preloaded.get("val"))
           if shards["val"] else None)
    sizes = tuple(n for _, n in shards["train"])
    # A cache kept in memory is shuffled as one window: every row mixed with every other.
    order = Order(sizes, cfg.batch_size, cfg.seed, window=len(sizes) if keep or not cfg.shuffle_shards else cfg.shuffle_shards)
    per_epoch = order.steps_per_epoch
    checkpoint_every = cfg.checkpoint_every or per_epoch
    eval_every = cfg.eval_every or per_epoch
    window = Window(task.unit)
    throttle = Throttle(logger.info, every=10.0)
    throttle.last = time.monotonic()

    def report(final: bool) -> None:
        """Evaluate (at eval steps), then hand Ray Train the metrics and (at checkpoint steps) every worker's shard."""
        rows, units, waited = _all_sum([window.rows, float(window.units), window.waited])
        train_s = time.time() - window.started
        memory = parallel.local_bytes(model, optimizer)  # before evaluation, which unshards FSDP's root
        evaluate = final or step % eval_every == 0
        eval_started = time.time()
        evaluated = task.evaluate(model, in_order(val, task.eval_batch_size)) if val is not None and evaluate else {}
        parallel.reshard(model)
        calibration = evaluated.pop("calibration", None)
        metrics = {"step": step, "epoch": round(step / per_epoch, 4), **window.means(), "train_samples": int(rows),
                   f"train_{task.unit}": int(units), "train_seconds": train_s,
                   f"{task.unit}_per_s": units / max(train_s, 1e-9), "samples_per_s": rows / max(train_s, 1e-9),
                   "data_wait_seconds": waited / world,  # mean over workers, of train_seconds
                   "eval_seconds": time.time() - eval_started, "lr": schedule.get_last_lr()[0], **evaluated,
                   "workers_with_teacher": workers_with_teacher, "resumed_from_step": resumed_from, **memory}
        history.append({**metrics, "calibration": calibration})
        save = final or step % checkpoint_every == 0
        with tempfile.TemporaryDirectory() as d:
            if save:
                parallel.save(d, model, optimizer)
                student = parallel.full_state(model) if final else None
                if rank == 0:
                    torch.save({"step": step, "history": history, "scheduler": schedule.state_dict(),
                                "scaler": precision.state_dict()}, os.path.join(d, META_FILE))
                    if student is not None:
                        prefix = parallel.prefix_of(model, task.student(parallel.bare(model)))
                        torch.save({k[len(prefix):]: v for k, v in student.items() if k.startswith(prefix)},
                                   os.path.join(d, STUDENT_FILE))
            if rank == 0 and evidence:
                metrics["teacher_evidence"] = "; ".join(evidence)
            session.report(metrics, d if save else None)
        if rank == 0 and evaluate:  # through logging: Ray Train would print() twice (stdout and its console handler)
            logger.info(f"step {step}/{total} (epoch {metrics['epoch']:g})  loss {metrics.get('train_loss', float('nan')):.4f}  "
                        f"{task.summary(evaluated)}  {metrics[f'{task.unit}_per_s']:,.0f} {task.unit}/s, "
                        f"{metrics['data_wait_seconds']:.1f}s of {train_s:.1f}s waiting for data")
        window.reset()

    while step < total:
        epoch, first = divmod(step, per_epoch)
        stop = min(per_epoch, first + total - step)
        batches = train_batches(train, order, epoch, first, stop, rank, world, cfg.grad_accum_steps)
        for micro in window.timed(batches):
            # Seeded per step, so dropout draws the same masks whether or not the run was resumed.
            torch.manual_seed(hash((cfg.seed, step, rank)) % (2**63))
            parts, rows, units = train_step(model, micro, task, optimizer, precision, opt.grad_clip,
                                            lambda last: parallel.sync(model, last))
            schedule.step()
            step += 1
            window.add(parts, rows, units)
            if rank == 0:
                throttle(lambda: window.line(step, total, per_epoch))
            if step % eval_every == 0 or step % checkpoint_every == 0 or step == total:
                report(final=step == total)
    train.close()
    if val is not None:
        val.close()
