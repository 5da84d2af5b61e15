"""`make bench`'s stage-2 data path at 1, 2 and 4 workers, on a cache in an object store.

The cache lives in a real S3 server (moto on 127.0.0.1) behind a proxy that counts the bytes each
object served, so what is measured is what the bucket sent, not what the reader believes it read:

- `read_amplification`: bytes of train shards served during one epoch of training (streamed,
  `in_memory: false`) divided by the train split's bytes. One per epoch means each row was read
  by one worker; W would mean every worker read every shard.
- `eval_seconds`: the median time of one evaluation of the same validation split (its shards
  dealt to the workers, the sums all-reduced).
- With `local_cache`, two epochs at 2 workers: the second epoch's shards come from node-local
  disk (`local_cache_two_epochs_amplification` stays near 1 instead of 2).
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

import torch

from jobs.benchmarks.common import kd_train, model_of, spec
from pipeline.config import PrecomputeConfig, TrainConfig
from pipeline.models.factory import save_state
from pipeline.student.train.driver import run_train
from pipeline.teacher.precompute import run_precompute

WORKERS = (1, 2, 4)
STUDENT = {"factory": "pipeline.models.builtin:mnist_cnn", "kwargs": {"width": 32}}


def _served_train(proxy) -> int:
    return sum(n for path, n in proxy.served.items() if "/split=train/" in path)


def stage2_scale(work: str, args: argparse.Namespace, data: dict) -> dict[str, Any]:
    from deploy.local.s3 import S3Proxy, moto_s3

    with moto_s3(buckets=("bench",)) as (endpoint, _):
        proxy = S3Proxy(endpoint)
        try:
            return _measure(work, args, proxy)
        finally:
            proxy.close()


def _measure(work: str, args: argparse.Namespace, proxy) -> dict[str, Any]:
    teacher = spec("mlp", hidden=[64])  # stage 2 never runs the teacher; any cache will do
    torch.manual_seed(0)
    weights = os.path.join(work, "scale-teacher.pt")
    save_state(model_of(teacher), weights)
    storage = {"endpoint_url": proxy.endpoint}
    pre = PrecomputeConfig.model_validate({
        "source": {"kind": "mnist"}, "teacher": {**teacher, "weights": weights}, "cache_root": "s3://bench/cache",
        "batch_size": 256, "cpus_per_actor": 0.5, "rows_per_shard": args.scale_shard_rows, "storage": storage})
    print(f"stage 2 at scale: a cache in S3 (moto behind a counting proxy), {args.scale_shard_rows} rows a shard", flush=True)
    result = run_precompute(pre, force=True)
    manifest, uri = result.manifest, result.uri
    train_bytes = sum(s.bytes for s in manifest.shards if s.split == "train")
    shards = {split: sum(s.split == split for s in manifest.shards) for split in ("train", "val")}
    train_rows = sum(s.rows for s in manifest.shards if s.split == "train")
    eval_every = max((train_rows // 64) // 6, 1)  # about six evaluations an epoch, for a median

    def fit(workers: int, epochs: int, name: str, **extra: Any) -> tuple[Any, int]:
        cfg = TrainConfig.model_validate(kd_train(
            uri, STUDENT, work, epochs, num_workers=workers, cpus_per_worker=0.4,
            in_memory=False, eval_every=eval_every, storage=storage, name=name, **extra))
        before = _served_train(proxy)
        out = run_train(cfg, existing="overwrite").result
        return out, _served_train(proxy) - before

    runs = []
    for workers in WORKERS:
        print(f"stage 2 at scale: one epoch streamed from S3 on {workers} worker(s)", flush=True)
        out, served = fit(workers, 1, f"scale-{workers}")
        evals = [h["eval_seconds"] for h in out.history if h.get("eval_seconds")]
        runs.append({"workers": workers, "train_bytes_served": served, "read_amplification": served / train_bytes,
                     "eval_seconds": statistics.median(evals), "evaluations": len(evals),
                     "samples_per_s": statistics.median(h["samples_per_s"] for h in out.history),
                     "val_accuracy": out.metrics.get("val_accuracy")})
    print("stage 2 at scale: two epochs on 2 workers with a node-local shard cache", flush=True)
    _, served = fit(2, 2, "scale-local", local_cache=os.path.join(work, "local-shards"))
    by = {str(r["workers"]): r for r in runs}
    return {"student": STUDENT, "train_bytes": train_bytes, "shards": shards, "rows_per_shard": args.scale_shard_rows,
            "runs": runs,
            "read_amplification": {k: r["read_amplification"] for k, r in by.items()},
            "eval_seconds": {k: r["eval_seconds"] for k, r in by.items()},
            "eval_seconds_2_over_1": by["2"]["eval_seconds"] / by["1"]["eval_seconds"],
            "local_cache_two_epochs_amplification": served / train_bytes}


def markdown(s: dict[str, Any]) -> list[str]:
    lines = [f"Stage 2 at scale: {s['student']['factory'].split(':')[1]} from a cache in S3 (moto behind a proxy "
             f"counting the bytes served), {s['shards']['train']} train and {s['shards']['val']} val shards of "
             f"{s['rows_per_shard']} rows, one epoch streamed (`in_memory: false`).", "",
             "| workers | train bytes served ÷ train split's bytes | one evaluation of the val split | samples/s |",
             "|---|---|---|---|"]
    lines += [f"| {r['workers']} | **{r['read_amplification']:.3f}** | {r['eval_seconds']:.3f} s | {r['samples_per_s']:,.0f} |"
              for r in s["runs"]]
    lines += ["", f"Evaluation at 2 workers ÷ at 1: **{s['eval_seconds_2_over_1']:.2f}**. Two epochs at 2 workers with "
              f"`local_cache`: {s['local_cache_two_epochs_amplification']:.3f} of the train split served in all.", ""]
    return lines
