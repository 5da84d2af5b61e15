"""The code that runs in each Ray Train worker (or a single-worker sweep trial's process): restore,
train optimizer steps through the task seam, evaluate and checkpoint every N steps, report.

No teacher is ever built or imported here; each worker checks that and reports what it found.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from typing import Any

import torch

from pipeline.errors import DistillError
from pipeline.models.factory import BUILT_IN_THIS_PROCESS, LOADED_IN_THIS_PROCESS
from pipeline.progress import Throttle
from pipeline.runtime import quiet_train_worker
from pipeline.student.tasks import task_for
from pipeline.student.train import parallel
from pipeline.student.train.checkpoint import restore, save_checkpoint
from pipeline.student.train.meter import Meter
from pipeline.student.train.order import Order, lanes_for
from pipeline.student.train.plan import WorkerPlan
from pipeline.student.train.precision import Precision
from pipeline.student.train.reader import in_order, row_range, train_batches
from pipeline.student.train.schedule import scheduler
from pipeline.student.train.session import Session, TrainSession
from pipeline.student.train.step import make_optimizer, train_step

PLAN = "plan"  # the key of the WorkerPlan in Ray Train's train_loop_config
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


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _all_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if _distributed():
        dist.all_reduce(t)
    return t.tolist()


def _all_sum_dict(sums: dict[str, float]) -> dict[str, float]:
    """Evaluation sums added over workers by key (a worker with no val rows has none of them)."""
    if not _distributed():
        return sums
    import torch.distributed as dist

    gathered: list[dict[str, float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sums)
    out: dict[str, float] = {}
    for part in gathered:
        for k, v in (part or {}).items():
            out[k] = out.get(k, 0.0) + v
    return out


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker: `config[PLAN]` is the driver's `WorkerPlan`."""
    quiet_train_worker()
    run_loop(config[PLAN], TrainSession())


def run_loop(plan: WorkerPlan, session: Session) -> None:
    """Train, evaluate, checkpoint and report through `session` (a Train worker's or a Tune trial's)."""
    Loop(plan, session).run()


