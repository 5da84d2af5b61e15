"""`make gpu-check`: both stages on one GPU at a 131,072-token vocabulary, against bare PyTorch loops.

Built here, nothing downloaded: a word-level tokenizer of `--vocab` tokens, documents of its
words, an HF Llama teacher saved with `save_pretrained` (loaded by the product's
`hf_causal_lm`, bf16) and an HF Llama student config. Then, in one process:

- stage 1 (`run_precompute`): the teacher on a `gpus_per_actor: 1` Ray Data actor, the default
  sampled signal (ids packed at 17 bits); against a bare `inference_mode` bf16 forward loop of the
  same teacher over the same windows making the (B, L, V) logits and nothing else;
- stage 2 (`run_train`): the student on one Ray Train worker with `gpus_per_worker: 1`,
  `parallel: fsdp`, `precision: bf16` and the fused head losses (kd + ce); against a bare loop
  training the same student with bf16 autocast and plain cross-entropy on its full logits.

Per stage: rows/s (stage 1) or tokens/s (stage 2) and their ratio to the bare loop, and the peak
GPU memory: `max_memory_allocated` for the bare loops (this process), and for the stages the
device's used memory sampled from this process every 0.1 s, less what was used before the stage.
Writes runs/bench/gpu.json and .md. Without a GPU it runs on the CPU (`--tiny` shrinks it to a
test), so the script is checked on every machine; the figures only mean something on a GPU.

On a GPU machine with torch but not Ray: `deploy/gpu/wheels.sh` here, then there
`make gpu-check WHEELS=/tmp/site` after installing the wheels into /tmp/site.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any, Callable

import numpy as np
import torch

SIZES = {  # (vocab, seq_len, rows, teacher hidden/layers, student hidden/layers, batch)
    "full": {"vocab": 131_072, "seq_len": 1024, "rows": 1024, "teacher": (1024, 8), "student": (512, 4), "batch": 8},
    "tiny": {"vocab": 70_000, "seq_len": 16, "rows": 64, "teacher": (32, 1), "student": (16, 1), "batch": 8},
}


def llama(vocab: int, seq_len: int, hidden: int, layers: int) -> dict[str, Any]:
    heads = max(1, hidden // 64) if hidden >= 64 else 2
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": seq_len, "tie_word_embeddings": False}


def make_inputs(work: str, size: dict[str, Any]) -> tuple[str, str, str]:
    """(documents dir, tokenizer.json, teacher dir), written once."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab, docs = size["vocab"], os.path.join(work, "docs")
    tok_path, teacher_dir = os.path.join(work, "tokenizer.json"), os.path.join(work, "teacher")
    if not os.path.exists(tok_path):
        tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab)}}, unk_token="<eos>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(tok_path)
    if not os.path.isdir(docs):
        os.makedirs(docs)
        rng = np.random.default_rng(0)
        per_doc = 8 * size["seq_len"]  # windows of seq_len + 1 tokens, 8 a document
        for d in range(max(1, size["rows"] // 8)):
            words = rng.zipf(1.2, per_doc) % (vocab - 2) + 2  # a long tail reaching ids above 65,535
            with open(os.path.join(docs, f"doc{d:05d}.txt"), "w") as f:
                f.write(" ".join(f"w{i}" for i in words))
    if not os.path.isdir(teacher_dir):
        torch.manual_seed(0)
        hidden, layers = size["teacher"]
        cfg = AutoConfig.for_model(**llama(vocab, size["seq_len"], hidden, layers))
        AutoModelForCausalLM.from_config(cfg).save_pretrained(teacher_dir)
    return docs, tok_path, teacher_dir


class PeakMemory:
    """The device's used memory, sampled every 0.1 s while the block runs, less its value at the start."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            self.base = self._used()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self._used() - self.base)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @property
    def gib(self) -> float | None:
        return self.peak / 2**30 if self.device.type == "cuda" else None


def _bare_peak(device: torch.device, run: Callable[[], float]) -> tuple[float, float | None]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    value = run()
    if device.type != "cuda":
        return value, None
    return value, (torch.cuda.max_memory_allocated(device) - start) / 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_teacher(teacher_dir: str, windows: np.ndarray, batch: int, device: torch.device) -> float:
    """Rows/s of a bf16 inference loop making the teacher's logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.bfloat16).to(device).eval()
    ids = torch.from_numpy(windows[:, :-1].astype(np.int64))
    with torch.inference_mode():
        model(ids[:batch].to(device))  # warm up
        _sync(device)
        started = time.perf_counter()
        for i in range(0, len(ids), batch):
            model(ids[i:i + batch].to(device)).logits
        _sync(device)
    return len(ids) / (time.perf_counter() - started)


def bare_student(student_cfg: dict[str, Any], windows: np.ndarray, batch: int, device: torch.device) -> float:
    """Tokens/s of a plain bf16-autocast AdamW loop on the student with cross-entropy on its full logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**student_cfg)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.from_numpy(windows.astype(np.int64))
    tokens, started = 0, None
    for step, i in enumerate(range(0, len(ids) - batch + 1, batch)):
        if step == 1:  # the first step warms up
            _sync(device)
            started, tokens = time.perf_counter(), 0
        x = ids[i:i + batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += x[:, 1:].numel()
    _sync(device)
    return tokens / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run of the same code (the CPU test)")
    args = parser.parse_args(argv)
    from pipeline.config import PrecomputeConfig, TrainConfig
    from pipeline.data.sources import load_split
    from pipeline.student.train.driver import run_train
    from pipeline.teacher.precompute import run_precompute

    from jobs.benchmarks.common import machine, write_report

    size = SIZES["tiny" if args.tiny else "full"]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    work = os.path.abspath(os.path.join(args.out, "gpu" + ("-tiny" if args.tiny else "")))
    os.makedirs(work, exist_ok=True)
    started = time.time()
    docs, tok_path, teacher_dir = make_inputs(work, size)
    source = {"kind": "text", "files": [docs], "seq_len": size["seq_len"], "val_fraction": 0.1, "tokenizer": {"uri": tok_path}}
    teacher = {"factory": "pipeline.models.hf:hf_causal_lm", "kwargs": {"path": teacher_dir, "dtype": "bfloat16" if cuda else "float32"}}
    pre = PrecomputeConfig.model_validate({
        "source": source, "teacher": teacher, "outputs": {"logits": {"mode": "sampled", "k": 25}},
        "cache_root": os.path.join(work, "cache"), "batch_size": size["batch"], "num_actors": 1,
        "gpus_per_actor": 1 if cuda else 0, "cpus_per_actor": 1})
    windows = load_split(pre.source, "train")["input_ids"]
    rows: list[dict[str, Any]] = []

    bare_rps, bare_peak = _bare_peak(device, lambda: bare_teacher(teacher_dir, windows, size["batch"], device))
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        cache = run_precompute(pre, force=True)
        stage1_wall = time.perf_counter() - t0
    stats = cache.manifest.stats
    rows.append({"stage": "precompute", "rows_per_s": stats.rows_per_s, "bare_rows_per_s": bare_rps,
                 "ratio": (stats.rows_per_s or 0) / bare_rps, "peak_gpu_gib": mem.gib, "bare_peak_gpu_gib": bare_peak,
                 "wall_s": round(stage1_wall, 1), "devices": stats.devices,
                 "index_bits": getattr(cache.manifest.logits(), "index_bits", None)})
    print(json.dumps(rows[-1]), flush=True)

    student = llama(size["vocab"], size["seq_len"], *size["student"])
    bare_tps, bare_speak = _bare_peak(device, lambda: bare_student(student, windows, size["batch"], device))
    train = TrainConfig.model_validate({
        "name": "gpu-check", "cache": cache.uri, "epochs": 1, "batch_size": size["batch"], "num_workers": 1,
        "student": {"factory": "pipeline.models.hf:hf_causal_lm_config", "kwargs": student},
        "loss": {"temperature": 1.0, "terms": {"kd": 0.5, "ce": 0.5}}, "precision": "bf16", "parallel": "fsdp",
        "gpus_per_worker": 1 if cuda else 0, "cpus_per_worker": 1, "storage_path": os.path.join(work, "runs")})
    with PeakMemory(device) as mem:
        result = run_train(train, existing="overwrite").result
    tps = result.throughput.get("tokens_per_s")
    rows.append({"stage": "train", "tokens_per_s": tps, "bare_tokens_per_s": bare_tps, "ratio": (tps or 0) / bare_tps,
                 "peak_gpu_gib": mem.gib, "bare_peak_gpu_gib": bare_speak, "wall_s": result.wall_s,
                 "val_perplexity": result.metrics.get("val_perplexity"), "fused": True, "precision": "bf16", "parallel": "fsdp"})
    print(json.dumps(rows[-1]), flush=True)

    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "vocab": size["vocab"], "seq_len": size["seq_len"],
              "rows": rows, "size": "tiny" if args.tiny else "full", "teacher": llama(size["vocab"], size["seq_len"], *size["teacher"]),
              "student": student, "torch": torch.__version__, "machine": machine(),
              "command": "make gpu-check" + (" ARGS=--tiny" if args.tiny else ""), "wall_s": round(time.time() - started, 1)}

    def gib(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f} GiB"

    md = [f"{report['device']}, V={size['vocab']:,}, L={size['seq_len']}, batch {size['batch']}.", "",
          "| stage | product | bare loop | ratio | peak GPU memory (bare) |", "|---|---|---|---|---|",
          f"| precompute (rows/s) | {rows[0]['rows_per_s'] or 0:.1f} | {bare_rps:.1f} | {rows[0]['ratio']:.2f} | "
          f"{gib(rows[0]['peak_gpu_gib'])} ({gib(bare_peak)}) |",
          f"| train (tokens/s) | {tps or 0:,.0f} | {bare_tps:,.0f} | {rows[1]['ratio']:.2f} | "
          f"{gib(rows[1]['peak_gpu_gib'])} ({gib(bare_speak)}) |", ""]
    write_report(args.out, "gpu" + ("-tiny" if args.tiny else ""), report, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
