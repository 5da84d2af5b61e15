"""`make bench-resume`: how much teacher work an interrupted precompute repeats.

Starts `distill precompute` (a compute-heavy teacher over the 5,000 MNIST rows) as a second
driver on this cluster, kills it once about half the rows are committed, runs the same config
again and reads the resume stats from the manifest. Writes runs/bench/resume.json and .md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import yaml

from jobs.benchmarks.common import machine, write_report
from pipeline.teacher.identity import resolve_target
from pipeline.config import load_precompute_config
from pipeline.models.builtin import heavy_cnn
from pipeline.models.factory import save_state
from pipeline.runtime import ensure_ray
from pipeline.teacher.precompute import run_precompute
from pipeline.teacher.resume import committed_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of rows committed before the kill")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="resume-", dir=args.out)
    torch.manual_seed(0)
    save_state(heavy_cnn(width=128), f"{work}/heavy.pt")
    path = f"{work}/pre.yaml"
    with open(path, "w") as f:
        yaml.safe_dump({"source": {"kind": "mnist"}, "cache_root": f"{work}/cache", "batch_size": 128,
                        "teacher": {"factory": "pipeline.models.builtin:heavy_cnn", "kwargs": {"width": 128},
                                    "weights": f"{work}/heavy.pt"}}, f)
    cfg = load_precompute_config(path)
    uri = resolve_target(cfg).uri
    ensure_ray()
    import ray

    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "precompute", path,
                               "--address", ray.get_runtime_context().gcs_address],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = 5000
    while committed_rows(uri) < args.kill_at * total and driver.poll() is None:
        time.sleep(0.2)
    driver.kill()
    driver.wait()
    at_kill = committed_rows(uri)
    import pipeline.cache.lock as lock

    lock.STALE_S = 1.0  # the killed driver's heartbeat stops; do not wait the default minute
    time.sleep(1.5)
    started = time.time()
    result = run_precompute(cfg)
    stats = result.manifest.stats
    report = {
        "rows": total, "committed_at_kill": at_kill, "rows_recomputed_on_resume": stats.rows_computed,
        "fraction_computed_on_resume": stats.fraction_computed,
        "committed_rows_computed_again": at_kill + stats.rows_computed - total, "resume_wall_s": round(time.time() - started, 1),
        "command": "make bench-resume", "machine": machine(),
    }
    table = ("| rows | committed when killed | computed on resume | fraction computed on resume | committed rows computed again |\n"
             "|---|---|---|---|---|\n"
             f"| {total} | {at_kill} | {stats.rows_computed} | {stats.fraction_computed:.2f} | {report['committed_rows_computed_again']} |")
    write_report(args.out, "resume", report, table)
    print("\n" + table)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
