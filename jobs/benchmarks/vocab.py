"""`make bench-vocab`: at a 32k vocabulary, how much of online full-logit KD the cached default signal keeps.

A 32,768-token byte-level BPE is trained on the Python sources of the standard library and the
installed packages (`--tokenizer-bytes`, 32 MB), and a causal-LM teacher (`lm_teacher`) on a
prefix of the standard library. Every arm trains the same student (`lm_small`, the fused head
losses) from the same init, on the same rows in the same order (one pass over a smaller prefix,
the cache corpus), with the same optimizer and schedule, by the product's own step
(`train_step`, `TokenTask`):

- `hard`: next-token cross-entropy only;
- `online_full`: the reference, the teacher's full logits computed in the loop for each batch
  (no cache: full logits at 32k are 64 kB a token), kd 0.5 + ce 0.5 at T = 1;
- `sampled`: the default cache signal (25 multinomial draws), same loss;
- the best other signal at the same raw budget (100 bytes a token) by `make bench-screen`'s squared
  error, measured here on the selection split.

Three document-level splits, none of whose documents the teacher or any student trains on:
the selection split (the cache corpus's held-out documents) picks the other signal; the test
split (held-out documents from the rest of the standard library, at least `--test-tokens`) is the
only one reported. Per seed the arms are paired: the same student init and row order, the
order's digest recorded per row (paired arms must match; the bench fails if they do not). Per
arm, relative to online full KD: the log-perplexity difference ln(ppl) / ln(ppl_online) - 1 and
the share of the KD gain recovered, (ln ppl_hard - ln ppl) / (ln ppl_hard - ln ppl_online), each
with a 95% t-interval over seeds. Target: the sampled default within 1% of online full KD in mean
log-perplexity, its interval inside ±2%.

The student loop is this bench's (the online arm cannot go through a cache); `make bench-topk`
runs signals through the Ray Train pipeline at 2,048 tokens. Finished runs are kept under
runs/bench/vocab/ and reused when their config is unchanged. Writes runs/bench/vocab_fidelity.json
and .md; exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.cache.manifest import FullLogitsRecord, Manifest, read_manifest
from pipeline.cache.schema import INPUT_IDS, LENGTH, LOGITS, SAMPLE_ID
from pipeline.cache.shards import list_shard_files, split_of_shard
from pipeline.cache.tensors import table_to_numpy
from pipeline.config import ModelSpec, PrecomputeConfig, TrainConfig
from pipeline.data.corpus import read_documents, stdlib_root
from pipeline.data.sources import load_split
from pipeline.data.tokenizer import save_tokenizer, train_bpe
from pipeline.data.windows import doc_id_of
from pipeline.models.factory import build_model
from pipeline.student.tasks.tokens import TokenTask
from pipeline.student.train.schedule import lr_factor
from pipeline.student.train.step import make_optimizer, train_step
from pipeline.teacher.precompute import run_precompute

from jobs.benchmarks import screen
from jobs.benchmarks.common import Target, interval, machine, write_report
from jobs.benchmarks.textteacher import TEACHER, teacher_config, text_source

STUDENT = {"factory": "pipeline.models.lm:lm_small"}
T1 = {"temperatures": [1.0]}
DEFAULT_SIGNAL = {"mode": "sampled", "k": 25, **T1}
BUDGET = 100  # raw bytes a token of the default signal (uint16 id + float16 weight, 25 slots)
TARGET_MEAN, TARGET_INTERVAL = Target("sampled_log_ppl_vs_online", "<=", 0.01), 0.02


def tokenizer(work: str, vocab: int, max_bytes: int) -> str:
    """The BPE trained on the stdlib's and the installed packages' .py files (nothing downloaded)."""
    uri = os.path.abspath(os.path.join(work, f"tokenizer-py{max_bytes}-v{vocab}.json"))
    if not storage.exists(uri):
        packages = sysconfig.get_paths()["purelib"]
        print(f"== BPE {vocab} on {max_bytes / 1e6:.0f} MB of Python sources ({stdlib_root()}, {packages}) ==", flush=True)
        docs = read_documents([f"{stdlib_root()}/**/*.py", f"{packages}/**/*.py"], max_bytes=max_bytes)
        save_tokenizer(train_bpe(docs, vocab_size=vocab), uri)
    return uri


def read_rows(cache_uri: str, split: str = "train") -> dict[str, np.ndarray]:
    """One split of a cache with plain pyarrow, rows sorted by sample id."""
    parts = [table_to_numpy(pq.read_table(os.path.join(cache_uri, rel)))
             for rel in list_shard_files(cache_uri) if split_of_shard(rel) == split]
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(rows[SAMPLE_ID].astype(str), kind="stable")
    return {k: v[order] for k, v in rows.items()}


def test_split(tok_uri: str, seq_len: int, exclude: set[str], min_tokens: int, per_doc: int = 64) -> dict[str, np.ndarray]:
    """Held-out windows of the whole stdlib, minus the selection split's documents: the first
    `per_doc` windows of each document (so no few long files dominate), documents in hash order
    until `min_tokens` targets."""
    rows = load_split(PrecomputeConfig.model_validate({"source": text_source(None, tok_uri, seq_len), "teacher": TEACHER}).source, "val")
    docs = np.array([doc_id_of(s) for s in rows[SAMPLE_ID]])
    keep, tokens, used = np.zeros(len(docs), bool), 0, 0
    for d in sorted(set(docs) - exclude, key=lambda d: hashlib.blake2b(d.encode(), digest_size=8).digest()):
        at = np.flatnonzero(docs == d)[:per_doc]
        keep[at], used = True, used + 1
        tokens += int((rows[LENGTH][at] - 1).sum())
        if tokens >= min_tokens:
            break
    return {k: v[keep] for k, v in rows.items()} | {"documents": np.array(used)}


class OnlineTask(TokenTask):
    """Full-logit KD with the teacher in the loop: the full-logits loss of a full cache, its logits made per batch."""

    def __init__(self, cfg: TrainConfig, manifest: Manifest, teacher: torch.nn.Module) -> None:
        super().__init__(cfg, manifest)
        self.signal = FullLogitsRecord(columns=[LOGITS], teacher="teacher", dtype="float32",
                                       shape=[int(manifest.input_shape[0]), manifest.num_classes])
        self.teacher = teacher

    def columns(self) -> list[str]:
        return [INPUT_IDS, LENGTH]

    def losses(self, output: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # not inference_mode: its tensors could not enter the student's autograd graph uncopied
            logits = self.teacher(self.model_inputs(batch)).float()
        return super().losses(output, {**batch, LOGITS: logits})


def train_arm(task: TokenTask, rows: dict[str, np.ndarray], cfg: TrainConfig, seed: int) -> tuple[torch.nn.Module, str]:
    """One pass over the rows in the seed's order; returns the student and the digest of that order."""
    torch.manual_seed(seed)
    model = task.build_model()
    order = np.random.default_rng(seed).permutation(len(rows[SAMPLE_ID]))
    digest = hashlib.sha256("\n".join(rows[SAMPLE_ID][order].astype(str)).encode()).hexdigest()[:16]
    opt = cfg.optimizer
    optimizer = make_optimizer(model.parameters(), opt.name, opt.lr, opt.weight_decay)
    steps = len(order) // cfg.batch_size
    dtypes = task.dtypes()
    started = time.time()
    for step in range(steps):
        for g in optimizer.param_groups:
            g["lr"] = opt.lr * lr_factor(step, steps, opt.warmup_steps, opt.schedule)
        at = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        batch = {c: torch.from_numpy(np.ascontiguousarray(rows[c][at])).to(dtypes[c]) for c in task.columns()}
        parts, _, _ = train_step(model, [batch], task, optimizer, clip=opt.grad_clip)
        if step % 50 == 0 or step == steps - 1:
            print(f"    step {step + 1}/{steps} loss {float(parts['loss']):.3f} ({time.time() - started:.0f}s)", flush=True)
    return model, digest