class Loop:
    """One worker's run: the model, its optimizer state and the metrics history between reports."""

    def __init__(self, plan: WorkerPlan, session: Session) -> None:
        cfg = self.cfg = plan.train
        self.session, self.total = session, plan.total_steps
        torch.manual_seed(cfg.seed)
        self.task = task = task_for(cfg, plan.manifest)
        self.model = parallel.wrap(task.build_model(), cfg.parallel, session.device)
        opt = cfg.optimizer
        self.optimizer = make_optimizer(self.model.parameters(), opt.name, opt.lr, opt.weight_decay, opt.momentum)
        self.schedule = scheduler(self.optimizer, cfg, self.total)
        self.precision = Precision(cfg.precision, session.device)
        self.step, self.history, self.lanes = 0, [], None
        self.resumed_from = self.restore()

        # Checked inside the worker: how many workers show any sign of a teacher.
        self.evidence = teacher_evidence(plan.manifest.teacher.factory, plan.manifest.teacher.weights)
        self.workers_with_teacher = int(_all_sum([1.0 if self.evidence else 0.0])[0])

        columns, dtypes = task.columns(), task.dtypes()
        self.train = plan.cache.reader("train", columns, dtypes, plan.preloaded)
        self.val = plan.cache.reader("val", columns, dtypes, plan.preloaded)
        sizes, world = plan.cache.sizes(), session.world
        # A cache kept in memory is shuffled as one window per lane: every row mixed with every other.
        window = len(sizes) if plan.cache.in_memory or not cfg.shuffle_shards else cfg.shuffle_shards
        # The lanes are the run's first worker count's, kept on resume (another count splits or joins them).
        lanes = self.lanes or lanes_for(sizes, cfg.batch_size, cfg.seed, world, cfg.grad_accum_steps)
        self.order = Order(sizes, cfg.batch_size, cfg.seed, window=window, lanes=lanes)
        if self.order.fewest_rows(world) < cfg.grad_accum_steps:
            raise DistillError(f"{world} workers cannot share this run's {lanes} lanes of shards: some worker would get "
                               f"fewer than {cfg.grad_accum_steps} rows at a step",
                               f"resume it on at most {lanes} workers, or raise batch_size")
        self.per_epoch = self.order.steps_per_epoch
        # Each worker evaluates an even share of the val rows (in file order), the sums all-reduced.
        self.val_sizes = plan.cache.sizes("val") if plan.cache.shards.get("val") else ()
        self.checkpoint_every = cfg.checkpoint_every or self.per_epoch
        self.eval_every = cfg.eval_every or self.per_epoch
        self.meter = Meter(task.unit)

    def restore(self) -> int:
        """Continue from the session's latest checkpoint, if any; returns the step resumed from."""
        with self.session.checkpoint_dir() as d:
            meta = restore(d, self.model, self.optimizer)
        if meta is not None:
            self.step, self.history = meta["step"], meta["history"]
            self.lanes = meta.get("lanes", 1)  # checkpoints from before lanes: one lane, split by every worker
            self.schedule.load_state_dict(meta["scheduler"])
            self.precision.load_state_dict(meta["scaler"])
        return self.step

    def run(self) -> None:
        cfg, rank, world = self.cfg, self.session.rank, self.session.world
        throttle = Throttle(logger.info, every=10.0)
        throttle.last = time.monotonic()
        try:
            while self.step < self.total:
                epoch, first = divmod(self.step, self.per_epoch)
                stop = min(self.per_epoch, first + self.total - self.step)
                batches = train_batches(self.train, self.order, epoch, first, stop, rank, world, cfg.grad_accum_steps)
                for micro in self.meter.timed(batches):
                    # Seeded per step, so dropout draws the same masks whether or not the run was resumed.
                    torch.manual_seed(hash((cfg.seed, self.step, rank)) % (2**63))
                    mine = sum(len(next(iter(m.values()))) for m in micro)  # lanes give workers unequal parts
                    parts, rows, units = train_step(self.model, micro, self.task, self.optimizer, self.precision,
                                                    cfg.optimizer.grad_clip, lambda last: parallel.sync(self.model, last),
                                                    scale=mine * world / cfg.batch_size)
                    self.schedule.step()
                    self.step += 1
                    self.meter.add(parts, rows, units)
                    if rank == 0:
                        throttle(lambda: self.meter.line(self.step, self.total, self.per_epoch))
                    step = self.step
                    if step % self.eval_every == 0 or step % self.checkpoint_every == 0 or step == self.total:
                        self.report(final=step == self.total)
        finally:
            self.train.close()
            if self.val is not None:
                self.val.close()

    def metrics(self) -> dict[str, Any]:
        """This stretch's train metrics, summed over workers, and this worker's memory."""
        rows, units, waited = _all_sum([self.meter.rows, float(self.meter.units), self.meter.waited])
        train_s, unit = time.time() - self.meter.started, self.task.unit
        return {"step": self.step, "epoch": round(self.step / self.per_epoch, 4), **self.meter.means(),
                "train_samples": int(rows), f"train_{unit}": int(units), "train_seconds": train_s,
                f"{unit}_per_s": units / max(train_s, 1e-9), "samples_per_s": rows / max(train_s, 1e-9),
                "data_wait_seconds": waited / self.session.world,  # mean over workers, of train_seconds
                "lr": self.schedule.get_last_lr()[0], "workers_with_teacher": self.workers_with_teacher,
                "resumed_from_step": self.resumed_from,
                **parallel.local_bytes(self.model, self.optimizer)}  # before evaluation, which unshards FSDP's root

    def evaluate(self) -> dict[str, Any]:
        """This worker's share of the val rows through the task's evaluation; the sums added over workers."""
        started = time.time()
        if self.val is None:
            return {"eval_seconds": 0.0}
        rank, world, size = self.session.rank, self.session.world, self.task.eval_batch_size
        n = sum(self.val_sizes)
        shares = [row_range(self.val_sizes, r * n // world, (r + 1) * n // world) for r in range(world)]
        batches = in_order(self.val, size, shares[rank])
        if self.cfg.parallel == "fsdp" and world > 1:  # FSDP's forward is collective: as many on every worker
            forwards = [sum(-(-(b - a) // size) for _, a, b in share) for share in shares]
            batches = self._padded(batches, max(forwards) - forwards[rank])
        model = self.model if self.cfg.parallel == "fsdp" else parallel.bare(self.model)
        evaluated = self.task.evaluate(model, batches, reduce=_all_sum_dict)
        parallel.reshard(self.model)
        return {**evaluated, "eval_seconds": time.time() - started}

    def _padded(self, batches, extra: int):
        """The batches, then `extra` forwards of one val row whose outputs are dropped."""
        row = None
        for batch in batches:
            row = row or {c: t[:1] for c, t in batch.items()}
            yield batch
        if extra:
            row = row or {c: t[:1] for c, t in self.val.get(0).items()}
            for _ in range(extra):
                self.model(self.task.model_inputs(row))

    def report(self, final: bool) -> None:
        """Evaluate (at eval steps), then hand the metrics and (at checkpoint steps) every worker's shard on."""
        metrics = self.metrics()
        evaluate = final or self.step % self.eval_every == 0
        evaluated = self.evaluate() if evaluate else {"eval_seconds": 0.0}
        calibration = evaluated.pop("calibration", None)
        metrics.update(evaluated)
        self.history.append({**metrics, "calibration": calibration})
        save = final or self.step % self.checkpoint_every == 0
        with tempfile.TemporaryDirectory() as d:
            if save:
                self.save(d, final)
            if self.session.rank == 0 and self.evidence:
                metrics["teacher_evidence"] = "; ".join(self.evidence)
            self.session.report(metrics, d if save else None)
        if self.session.rank == 0 and evaluate:  # through logging: Ray Train would print() twice
            unit = self.task.unit
            logger.info(f"step {self.step}/{self.total} (epoch {metrics['epoch']:g})  loss "
                        f"{metrics.get('train_loss', float('nan')):.4f}  {self.task.summary(evaluated)}  "
                        f"{metrics[f'{unit}_per_s']:,.0f} {unit}/s, {metrics['data_wait_seconds']:.1f}s of "
                        f"{metrics['train_seconds']:.1f}s waiting for data")
        self.meter.reset()

    def save(self, directory: str, final: bool) -> None:
        meta = {"step": self.step, "history": self.history, "scheduler": self.schedule.state_dict(),
                "scaler": self.precision.state_dict(), "lanes": self.order.lanes}
        student = self.task.student(parallel.bare(self.model)) if final else None
        save_checkpoint(directory, self.model, self.optimizer, self.session.rank, meta, student)
