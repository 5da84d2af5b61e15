"""`make bench-views`: does a view-consistent cache keep what a teacher in the loop gives an augmented student?

On the demo's MNIST (4,000 train / 1,000 val), the demo's CNN teacher and small CNN student, the
KD loss (0.7 KD + 0.3 CE at T 4), 15 epochs, batch 64, Adam 1e-3, four arms per seed:

- `plain`: today's cache (the teacher's logits of the whole image), no augmentation;
- `plain_aug`: the same cache, the student's images augmented (random-resized crop and shift),
  its targets still those of the unaugmented image;
- `views`: the view-consistent cache: R views per image (view 0 the whole image, the others the same
  crop and shift drawn per image from the seed and the id, `pipeline.data.views.image_views`) with
  the teacher's logits for each; each step replays one stored view per image (`replay_view`);
- `online_consistent`: the reference (Beyer et al.'s function matching): each step augments the
  images and runs the teacher on exactly those views.

Every arm goes through the product's own step (`train_step` and `ClassificationTask.prepare`) from
the same init, with the same batch order per seed; all are evaluated on the unaugmented val split.
The view cache is also written by the real stage 1 (`distill precompute` of
jobs/configs/mnist/precompute-views.yaml, Ray Data) for its bytes per row and its source's, and the
bench checks that the views and logits it stored are the ones trained on here. A curve over R
trains the `views` arm at other view counts. Costs: 8 students from one view cache (the teacher's
pass over the R views plus 8 students) against 8 online runs, the same in-process compute.

Targets: `views` mean >= `online_consistent` mean - 0.3 points and > `plain` mean; the 8-student
cost ratio <= 0.25. Writes runs/bench/views.json and .md; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from jobs.benchmarks.common import Target, finish, interval, machine, machine_line, target_records, targets
from pipeline.cache.manifest import read_manifest
from pipeline.cache.schema import LABEL, LOGITS, SAMPLE_ID, VIEWS, X
from pipeline.cache.tensors import table_to_numpy
from pipeline.config import PrecomputeConfig, TrainConfig
from pipeline.config import load_precompute_config
from pipeline.data.sources import load_split
from pipeline.data.views import apply_views, image_views
from pipeline.models.factory import build_model
from pipeline.student.tasks.classification import ClassificationTask
from pipeline.student.train.step import make_optimizer, train_epoch
from pipeline.teacher.fit import fit_teacher

PRECOMPUTE = "jobs/configs/mnist/precompute-views.yaml"
STUDENT = {"factory": "pipeline.models.builtin:cnn_student", "kwargs": {"width": 8, "hidden": 64}}
LOSS = {"temperature": 4.0, "terms": {"kd": 0.7, "ce": 0.3}}
ARMS = ("plain", "plain_aug", "views", "online_consistent")
TARGETS = targets(Target("views_minus_online_points", ">=", -0.3), Target("views_minus_plain_points", ">=", 1e-9),
                  Target("cost_8_views_over_8_online", "<=", 0.25))
Batches = Callable[[int], Iterator[dict[str, torch.Tensor]]]


def teacher_logits(teacher: torch.nn.Module, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """As the cache stores them: float16, computed in float32 in eval mode."""
    with torch.inference_mode():
        return torch.cat([teacher(x[i:i + chunk]).to(torch.float16) for i in range(0, len(x), chunk)])


def view_logits(teacher: torch.nn.Module, x: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """(N, R, C): the teacher on each of every image's R views, as stage 1's predictor runs it."""
    n, r = views.shape[:2]
    seen = apply_views(x.repeat_interleave(r, dim=0), views.reshape(n * r, 5))
    return teacher_logits(teacher, seen).reshape(n, r, -1)


def task_for(arm: str, transforms: list[dict]) -> ClassificationTask:
    """The product's task per arm: the view arm's manifest has the views column, the augmented arms an `augment` list."""
    augment = transforms if arm in ("plain_aug", "online_consistent") else []
    cfg = TrainConfig.model_validate({"cache": "in-memory", "student": STUDENT, "loss": LOSS, "augment": augment})
    task = ClassificationTask.in_memory(cfg, num_classes=10, input_shape=(1, 28, 28))
    if arm == "views":
        task = ClassificationTask(cfg, task.manifest.model_copy(update={"columns": {**task.manifest.columns, VIEWS: "tensor"}}))
    return task


class OnlineTask(ClassificationTask):
    """Function matching: the teacher run on each step's augmented images, after the product's augmentation."""

    def __init__(self, base: ClassificationTask, teacher: torch.nn.Module) -> None:
        super().__init__(base.cfg, base.manifest)
        self.teacher = teacher

    def prepare(self, batch):
        out = super().prepare(batch)
        with torch.no_grad():
            out[LOGITS] = self.teacher(out[X]).float()
        return out


def batches_of(columns: dict[str, torch.Tensor], batch_size: int, seed: int) -> Batches:
    """Per epoch, the rows in an order drawn from (seed, epoch) alone, so every arm of a seed sees the same batches."""
    def epoch(e: int) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(len(columns[LABEL]), generator=torch.Generator().manual_seed(seed * 1000 + e))
        for idx in order.split(batch_size):
            yield {k: v[idx] for k, v in columns.items()}
    return epoch


def train_arm(task: ClassificationTask, batches: Batches, val: dict[str, torch.Tensor], epochs: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)  # the same init per seed in every arm; augmentation draws follow from it
    model = task.build_model()
    opt = make_optimizer(model.parameters(), "adam", 1e-3)
    started = time.perf_counter()
    for e in range(epochs):
        train_epoch(model, batches(e), task, opt)
    wall = time.perf_counter() - started
    plain = task_for("plain", [])
    return {"val_accuracy": plain.evaluate(model, [val])["val_accuracy"], "wall_s": wall}


def real_cache(work: str, weights: str) -> dict[str, Any]:
    """`distill precompute` of the view config as a user runs it: the manifest, the stored views and logits, the wall."""
    started = time.perf_counter()
    cmd = [os.path.join(os.path.dirname(sys.executable), "distill"), "precompute", PRECOMPUTE, "--set", f"teacher.weights={weights}",
           "--set", f"cache_root={os.path.join(work, 'cache')}"]
    ran = subprocess.run(cmd, capture_output=True, text=True)
    if ran.returncode != 0:
        raise SystemExit(f"distill precompute failed:\n{ran.stdout[-2000:]}\n{ran.stderr[-2000:]}")
    wall = time.perf_counter() - started
    uri = _view_cache(work)
    manifest = read_manifest(uri)
    stored: dict[str, list] = {SAMPLE_ID: [], VIEWS: [], LOGITS: []}
    for shard in manifest.shards:
        if shard.split == "train":
            cols = table_to_numpy(pq.read_table(os.path.join(uri, shard.path), columns=list(stored)))
            for k in stored:
                stored[k].append(cols[k])
    cache_bytes = sum(s.bytes for s in manifest.shards) + os.path.getsize(os.path.join(uri, "manifest.json"))
    return {"uri": uri, "manifest": manifest, "wall_s": wall, "cache_bytes": cache_bytes,
            **{k: np.concatenate(v) for k, v in stored.items()}}


def _view_cache(work: str) -> str:
    """The view cache under the bench's cache root (the only cache there with a views column)."""
    for path in sorted(glob.glob(os.path.join(work, "cache", "*", "manifest.json"))):
        if VIEWS in read_manifest(os.path.dirname(path)).columns:
            return os.path.dirname(path)
    raise SystemExit(f"no view cache under {work}/cache after distill precompute")


