"""Stage 1 of a language-model teacher at real vocabularies (`make bench ARGS="--only lm_vocab"`).

For V = 2,048, 32,768 and 131,072, each row a fresh process on one thread: a GPT-style teacher
(`causal_lm`, d_model 256, 4 layers, untied head) whose head is scaled so that its next-token
distributions have a mean entropy of 2.5 nats (a trained LM's order; an untrained head is nearly
uniform and would make every draw a distinct id), run by the teacher actor's own code
(`TeacherPredictor` on numpy batches, the callable Ray Data maps over the source) with the
default signal (25 multinomial draws), against a bare `inference_mode` forward loop of the same
model and batch making the (B, L, V) logits and nothing else. Per row:

- `rows_per_s_ratio`: the actor's rows/s ÷ the bare loop's (target >= 0.9);
- `peak_rise_mib` ÷ `chunk_logits_mib`: the actor call's peak resident memory above the resident
  memory before it, over one chunk's float32 logits; `whole_batch` rows repeat the call with the
  whole batch as one chunk (the encoding before chunking) for contrast;
- `stored_bytes_per_token`: the signal's columns written as a shard is (Parquet, Arrow
  fixed-shape tensors, the writer's compression) ÷ tokens, and ÷ the 2,048 row's (target at
  131,072: <= 1.15).

The Ray Data pass around the actor is `stage1`'s subject (its rows/s against the same bare loop).
"""

from __future__ import annotations

import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

