"""The text source: a corpus tokenised and cut into fixed-length windows, split by document.

The corpus, the tokenizer (trained on it unless one is given) and the windows are built once per
process and reused: describing the source for the cache key and staging its rows read them alike.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from pipeline import storage
from pipeline.cache.schema import INPUT_IDS, LENGTH, SAMPLE_ID, SPLIT
from pipeline.config import TextSource
from pipeline.data.corpus import Document, corpus_fingerprint, read_documents
from pipeline.data.sources import SPLITS, SourceInfo, identity_record
from pipeline.data.split import hash_split
from pipeline.data.tokenizer import byte_tokenizer, load_tokenizer, tokenizer_digest, train_bpe
from pipeline.data.windows import chunk_documents, doc_id_of
from pipeline.errors import DistillError

TRANSFORM = "tokens + <eos> per document, windows of seq_len + 1 overlapping by one"
_CORPUS_FIELDS = {"files", "uri", "text_column", "id_column", "max_documents", "max_bytes"}


class TextWindows:
    """Held in memory: a text source is a few hundred MB at most on one node."""

    streams = False
    input_scale = 1.0  # token ids, not inputs to scale

    def __init__(self, cfg: TextSource, options: storage.Options = None) -> None:
        self.cfg = cfg
        # Where the files are read through is part of the (per-process) memo keys, not of the cache key.
        where = options.model_dump() if options is not None else None
        self._corpus_key = json.dumps({**cfg.model_dump(include=_CORPUS_FIELDS), "storage": where}, sort_keys=True)
        self._tokenizer_key = json.dumps([self._corpus_key, cfg.tokenizer.model_dump()], sort_keys=True)

    def tokenizer(self) -> Tokenizer:
        """Loaded from `tokenizer.uri`, a byte tokenizer, or BPE trained on the corpus once per process."""
        return _tokenizer(self._tokenizer_key)[0]

    def _rows(self) -> dict[str, np.ndarray]:
        return _rows(json.dumps([self._corpus_key, self._tokenizer_key, self.cfg.seq_len, self.cfg.val_fraction,
                                 self.cfg.split_seed]))

    def describe(self) -> SourceInfo:
        rows = self._rows()
        return SourceInfo(
            kind="text",
            fingerprint=f"{_corpus(self._corpus_key)[1]}:{_tokenizer(self._tokenizer_key)[1]}",
            num_classes=self.tokenizer().get_vocab_size(),
            input_shape=(self.cfg.seq_len,),
            rows={s: int((rows[SPLIT] == s).sum()) for s in SPLITS},
        )

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        rows = self._rows()
        keep = rows[SPLIT] == split
        return {k: v[keep] for k, v in rows.items() if k != SPLIT}

    def identity(self, info: SourceInfo) -> dict[str, Any]:
        cfg = self.cfg
        text = {"files": cfg.files, "text_column": cfg.text_column, "seq_len": cfg.seq_len,
                "tokenizer": cfg.tokenizer.model_dump(exclude={"uri"}), "max_documents": cfg.max_documents,
                "max_bytes": cfg.max_bytes}
        return identity_record(cfg, info, TRANSFORM, text=text)


def _options(where: dict | None) -> storage.StorageOptions | None:
    return storage.StorageOptions(**where) if where is not None else None


@functools.lru_cache(maxsize=4)
def _corpus(key: str) -> tuple[tuple[Document, ...], str]:
    spec = json.loads(key)
    where = spec["uri"] or spec["files"]
    try:
        docs = tuple(read_documents(where, text_column=spec["text_column"], id_column=spec["id_column"] if spec["uri"] else None,
                                    max_documents=spec["max_documents"], max_bytes=spec["max_bytes"],
                                    options=_options(spec["storage"])))
    except (FileNotFoundError, OSError, ValueError, KeyError) as e:
        raise DistillError(f"cannot read the text source {where or 'stdlib'!r}: {e}", "check `source.files` / `source.uri`") from None
    if not docs:
        raise DistillError(f"the text source {where or 'stdlib'!r} has no documents", "check `source.files` / `source.uri`")
    return docs, corpus_fingerprint(docs)


@functools.lru_cache(maxsize=4)
def _tokenizer(key: str) -> tuple[Tokenizer, str]:
    corpus_key, tok = json.loads(key)
    if tok["uri"]:
        t = load_tokenizer(tok["uri"], _options(json.loads(corpus_key)["storage"]))
    elif tok["kind"] == "byte":
        t = byte_tokenizer()
    else:
        t = train_bpe(_corpus(corpus_key)[0], vocab_size=tok["vocab_size"], min_frequency=tok["min_frequency"])
    return t, tokenizer_digest(t)


@functools.lru_cache(maxsize=4)
def _rows(key: str) -> dict[str, np.ndarray]:
    """Every window of the corpus with its split (by document, so no document straddles splits)."""
    corpus_key, tok_key, seq_len, val_fraction, seed = json.loads(key)
    rows = list(chunk_documents(_corpus(corpus_key)[0], _tokenizer(tok_key)[0], seq_len))
    ids = np.array([r[SAMPLE_ID] for r in rows], dtype=object)
    return {
        SAMPLE_ID: ids,
        INPUT_IDS: np.stack([r[INPUT_IDS] for r in rows]).astype(np.int32),
        LENGTH: np.array([r[LENGTH] for r in rows], dtype=np.int32),
        SPLIT: hash_split([doc_id_of(i) for i in ids], val_fraction, seed).astype(object),
    }
