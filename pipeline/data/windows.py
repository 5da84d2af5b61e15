"""Fixed-length token windows over tokenised documents: the rows of a text cache."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from pipeline.cache.schema import INPUT_IDS, LENGTH, SAMPLE_ID
from pipeline.data.corpus import Document
from pipeline.data.tokenizer import encode_texts, special_ids

_ENCODE_BATCH = 256  # documents per encode_batch call: large enough for the Rust thread pool



def window_starts(n_tokens: int, seq_len: int, stride: int | None = None) -> list[int]:
    """Start offsets of the windows of seq_len + 1 tokens over a sequence of n_tokens.

    With stride = seq_len (the default) consecutive windows share one token, so each token after
    the first is a target exactly once. A smaller stride gives each window more context and
    repeats targets. Windows stop at the first one that reaches the end; none has fewer than 2 tokens.
    """
    stride = seq_len if stride is None else stride
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise ValueError(f"need seq_len >= 1 and 1 <= stride <= seq_len, got seq_len={seq_len}, stride={stride}")
    starts = []
    for start in range(0, max(n_tokens - 1, 0), stride):
        starts.append(start)
        if start + seq_len + 1 >= n_tokens:
            break
    return starts


def _windows(doc_id: str, ids: list[int], seq_len: int, stride: int | None, pad_id: int, eos_id: int) -> Iterator[dict]:
    tokens = np.asarray([*ids, eos_id], dtype=np.int32)
    for start in window_starts(len(tokens), seq_len, stride):
        piece = tokens[start:start + seq_len + 1]
        row = np.full(seq_len + 1, pad_id, dtype=np.int32)
        row[: len(piece)] = piece
        yield {SAMPLE_ID: f"{doc_id}@{start}", INPUT_IDS: row, LENGTH: len(piece)}


def chunk_documents(documents: Iterable[Document], tokenizer: Tokenizer, seq_len: int, stride: int | None = None) -> Iterator[dict]:
    """Rows of fixed-length token windows: {"sample_id", "input_ids", "length"}.

    Each document is tokenised, `<eos>` is appended, and window i covers tokens
    [i*stride, i*stride + seq_len + 1) (stride defaults to seq_len). `input_ids` is int32 of
    length seq_len + 1, padded with the pad id; `length` counts its real tokens. The model reads
    input_ids[:-1] and predicts input_ids[1:]; target t is real where t < length - 1.
    `sample_id` is f"{doc_id}@{token_offset}": unique and stable while the corpus and tokenizer are.
    """
    pad_id, eos_id = special_ids(tokenizer)
    window_starts(0, seq_len, stride)  # validate before any work
    batch: list[Document] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == _ENCODE_BATCH:
            yield from _chunk_batch_rows(batch, tokenizer, seq_len, stride, pad_id, eos_id)
            batch = []
    if batch:
        yield from _chunk_batch_rows(batch, tokenizer, seq_len, stride, pad_id, eos_id)


def _chunk_batch_rows(docs: list[Document], tok: Tokenizer, seq_len: int, stride: int | None,
                      pad_id: int, eos_id: int) -> Iterator[dict]:
    for doc, ids in zip(docs, encode_texts(tok, [d.text for d in docs])):
        yield from _windows(doc.doc_id, ids, seq_len, stride, pad_id, eos_id)


def chunk_batch(batch: dict[str, Any], tokenizer: Tokenizer, seq_len: int, stride: int | None = None,
                *, id_column: str = "doc_id", text_column: str = "text") -> dict[str, np.ndarray]:
    """Columnar form of `chunk_documents`, for Ray Data `map_batches` (documents in, windows out).

    Returns `sample_id` (object), `input_ids` (N, seq_len + 1) int32 and `length` (N,) int32.
    """
    docs = [Document(str(i), str(t)) for i, t in zip(batch[id_column], batch[text_column])]
    rows = list(chunk_documents(docs, tokenizer, seq_len, stride))
    return {
        SAMPLE_ID: np.array([r[SAMPLE_ID] for r in rows], dtype=object),
        INPUT_IDS: np.stack([r[INPUT_IDS] for r in rows]) if rows else np.zeros((0, seq_len + 1), np.int32),
        LENGTH: np.array([r[LENGTH] for r in rows], dtype=np.int32),
    }


def doc_id_of(sample_id: str) -> str:
    """The document a window came from (sample ids are f"{doc_id}@{offset}")."""
    return sample_id.rsplit("@", 1)[0]

