"""What a token cache will cost before the teacher runs: raw bytes a token of its signal, the
projected size, and a refusal of full logits that nobody asked for at a large vocabulary."""

from __future__ import annotations

from pipeline.cache.packing import index_bits
from pipeline.config import PrecomputeConfig, TextSource
from pipeline.config.precompute import FULL_LOGITS_VOCAB, FullLogits, SampledLogits, TeacherSequences, TopkLogits
from pipeline.data.sources import SourceInfo
from pipeline.errors import DistillError
from pipeline.teacher.encode import index_dtype

INPUT_BYTES = 4  # the window's int32 token ids, stored with every signal


def signal_bytes_per_token(logits, vocab: int, seq_len: int) -> float:
    """Raw (uncompressed) bytes of the teacher signal for one token."""
    bits = index_bits(vocab)
    ids = bits / 8 if bits else index_dtype(vocab).itemsize
    if isinstance(logits, FullLogits):
        return vocab * (2 if logits.dtype == "float16" else 4)
    if isinstance(logits, TopkLogits):
        return logits.k * (ids + (2 if logits.values == "float16" else 1)) + 4 * len(logits.temperatures)
    if isinstance(logits, SampledLogits):
        return logits.k * (ids + 2)
    if isinstance(logits, TeacherSequences):
        return (logits.prompt_tokens + logits.new_tokens) * 4 / max(seq_len, 1)
    raise TypeError(f"unknown logits output {type(logits).__name__}")


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} bytes"


def token_cache_line(cfg: PrecomputeConfig, source: SourceInfo) -> str | None:
    """One line: the signal, its raw bytes a token and the cache's projected raw size (text sources)."""
    if not isinstance(cfg.source, TextSource):
        return None
    logits, vocab, seq_len = cfg.outputs.logits, source.num_classes, cfg.source.seq_len
    per_token = signal_bytes_per_token(logits, vocab, seq_len)
    tokens = sum(source.rows.values()) * seq_len
    return (f"teacher signal: {logits.mode} at a vocabulary of {vocab:,}, {per_token:,.0f} raw bytes a token "
            f"(+{INPUT_BYTES} for the input ids); about {_size((per_token + INPUT_BYTES) * tokens)} before compression "
            f"for {tokens:,} tokens")


def check_token_outputs(cfg: PrecomputeConfig, source: SourceInfo) -> None:
    """Full logits at a large vocabulary only when the config says `mode: full`."""
    if not isinstance(cfg.source, TextSource) or not isinstance(cfg.outputs.logits, FullLogits):
        return
    vocab = source.num_classes
    if cfg._implicit_full and vocab > FULL_LOGITS_VOCAB:
        per_token = signal_bytes_per_token(cfg.outputs.logits, vocab, cfg.source.seq_len)
        tokens = sum(source.rows.values()) * cfg.source.seq_len
        sampled = signal_bytes_per_token(SampledLogits(), vocab, cfg.source.seq_len)
        raise DistillError(f"`outputs.logits` without a mode stores full logits: at a vocabulary of {vocab:,} that is "
                           f"{per_token:,.0f} bytes a token, {_size(per_token * tokens)} for this source",
                           f"write `mode: full` to store them anyway, or drop `outputs.logits` for the default "
                           f"sampled signal (25 draws, {sampled:.0f} raw bytes a token)")