def perplexity(task: TokenTask, model: torch.nn.Module, rows: dict[str, np.ndarray]) -> float:
    n = task.eval_batch_size
    batches = ({c: torch.from_numpy(rows[c][i:i + n].astype(np.int64)) for c in (INPUT_IDS, LENGTH)}
               for i in range(0, len(rows[INPUT_IDS]), n))
    return float(task.evaluate(model, batches)["val_perplexity"])


def choose_other(teacher: torch.nn.Module, selection: dict[str, np.ndarray], positions: int) -> tuple[str, dict, str, list[dict]]:
    """The lowest squared error at BUDGET bytes among the signals other than the default, on the selection split."""
    p = screen.teacher_distributions(teacher, selection, positions)
    rows = []
    for name, k, head in screen.signals(BUDGET):
        if name == "topk-uniform":
            err = screen.errors(p, screen.topk_uniform(p, k))
        else:
            err = screen.errors(p, screen.dense(*screen.estimate(p, name, k, head, torch.Generator().manual_seed(0)), p.shape[-1]))
        rows.append({"signal": name, "k": k, "head": head, **err})
        print(f"  screen {name} k={k} head={head}: squared error {err['sq_error']:.4f}", flush=True)
    best = min((r for r in rows if r["signal"] != "multinomial"), key=lambda r: r["sq_error"])
    k, head = best["k"], best["head"]
    if best["signal"] == "topk-uniform":
        return f"topk{k}-uniform", {"mode": "topk", "k": k, "values": "uint8", **T1}, "uniform", rows
    extra = {"head": head} if head else {}
    label = f"{best['signal']}{k}" + (f"-{head}" if head else "")
    return label, {"mode": "sampled", "k": k, "estimator": best["signal"], **extra, **T1}, "bucket", rows


