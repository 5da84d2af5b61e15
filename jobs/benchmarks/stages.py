"""`make bench`: each stage against a plain PyTorch baseline measured in the same run.

(a) Stage 1: rows/s of the Ray Data teacher pipeline (start of execution to manifest,
    Ray already up) divided by a bare `torch.inference_mode` loop over the same teacher,
    batch size and thread count, with a teacher heavy enough that inference dominates.
(b) Stage 2: samples/s of the Ray Train loop streaming the cache (timed inside the
    workers over the epoch loop: data, forward, backward, all-reduce) divided by an
    in-memory loop of the same student, loss and global batch, one process, no Ray,
    with the same total number of threads.

Writes runs/bench/stages.json and runs/bench/stages.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from pipeline.config import PrecomputeConfig, TeacherConfig, TrainConfig
from pipeline.data.sources import describe, load_split
from pipeline.models.builtin import heavy_cnn
from pipeline.models.factory import build_model, save_state
from pipeline.runtime import ensure_ray
from pipeline.student.loop import make_optimizer, train_epoch
from pipeline.student.losses import DistillationLoss
from pipeline.student.trainer import run_train
from pipeline.teacher.plan import run_precompute

HEAVY = {"factory": "pipeline.models.builtin:heavy_cnn", "kwargs": {"width": 128}}
STUDENT = {"factory": "pipeline.models.builtin:mlp", "kwargs": {"hidden": [512, 512]}}


def bare_inference_rows_per_s(x: np.ndarray, weights: str, batch_size: int, threads: int) -> float:
    """The baseline for stage 1: the same teacher in a plain loop, no Ray, no I/O."""
    torch.set_num_threads(threads)
    model = build_model(TeacherConfig.model_validate({**HEAVY, "weights": weights}),
                        input_shape=x.shape[1:], num_classes=10).eval()
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            model(torch.from_numpy(x[i:i + batch_size])).to(torch.float16).numpy()
    return len(x) / (time.perf_counter() - started)


def bare_training_samples_per_s(train: dict[str, np.ndarray], logits: np.ndarray, cfg: TrainConfig, epochs: int,
                                threads: int) -> float:
    """The baseline for stage 2: the same student, loss and global batch over in-memory tensors."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.student, input_shape=train["x"].shape[1:], num_classes=10)
    opt = make_optimizer(model.parameters(), cfg.optimizer.name, cfg.optimizer.lr)
    loss = DistillationLoss(cfg.loss.terms, cfg.loss.temperature)
    x, y, z = torch.from_numpy(train["x"]), torch.from_numpy(train["label"]), torch.from_numpy(logits).float()
    rates = []
    for _ in range(epochs):
        order = torch.randperm(len(y))
        batches = ({"x": x[idx], "label": y[idx], "teacher_logits": z[idx]} for idx in order.split(cfg.batch_size))
        started = time.perf_counter()
        stats = train_epoch(model, batches, loss, opt)
        rates.append(stats["train_samples"] / (time.perf_counter() - started))
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256, help="teacher batch size")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench-", dir=args.out)
    ensure_ray()

    # (a) Stage 1 against a bare inference loop.
    torch.manual_seed(0)
    weights = os.path.join(work, "heavy.pt")
    save_state(heavy_cnn(width=HEAVY["kwargs"]["width"]), weights)
    pre = PrecomputeConfig.model_validate({
        "source": {"kind": "mnist"}, "teacher": {**HEAVY, "weights": weights}, "cache_root": os.path.join(work, "cache"),
        "batch_size": args.batch_size, "num_actors": 1, "cpus_per_actor": 1,
    })
    x_all = np.concatenate([load_split(pre.source, s)["x"] for s in ("train", "val")])
    print(f"stage 1: bare inference loop over {len(x_all)} rows", flush=True)
    bare_rows = bare_inference_rows_per_s(x_all, weights, args.batch_size, threads=1)
    print("stage 1: the Ray Data pipeline over the same rows", flush=True)
    started = time.perf_counter()
    result = run_precompute(pre, force=True)
    pipe_rows = result.manifest.rows / (time.perf_counter() - started)

    # (b) Stage 2 against an in-memory loop, with 1 worker (the headline) and with 2.
    train = load_split(pre.source, "train")
    with torch.inference_mode():
        logits = build_model(pre.teacher, input_shape=describe(pre.source).input_shape, num_classes=10).eval()(
            torch.from_numpy(train["x"])).numpy()
    student_rows = []
    for workers in (1, 2):
        train_cfg = TrainConfig.model_validate({
            "cache": result.uri, "student": STUDENT, "epochs": args.epochs, "batch_size": 64, "num_workers": workers,
            "cpus_per_worker": 0.5, "storage_path": os.path.join(work, "train"), "name": f"bench-{workers}w",
            "shuffle_buffer": 4096,
        })
        print(f"stage 2: Ray Train from the cache, {workers} worker(s)", flush=True)
        out = run_train(train_cfg, overwrite=True).result
        ray_rate = statistics.median(h["samples_per_s"] for h in out["history"][1:])
        print(f"stage 2: in-memory loop, no Ray, {workers} thread(s)", flush=True)
        bare_rate = bare_training_samples_per_s(train, logits, train_cfg, args.epochs, threads=workers)
        student_rows.append({"workers": workers, "ray_samples_per_s": ray_rate, "bare_samples_per_s": bare_rate,
                             "bare_threads": workers, "efficiency": ray_rate / bare_rate, "ray_fit_wall_s": out["wall_s"]})

    report = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "teacher_stage_efficiency": pipe_rows / bare_rows,
        "student_stage_efficiency": student_rows[0]["efficiency"],
        "teacher": {**HEAVY, "rows": result.manifest.rows, "batch_size": args.batch_size, "threads": 1,
                    "pipeline_rows_per_s": pipe_rows, "bare_rows_per_s": bare_rows},
        "student": {**STUDENT, "train_rows": len(train["label"]), "global_batch": 64, "epochs": args.epochs,
                    "runs": student_rows, "note": "Ray rate timed inside the workers over the epoch loop (data, "
                    "forward, backward, all-reduce), median of epochs 2..N; baseline: same student, loss and global "
                    "batch over in-memory tensors in one process with as many threads as Ray workers"},
        "command": "make bench",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(os.path.join(args.out, "stages.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = "\n".join([
        "| stage | pipeline | baseline (same run) | ratio |",
        "|---|---|---|---|",
        f"| 1: teacher ({HEAVY['factory'].split(':')[1]}, batch {args.batch_size}, 1 thread) | "
        f"{pipe_rows:,.0f} rows/s | {bare_rows:,.0f} rows/s bare `inference_mode` loop | **{report['teacher_stage_efficiency']:.2f}** |",
        *[f"| 2: student (MLP 784-512-512-10, batch 64, {r['workers']} worker{'s' if r['workers'] > 1 else ''}) | "
          f"{r['ray_samples_per_s']:,.0f} samples/s | {r['bare_samples_per_s']:,.0f} samples/s in-memory loop, "
          f"{r['bare_threads']} thread{'s' if r['bare_threads'] > 1 else ''} | **{r['efficiency']:.2f}** |" for r in student_rows],
    ])
    with open(os.path.join(args.out, "stages.md"), "w") as f:
        f.write(f"Device: {report['device']}. Command: `make bench`.\n\n{table}\n")
    print("\n" + table + f"\n\nwrote {args.out}/stages.json and {args.out}/stages.md")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
