"""The BPE tokenizer and causal-LM teacher (`lm_teacher`) that `make bench-screen` and `make bench-topk`
share: trained here on a prefix of Python's standard library sources, once per (bytes, epochs,
vocabulary), under runs/bench/topk/."""

from __future__ import annotations

import os

from pipeline import storage
from pipeline.config import PrecomputeConfig
from pipeline.data.corpus import read_documents
from pipeline.data.tokenizer import save_tokenizer, train_bpe
from pipeline.teacher.fit import fit_teacher

TEACHER = {"factory": "pipeline.models.lm:lm_teacher"}


def text_source(max_bytes: int, tokenizer_uri: str, seq_len: int) -> dict:
    """Documents split by a hash of their path: the same held-out documents at every prefix length."""
    return {"kind": "text", "seq_len": seq_len, "val_fraction": 0.1, "max_bytes": max_bytes, "tokenizer": {"uri": tokenizer_uri}}


def teacher_config(work: str, teacher_bytes: int, epochs: int, vocab: int, seq_len: int = 64,
                   tokenizer_uri: str | None = None) -> PrecomputeConfig:
    """The teacher's fit config, its tokenizer (trained on the teacher's stdlib prefix unless
    `tokenizer_uri` names one) and weights trained first when missing."""
    os.makedirs(work, exist_ok=True)
    suffix = "" if vocab == 8192 else f"-v{vocab}"  # the 8,192 files predate the option
    if tokenizer_uri:
        suffix += "-" + os.path.splitext(os.path.basename(tokenizer_uri))[0]
    tok_uri = tokenizer_uri or os.path.abspath(os.path.join(work, f"tokenizer-{teacher_bytes}{suffix}.json"))
    if not storage.exists(tok_uri):
        print(f"== BPE {vocab} on the first {teacher_bytes / 1e6:.1f} MB of the standard library ==", flush=True)
        save_tokenizer(train_bpe(read_documents(None, max_bytes=teacher_bytes), vocab_size=vocab), tok_uri)
    weights = os.path.abspath(os.path.join(work, f"lm_teacher-{teacher_bytes}-{epochs}{suffix}.pt"))
    cfg = PrecomputeConfig.model_validate({
        "source": text_source(teacher_bytes, tok_uri, seq_len), "cache_root": os.path.join(work, "cache"),
        "teacher": {**TEACHER, "weights": weights, "fit": {"epochs": epochs, "lr": 0.002, "batch_size": 32, "shift": 0}}})
    if not storage.exists(weights):
        print("== fitting the teacher ==", flush=True)
        fit_teacher(cfg)
    return cfg
