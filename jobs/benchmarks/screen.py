"""`make bench-screen`: which sparse token signal to train with, measured without training anything.

On a trained causal-LM teacher's distributions over held-out standard-library text, each stored
signal's error against the full teacher distribution p at equal bytes per token (25, 50, 100):

- squared error E||p_hat - p||^2: for a signal whose weights sum to 1 it is exactly the mean
  squared error of the soft cross-entropy gradient against the full-KD gradient (q - w vs q - p),
  whatever the student q; for priority sampling it adds the (sum w - 1) q term's spread;
- KL(p_hat_norm || p) of the renormalised estimate (finite: its support is inside p's), and the
  share of p's mass on the tokens stored.

Top-k stores its k logits exactly (uint8 offsets, 3 B a token each plus 4 B of log-normaliser) and
its rest mass exactly, spread uniformly here (`loss.topk_tail: uniform`): its error is all bias,
the same at every position of a context and so never averaged away by training, where the
sampled signals' error is all variance (they are unbiased). The squared error ranks the unbiased
signals against each other; whether a biased signal's smaller error trains better only training
can say (`make bench-topk`).
The sampled signals store distinct ids (uint16) and float16 weights, 4 B a slot. Bytes are raw
column bytes before Parquet compression (which saves 20 to 50% on real caches).

Writes runs/bench/screen.json and runs/bench/screen.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

from pipeline.cache.schema import INPUT_IDS, LENGTH
from pipeline.config import ModelSpec
from pipeline.data.sources import describe, load_split
from pipeline.models.factory import build_model
from pipeline.teacher.estimators import dense, estimate

from jobs.benchmarks.common import machine, write_report
from jobs.benchmarks.textteacher import TEACHER, teacher_config

BUDGETS = (25, 50, 100)


def signals(budget: int) -> list[tuple[str, int, int]]:
    """(signal, k, head) that fit `budget` raw bytes per token."""
    slots = budget // 4  # uint16 id + float16 weight
    topk = (budget - 4) // 3  # uint8 offset + uint16 id, plus a float32 log-normaliser
    return [("topk-uniform", topk, 0), ("multinomial", slots, 0), ("priority", slots, 0),
            ("head_tail", slots, slots // 4), ("head_tail", slots, slots // 2)]


def topk_uniform(p: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k probabilities exactly, the rest mass spread evenly over the other tokens."""
    top = torch.topk(p, k, dim=-1)
    rest = (1 - top.values.sum(-1, keepdim=True)).clamp_min(0) / (p.shape[-1] - k)
    return torch.full_like(p, 0).add_(rest).scatter_(-1, top.indices, top.values)


def errors(p: torch.Tensor, p_hat: torch.Tensor, ids: torch.Tensor | None = None) -> dict[str, float]:
    sq = ((p_hat - p) ** 2).sum(-1)
    norm = p_hat / p_hat.sum(-1, keepdim=True)
    kl = torch.where(norm > 0, norm * (norm.clamp_min(1e-300).log() - p.clamp_min(1e-300).log()), torch.zeros_like(norm)).sum(-1)
    covered = (p * (p_hat > 0)).sum(-1)
    return {"sq_error": float(sq.mean()), "sq_error_se": float(sq.std() / math.sqrt(len(sq))),
            "kl_norm": float(kl.mean()), "mass_covered": float(covered.mean())}


@torch.inference_mode()
def teacher_distributions(teacher: torch.nn.Module, val: dict[str, np.ndarray], positions: int) -> torch.Tensor:
    """softmax(z) (N, V) in float64 at the real target positions of the held-out windows."""
    out, n = [], 0
    for i in range(0, len(val[INPUT_IDS]), 32):
        ids = torch.from_numpy(val[INPUT_IDS][i:i + 32].astype(np.int64))
        mask = torch.arange(ids.shape[1] - 1)[None, :] < torch.from_numpy(val[LENGTH][i:i + 32].astype(np.int64))[:, None] - 1
        out.append(torch.softmax(teacher(ids[:, :-1]).double(), -1)[mask])
        n += int(mask.sum())
        if n >= positions:
            break
    return torch.cat(out)[:positions]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--teacher-bytes", type=int, default=8_000_000, help="stdlib prefix the tokenizer and teacher learn from")
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary of the tokenizer and teacher")
    parser.add_argument("--positions", type=int, default=4096, help="held-out token positions screened")
    parser.add_argument("--repeats", type=int, default=4, help="independent draws per position for the sampled signals")
    args = parser.parse_args(argv)
    work = os.path.join(args.out, "topk")  # the teacher and tokenizer `make bench-topk` trains, shared
    os.makedirs(work, exist_ok=True)
    cfg = teacher_config(work, args.teacher_bytes, args.teacher_epochs, args.vocab)
    weights = cfg.teacher.weights
    info = describe(cfg.source)
    teacher = build_model(ModelSpec.model_validate({**TEACHER, "weights": weights}), input_shape=(64,), num_classes=info.num_classes).eval()
    p = teacher_distributions(teacher, load_split(cfg.source, "val"), args.positions)
    entropy = float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean())
    print(f"== {len(p)} held-out positions, vocabulary {p.shape[-1]}, teacher entropy {entropy:.2f} nats ==", flush=True)

    rows = []
    for budget in BUDGETS:
        for name, k, head in signals(budget):
            if name == "topk-uniform":
                row = errors(p, topk_uniform(p, k))
                row["mass_covered"] = float(torch.topk(p, k, dim=-1).values.sum(-1).mean())  # the k stored exactly
            else:
                g = torch.Generator().manual_seed(0)
                parts = [errors(p, dense(*estimate(p, name, k, head, g), p.shape[-1])) for _ in range(args.repeats)]
                row = {key: float(np.mean([r[key] for r in parts])) for key in parts[0]}
                row["sq_error_se"] /= math.sqrt(args.repeats)
            rows.append({"budget": budget, "signal": name, "k": k, "head": head, **row})
            print(json.dumps(rows[-1]), flush=True)
    m = machine()
    report = {"host": m["host"], "machine": m, "vocab": p.shape[-1], "positions": len(p), "teacher_entropy_nats": entropy,
              "teacher": {"factory": TEACHER["factory"], "bytes": args.teacher_bytes, "epochs": args.teacher_epochs}, "rows": rows}
    lines = [f"Teacher `lm_teacher` ({args.teacher_bytes / 1e6:.1f} MB, {args.teacher_epochs} epoch), vocabulary {p.shape[-1]}, "
             f"{len(p)} held-out positions, mean entropy {entropy:.2f} nats.", "",
             "| bytes/token | signal | k (head) | squared error E‖p̂−p‖² | KL(p̂ renormalised ‖ p) | p mass on stored ids |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        kind = f"{r['k']} ({r['head']})" if r["signal"] == "head_tail" else str(r["k"])
        lines.append(f"| {r['budget']} | {r['signal']} | {kind} | {r['sq_error']:.4f} ± {r['sq_error_se']:.4f} | "
                     f"{r['kl_norm']:.3f} | {100 * r['mass_covered']:.1f}% |")
    table = "\n".join(lines) + "\n"
    write_report(args.out, "screen", report, table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
