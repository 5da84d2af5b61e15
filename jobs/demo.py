"""`make demo`: the whole pipeline on the 5,000 bundled MNIST images.

Fit (or reuse) the CNN teacher, precompute its cache once, precompute again to show the
cache hit, then train hard-label and KD students from that one cache over 3 seeds each,
print a table and write runs/demo/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from pipeline import storage
from pipeline.cache.shards import list_shard_files
from pipeline.config import load_precompute_config, load_train_config
from pipeline.errors import DistillError
from pipeline.report import write_report
from pipeline.student.train.driver import TrainResult, run_train
from pipeline.teacher.fit import fit_teacher
from pipeline.teacher.precompute import run_precompute

PRECOMPUTE = "jobs/configs/mnist/precompute.yaml"
TRAIN = "jobs/configs/mnist/train-kd.yaml"
# name -> overrides of the train config; all read the same cache.
STUDENTS = {
    "hard-label": ["loss.terms.kd=0.0", "loss.terms.ce=1.0"],
    "kd": ["loss.terms.kd=0.7", "loss.terms.ce=0.3", "loss.temperature=4.0"],
    "kd-T2": ["loss.terms.kd=0.7", "loss.terms.ce=0.3", "loss.temperature=2.0"],
}


def _shard_state(uri: str) -> list[tuple[str, float]]:
    fs, root = storage.filesystem(uri)
    return [(rel, fs.info(f"{root}/{rel}").get("mtime", 0)) for rel in list_shard_files(uri)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override the train config's epochs")
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args(argv)
    started = time.time()
    try:
        pre = load_precompute_config(PRECOMPUTE)
        if not storage.exists(pre.teacher.weights or ""):
            print(f"== fitting the teacher ({pre.teacher.factory}) ==", flush=True)
            fit_teacher(pre)
        else:
            print(f"== reusing the teacher at {pre.teacher.weights} ==", flush=True)

        print("== stage 1: precompute the teacher cache ==", flush=True)
        first = run_precompute(pre)
        before = _shard_state(first.uri)
        print("== stage 1 again, same config: must be a cache hit ==", flush=True)
        again = run_precompute(pre)
        hit_on_reuse = again.hit and again.rows_computed == 0 and _shard_state(again.uri) == before
        manifest = again.manifest

        results: dict[str, list[TrainResult]] = {}
        for name, overrides in STUDENTS.items():
            for seed in range(args.seeds):
                extra = [f"seed={seed}", f"name=demo-{name}-seed{seed}", f"storage_path={args.out}/train"]
                if args.epochs:
                    extra.append(f"epochs={args.epochs}")
                cfg = load_train_config(TRAIN, overrides + extra)
                print(f"== stage 2: {name}, seed {seed} ==", flush=True)
                results.setdefault(name, []).append(run_train(cfg, existing="overwrite"))
    except DistillError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return 2

    import ray

    ray.shutdown()  # flush the workers' logs now, so they do not land under the table
    students = []
    for name, runs in results.items():
        acc = [r.result.metrics["val_accuracy"] for r in runs]
        students.append({
            "name": name,
            "alpha": runs[0].result.alpha,
            "temperature": runs[0].result.temperature,
            "seeds": len(runs),
            "accuracy_mean": statistics.mean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "agreement_mean": statistics.mean(r.result.metrics["val_agreement"] for r in runs),
            "kl_mean": statistics.mean(r.result.metrics["val_kl"] for r in runs),
            "epochs": runs[0].result.epochs,
        })
    summary = {
        "teacher": {"accuracy": results["kd"][0].result.metrics["teacher_val_accuracy"], "factory": pre.teacher.factory},
        "cache": {"uri": first.uri, "rows": manifest.rows, "bytes": manifest.bytes, "hit_on_reuse": hit_on_reuse},
        "students": students,
        "wall_s": round(time.time() - started, 1),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    print()
    print(f"teacher {pre.teacher.factory}: val accuracy {summary['teacher']['accuracy']:.4f}")
    print(f"cache {first.uri}: {manifest.rows} rows, {manifest.bytes / 1e6:.2f} MB, hit on reuse: {hit_on_reuse}")
    print(f"{'student':<12} {'alpha':>5} {'T':>4} {'seeds':>5} {'val acc (mean ± std)':>22} {'agreement':>10} {'KL(T)':>7}")
    for s in students:
        print(f"{s['name']:<12} {s['alpha']:>5.2f} {s['temperature']:>4.1f} {s['seeds']:>5} "
              f"{100 * s['accuracy_mean']:>14.2f} ± {100 * s['accuracy_std']:.2f} {100 * s['agreement_mean']:>9.2f}% {s['kl_mean']:>7.3f}")
    report = write_report([r.run_dir for runs in results.values() for r in runs], os.path.join(args.out, "report.html"))
    print(f"\nwrote {os.path.join(args.out, 'summary.json')} and {report} in {summary['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
