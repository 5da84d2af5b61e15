"""`make bench-scale` (part of `make bench`): the language-model mechanics against baselines measured
in the same run, on Hugging Face GPT-2-style models built here (nothing downloaded).

(a) Stage 2: tokens/s of an HF causal LM student trained by `distill train` from a top-k cache
    (timed inside the worker between reports) / a plain PyTorch loop over the same tokens in
    memory: same model and seed, precision, batch, top-k KD + CE loss, thread count. Target >= 0.9.
(b) DDP vs FSDP, 2 workers: tokens/s, and parameter + optimizer bytes per worker (FSDP ~ 0.5x DDP).
(c) Stage 1: tokens/s of `run_precompute` with an HF teacher, end to end / a bare
    `inference_mode` loop of the same teacher over the same batches. Target >= 0.8 on CPU.
(d) Growth: a streaming train worker and a teacher actor at 1x and 10x the cache's rows: peak RSS
    (polled from outside) at 10x <= 1.2x of 1x, and throughput within 10%.

Writes runs/bench/scale.json and runs/bench/scale.md, exits 1 naming every target missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from typing import Any

import psutil
import torch

from jobs.benchmarks import common
from jobs.benchmarks.common import Target, machine, machine_line, write_report
from pipeline.cache.manifest import read_manifest
from pipeline.config import PrecomputeConfig, TrainConfig
from pipeline.runtime import ensure_ray
from pipeline.student.train.step import make_optimizer, train_step
from pipeline.student.train.precision import Precision
from pipeline.student.train.order import Order
from pipeline.student.train.reader import ShardReader, train_batches
from pipeline.student.tasks.tokens import TokenTask
from pipeline.student.train.driver import run_train
from pipeline.teacher.precompute import run_precompute

SEQ = 64
VOCAB = 2048
TEACHER = {"n_embd": 256, "n_layer": 4, "n_head": 4}  # stage 1's teacher
TINY_TEACHER = {"n_embd": 64, "n_layer": 2, "n_head": 2}  # the growth caches' teacher: 10x rows in minutes
STUDENT = {"factory": "pipeline.models.hf:hf_causal_lm_config",
           "kwargs": {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "bos_token_id": 1, "eos_token_id": 1}}
LOSS = {"temperature": 1.0, "terms": {"kd": 0.5, "ce": 0.5}}
TARGETS = common.targets(
    Target("student_lm_efficiency", ">=", 0.9), Target("teacher_lm_efficiency", ">=", 0.8),
    Target("fsdp_memory_ratio", "<=", 0.6), Target("worker_rss_growth", "<=", 1.2), Target("actor_rss_growth", "<=", 1.2),
    Target("worker_throughput_growth", ">=", 0.9),
)


class PeakRss:
    """The largest resident set (`peak`) and private memory (`peak_uss`: pages no other process
    shares, so not the object store's shared memory the process has mapped) of any process whose
    command line contains `marker` (Ray titles its processes `ray::RayTrainWorker...`,
    `ray::MapWorker(...)`), polled every 0.2 s on a thread."""

    def __init__(self, marker: str) -> None:
        self.marker, self.peak, self.peak_uss, self._stop = marker, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if self.marker in " ".join(p.info["cmdline"] or []):
                        mem = p.memory_full_info()
                        self.peak, self.peak_uss = max(self.peak, mem.rss), max(self.peak_uss, mem.uss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def hf_teacher(path: str, size: dict[str, int]) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, bos_token_id=1, eos_token_id=1, **size)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def precompute(work: str, name: str, teacher: str, max_bytes: int, tokenizer: str | None) -> PrecomputeConfig:
    source = {"kind": "text", "seq_len": SEQ, "val_fraction": 0.05, "max_bytes": max_bytes,
              "tokenizer": {"uri": tokenizer} if tokenizer else {"kind": "bpe", "vocab_size": VOCAB}}
    return PrecomputeConfig.model_validate({
        "source": source, "teacher": {"factory": "pipeline.models.hf:hf_causal_lm", "kwargs": {"path": teacher}},
        "outputs": {"logits": {"mode": "topk", "k": 32, "temperatures": [1.0], "values": "uint8"}},
        "cache_root": os.path.join(work, "cache"), "batch_size": 32, "rows_per_shard": 1000,
        "num_actors": 1, "cpus_per_actor": 1})


def bare_teacher_tokens_per_s(teacher: str, uri: str) -> float:
    """Stage 1's baseline: the teacher in a plain `inference_mode` loop over the cache's own windows."""
    from pipeline.models.hf import hf_causal_lm

    torch.set_num_threads(1)
    m = read_manifest(uri)
    reader = ShardReader(uri, [s.path for s in m.shards], ["input_ids"], {"input_ids": torch.int64}, keep=True)
    x = torch.cat([reader.get(i)["input_ids"] for i in range(len(m.shards))])[:, :-1]
    model = hf_causal_lm(teacher, num_classes=VOCAB).eval()
    with torch.inference_mode():
        model(x[:32])
        started = time.perf_counter()
        for i in range(0, len(x), 32):
            model(x[i:i + 32]).float().topk(32, dim=-1)
    return x.numel() / (time.perf_counter() - started)


def in_fresh_process(*args: str) -> float:
    """A baseline in its own Python process, which has never imported Ray (no Ray threads beside it)."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "jobs.benchmarks.scale", *args], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def train(work: str, name: str, cache: str, **extra: Any) -> dict[str, Any]:
    cfg = TrainConfig.model_validate({
        "cache": cache, "student": STUDENT, "loss": LOSS, "optimizer": {"name": "adamw", "lr": 1e-3},
        "batch_size": 32, "num_workers": 1, "cpus_per_worker": 1, "storage_path": os.path.join(work, "runs"),
        "name": name, "eval_every": 20, "max_steps": 80, "in_memory": False, **extra})
    with PeakRss("RayTrainWorker") as rss:
        out = run_train(cfg, existing="overwrite", log=lambda s: None).result
    steady = [h for h in out.history if h["step"] > 20]  # the first window also starts the data path
    return {"tokens_per_s": statistics.median(h["tokens_per_s"] for h in steady),
            "data_wait_share": sum(h["data_wait_seconds"] for h in steady) / sum(h["train_seconds"] for h in steady),
            "param_bytes": out.memory_per_worker["param_bytes"], "optimizer_bytes": out.memory_per_worker["optimizer_bytes"],
            "peak_rss": rss.peak, "peak_uss": rss.peak_uss, "val_perplexity": out.metrics["val_perplexity"]}


def bare_student_tokens_per_s(cache: str, precision: str = "fp32", steps: int = 60) -> float:
    """Stage 2's baseline: the same student, seed, loss and batch over the cache's rows in memory."""
    torch.set_num_threads(1)
    manifest = read_manifest(cache)
    cfg = TrainConfig.model_validate({"cache": cache, "student": STUDENT, "loss": LOSS, "batch_size": 32})
    task = TokenTask(cfg, manifest)
    shards = [(s.path, s.rows) for s in manifest.shards_of("train")]
    reader = ShardReader(cache, [p for p, _ in shards], task.columns(), task.dtypes(), keep=True)
    order = Order(tuple(n for _, n in shards), 32, 0)
    batches = [b for step in train_batches(reader, order, 0, 0, min(steps + 10, order.steps_per_epoch), 0, 1) for b in step]
    torch.manual_seed(0)
    model = task.build_model()
    opt = make_optimizer(model.parameters(), "adamw", 1e-3)
    prec = Precision(precision, torch.device("cpu"))
    for b in batches[:10]:
        train_step(model, [b], task, opt, prec)
    started, tokens = time.perf_counter(), 0.0
    for b in batches[10:]:
        tokens += float(train_step(model, [b], task, opt, prec)[2])
    return tokens / (time.perf_counter() - started)


def run(work: str, args: argparse.Namespace) -> dict[str, Any]:
    ensure_ray()
    m = machine()
    report: dict[str, Any] = {"host": m["host"], "cpus": m["cpus"], "device": machine_line(m), "torch": m["torch"],
                              "machine": m}
    # The BPE tokenizer every cache shares, trained once on a small cache of the tiny teacher: a
    # user's teacher comes with its tokenizer, so no timed run below trains one.
    tiny = hf_teacher(os.path.join(work, "tiny-teacher"), TINY_TEACHER)
    tokenizer = f"{run_precompute(precompute(work, 'tokenizer', tiny, args.bytes, None), log=lambda s: None).uri}/tokenizer.json"
    # (c) stage 1 on the larger teacher, over 4x the text.
    teacher = hf_teacher(os.path.join(work, "teacher"), TEACHER)
    cfg = precompute(work, "stage1", teacher, 4 * args.bytes, tokenizer)
    started = time.time()
    uri = run_precompute(cfg, log=lambda s: None).uri
    wall = time.time() - started
    tokens = read_manifest(uri).rows * SEQ
    bare = in_fresh_process("--bare-teacher", teacher, uri)
    report["stage1"] = {"tokens": tokens, "tokens_per_s": tokens / wall, "bare_tokens_per_s": bare,
                        "teacher_lm_efficiency": tokens / wall / bare}
    print(json.dumps(report["stage1"]), flush=True)
    # (a) stage 2 against the plain loop, fp32 and bf16.
    report["stage2"] = {}
    for precision in ("fp32", "bf16"):
        got = train(work, f"student-{precision}", uri, precision=precision)
        base = in_fresh_process("--bare-student", uri, precision)
        report["stage2"][precision] = {**got, "bare_tokens_per_s": base, "student_lm_efficiency": got["tokens_per_s"] / base}
        print(precision, json.dumps(report["stage2"][precision]), flush=True)
    # (b) DDP vs FSDP over two workers.
    report["parallel"] = {p: train(work, f"student-{p}", uri, parallel=p, num_workers=2) for p in ("ddp", "fsdp")}
    d, f = report["parallel"]["ddp"], report["parallel"]["fsdp"]
    report["parallel"]["fsdp_memory_ratio"] = (f["param_bytes"] + f["optimizer_bytes"]) / (d["param_bytes"] + d["optimizer_bytes"])
    print(json.dumps(report["parallel"]), flush=True)
    # (d) growth: caches of 1x and 10x the rows from the tiny teacher, streamed by the student.
    growth = {}
    for scale in (1, 10):
        with PeakRss("MapWorker") as actor:
            started = time.time()
            result = run_precompute(precompute(work, f"growth{scale}", tiny, args.bytes * scale, tokenizer), log=lambda s: None)
            wall = time.time() - started
        rows = result.manifest.rows
        got = train(work, f"growth-{scale}x", result.uri)
        growth[f"{scale}x"] = {"rows": rows, "teacher_tokens_per_s": rows * SEQ / wall, "actor_peak_rss": actor.peak,
                               "actor_peak_uss": actor.peak_uss, **got}
        print(scale, json.dumps(growth[f"{scale}x"]), flush=True)
    one, ten = growth["1x"], growth["10x"]
    growth.update(worker_rss_growth=ten["peak_rss"] / one["peak_rss"], actor_rss_growth=ten["actor_peak_rss"] / one["actor_peak_rss"],
                  worker_uss_growth=ten["peak_uss"] / one["peak_uss"], actor_uss_growth=ten["actor_peak_uss"] / one["actor_peak_uss"],
                  worker_throughput_growth=ten["tokens_per_s"] / one["tokens_per_s"])
    report["growth"] = growth
    return report


def ratios(report: dict[str, Any]) -> dict[str, float]:
    return {"student_lm_efficiency": report["stage2"]["fp32"]["student_lm_efficiency"],
            "teacher_lm_efficiency": report["stage1"]["teacher_lm_efficiency"],
            "fsdp_memory_ratio": report["parallel"]["fsdp_memory_ratio"],
            **{k: report["growth"][k] for k in ("worker_rss_growth", "actor_rss_growth", "worker_throughput_growth")}}


def missed(values: dict[str, float]) -> list[str]:
    """Each ratio that misses its target, named with its value."""
    return common.missed(values, TARGETS)


def markdown(report: dict[str, Any]) -> str:
    s1, s2, par, g = report["stage1"], report["stage2"], report["parallel"], report["growth"]
    mb = 1e6
    lines = [
        "| stage 1: HF teacher (GPT-2 256d x 4 layers, vocab 2048, 64-token windows, top-32 uint8) | tokens/s | bare loop, same run | ratio |",
        "|---|---|---|---|",
        f"| {s1['tokens']:,} tokens, 1 actor, 1 thread, end to end | {s1['tokens_per_s']:,.0f} | {s1['bare_tokens_per_s']:,.0f} | **{s1['teacher_lm_efficiency']:.2f}** |",
        "",
        "| stage 2: HF student (GPT-2 128d x 2 layers) from the top-32 cache | tokens/s | plain loop, same run | ratio | waiting for data |",
        "|---|---|---|---|---|",
        *[f"| {p}, batch 32 x 64 tokens, 1 worker | {v['tokens_per_s']:,.0f} | {v['bare_tokens_per_s']:,.0f} | "
          f"**{v['student_lm_efficiency']:.2f}** | {100 * v['data_wait_share']:.0f}% |" for p, v in s2.items()],
        "",
        "| 2 workers | tokens/s | parameters per worker | optimizer state per worker |",
        "|---|---|---|---|",
        *[f"| {p} | {par[p]['tokens_per_s']:,.0f} | {par[p]['param_bytes'] / mb:.2f} MB | {par[p]['optimizer_bytes'] / mb:.2f} MB |"
          for p in ("ddp", "fsdp")],
        f"| fsdp / ddp memory | | **{par['fsdp_memory_ratio']:.2f}** | |",
        "",
        "| growth (streamed, in_memory: false) | rows | teacher actor peak RSS (private) | train worker peak RSS (private) | student tokens/s |",
        "|---|---|---|---|---|",
        *[f"| {k} | {g[k]['rows']:,} | {g[k]['actor_peak_rss'] / mb:,.0f} MB ({g[k]['actor_peak_uss'] / mb:,.0f} MB) | "
          f"{g[k]['peak_rss'] / mb:,.0f} MB ({g[k]['peak_uss'] / mb:,.0f} MB) | {g[k]['tokens_per_s']:,.0f} |" for k in ("1x", "10x")],
        f"| 10x / 1x | {g['10x']['rows'] / g['1x']['rows']:.1f}x | **{g['actor_rss_growth']:.2f}** ({g['actor_uss_growth']:.2f}) | "
        f"**{g['worker_rss_growth']:.2f}** ({g['worker_uss_growth']:.2f}) | **{g['worker_throughput_growth']:.2f}** |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--bytes", type=int, default=400_000, help="text read for the 1x cache (10x for the growth run)")
    p.add_argument("--bare-teacher", nargs=2, metavar=("TEACHER", "CACHE"), help=argparse.SUPPRESS)
    p.add_argument("--bare-student", nargs=2, metavar=("CACHE", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bare_teacher:
        print(bare_teacher_tokens_per_s(*args.bare_teacher))
        return 0
    if args.bare_student:
        print(bare_student_tokens_per_s(*args.bare_student))
        return 0
    work = os.path.join(args.out, "scale")
    shutil.rmtree(work, ignore_errors=True)
    report = run(work, args)
    report["ratios"] = ratios(report)
    report["missed"] = misses = missed(report["ratios"])
    table = markdown(report)
    write_report(args.out, "scale", report, table)
    print("\n" + table + f"\nwrote {args.out}/scale.json and {args.out}/scale.md")
    if misses:
        print("missed: " + "; ".join(misses))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