def code_version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "pipeline", "jobs"], capture_output=True, text=True).stdout.strip()
        return rev + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import version

        return "distill " + version("distill-pipeline")


def train_config(name: str, cache_uri: str, seed: int, args: argparse.Namespace, tail: str) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": name, "cache": cache_uri, "student": STUDENT, "seed": seed, "epochs": 1, "batch_size": args.batch_size,
        "loss": {"temperature": 1.0, "terms": {"ce": 1.0} if name.startswith("hard") else {"kd": 0.5, "ce": 0.5}, "topk_tail": tail},
        "optimizer": {"name": "adamw", "lr": args.lr, "weight_decay": 0.01, "schedule": "cosine", "warmup_steps": args.warmup,
                      "grad_clip": 1.0},
        "num_workers": 1, "storage_path": os.path.abspath(os.path.join(args.out, "vocab", "runs"))})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--vocab", type=int, default=32_768)
    parser.add_argument("--tokenizer-bytes", type=int, default=32_000_000, help="Python sources the BPE learns from")
    parser.add_argument("--teacher-bytes", type=int, default=1_200_000, help="stdlib prefix the teacher learns from")
    parser.add_argument("--cache-bytes", type=int, default=400_000, help="stdlib prefix the caches and students cover")
    parser.add_argument("--test-tokens", type=int, default=100_000, help="held-out target tokens the arms are reported on")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--screen-positions", type=int, default=2048)
    args = parser.parse_args(argv)
    work = os.path.join(args.out, "vocab")
    os.makedirs(work, exist_ok=True)
    started = time.time()
    torch.set_num_threads(os.cpu_count() or 1)

    tok_uri = tokenizer(work, args.vocab, args.tokenizer_bytes)
    fit_cfg = teacher_config(work, args.teacher_bytes, 1, args.vocab, args.seq_len, tokenizer_uri=tok_uri)
    cache_source = text_source(args.cache_bytes, tok_uri, args.seq_len)
    selection = load_split(PrecomputeConfig.model_validate({"source": cache_source, "teacher": TEACHER}).source, "val")
    test = test_split(tok_uri, args.seq_len, {doc_id_of(s) for s in selection[SAMPLE_ID]}, args.test_tokens)
    test_tokens, test_docs = int((test[LENGTH] - 1).sum()), int(test.pop("documents"))
    print(f"== test split: {test_tokens:,} tokens from {test_docs} held-out documents; selection split: "
          f"{int((selection[LENGTH] - 1).sum()):,} tokens ==", flush=True)

    def cache(spec: dict) -> Any:
        return run_precompute(PrecomputeConfig.model_validate({
            "source": cache_source, "teacher": {**TEACHER, "weights": fit_cfg.teacher.weights}, "outputs": {"logits": spec},
            "cache_root": os.path.join(work, "cache"), "batch_size": 32}))

    first = cache({**DEFAULT_SIGNAL, "seed": 0})
    vocab = first.manifest.num_classes
    teacher = build_model(ModelSpec.model_validate({**TEACHER, "weights": fit_cfg.teacher.weights}),
                          input_shape=(args.seq_len,), num_classes=vocab).eval()
    other, other_spec, other_tail, screened = choose_other(teacher, selection, args.screen_positions)
    print(f"== best other signal at {BUDGET} bytes a token on the selection split: {other} ==", flush=True)

    done_path = os.path.join(work, "arms.json")
    done = json.load(open(done_path)) if os.path.exists(done_path) else {}
    rows_out, teacher_ppl = [], None
    for seed in range(args.seeds):
        default = first if seed == 0 else cache({**DEFAULT_SIGNAL, "seed": seed})
        alt = cache({**other_spec, "seed": seed} if other_spec["mode"] == "sampled" else other_spec)
        base = read_rows(default.uri)
        for arm, made, tail in (("hard", default, "bucket"), ("online_full", default, "bucket"),
                                ("sampled", default, "bucket"), (other, alt, other_tail)):
            cfg = train_config(f"{'hard' if arm == 'hard' else arm}-{seed}", made.uri, seed, args, tail)
            key = hashlib.sha256(json.dumps([cfg.model_dump(mode="json"), made.manifest.cache_id, test_tokens]).encode()).hexdigest()
            if done.get(f"{arm}/{seed}", {}).get("key") == key:
                rows_out.append(done[f"{arm}/{seed}"]["row"])
                print(f"== seed {seed} {arm}: already trained with this config ==", flush=True)
                continue
            manifest = read_manifest(made.uri)
            rows = base if made is default else read_rows(made.uri)
            if not np.array_equal(rows[SAMPLE_ID], base[SAMPLE_ID]):
                raise SystemExit(f"cache {made.uri} holds other rows than {default.uri}: the arms would not be paired")
            task = OnlineTask(cfg, manifest, teacher) if arm == "online_full" else TokenTask(cfg, manifest)
            print(f"== seed {seed} {arm}: training on {len(rows[SAMPLE_ID]):,} windows ==", flush=True)
            t0 = time.time()
            model, digest = train_arm(task, rows, cfg, seed)
            wall = time.time() - t0
            if teacher_ppl is None:
                teacher_ppl = perplexity(task, teacher, test)
            row = {"arm": arm, "seed": seed, "split": "test", "val_perplexity": round(perplexity(task, model, test), 4),
                   "selection_perplexity": round(perplexity(task, model, selection), 4),
                   "bytes_per_token": 0.0 if arm in ("hard", "online_full") else float(manifest.logits().bytes_per_token),
                   "order_digest": digest, "wall_s": round(wall, 1), "cache_id": made.manifest.cache_id}
            print(json.dumps(row), flush=True)
            done[f"{arm}/{seed}"] = {"key": key, "row": row}
            with open(done_path, "w") as f:
                json.dump(done, f, indent=1)
            rows_out.append(row)

    for seed in range(args.seeds):
        digests = {r["order_digest"] for r in rows_out if r["seed"] == seed}
        if len(digests) != 1:
            raise SystemExit(f"seed {seed}: the arms trained on different row orders {sorted(digests)}")
    arms = list(dict.fromkeys(r["arm"] for r in rows_out))
    logppl = {a: np.log([r["val_perplexity"] for r in sorted(rows_out, key=lambda r: r["seed"]) if r["arm"] == a]) for a in arms}
    ref, hard = logppl["online_full"], logppl["hard"]
    stats = {}
    for a in arms:
        rel = interval(logppl[a] / ref - 1)
        rec = interval((hard - logppl[a]) / (hard - ref))
        stats[a] = {"val_perplexity_mean": float(np.exp(logppl[a]).mean()), "log_ppl_vs_online": rel[0],
                    "log_ppl_vs_online_ci95": [rel[1], rel[2]], "kd_gain_recovered": rec[0], "kd_gain_recovered_ci95": [rec[1], rec[2]],
                    "bytes_per_token": float(np.mean([r["bytes_per_token"] for r in rows_out if r["arm"] == a]))}
    s = stats["sampled"]
    met = TARGET_MEAN.met(abs(s["log_ppl_vs_online"])) and all(abs(x) <= TARGET_INTERVAL for x in s["log_ppl_vs_online_ci95"])
    report = {
        "vocab_size": vocab, "rows": rows_out, "arms": stats, "other_signal": {"name": other, "spec": other_spec, "screen": screened},
        "target": {"sampled_mean_within": TARGET_MEAN.threshold, "sampled_ci95_within": TARGET_INTERVAL, "met": met},
        "splits": {"test": {"tokens": test_tokens, "documents": test_docs},
                   "selection": {"tokens": int((selection[LENGTH] - 1).sum()), "documents": len({doc_id_of(x) for x in selection[SAMPLE_ID]})},
                   "train": {"windows": int(len(base[SAMPLE_ID])), "tokens": int((base[LENGTH] - 1).sum())}},
        "teacher": {"factory": TEACHER["factory"], "train_bytes": args.teacher_bytes, "test_perplexity": round(teacher_ppl or math.nan, 3)},
        "student": STUDENT["factory"], "seeds": args.seeds, "tokenizer_bytes": args.tokenizer_bytes,
        "command": "make bench-vocab" + (f" ARGS='{' '.join(argv)}'" if argv else ""), "code_version": code_version(),
        "machine": machine(), "wall_s": round(time.time() - started, 1)}
    md = [f"Vocabulary {vocab:,}; teacher `lm_teacher` ({args.teacher_bytes / 1e6:.1f} MB of the stdlib) at test perplexity "
          f"{report['teacher']['test_perplexity']}; student `lm_small`, one pass over {report['splits']['train']['tokens']:,} tokens; "
          f"{args.seeds} paired seeds; reported on the test split ({test_tokens:,} tokens, {test_docs} documents); "
          f"the other signal ({other}) chosen on the selection split. Intervals are 95% t-intervals over seeds.", "",
          "| arm | bytes/token (stored) | test perplexity | log-ppl vs online full KD | KD gain recovered |", "|---|---|---|---|---|"]
    for a, r in stats.items():
        ci, rc = r["log_ppl_vs_online_ci95"], r["kd_gain_recovered_ci95"]
        md.append(f"| {a} | {r['bytes_per_token']:.1f} | {r['val_perplexity_mean']:.2f} | {100 * r['log_ppl_vs_online']:+.2f}% "
                  f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] | {100 * r['kd_gain_recovered']:.1f}% [{100 * rc[0]:.1f}, {100 * rc[1]:.1f}] |")
    md += ["", f"Target (the sampled default within 1% of online full KD in mean log-perplexity, its interval within 2%): "
               f"{'met' if met else 'MISSED'}.", ""]
    write_report(args.out, "vocab_fidelity", report, "\n".join(md))
    print("\n".join(md))
    import ray

    ray.shutdown()
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
