"""`make bench`: each stage against a plain PyTorch baseline measured in the same run.

(a) Stage 1: rows/s of the teacher pipeline end to end (cache key, staging, Ray Data pass,
    Parquet write, checksums, manifest; Ray already up) divided by a bare `inference_mode`
    loop over the same teacher, batch size, device and thread count. Also rows/s with 2
    teacher actors over 1 (scaling). Target: >= 0.8 on CPU, >= 0.9 on a GPU.
(b) Stage 2: samples/s of the Ray Train loop streaming the cache (timed inside the worker
    over the epoch loop) divided by an in-memory loop of the same student, loss and global
    batch, one process, no Ray, same threads; plus the KD loss's own cost per step and the
    time the worker waited for data. Target: >= 0.9 for one worker.
(b') Stage 2 at 1, 2 and 4 workers from a cache in S3 (jobs/benchmarks/dataread.py): bytes the
    bucket served per epoch over the train split's bytes (target <= 1.05 each) and one evaluation's
    seconds (2 workers <= 0.65 x 1); the 2-worker samples/s ratio of (b) must not fall below 0.81.
(c) Amortisation: wall time of one teacher pass + N students trained from the cache (the real
    `run_precompute` + N x `run_train`, each paying Ray Train's start-up) divided by the same
    N students trained with online KD (the teacher's forward in every step, a plain PyTorch
    loop with no Ray cost at all), N = 1, 4, 8, teacher >= 10x the student's FLOPs.
    Target at N = 4: <= 0.35.
(d) Stage 1 of a language-model teacher at V = 2,048, 32,768 and 131,072 (jobs/benchmarks/lmvocab.py):
    the teacher actor's rows/s over a bare forward loop (target >= 0.9), its peak memory over one
    chunk's logits, and the default signal's stored bytes a token at 131,072 over 2,048 (<= 1.15).

Writes runs/bench/stages.json, runs/bench/stages.md and runs/bench/history/stages-<time>.json,
then exits 1 naming every ratio that missed its target.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from jobs.benchmarks import dataread, lmvocab
from jobs.benchmarks.common import (AMORT_STUDENT, INPUT, Target, cached_logits, fit_amortisation_teacher, kd_task, kd_train,
                                    machine, machine_line, missed, mnist, model_of, online_kd_student, precompute_config, spec,
                                    targets, tensors, train_in_memory, write_json, write_report)
from pipeline.config import TrainConfig
from pipeline.models.factory import save_state
from pipeline.runtime import ensure_ray
from pipeline.student.train.step import make_optimizer
from pipeline.student.train.driver import run_train
from pipeline.teacher.precompute import run_precompute

TARGETS = targets(
    Target("teacher_stage_efficiency", ">=", 0.8),  # 0.9 on a GPU: see `check`
    Target("student_stage_efficiency", ">=", 0.9),
    Target("student_stage_efficiency_2_workers", ">=", 0.81),  # the last run before shards were dealt to workers
    Target("amortisation_n4", "<=", 0.35),
    *(Target(f"read_amplification_{w}", "<=", 1.05) for w in dataread.WORKERS),
    Target("eval_seconds_2_over_1", "<=", 0.65),
    Target("lm_vocab_rows_per_s_ratio", ">=", 0.9),
    Target("lm_vocab_stored_bytes_131k_over_2k", "<=", 1.15),
)
STAGE2_STUDENT = {"factory": "pipeline.models.builtin:mnist_cnn", "kwargs": {"width": 32}}
STAGE2_SMALL = {"factory": "pipeline.models.builtin:cnn_student", "kwargs": {"width": 32, "hidden": 128}}


def flops_per_sample(model: torch.nn.Module) -> float:
    """Forward FLOPs of one sample (torch's counter: 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.eval()(torch.zeros(1, *INPUT))
    return float(counter.get_total_flops())


# ---------------------------------------------------------------- baselines (no Ray)

def bare_inference_rows_per_s(model: torch.nn.Module, x: np.ndarray, batch_size: int) -> float:
    """Stage 1's baseline: the teacher in a plain loop producing the same float16 logits, no I/O."""
    model.eval()
    with torch.inference_mode():
        model(torch.from_numpy(x[:batch_size]))  # warm-up, as the actor's first batch is
        started = time.perf_counter()
        for i in range(0, len(x), batch_size):
            model(torch.from_numpy(x[i:i + batch_size])).to(torch.float16).numpy()
    return len(x) / (time.perf_counter() - started)


def bare_training_samples_per_s(student: dict, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, batch_size: int,
                                epochs: int, seed: int = 0) -> float:
    """Stage 2's baseline: the same student, loss and global batch over in-memory tensors."""
    rates = [e["samples"] / e["seconds"] for e in train_in_memory(student, x, y, logits, batch_size, epochs, seed)]
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def kd_loss_cost(student: dict, batch_size: int, repeats: int = 200) -> dict[str, float]:
    """Milliseconds per step of the student's forward+backward+update with plain CE, and the extra
    milliseconds the KD loss (softened KL against stored logits, plus CE) adds to the same step."""
    torch.manual_seed(0)
    model = model_of(student)
    opt = make_optimizer(model.parameters(), "adam", 1e-3)
    batch = {"x": torch.randn(batch_size, *INPUT), "label": torch.randint(0, 10, (batch_size,)),
             "teacher_logits": torch.randn(batch_size, 10)}
    task = kd_task(student)

    def step(loss_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        loss_of(model(batch["x"])).backward()
        opt.step()

    def ms(loss_of: Callable[[torch.Tensor], torch.Tensor]) -> float:
        for _ in range(10):
            step(loss_of)
        started = time.perf_counter()
        for _ in range(repeats):
            step(loss_of)
        return (time.perf_counter() - started) / repeats * 1e3

    def loss_only(loss_of: Callable[[torch.Tensor], torch.Tensor]) -> float:
        z = torch.randn(batch_size, 10)
        started = time.perf_counter()
        for _ in range(repeats * 5):
            leaf = z.clone().requires_grad_()
            loss_of(leaf).backward()
        return (time.perf_counter() - started) / (repeats * 5) * 1e3

    ce_step = min(ms(lambda z: F.cross_entropy(z, batch["label"])) for _ in range(3))
    kd_step = min(ms(lambda z: task.losses(z, batch)["loss"]) for _ in range(3))
    kd_alone = loss_only(lambda z: task.losses(z, batch)["loss"])
    ce_alone = loss_only(lambda z: F.cross_entropy(z, batch["label"]))
    return {"step_ms_ce": ce_step, "step_ms_kd": kd_step, "loss_ms_kd": kd_alone, "loss_ms_ce": ce_alone,
            "kd_share_of_step": kd_alone / kd_step}


# ---------------------------------------------------------------- the three measurements

def stage1(work: str, args: argparse.Namespace, data: dict) -> dict[str, Any]:
    teacher = spec("heavy_cnn", width=args.stage1_width)
    torch.manual_seed(0)
    weights = os.path.join(work, "stage1-teacher.pt")
    save_state(model_of(teacher), weights)  # the weights' values do not change the time
    x = np.concatenate([data[s]["x"] for s in ("train", "val")])
    torch.set_num_threads(1)
    print(f"stage 1: bare inference loop over {len(x)} rows, 1 thread", flush=True)
    bare = bare_inference_rows_per_s(model_of(teacher, weights), x, args.batch_size)
    runs = []
    for actors in (1, 2):
        print(f"stage 1: the teacher pipeline with {actors} actor(s)", flush=True)
        cfg = precompute_config(teacher, weights, os.path.join(work, f"cache-{actors}"), args.batch_size, actors)
        started = time.perf_counter()
        result = run_precompute(cfg, force=True)
        wall = time.perf_counter() - started
        rows = result.manifest.rows
        runs.append({"actors": actors, "rows": rows, "wall_s": wall, "rows_per_s": rows / wall,
                     "ray_data_wall_s": result.manifest.stats.wall_s,
                     "fixed_s": wall - rows / bare / actors})  # what the bare rate does not explain
    one, two = runs
    return {"teacher": teacher, "flops_per_sample": flops_per_sample(model_of(teacher)), "batch_size": args.batch_size,
            "threads_per_actor": 1, "bare_rows_per_s": bare, "runs": runs,
            "efficiency": one["rows_per_s"] / bare, "scaling_2_over_1": two["rows_per_s"] / one["rows_per_s"]}


def stage2(work: str, args: argparse.Namespace, data: dict) -> dict[str, Any]:
    """The headline student (a small CNN, 49 ms a step here) on 1 and 2 workers, and a smaller
    one on 1 worker, to show how the fixed costs per step and per epoch weigh as the step shrinks."""
    teacher = spec("mlp", hidden=[64])  # stage 2 never runs the teacher; any cache will do
    torch.manual_seed(0)
    weights = os.path.join(work, "stage2-teacher.pt")
    save_state(model_of(teacher), weights)
    cfg = precompute_config(teacher, weights, os.path.join(work, "cache-stage2"), 256, 1)
    cache = run_precompute(cfg, force=True)
    x, y = tensors(data["train"])
    logits = cached_logits(model_of(teacher, weights), x)
    runs = []
    for student, workers in ((STAGE2_STUDENT, 1), (STAGE2_STUDENT, 2), (STAGE2_SMALL, 1)):
        name = f"{student['factory'].split(':')[1]} width {student['kwargs']['width']}"
        train_cfg = TrainConfig.model_validate(kd_train(cache.uri, student, work, args.epochs, num_workers=workers,
                                                        cpus_per_worker=0.5, name=f"stage2-{len(runs)}"))
        print(f"stage 2: {name}, Ray Train from the cache, {workers} worker(s)", flush=True)
        out = run_train(train_cfg, existing="overwrite").result
        steady = out.history[1:]  # epoch 1 also starts the workers' data path
        ray_rate = statistics.median(h["samples_per_s"] for h in steady)
        print(f"stage 2: {name}, in-memory loop, no Ray, {workers} thread(s)", flush=True)
        torch.set_num_threads(workers)
        bare = bare_training_samples_per_s(student, x, y, logits, 64, args.epochs)
        runs.append({"student": student, "name": name, "flops_per_sample": flops_per_sample(model_of(student)),
                     "workers": workers, "ray_samples_per_s": ray_rate, "bare_samples_per_s": bare, "bare_threads": workers,
                     "efficiency": ray_rate / bare, "ray_fit_wall_s": out.wall_s,
                     "data_wait_share": statistics.median(h["data_wait_seconds"] / h["train_seconds"] for h in steady),
                     "first_epoch_s": out.history[0]["train_seconds"],
                     "steady_epoch_s": statistics.median(h["train_seconds"] for h in steady),
                     "kd_loss": kd_loss_cost(student, 64 // workers)})
    torch.set_num_threads(1)
    return {"train_rows": len(y), "global_batch": 64, "epochs": args.epochs, "runs": runs,
            "efficiency": runs[0]["efficiency"]}


def amortisation(work: str, args: argparse.Namespace, data: dict) -> dict[str, Any]:
    teacher_spec, student = spec("heavy_cnn", width=args.amort_teacher_width), AMORT_STUDENT
    t_flops, s_flops = flops_per_sample(model_of(teacher_spec)), flops_per_sample(model_of(student))
    torch.set_num_threads(1)
    print(f"amortisation: fitting the teacher ({t_flops / s_flops:.0f}x the student's FLOPs)", flush=True)
    pre, teacher_acc = fit_amortisation_teacher(work, args.amort_teacher_width, args.teacher_epochs)
    n_max = max(args.students)

    print("amortisation: offline, one teacher pass", flush=True)
    started = time.perf_counter()
    cache = run_precompute(pre, force=True)
    offline = [time.perf_counter() - started]  # cumulative wall after 0, 1, 2, ... students
    offline_acc = []
    for i in range(n_max):
        print(f"amortisation: offline student {i + 1}/{n_max}", flush=True)
        cfg = TrainConfig.model_validate(kd_train(cache.uri, student, work, args.amort_epochs, name=f"offline-{i}", seed=i))
        started = time.perf_counter()
        offline_acc.append(run_train(cfg, existing="overwrite").result.metrics["val_accuracy"])
        offline.append(offline[-1] + time.perf_counter() - started)

    teacher = model_of(teacher_spec, pre.teacher.weights)
    online, online_acc = [0.0], []
    for i in range(n_max):
        print(f"amortisation: online KD student {i + 1}/{n_max}", flush=True)
        out = online_kd_student(student, teacher, data, 64, args.amort_epochs, seed=i)
        online.append(online[-1] + out["wall_s"])
        online_acc.append(out["val_accuracy"])
    return {
        "teacher": teacher_spec, "student": student, "teacher_flops_per_sample": t_flops, "student_flops_per_sample": s_flops,
        "flops_ratio": t_flops / s_flops, "teacher_val_accuracy": teacher_acc, "epochs": args.amort_epochs,
        "train_rows": len(data["train"]["label"]), "threads": 1, "teacher_pass_s": offline[0],
        "offline_student_s": [b - a for a, b in zip(offline, offline[1:])],
        "online_student_s": [b - a for a, b in zip(online, online[1:])],
        "offline_val_accuracy": offline_acc, "online_val_accuracy": online_acc,
        "points": [{"n_students": n, "offline_s": offline[n], "online_s": online[n],
                    "offline_over_online": offline[n] / online[n]} for n in args.students],
    }


# ---------------------------------------------------------------- report

def check(report: dict[str, Any], on_gpu: bool) -> list[str]:
    """Every ratio that missed its target, in words; a GPU asks 0.9 of stage 1."""
    values = {"teacher_stage_efficiency": report.get("teacher_stage_efficiency"),
              "student_stage_efficiency": report.get("student_stage_efficiency"),
              "student_stage_efficiency_2_workers": report.get("student_stage_efficiency_2_workers"),
              **{f"read_amplification_{w}": report.get("read_amplification", {}).get(str(w)) for w in dataread.WORKERS},
              "eval_seconds_2_over_1": report.get("eval_seconds_2_over_1"),
              "amortisation_n4": next((p["offline_over_online"] for p in report.get("amortisation", []) if p["n_students"] == 4), None),
              "lm_vocab_rows_per_s_ratio": report.get("lm_vocab", {}).get("rows_per_s_ratio_min"),
              "lm_vocab_stored_bytes_131k_over_2k": report.get("lm_vocab", {}).get("stored_bytes_largest_over_smallest")}
    table = {**TARGETS, "teacher_stage_efficiency": Target("teacher_stage_efficiency", ">=", 0.9)} if on_gpu else TARGETS
    return missed(values, table)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Device: {report['device']}. Command: `{report['command']}`.", ""]
    if s1 := report["details"].get("stage1"):
        one, two = s1["runs"]
        lines += ["| stage 1: teacher pass | rows/s | baseline (same run) | ratio |", "|---|---|---|---|",
                  f"| heavy_cnn width {s1['teacher']['kwargs']['width']} ({s1['flops_per_sample'] / 1e6:.0f} MFLOP/row), "
                  f"batch {s1['batch_size']}, 1 actor, 1 thread, end to end | {one['rows_per_s']:,.0f} | "
                  f"{s1['bare_rows_per_s']:,.0f} bare `inference_mode` loop | **{s1['efficiency']:.2f}** |",
                  f"| same, 2 actors | {two['rows_per_s']:,.0f} | {one['rows_per_s']:,.0f} with 1 actor | "
                  f"**{s1['scaling_2_over_1']:.2f}x** |", ""]
    if s2 := report["details"].get("stage2"):
        lines += ["| stage 2: train from the cache | samples/s | baseline (same run) | ratio | waiting for data | KD loss share of a step |",
                  "|---|---|---|---|---|---|"]
        for r in s2["runs"]:
            lines.append(f"| {r['name']} ({r['flops_per_sample'] / 1e6:.1f} MFLOP/sample), batch 64, "
                         f"{r['workers']} worker{'s' if r['workers'] > 1 else ''} | {r['ray_samples_per_s']:,.0f} | "
                         f"{r['bare_samples_per_s']:,.0f} in-memory loop, {r['bare_threads']} thread"
                         f"{'s' if r['bare_threads'] > 1 else ''} | **{r['efficiency']:.2f}** | {r['data_wait_share']:.0%} | "
                         f"{r['kd_loss']['kd_share_of_step']:.1%} ({r['kd_loss']['loss_ms_kd']:.2f} of {r['kd_loss']['step_ms_kd']:.1f} ms) |")
        lines.append("")
    if scale := report["details"].get("stage2_scale"):
        lines += dataread.markdown(scale)
    if am := report["details"].get("amortisation"):
        lines += [f"Amortisation: teacher heavy_cnn width {am['teacher']['kwargs']['width']} "
                  f"({am['teacher_flops_per_sample'] / 1e6:.0f} MFLOP/row, val acc {am['teacher_val_accuracy']:.1%}), "
                  f"student MLP 784-512-512-10 ({am['student_flops_per_sample'] / 1e6:.2f} MFLOP, "
                  f"{am['flops_ratio']:.0f}x fewer), {am['epochs']} epochs of {am['train_rows']} rows each, 1 thread. "
                  f"Teacher pass {am['teacher_pass_s']:.1f} s; a student from the cache "
                  f"{statistics.median(am['offline_student_s']):.1f} s (Ray Train run, start-up included), with online KD "
                  f"{statistics.median(am['online_student_s']):.1f} s (plain loop). Val accuracy offline "
                  f"{statistics.mean(am['offline_val_accuracy']):.2%}, online {statistics.mean(am['online_val_accuracy']):.2%} "
                  f"(mean over students).", "",
                  "| students | offline: one teacher pass + N runs | online KD: N runs | offline / online |", "|---|---|---|---|"]
        lines += [f"| {p['n_students']} | {p['offline_s']:.0f} s | {p['online_s']:.0f} s | **{p['offline_over_online']:.2f}** |"
                  for p in am["points"]]
    if lm := report["details"].get("lm_vocab"):
        lines += ["", *lmvocab.markdown(lm)]
    if report["missed"]:
        lines += ["", "Missed: " + "; ".join(report["missed"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--only", default="stage1,stage2,stage2_scale,amortisation,lm_vocab", help="comma-separated sections to run")
    parser.add_argument("--scale-shard-rows", type=int, default=250, help="rows a shard of the stage2_scale cache")
    parser.add_argument("--batch-size", type=int, default=256, help="stage 1 teacher batch size")
    parser.add_argument("--stage1-width", type=int, default=192, help="stage 1 heavy_cnn width")
    parser.add_argument("--epochs", type=int, default=10, help="stage 2 epochs")
    parser.add_argument("--amort-teacher-width", type=int, default=96)
    parser.add_argument("--amort-epochs", type=int, default=20)
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--students", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args(argv)
    sections = set(args.only.split(","))
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench-", dir=args.out)
    m = machine()
    if "stage2_scale" in sections:
        from deploy.local.s3 import set_fake_credentials

        set_fake_credentials()  # for the local S3 server, before Ray starts: its workers inherit them
    ensure_ray()
    data = mnist()
    started = time.time()
    details: dict[str, Any] = {}
    try:
        if "stage1" in sections:
            details["stage1"] = stage1(work, args, data)
        if "stage2" in sections:
            details["stage2"] = stage2(work, args, data)
        if "stage2_scale" in sections:
            details["stage2_scale"] = dataread.stage2_scale(work, args, data)
        if "amortisation" in sections:
            details["amortisation"] = amortisation(work, args, data)
        if "lm_vocab" in sections:
            details["lm_vocab"] = lmvocab.section()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report: dict[str, Any] = {
        "device": machine_line(m),
        "machine": m,
        **({"teacher_stage_efficiency": details["stage1"]["efficiency"]} if "stage1" in details else {}),
        **({"student_stage_efficiency": details["stage2"]["efficiency"],
            "student_stage_efficiency_2_workers": details["stage2"]["runs"][1]["efficiency"]} if "stage2" in details else {}),
        **({k: details["stage2_scale"][k] for k in ("read_amplification", "eval_seconds", "eval_seconds_2_over_1")}
           if "stage2_scale" in details else {}),
        **({"amortisation": [{"n_students": p["n_students"], "offline_over_online": p["offline_over_online"]}
                             for p in details["amortisation"]["points"]]} if "amortisation" in details else {}),
        **({"lm_vocab": {k: v for k, v in details["lm_vocab"].items() if k != "teacher"}} if "lm_vocab" in details else {}),
        "targets": {t.name: {"value": t.threshold, "kind": t.kind} for t in TARGETS.values()},
        "details": details,
        "wall_s": time.time() - started,
        "command": " ".join(["python -m jobs.benchmarks.stages", *(sys.argv[1:] if argv is None else argv)]),
        "torch": m["torch"],
        "python": m["python"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    report["missed"] = check(report, on_gpu=m["gpus"] > 0)
    table = markdown(report)
    write_report(args.out, "stages", report, table)
    write_json(os.path.join(args.out, "history", f"stages-{report['created'].replace(':', '')}.json"), report)
    print("\n" + table + f"\nwrote {args.out}/stages.json, {args.out}/stages.md and a copy under {args.out}/history/")
    if report["missed"]:
        print("BENCHMARK TARGET MISSED: " + "; ".join(report["missed"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