VOCABS = (2_048, 32_768, 131_072)
B, L, D_MODEL, LAYERS, ENTROPY = 4, 512, 256, 4, 2.5
REPEATS = 7  # timed calls of each loop; the medians are compared
TEACHER = {"d_model": D_MODEL, "n_layers": LAYERS, "n_heads": 8, "tie_weights": False}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _calibrated_teacher(vocab: int, path: str):
    """The teacher with its head scaled to a mean next-token entropy of ENTROPY nats, saved to `path`."""
    import torch

    from pipeline.models.lm import causal_lm

    torch.manual_seed(0)
    model = causal_lm(num_classes=vocab, input_shape=(L,), **TEACHER).eval()
    ids = torch.randint(0, vocab, (2, 128), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        h = model(ids, hidden=True).hidden.reshape(-1, D_MODEL)
        z = h @ model.head.weight.T

        def entropy(scale: float) -> float:
            logp = torch.log_softmax(z * scale, -1)
            return float(-(logp.exp() * logp).sum(-1).mean())

        lo, hi = 1.0, 1e4
        for _ in range(40):  # entropy falls as the scale grows
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if entropy(mid) > ENTROPY else (lo, mid)
        model.head.weight.mul_(hi)
    torch.save(model.state_dict(), path)
    return model


def stored_bytes(columns: dict[str, np.ndarray]) -> int:
    """Bytes of the columns as a shard holds them (Arrow fixed-shape tensors, Parquet's default codec)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(v)) for k, v in columns.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.tell()


def one_row(vocab: int, whole_batch: bool) -> dict[str, Any]:
    import torch

    from pipeline.cache.packing import index_bits
    from pipeline.cache.schema import INPUT_IDS, LENGTH, SAMPLE_ID, SAMPLED_INDICES, SAMPLED_WEIGHTS
    from pipeline.teacher import chunked
    from pipeline.teacher.predictor import TeacherPredictor

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="lmvocab-")
    weights = os.path.join(work, "teacher.pt")
    model = _calibrated_teacher(vocab, weights)
    spec = {"factory": "pipeline.models.lm:causal_lm", "weights": weights, "kwargs": TEACHER}
    predictor = TeacherPredictor({"teacher": spec}, (L,), vocab, logits_spec={"mode": "sampled"})
    rng = np.random.default_rng(0)
    batch = {SAMPLE_ID: np.array([f"r{i}" for i in range(B)]), INPUT_IDS: rng.integers(0, vocab, (B, L + 1)),
             LENGTH: np.full(B, L + 1)}
    if whole_batch:
        chunked.CHUNK_LOGITS = B * L * vocab
    predictor({k: v[:1, :9] if v.ndim == 2 else v[:1] for k, v in batch.items()})  # warm up, small
    before = _rss()
    out = predictor(dict(batch))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ids = torch.from_numpy(batch[INPUT_IDS][:, :-1])
    actor, bare = [], []
    for _ in range(REPEATS):  # interleaved, so a slow spell of the machine hits both loops alike
        started = time.perf_counter()
        predictor(dict(batch))
        actor.append(time.perf_counter() - started)
        with torch.inference_mode():
            started = time.perf_counter()
            model(ids)
            bare.append(time.perf_counter() - started)
    signal = {SAMPLED_INDICES: out[SAMPLED_INDICES], SAMPLED_WEIGHTS: out[SAMPLED_WEIGHTS]}
    distinct = float((out[SAMPLED_WEIGHTS] > 0).sum(-1).mean())
    chunk = min(chunked.chunk_positions(vocab), B * L) * vocab * 4  # the largest chunk this batch cuts
    return {"V": vocab, "whole_batch": whole_batch, "B": B, "L": L,
            "actor_rows_per_s": B / statistics.median(actor), "bare_rows_per_s": B / statistics.median(bare),
            "rows_per_s_ratio": statistics.median(bare) / statistics.median(actor),
            "peak_rise_mib": max(peak - before, 0) / 2**20, "chunk_logits_mib": chunk / 2**20,
            "batch_logits_mib": B * L * vocab * 4 / 2**20,
            "peak_over_chunk": max(peak - before, 0) / chunk,
            "stored_bytes_per_token": stored_bytes(signal) / (B * L), "distinct_ids_per_token": distinct,
            "ids": f"packed, {index_bits(vocab)} bits" if index_bits(vocab) else str(out[SAMPLED_INDICES].dtype)}


def _in_fresh_process(vocab: int, whole_batch: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "jobs.benchmarks.lmvocab", str(vocab), str(int(whole_batch))]
    ran = subprocess.run(cmd, check=True, capture_output=True, text=True)
    row = json.loads(ran.stdout.strip().splitlines()[-1])
    print(f"  lm_vocab V={vocab:>7,} {'whole batch' if whole_batch else 'chunked':<11}: {row['rows_per_s_ratio']:.2f} of the bare "
          f"loop, peak rise {row['peak_rise_mib']:,.0f} MiB ({row['peak_over_chunk']:.1f} chunks), "
          f"{row['stored_bytes_per_token']:.1f} stored bytes a token", flush=True)
    return row


def section(vocabs: tuple[int, ...] = VOCABS) -> dict[str, Any]:
    """The rows (chunked at every V, and the whole batch as one chunk at the largest) and the ratios the targets read."""
    rows = [_in_fresh_process(v, False) for v in vocabs] + [_in_fresh_process(vocabs[-1], True)]
    chunked_rows = [r for r in rows if not r["whole_batch"]]
    base = next(r for r in chunked_rows if r["V"] == min(vocabs))["stored_bytes_per_token"]
    largest = next(r for r in chunked_rows if r["V"] == max(vocabs))
    return {"teacher": {"factory": "pipeline.models.lm:causal_lm", "kwargs": TEACHER, "mean_entropy_nats": ENTROPY},
            "signal": "sampled, 25 multinomial draws (the default)", "threads": 1, "rows": rows,
            "rows_per_s_ratio_min": min(r["rows_per_s_ratio"] for r in chunked_rows),
            "peak_over_chunk_max": max(r["peak_over_chunk"] for r in chunked_rows),
            "stored_bytes_largest_over_smallest": largest["stored_bytes_per_token"] / base}


if __name__ == "__main__":
    print(json.dumps(one_row(int(sys.argv[1]), bool(int(sys.argv[2])))))


def markdown(s: dict[str, Any]) -> list[str]:
    t = s["teacher"]["kwargs"]
    lines = [f"Stage 1 at real vocabularies: the teacher actor's code (`TeacherPredictor`), batch {B} x {L} tokens, "
             f"1 thread, a causal LM teacher (d_model {t['d_model']}, {t['n_layers']} layers) with a mean next-token entropy "
             f"of {s['teacher']['mean_entropy_nats']} nats, {s['signal']}; each row a fresh process.", "",
             "| V | encoding | rows/s ÷ bare forward loop | peak rise | ÷ one chunk's logits | whole batch's logits | "
             "stored bytes a token | distinct ids a token | ids |", "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['V']:,} | {'whole batch' if r['whole_batch'] else 'chunked'} | **{r['rows_per_s_ratio']:.2f}** | "
                     f"{r['peak_rise_mib']:,.0f} MiB | {r['peak_over_chunk']:.1f} | {r['batch_logits_mib']:,.0f} MiB | "
                     f"{r['stored_bytes_per_token']:.1f} | {r['distinct_ids_per_token']:.1f} | {r['ids']} |")
    lines += ["", f"Stored bytes a token at {max(VOCABS):,} ÷ at {min(VOCABS):,}: **{s['stored_bytes_largest_over_smallest']:.2f}**.", ""]
    return lines
