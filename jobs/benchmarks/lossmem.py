"""`make bench-lossmem`: the memory a token-loss training step adds, with the student's head fused
into the loss (applied a chunk of positions at a time) and without (the full (B, L, V) logits).

Each row is a fresh process: a small causal LM (`causal_lm`, d_model 64, one layer) at
B = 2, L = 1,024, V = 131,072, one training step (forward, the task's loss, backward, SGD) through
`TokenTask`, the code a training run calls. `peak_rise_gib` is the process's peak resident memory
during that step minus its resident memory just before it (CUDA: peak allocated minus allocated);
the logits alone are 1.0 GiB in float32 at this size. `kd_ce` is the default sampled signal
(25 draws, kd 0.5 + ce 0.5); `ce` the cross-entropy alone. Throughput (`tokens_per_s`, the median
of 5 further steps) is compared at V = 8,192, where the unfused step is not memory-bound.

Writes runs/bench/loss_memory.json and .md. Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from jobs.benchmarks.common import Target, machine, machine_line, missed, targets, write_report

B, L, V, SPEED_V, DRAWS, HIDDEN = 2, 1024, 131_072, 8_192, 25, 64
TARGETS = targets(
    Target("fused_kd_ce_peak_rise_gib", "<=", 0.5),
    Target("fused_kd_ce_over_fused_ce", "<=", 1.1),
    Target("fused_over_unfused_tokens_per_s_ce", ">=", 0.9),
    Target("fused_over_unfused_tokens_per_s_kd_ce", ">=", 0.9),
)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _task(loss: str, fused: bool, vocab: int):
    from pipeline.cache.manifest import Manifest
    from pipeline.config import TrainConfig
    from pipeline.student.tasks.tokens import TokenTask

    manifest = Manifest(
        cache_id="lossmem000000000", task="tokens", teachers={"teacher": {"factory": "pipeline.models.lm:lm_teacher"}},
        dataset={"kind": "text", "fingerprint": "f", "split": {"val_fraction": 0.1, "split_seed": 0}, "transform": "none",
                 "input_shape": [L]},
        outputs=[{"mode": "sampled", "teacher": "teacher", "columns": ["sampled_indices", "sampled_weights"],
                  "shape": [L, vocab], "k": DRAWS, "temperatures": [1.0], "seed": 0, "bytes_per_token": 1.0}],
        num_classes=vocab, input_shape=[L], rows=B, rows_by_split={"train": B, "val": 0}, columns={}, shards=[])
    terms = {"ce": 1.0} if loss == "ce" else {"kd": 0.5, "ce": 0.5}
    cfg = TrainConfig.model_validate({
        "cache": "c", "student": {"factory": "pipeline.models.lm:causal_lm",
                                  "kwargs": {"d_model": HIDDEN, "n_layers": 1, "n_heads": 2}},
        "loss": {"temperature": 1.0, "terms": terms, "fused_head": fused}})
    return TokenTask(cfg, manifest)


def one_row(loss: str, fused: bool, vocab: int, device: str) -> dict[str, Any]:
    """One step's peak memory rise and the throughput of further steps, in this process."""
    import torch

    from pipeline.student.train.step import train_step

    torch.manual_seed(0)
    dev = torch.device(device)
    task = _task(loss, fused, vocab)
    model = task.build_model().to(dev)
    assert task.fused == fused
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, vocab, (B, L + 1), generator=g), "length": torch.full((B,), L + 1),
             "sampled_indices": torch.randint(0, vocab, (B, L, DRAWS), generator=g),
             "sampled_weights": torch.full((B, L, DRAWS), 1.0 / DRAWS)}
    batch = {k: v.to(dev) for k, v in batch.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss()
    train_step(model, [batch], task, optimizer)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(5):
        started = time.perf_counter()
        train_step(model, [batch], task, optimizer)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {"loss": loss, "fused": fused, "V": vocab, "peak_rise_gib": max(peak - before, 0) / 2**30,
            "tokens_per_s": B * L / statistics.median(times)}


def _in_fresh_process(loss: str, fused: bool, vocab: int, device: str, chunk: int | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "jobs.benchmarks.lossmem", "--row", loss, "--fused", str(int(fused)),
           "--vocab", str(vocab), "--device", device, *(["--chunk-elements", str(chunk)] if chunk else [])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {loss:<5} fused={str(fused):<5} V={vocab:>7,}: peak rise {row['peak_rise_gib']:.3f} GiB, "
          f"{row['tokens_per_s']:,.0f} tokens/s", flush=True)
    return row


def report(rows: list[dict[str, Any]], speed: list[dict[str, Any]], m: dict[str, Any], command: str) -> dict[str, Any]:
    def at(table, loss, fused):
        return next(r for r in table if r["loss"] == loss and r["fused"] == fused)

    values = {
        "fused_kd_ce_peak_rise_gib": at(rows, "kd_ce", True)["peak_rise_gib"],
        "fused_kd_ce_over_fused_ce": at(rows, "kd_ce", True)["peak_rise_gib"] / max(at(rows, "ce", True)["peak_rise_gib"], 1e-9),
        **{f"fused_over_unfused_tokens_per_s_{loss}": at(speed, loss, True)["tokens_per_s"] / at(speed, loss, False)["tokens_per_s"]
           for loss in ("ce", "kd_ce")},
    }
    return {"B": B, "L": L, "V": V, "rows": rows, "speed": {"V": SPEED_V, "rows": speed}, **values,
            "targets": {t.name: {"value": t.threshold, "kind": t.kind} for t in TARGETS.values()},
            "missed": missed(values, TARGETS), "device": machine_line(m), "machine": m, "command": command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def markdown(r: dict[str, Any]) -> str:
    lines = [f"Token-loss step memory at B = {r['B']}, L = {r['L']:,}, V = {r['V']:,} ({r['device']}); each row a fresh process.", "",
             "| loss | fused head | peak rise | tokens/s | tokens/s at V = 8,192 |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        fast = next(s for s in r["speed"]["rows"] if s["loss"] == row["loss"] and s["fused"] == row["fused"])
        lines.append(f"| {row['loss']} | {'yes' if row['fused'] else 'no'} | **{row['peak_rise_gib']:.3f} GiB** | "
                     f"{row['tokens_per_s']:,.0f} | {fast['tokens_per_s']:,.0f} |")
    lines += ["", f"Fused kd_ce ÷ fused ce peak rise: **{r['fused_kd_ce_over_fused_ce']:.2f}**; fused ÷ unfused tokens/s at "
              f"V = 8,192: ce **{r['fused_over_unfused_tokens_per_s_ce']:.2f}**, kd_ce **{r['fused_over_unfused_tokens_per_s_kd_ce']:.2f}**."]
    if r["missed"]:
        lines += ["", "Missed: " + "; ".join(r["missed"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    parser.add_argument("--row", choices=("ce", "kd_ce"), help=argparse.SUPPRESS)  # one row, in this process
    parser.add_argument("--fused", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=V, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-elements", type=int, help="logits a fused chunk holds (default: the loss's own)")
    args = parser.parse_args(argv)
    if args.chunk_elements:
        from pipeline.student.losses import fused

        fused.CHUNK_ELEMENTS = args.chunk_elements
    if args.row:
        print(json.dumps(one_row(args.row, bool(args.fused), args.vocab, args.device)))
        return 0
    m = machine()
    print(f"bench-lossmem: one training step per fresh process on {args.device}", flush=True)
    c = args.chunk_elements
    rows = [_in_fresh_process(loss, fused, V, args.device, c) for loss in ("ce", "kd_ce") for fused in (False, True)]
    speed = [_in_fresh_process(loss, fused, SPEED_V, args.device, c) for loss in ("ce", "kd_ce") for fused in (False, True)]
    command = " ".join(["python -m jobs.benchmarks.lossmem", *(sys.argv[1:] if argv is None else argv)])
    r = report(rows, speed, m, command)
    table = markdown(r)
    write_report(args.out, "loss_memory", r, table)
    print("\n" + table + f"\nwrote {args.out}/loss_memory.json and {args.out}/loss_memory.md")
    if r["missed"]:
        print("BENCHMARK TARGET MISSED: " + "; ".join(r["missed"]), file=sys.stderr)
        return 1
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