def demo_teacher(work: str, epochs: int) -> tuple[PrecomputeConfig, torch.nn.Module]:
    """The view config with the demo's CNN teacher fitted for `epochs` under `work` (reused when there), and the teacher."""
    os.makedirs(work, exist_ok=True)
    pre = load_precompute_config(PRECOMPUTE)
    weights = os.path.abspath(os.path.join(work, f"teacher-e{epochs}.pt"))
    pre = pre.model_copy(update={"teacher": pre.teacher.model_copy(update={
        "weights": weights, "fit": pre.teacher.fit.model_copy(update={"epochs": epochs})})})
    if not os.path.exists(weights):
        print(f"fitting the MNIST teacher ({epochs} epochs) ...", flush=True)
        fit_teacher(pre)
    return pre, build_model(pre.teacher, input_shape=(1, 28, 28), num_classes=10).eval()


def spread(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation and the 95% t-interval's half-width over seeds."""
    a = np.asarray(values, dtype=float)
    mean, _, high = interval(a)
    return {"mean": mean, "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "ci95_half": high - mean}


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [f"# View-consistent caches ({machine_line(report['machine'])})", "",
             f"MNIST 4,000/1,000, {report['epochs']} epochs, R = {report['views_per_image']}, seeds {report['seeds']}.", "",
             "| arm | val accuracy, mean ± 95% (points) | per seed | student wall s (mean) |", "|---|---|---|---|"]
    for arm in ARMS:
        acc = s["arms"][arm]
        per = ", ".join(f"{100 * r['val_accuracy']:.2f}" for r in report["rows"] if r["arm"] == arm)
        lines.append(f"| {arm} | {100 * acc['mean']:.2f} ± {100 * acc['ci95_half']:.2f} | {per} | {acc['wall_s']:.1f} |")
    lines += ["", "| R | views val accuracy (points) |", "|---|---|"]
    lines += [f"| {c['views_per_image']} | {100 * c['val_accuracy']['mean']:.2f} ({len(c['seeds'])} seeds) |" for c in report["curve"]]
    lines += ["", f"Cache {report['cache_bytes_per_row']:.1f} B/row against its source {report['source_bytes_per_row']:.1f} B/row.",
              f"8 students from one view cache ÷ 8 online runs: {s['cost_8_views_over_8_online']:.3f}.", ""]
    lines += [f"- {name}: {value:.3f} (target {TARGETS[name].op} {TARGETS[name].threshold:g}) "
              f"{'met' if TARGETS[name].met(value) else 'MISSED'}" for name, value in s["targets"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--curve", default="1,2,4,16", help="other view counts R for the curve (one seed each)")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one core per student, as a 1-CPU Ray Train worker runs
    work = os.path.join(args.out, "views")
    pre, teacher = demo_teacher(work, args.teacher_epochs)
    weights = pre.teacher.weights
    views_cfg = pre.outputs.views
    transforms = [t.model_dump() for t in views_cfg.transforms]
    r = views_cfg.count

    train, val = (load_split(pre.source, s) for s in ("train", "val"))
    x, y = torch.from_numpy(train[X]), torch.from_numpy(train[LABEL])
    vx = torch.from_numpy(val[X])
    val_batch = {X: vx, LABEL: torch.from_numpy(val[LABEL]), LOGITS: teacher_logits(teacher, vx).float()}
    ids = [str(i) for i in train[SAMPLE_ID]]

    print(f"stage 1 (distill precompute, R = {r}) ...", flush=True)
    cache = real_cache(work, weights)
    m = cache["manifest"]
    started = time.perf_counter()
    views = image_views(ids, r, 28, 28, list(views_cfg.transforms), views_cfg.seed)
    logits = view_logits(teacher, x, views)
    teacher_pass_s = time.perf_counter() - started
    at = {sid: i for i, sid in enumerate(ids)}
    rows = [at[str(s)] for s in cache[SAMPLE_ID]]
    assert len(rows) == len(ids), f"the cache's train split has {len(rows)} rows, the source {len(ids)}"
    assert np.array_equal(cache[VIEWS], views[rows].numpy()), "stage 1 stored other views than image_views draws"
    logit_gap = float(np.abs(cache[LOGITS].astype(np.float32) - logits[rows].float().numpy()).max())
    assert logit_gap < 0.05, f"stage 1's logits differ from the teacher's on the same views by {logit_gap}"

    base = {X: x, LABEL: y}
    data = {"plain": {**base, LOGITS: logits[:, 0].float()}, "plain_aug": {**base, LOGITS: logits[:, 0].float()},
            "views": {**base, VIEWS: views, LOGITS: logits.float()}, "online_consistent": base}
    report_rows = []
    for seed in range(args.seeds):
        for arm in ARMS:
            task = task_for(arm, transforms)
            if arm == "online_consistent":
                task = OnlineTask(task, teacher)
            res = train_arm(task, batches_of(data[arm], 64, seed), val_batch, args.epochs, seed)
            report_rows.append({"arm": arm, "seed": seed, **res})
            print(f"seed {seed} {arm:18s} val_accuracy {res['val_accuracy']:.4f} ({res['wall_s']:.0f} s)", flush=True)

    curve = [{"views_per_image": r, "seeds": list(range(args.seeds)),
              "val_accuracy": spread([row["val_accuracy"] for row in report_rows if row["arm"] == "views"])}]
    for count in [int(c) for c in args.curve.split(",") if c.strip()]:
        v = image_views(ids, count, 28, 28, list(views_cfg.transforms), views_cfg.seed)
        z = view_logits(teacher, x, v).float()
        res = train_arm(task_for("views", transforms), batches_of({**base, VIEWS: v, LOGITS: z}, 64, 0), val_batch, args.epochs, 0)
        curve.append({"views_per_image": count, "seeds": [0], "val_accuracy": spread([res["val_accuracy"]]),
                      "wall_s": res["wall_s"]})
        print(f"R = {count:3d} views val_accuracy {res['val_accuracy']:.4f}", flush=True)
    curve.sort(key=lambda c: c["views_per_image"])

    arms = {arm: {**spread([row["val_accuracy"] for row in report_rows if row["arm"] == arm]),
                  "wall_s": float(np.mean([row["wall_s"] for row in report_rows if row["arm"] == arm]))} for arm in ARMS}
    cost_views = teacher_pass_s + 8 * arms["views"]["wall_s"]
    cost_online = 8 * arms["online_consistent"]["wall_s"]
    values = {"views_minus_online_points": 100 * (arms["views"]["mean"] - arms["online_consistent"]["mean"]),
              "views_minus_plain_points": 100 * (arms["views"]["mean"] - arms["plain"]["mean"]),
              "cost_8_views_over_8_online": cost_views / cost_online}
    report = {
        "machine": machine(), "epochs": args.epochs, "seeds": list(range(args.seeds)), "teacher_epochs": args.teacher_epochs,
        "teacher_val_accuracy": float((val_batch[LOGITS].argmax(1) == val_batch[LABEL]).float().mean()),
        "rows": report_rows, "views_per_image": r, "transforms": transforms,
        "cache_bytes_per_row": cache["cache_bytes"] / m.rows, "source_bytes_per_row": m.source_bytes / m.rows,
        "cache": {"uri": cache["uri"], "rows": m.rows, "precompute_wall_s": cache["wall_s"], "max_logit_gap": logit_gap},
        "teacher_pass_s": teacher_pass_s, "curve": curve,
        "summary": {"arms": arms, "cost_8_views_s": cost_views, "cost_8_online_s": cost_online,
                    "cost_8_views_over_8_online": values["cost_8_views_over_8_online"], "targets": values},
        "targets": target_records(values, TARGETS),
        "command": "make bench-views",
    }
    return finish(args.out, "views", report, markdown(report), values, TARGETS)


if __name__ == "__main__":
    sys.exit(main())
