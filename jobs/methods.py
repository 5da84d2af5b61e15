"""`make methods`: every distillation method trained from one cache, 3 seeds each.

Fits the two CNN teachers if their weights are missing, precomputes one cache with both
teachers' logits and the feature, attention and embedding taps, trains the small CNN student
with each method's config over the seeds, then chains a born-again generation: the seed-0 KD
student becomes the teacher of a new cache, and students of the same architecture distil from
it. Writes runs/methods/summary.json and summary.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from pipeline import storage
from pipeline.config import load_precompute_config, load_train_config
from pipeline.errors import DistillError
from pipeline.report import write_report
from pipeline.student.tasks.tapped import loss_inputs
from pipeline.student.train.driver import TrainResult, run_train
from pipeline.teacher.fit import fit_teacher
from pipeline.teacher.precompute import run_precompute

CONFIGS = "jobs/configs/mnist"
PRECOMPUTE = f"{CONFIGS}/precompute-taps.yaml"
# method -> train config; all read the one cache of PRECOMPUTE.
METHODS = {
    "hard-label": "train-cnn-hard.yaml",
    "kd": "train-cnn-kd.yaml",
    "hint": "train-hint.yaml",
    "attention": "train-attention.yaml",
    "rkd": "train-rkd.yaml",
    "deit": "train-deit.yaml",
    "multi-teacher": "train-multi-teacher.yaml",
}
BORN_AGAIN_PRECOMPUTE = f"{CONFIGS}/precompute-born-again.yaml"
BORN_AGAIN_TRAIN = f"{CONFIGS}/train-born-again.yaml"


def _signals(manifest, cfg) -> dict[str, float]:
    """Cache bytes per row of each stored teacher signal the method reads (logits and taps)."""
    per_col = manifest.bytes_per_row()
    inputs = loss_inputs(cfg.loss, manifest)
    used = {t for t, w in cfg.loss.terms.items() if w > 0}
    cols = list(inputs.logits) if used & {"kd", "deit_hard"} else []
    cols += [c for _, c in inputs.hint] + [a[1] for a in inputs.attention] + ([inputs.rkd[1]] if inputs.rkd else [])
    return {c: per_col.get(c, 0.0) for c in cols}


def _train(method: str, path: str, seeds: int, out: str, epochs: int | None, overrides=()) -> list[TrainResult]:
    runs = []
    for seed in range(seeds):
        extra = [*overrides, f"seed={seed}", f"name={method}-seed{seed}", f"storage_path={out}/train"]
        if epochs:
            extra.append(f"epochs={epochs}")
        print(f"== {method}, seed {seed} ==", flush=True)
        runs.append(run_train(load_train_config(path, extra), existing="overwrite"))
    return runs


def _row(method: str, runs: list[TrainResult], manifest, cfg) -> dict:
    acc = [r.result.metrics["val_accuracy"] for r in runs]
    agree = [r.result.metrics["val_agreement"] for r in runs]
    signals = _signals(manifest, cfg)
    return {
        "method": method,
        "terms": cfg.loss.terms,
        "seeds": len(runs),
        "accuracy_mean": statistics.mean(acc),
        "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "agreement_mean": statistics.mean(agree),
        "agreement_std": statistics.stdev(agree) if len(agree) > 1 else 0.0,
        "teacher_accuracy": runs[0].result.metrics["teacher_val_accuracy"],
        "cache_bytes_per_row": signals,
        "epochs": runs[0].result.epochs,
        "wall_s_mean": statistics.mean(r.result.wall_s for r in runs),
        "runs": [r.run_dir for r in runs],
    }


def _markdown(summary: dict) -> str:
    lines = [f"Small CNN student ({summary['student']}) on MNIST (4,000 train / 1,000 val), {summary['epochs']} epochs, "
             f"seeds 0..{summary['seeds'] - 1}; teacher {summary['teacher']['factory']} at "
             f"{100 * summary['teacher']['accuracy']:.1f}% val. One cache for all rows but born-again.", "",
             "| method | loss terms | val acc (mean ± std) | agreement with its teacher | teacher signal bytes/row |",
             "|---|---|---|---|---|"]
    for r in summary["rows"]:
        terms = ", ".join(f"{k} {v:g}" for k, v in r["terms"].items() if v > 0)
        signals = ", ".join(f"{c} {b:.0f}" for c, b in r["cache_bytes_per_row"].items()) or "none"
        lines.append(f"| {r['method']} | {terms} | {100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} "
                     f"| {100 * r['agreement_mean']:.2f}% | {signals} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override every train config's epochs")
    parser.add_argument("--only", nargs="*", help="methods to run (default: all, then born-again)")
    parser.add_argument("--out", default="runs/methods")
    args = parser.parse_args(argv)
    started = time.time()
    rows = []
    try:
        pre = load_precompute_config(PRECOMPUTE)
        for name, teacher in pre.all_teachers.items():
            if not storage.exists(teacher.weights or ""):
                print(f"== fitting teacher {name!r} ({teacher.factory}) ==", flush=True)
                fit_teacher(pre, name=name)
        print("== stage 1: one cache with both teachers and every tap ==", flush=True)
        cache = run_precompute(pre)
        for method, file in METHODS.items():
            if args.only and method not in args.only:
                continue
            path = f"{CONFIGS}/{file}"
            runs = _train(method, path, args.seeds, args.out, args.epochs)
            rows.append(_row(method, runs, cache.manifest, load_train_config(path)))
        if not args.only or "born-again" in args.only:
            # Generation 1 is the KD student above (seed 0); its weights are the next teacher.
            gen1 = f"{args.out}/train/kd-seed0/student.pt"
            if not storage.exists(gen1):
                _train("kd", f"{CONFIGS}/{METHODS['kd']}", 1, args.out, args.epochs)
            print("== born-again: the generation-1 student becomes the teacher of a new cache ==", flush=True)
            ba = run_precompute(load_precompute_config(BORN_AGAIN_PRECOMPUTE, [f"teacher.weights={gen1}"]))
            runs = _train("born-again", BORN_AGAIN_TRAIN, args.seeds, args.out, args.epochs,
                          ["precompute=", f"cache={ba.uri}"])
            rows.append(_row("born-again", runs, ba.manifest, load_train_config(BORN_AGAIN_TRAIN)))
    except DistillError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return 2

    import ray

    ray.shutdown()
    student = load_train_config(f"{CONFIGS}/{METHODS['kd']}").student
    summary = {
        "student": f"{student.factory.split(':')[-1]}({', '.join(f'{k}={v}' for k, v in student.kwargs.items())})",
        "epochs": rows[0]["epochs"] if rows else None,
        "seeds": args.seeds,
        "teacher": {"factory": pre.teacher.factory, "accuracy": rows[0]["teacher_accuracy"] if rows else None},
        "cache": {"uri": cache.uri, "rows": cache.manifest.rows, "bytes_per_row": cache.manifest.bytes_per_row()},
        "rows": rows,
        "wall_s": round(time.time() - started, 1),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(_markdown(summary))
    print()
    print(_markdown(summary))
    report = write_report([d for r in rows for d in r["runs"]], os.path.join(args.out, "report.html"))
    print(f"wrote {args.out}/summary.json, summary.md and {report} in {summary['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
