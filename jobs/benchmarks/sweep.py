"""`make bench-sweep`: what N students from one cache cost with `distill sweep`, against online KD.

The amortisation setup of `make bench` (teacher heavy_cnn width 96, 147x the student's FLOPs; student
MLP 784-512-512-10; 20 epochs of MNIST's 4,000 train rows; KD 0.7 + CE 0.3 at T 4; one thread per
student). One teacher pass (the real `run_precompute`), then, all measured in this run:

- sweep, direct trials: `run_sweep` over N seeds, one trial at a time (one core, as the baselines);
- sweep, Ray Train trials: the same with `trial: train` (each trial a Ray Train run);
- separate runs: `distill train` as a subprocess per student (its own Ray start-up, as a user pays it);
- the limit: the same N students trained one after another in this process from the cache's logits
  already in memory (no Ray, no storage, no evaluation);
- online KD: the teacher's forward in every step (plain PyTorch, no Ray).

Separate runs, the limit and online KD cost the same for every student, so `--baseline-students` of
each are timed and scaled to N. Amortisation = (teacher pass + the N students) / (N online KD
students). Per-trial overhead = a student's wall time minus the limit's time for one student.
Target: sweep at N = 8 <= 0.10.

Writes runs/bench/sweep.json and runs/bench/sweep.md; exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import yaml

from jobs.benchmarks.common import (AMORT_STUDENT, Target, cached_logits, fit_amortisation_teacher, kd_train, machine,
                                    machine_line, mnist, model_of, online_kd_student, spec, tensors, train_in_memory, write_report)
from pipeline.config.sweep import SweepConfig
from pipeline.runtime import ensure_ray
from pipeline.student.sweep.driver import run_sweep
from pipeline.teacher.precompute import run_precompute

TARGET = Target("sweep_n8", "<=", 0.10)  # sweep amortisation at N = 8
STUDENT = AMORT_STUDENT


def sweep_wall(base: dict[str, Any], work: str, n: int, trial: str) -> dict[str, Any]:
    cfg = SweepConfig.model_validate({"train": base, "name": f"{trial}-{n}", "storage_path": os.path.join(work, "sweeps"),
                                      "grid": {"seed": list(range(n))}, "max_concurrent_trials": 1, "trial": trial})
    started = time.perf_counter()
    result = run_sweep(cfg, overwrite=True, log=lambda line: None)
    wall = time.perf_counter() - started
    accuracies = [t["metric"] for t in result.trials]
    return {"n": n, "trial": trial, "wall_s": wall, "val_accuracy": statistics.fmean(accuracies)}


def plain_student(teacher_logits: torch.Tensor, data: dict, epochs: int, seed: int) -> float:
    """The limit: the student trained from the cached logits already in memory; seconds."""
    x, y = tensors(data["train"])
    return sum(e["seconds"] for e in train_in_memory(STUDENT, x, y, teacher_logits, 64, epochs, seed))


def separate_run(base: dict[str, Any], work: str, seed: int) -> float:
    """`distill train` in a fresh process, as a user runs one student: its own local Ray included."""
    path = os.path.join(work, f"train-{seed}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({**base, "seed": seed, "name": f"separate-{seed}"}, f)
    distill = os.path.join(os.path.dirname(sys.executable), "distill")
    started = time.perf_counter()
    subprocess.run([distill, "train", path, "--overwrite"], check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--teacher-width", type=int, default=96)
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--students", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--baseline-students", type=int, default=2, help="students timed for each per-student baseline")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-sweep-", dir=args.out)
    torch.set_num_threads(1)
    m = machine()
    ensure_ray()
    data = mnist()
    started = time.time()
    try:
        print("fitting the teacher", flush=True)
        pre, _ = fit_amortisation_teacher(work, args.teacher_width, args.teacher_epochs)
        print("one teacher pass", flush=True)
        t0 = time.perf_counter()
        cache = run_precompute(pre, force=True)
        teacher_pass = time.perf_counter() - t0
        base = kd_train(cache.uri, STUDENT, work, args.epochs)
        import ray

        ray.shutdown()  # each separate `distill train` starts its own local Ray, as a user's does
        teacher = model_of(spec("heavy_cnn", width=args.teacher_width), pre.teacher.weights).eval()
        logits = cached_logits(teacher, tensors(data["train"])[0])
        k = args.baseline_students
        print(f"{k} students each: separate `distill train` runs, the in-memory limit, online KD", flush=True)
        separate = statistics.fmean(separate_run(base, work, seed) for seed in range(k))
        plain = statistics.fmean(plain_student(logits, data, args.epochs, seed) for seed in range(k))
        online_runs = [online_kd_student(STUDENT, teacher, data, 64, args.epochs, seed) for seed in range(k)]
        online = statistics.fmean(r["wall_s"] for r in online_runs)
        ensure_ray()
        sweeps = []
        for n in args.students:
            print(f"sweep of {n} students, direct trials", flush=True)
            sweeps.append(sweep_wall(base, work, n, "direct"))
        n_train = min(args.students)
        print(f"sweep of {n_train} students, Ray Train trials", flush=True)
        sweeps.append(sweep_wall(base, work, n_train, "train"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for s in sweeps:
        n = s["n"]
        rows.append({"method": f"sweep, {s['trial']} trials", "n": n, "wall_s": teacher_pass + s["wall_s"],
                     "amortisation": (teacher_pass + s["wall_s"]) / (n * online),
                     "overhead_per_student_s": s["wall_s"] / n - plain, "val_accuracy": s["val_accuracy"]})
    for n in sorted(set(args.students)):
        for method, per in (("separate `distill train` runs", separate), ("limit: in-memory loop", plain)):
            rows.append({"method": method, "n": n, "wall_s": teacher_pass + n * per,
                         "amortisation": (teacher_pass + n * per) / (n * online), "overhead_per_student_s": per - plain})
    sweep8 = next((r["amortisation"] for r in rows if r["method"] == "sweep, direct trials" and r["n"] == 8), None)
    report = {
        "device": f"{machine_line(m)}, 1 thread per student", "machine": m,
        "teacher_pass_s": teacher_pass, "online_kd_student_s": online, "limit_student_s": plain,
        "separate_run_s": separate, "online_val_accuracy": statistics.fmean(r["val_accuracy"] for r in online_runs),
        "rows": rows,
        "target": {"sweep_n8_max": TARGET.threshold, "value": sweep8, "met": sweep8 is not None and TARGET.met(sweep8)},
        "epochs": args.epochs, "baseline_students": k, "wall_s": time.time() - started,
        "command": " ".join(["python -m jobs.benchmarks.sweep", *(sys.argv[1:] if argv is None else argv)]),
    }
    lines = [f"Device: {report['device']}. Teacher pass {teacher_pass:.1f} s; per student: online KD {online:.1f} s, "
             f"the in-memory limit {plain:.1f} s, a separate `distill train` {separate:.1f} s "
             f"(each the mean of {k}). Command: `{report['command']}`.", "",
             "| students | method | wall (teacher pass included) | overhead per student | amortisation vs online KD |",
             "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["n"], r["amortisation"])):
        lines.append(f"| {r['n']} | {r['method']} | {r['wall_s']:.0f} s | {r['overhead_per_student_s']:.1f} s | "
                     f"**{r['amortisation']:.3f}** |")
    if sweep8 is not None:
        lines += ["", f"Target: sweep at N = 8 <= {TARGET.threshold}: {'met' if report['target']['met'] else 'MISSED'} ({sweep8:.3f})."]
    write_report(args.out, "sweep", report, "\n".join(lines))
    print("\n".join(lines))
    return 0 if report["target"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
