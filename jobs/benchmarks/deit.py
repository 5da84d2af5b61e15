"""`make bench-deit`: a ViT student with DeiT's distillation token, trained from the cache, against the same ViT on hard labels.

On the demo's MNIST (4,000 train / 1,000 val) and its CNN teacher, the seed case of DeiT (a CNN
teacher, a transformer student). Every arm trains `pipeline.models.vit:vit_student` (patch 7, dim
64, depth 4, 4 heads) for the same epochs, batch 64, AdamW 1e-3, from the same init per seed and
the same batch order, through the product's own step (`train_step`, `ClassificationTask`) over
the teacher's logits as the cache stores them (float16, the whole image):

- `vit_hard`: the plain ViT (one class token, `distillation_token: false`), CE to the labels;
- `deit_hard`: class and distillation tokens, 1/2 CE(class head, y) + 1/2 CE(distillation head,
  the teacher's argmax) (`ce: 0.5, deit_hard: 0.5`, DeiT's default);
- `deit_soft`: class and distillation tokens, 1/2 CE(class head, y) + 1/2 T^2 KL(teacher || distillation head) at T 3.

Evaluation is on the val split, DeiT's prediction (the mean of the two heads). Writes
runs/bench/deit.json and .md. Target: each DeiT arm's mean above `vit_hard`'s; exits 1 when missed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from jobs.benchmarks.common import Target, finish, machine, machine_line, target_records, targets
from jobs.benchmarks.views import batches_of, demo_teacher, spread, teacher_logits
from pipeline.cache.schema import LABEL, LOGITS, X
from pipeline.config import TrainConfig
from pipeline.data.sources import load_split
from pipeline.student.tasks.classification import ClassificationTask
from pipeline.student.train.step import make_optimizer, train_epoch

VIT = "pipeline.models.vit:vit_student"
ARMS = {
    "vit_hard": ({"distillation_token": False}, {"temperature": 1.0, "terms": {"ce": 1.0}}),
    "deit_hard": ({}, {"temperature": 1.0, "terms": {"ce": 0.5, "deit_hard": 0.5}}),
    "deit_soft": ({}, {"temperature": 3.0, "terms": {"ce": 0.5, "kd": 0.5}}),
}
TARGETS = targets(Target("deit_hard_minus_vit_hard_points", ">=", 1e-9), Target("deit_soft_minus_vit_hard_points", ">=", 1e-9))


def run_arm(arm: str, data: dict[str, torch.Tensor], val: dict[str, torch.Tensor], epochs: int, seed: int) -> dict[str, float]:
    kwargs, loss = ARMS[arm]
    cfg = TrainConfig.model_validate({"cache": "in-memory", "student": {"factory": VIT, "kwargs": kwargs}, "loss": loss})
    task = ClassificationTask.in_memory(cfg, num_classes=10, input_shape=(1, 28, 28))
    task.check()  # the product's own refusals (a distillation token without a teacher term) apply here too
    torch.manual_seed(seed)
    model = task.build_model()
    opt = make_optimizer(model.parameters(), "adamw", 1e-3, weight_decay=0.05)
    batches = batches_of(data, 64, seed)
    started = time.perf_counter()
    for e in range(epochs):
        train_epoch(model, batches(e), task, opt)
    return {"val_accuracy": task.evaluate(model, [val])["val_accuracy"], "wall_s": time.perf_counter() - started}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# DeiT distillation token ({machine_line(report['machine'])})", "",
             f"MNIST 4,000/1,000, ViT student, {report['epochs']} epochs, seeds {report['seeds']}; "
             f"teacher (CNN) val accuracy {100 * report['teacher_val_accuracy']:.2f}.", "",
             "| arm | val accuracy, mean ± 95% (points) | per seed | wall s (mean) |", "|---|---|---|---|"]
    for arm, s in report["summary"]["arms"].items():
        per = ", ".join(f"{100 * r['val_accuracy']:.2f}" for r in report["rows"] if r["arm"] == arm)
        lines.append(f"| {arm} | {100 * s['mean']:.2f} ± {100 * s['ci95_half']:.2f} | {per} | {s['wall_s']:.1f} |")
    lines.append("")
    lines += [f"- {name}: {value:+.2f} points ({'met' if TARGETS[name].met(value) else 'MISSED'})"
              for name, value in report["summary"]["targets"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pre, teacher = demo_teacher(os.path.join(args.out, "views"), args.teacher_epochs)  # the teacher bench-views fits
    train, val = (load_split(pre.source, s) for s in ("train", "val"))
    x = torch.from_numpy(train[X])
    data = {X: x, LABEL: torch.from_numpy(train[LABEL]), LOGITS: teacher_logits(teacher, x).float()}
    vx = torch.from_numpy(val[X])
    val_batch = {X: vx, LABEL: torch.from_numpy(val[LABEL]), LOGITS: teacher_logits(teacher, vx).float()}

    rows = []
    for seed in range(args.seeds):
        for arm in ARMS:
            res = run_arm(arm, data, val_batch, args.epochs, seed)
            rows.append({"arm": arm, "seed": seed, **res})
            print(f"seed {seed} {arm:10s} val_accuracy {res['val_accuracy']:.4f} ({res['wall_s']:.0f} s)", flush=True)
    arms = {arm: {**spread([r["val_accuracy"] for r in rows if r["arm"] == arm]),
                  "wall_s": float(np.mean([r["wall_s"] for r in rows if r["arm"] == arm]))} for arm in ARMS}
    values = {f"{arm}_minus_vit_hard_points": 100 * (arms[arm]["mean"] - arms["vit_hard"]["mean"]) for arm in ("deit_hard", "deit_soft")}
    report = {"machine": machine(), "epochs": args.epochs, "seeds": list(range(args.seeds)), "student": VIT,
              "teacher_val_accuracy": float((val_batch[LOGITS].argmax(1) == val_batch[LABEL]).float().mean()),
              "rows": rows, "summary": {"arms": arms, "targets": values},
              "targets": target_records(values, TARGETS),
              "command": "make bench-deit"}
    return finish(args.out, "deit", report, markdown(report), values, TARGETS)


if __name__ == "__main__":
    sys.exit(main())
