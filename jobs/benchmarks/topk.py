"""`make bench-topk`: how faithful top-k and sampled token caches are, against full logits.

A BPE vocabulary of 8,192 and a causal-LM teacher (`lm_teacher`) are trained locally on a
prefix of Python's standard library sources; then, over a smaller prefix (the cache corpus,
split by document), one cache per mode: full logits, top-k with k in {8, 32, 64} (uint8 values
below each token's max, exact logsumexp at T = 1), sampled KD (k = 32 draws) and the hard-label
baseline read from the full cache. The same student (`lm_small`), seed and schedule trains from
each through the real pipeline (Ray Train); then, in this process, val perplexity on the
held-out documents and top-1 agreement with the teacher.

Writes runs/bench/topk_fidelity.json and topk_fidelity.md. Exits 1 when the target (top-32
within 1% of full-logit KD perplexity at no more than 100 bytes per token) is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

from pipeline import storage
from pipeline.cache.schema import INPUT_IDS, LENGTH, TOPK_INDICES, TOPK_LSE, TOPK_VALUES
from pipeline.config import ModelSpec, PrecomputeConfig, TrainConfig
from pipeline.data.sources import describe, load_split
from pipeline.data.corpus import read_documents
from pipeline.data.tokenizer import save_tokenizer, train_bpe
from pipeline.models.factory import build_model
from pipeline.student.token_losses import topk_kd_loss
from pipeline.student.run import run_train
from pipeline.teacher.encode import encode_topk
from pipeline.teacher.fit import fit_teacher
from pipeline.teacher.precompute import run_precompute

TEACHER = {"factory": "pipeline.models.lm:lm_teacher"}
STUDENT = {"factory": "pipeline.models.lm:lm_small"}
# (mode, k, top-k tail): `bucket` is the exact k+1-bucket KL, `uniform` spreads the exact rest mass evenly.
MODES = [("full", None, None), ("topk", 8, "bucket"), ("topk", 32, "bucket"), ("topk", 32, "uniform"), ("topk", 64, "bucket"),
         ("sampled", 32, None), ("hard", None, None)]


def _source(max_bytes: int, tokenizer_uri: str, seq_len: int) -> dict:
    return {"kind": "text", "seq_len": seq_len, "val_fraction": 0.1, "max_bytes": max_bytes, "tokenizer": {"uri": tokenizer_uri}}


def _logits_spec(mode: str, k: int | None) -> dict:
    if mode in ("full", "hard"):
        return {"mode": "full", "dtype": "float16"}
    if mode == "topk":
        return {"mode": "topk", "k": k, "temperatures": [1.0], "values": "uint8"}
    return {"mode": "sampled", "k": k, "temperatures": [1.0], "seed": 0}


@torch.inference_mode()
def _evaluate(student: torch.nn.Module, teacher: torch.nn.Module, val: dict[str, np.ndarray]) -> dict[str, float]:
    """Perplexity on the real held-out text and top-1 agreement with the teacher, over real targets."""
    nll, agree, tokens = 0.0, 0, 0
    for i in range(0, len(val[INPUT_IDS]), 64):
        ids = torch.from_numpy(val[INPUT_IDS][i:i + 64].astype(np.int64))
        mask = torch.arange(ids.shape[1] - 1)[None, :] < torch.from_numpy(val[LENGTH][i:i + 64].astype(np.int64))[:, None] - 1
        s = student(ids[:, :-1]).float()
        t = teacher(ids[:, :-1]).float()
        nll += float((torch.nn.functional.cross_entropy(s.transpose(1, 2), ids[:, 1:], reduction="none") * mask).sum())
        agree += int(((s.argmax(-1) == t.argmax(-1)) & mask).sum())
        tokens += int(mask.sum())
    return {"val_perplexity": math.exp(nll / tokens), "agreement": agree / tokens, "val_tokens": tokens}


@torch.inference_mode()
def _quantisation_error(teacher: torch.nn.Module, student: torch.nn.Module, val: dict[str, np.ndarray], k: int) -> dict:
    """What uint8 values add: the bucket KL of a trained student against float16 vs uint8 top-k."""
    ids = torch.from_numpy(val[INPUT_IDS][:64].astype(np.int64))
    mask = torch.arange(ids.shape[1] - 1)[None, :] < torch.from_numpy(val[LENGTH][:64].astype(np.int64))[:, None] - 1
    z, s = teacher(ids[:, :-1]).float(), student(ids[:, :-1]).float()
    out = {}
    for values in ("float16", "uint8"):
        enc = {c: torch.from_numpy(v.astype(np.int64 if c == TOPK_INDICES else np.float32))
               for c, v in encode_topk(z, k, [1.0], values).items()}
        out[values] = float(topk_kd_loss(s, enc[TOPK_INDICES], enc[TOPK_VALUES], enc[TOPK_LSE][..., 0], mask, 1.0,
                                         quantised_step=1 / 16 if values == "uint8" else None))
    return {"k": k, "bucket_kl_float16": out["float16"], "bucket_kl_uint8": out["uint8"],
            "relative_error": abs(out["uint8"] - out["float16"]) / max(out["float16"], 1e-12)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--teacher-bytes", type=int, default=4_000_000, help="stdlib prefix the tokenizer and teacher learn from")
    parser.add_argument("--cache-bytes", type=int, default=600_000, help="stdlib prefix the caches and students cover")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8, help="small batches: the cache corpus is small, the student needs steps")
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work = os.path.join(args.out, "topk")
    os.makedirs(work, exist_ok=True)
    started = time.time()

    tok_uri = os.path.abspath(os.path.join(work, f"tokenizer-{args.teacher_bytes}.json"))
    if not storage.exists(tok_uri):
        print(f"== BPE 8192 on the first {args.teacher_bytes / 1e6:.1f} MB of the standard library ==", flush=True)
        save_tokenizer(train_bpe(read_documents(None, max_bytes=args.teacher_bytes), vocab_size=8192), tok_uri)
    weights = os.path.abspath(os.path.join(work, f"lm_teacher-{args.teacher_bytes}-{args.teacher_epochs}.pt"))
    fit_cfg = PrecomputeConfig.model_validate({
        "source": _source(args.teacher_bytes, tok_uri, args.seq_len),
        "teacher": {**TEACHER, "weights": weights, "fit": {"epochs": args.teacher_epochs, "lr": 0.002, "batch_size": 32, "shift": 0}},
        "cache_root": os.path.join(work, "cache"),
    })
    if not storage.exists(weights):
        print("== fitting the teacher ==", flush=True)
        fit_teacher(fit_cfg)
    vocab = describe(fit_cfg.source).num_classes

    rows, students = [], {}
    cache_source = _source(args.cache_bytes, tok_uri, args.seq_len)
    for mode, k, tail in MODES:
        pre = PrecomputeConfig.model_validate({
            "source": cache_source, "teacher": {**TEACHER, "weights": weights}, "outputs": {"logits": _logits_spec(mode, k)},
            "cache_root": os.path.join(work, "cache"), "batch_size": 32,
        })
        print(f"== {mode} k={k}: cache ==", flush=True)
        cache = run_precompute(pre)
        name = f"{mode}{k or ''}{'-uniform' if tail == 'uniform' else ''}"
        cfg = TrainConfig.model_validate({
            "name": name, "cache": cache.uri, "student": STUDENT,
            "loss": {"temperature": 1.0, "terms": {"ce": 1.0} if mode == "hard" else {"kd": 0.5, "ce": 0.5},
                     "topk_tail": tail or "bucket"},
            "optimizer": {"name": "adamw", "lr": args.lr, "weight_decay": 0.01}, "epochs": args.epochs, "batch_size": args.batch_size,
            "num_workers": 1, "cpus_per_worker": 1, "storage_path": os.path.abspath(os.path.join(work, "runs")),
            "seed": args.seed,
        })
        print(f"== {name}: student ==", flush=True)
        result = run_train(cfg, overwrite=True).result
        bpt = 0.0 if mode == "hard" else float(cache.manifest.logits().bytes_per_token)
        rows.append({"mode": mode, "k": k, "tail": tail, "bytes_per_token": round(bpt, 2), "weights": result["weights"],
                     "train_tokens": None, "wall_s": result["wall_s"]})
        students[name] = result["weights"]

    teacher = build_model(fit_cfg.teacher, input_shape=(args.seq_len,), num_classes=vocab).eval()
    val = load_split(PrecomputeConfig.model_validate({"source": cache_source, "teacher": fit_cfg.teacher.model_dump()}).source, "val")
    train = load_split(PrecomputeConfig.model_validate({"source": cache_source, "teacher": fit_cfg.teacher.model_dump()}).source, "train")
    teacher_eval = _evaluate(teacher, teacher, val)
    for row in rows:
        student = build_model(ModelSpec(**STUDENT, weights=row.pop("weights")), input_shape=(args.seq_len,), num_classes=vocab).eval()
        row.update({key: round(v, 4) for key, v in _evaluate(student, teacher, val).items() if key != "val_tokens"})
        row["train_tokens"] = int(np.clip(train[LENGTH] - 1, 0, None).sum())
        if row["mode"] == "full":
            full_student = student
    full_ppl = next(r["val_perplexity"] for r in rows if r["mode"] == "full")
    for row in rows:
        row["perplexity_over_full"] = round(row["val_perplexity"] / full_ppl, 4)
    top32 = min((r for r in rows if r["mode"] == "topk" and r["k"] == 32), key=lambda r: r["val_perplexity"])
    target = {"topk32_perplexity_over_full_max": 1.01, "topk32_bytes_per_token_max": 100.0,
              "met": top32["perplexity_over_full"] <= 1.01 and top32["bytes_per_token"] <= 100.0}
    summary = {
        "vocab_size": vocab,
        "rows": rows,
        "teacher": {"factory": TEACHER["factory"], "val_perplexity": round(teacher_eval["val_perplexity"], 3),
                    "train_bytes": args.teacher_bytes, "epochs": args.teacher_epochs},
        "student": STUDENT["factory"], "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "seq_len": args.seq_len,
        "cache_bytes": args.cache_bytes, "val_tokens": teacher_eval["val_tokens"],
        "quantisation": _quantisation_error(teacher, full_student, val, 32),
        "target": target,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, no GPU",
        "command": "make bench-topk",
        "wall_s": round(time.time() - started, 1),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "topk_fidelity.json"), "w") as f:
        json.dump(summary, f, indent=2)
    md = [f"Vocabulary {vocab}; teacher `lm_teacher` at val perplexity {summary['teacher']['val_perplexity']:.2f}; "
          f"student `lm_small`, {args.epochs} epochs on {rows[0]['train_tokens']} tokens, seed {args.seed}; "
          f"{teacher_eval['val_tokens']} held-out tokens.", "",
          "| mode | k | top-k tail | bytes/token | val perplexity | vs full | agreement with teacher |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['mode']} | {r['k'] or '-'} | {r['tail'] or '-'} | {r['bytes_per_token']:.1f} | {r['val_perplexity']:.2f} | "
                  f"{r['perplexity_over_full']:.3f} | {100 * r['agreement']:.2f}% |")
    q = summary["quantisation"]
    md += ["", f"uint8 values (step 1/16) change the top-32 bucket KL by {100 * q['relative_error']:.2f}% "
               f"({q['bucket_kl_float16']:.4f} float16 vs {q['bucket_kl_uint8']:.4f} uint8).",
           f"Target (top-32 within 1% of full at <= 100 bytes/token): {'met' if target['met'] else 'MISSED'}."]
    with open(os.path.join(args.out, "topk_fidelity.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    import ray

    ray.shutdown()
    print("\n".join(md))
    print(f"\nwrote {args.out}/topk_fidelity.json and topk_fidelity.md in {summary['wall_s']:.0f}s")
    if not target["met"]:
        print(f"FAILED: the best top-32 ({top32['tail']} tail) is {top32['perplexity_over_full']:.3f}x full-logit perplexity at {top32['bytes_per_token']:.1f} "
              "bytes/token (target <= 1.01x at <= 100)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
