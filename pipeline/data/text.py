"""Text corpora, byte-level tokenizers and fixed-length token windows for language-model distillation.

The embedded default corpus is the source code of Python's own standard library: it ships with
every Python, so nothing is downloaded, and its document ids (paths relative to the stdlib
directory) are the same on every machine with the same Python version. A user's own corpus is a
list of text files, a directory, a glob (local or any fsspec URI), or a Parquet table with a
text column.

Pure Python, numpy and HF `tokenizers` (Rust, multi-threaded): no Ray, no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.cache import storage
from pipeline.cache.schema import INPUT_IDS, LENGTH, SAMPLE_ID
from pipeline.errors import DistillError

PAD = "<pad>"  # id 0 in the tokenizers made here; its value never matters, `length` masks it
EOS = "<eos>"  # id 1; appended to every document, so the model learns where a document ends
SPECIAL_TOKENS = (PAD, EOS)
# End-of-text names used by tokenizers made elsewhere (a teacher's own tokenizer.json).
_EOS_NAMES = (EOS, "<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>")
_PAD_NAMES = (PAD, "<|pad|>", "[PAD]")
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
_ENCODE_BATCH = 256  # documents per encode_batch call: large enough for the Rust thread pool


@dataclass(frozen=True)
class Document:
    """One document: `doc_id` is stable across runs and machines (a relative path or a table id)."""

    doc_id: str
    text: str


# ---------------------------------------------------------------------------------------------
# Corpora


def stdlib_root() -> str:
    """The standard library directory of the running Python: the root of the default corpus."""
    return os.path.realpath(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[str]:
    """Absolute paths of the standard library's `.py` files, sorted by their path relative to the root.

    Excluded: `site-packages` (installed packages differ between machines) and the test suites and
    tools (`test`, `tests`, `idlelib`, `lib2to3`), which are large, repetitive and not library code.
    """
    root = stdlib_root()
    found: list[str] = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP_DIRS]
        found += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    return sorted(found, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/"))


def read_documents(
    spec: str | Sequence[str] | None = None,
    *,
    format: str = "auto",
    text_column: str = "text",
    id_column: str | None = None,
    max_documents: int | None = None,
    max_bytes: int | None = None,
) -> Iterator[Document]:
    """Documents of a corpus, in a deterministic order.

    Args:
        spec: None for the standard library (the embedded default); a directory, a glob or a
            file (local path or fsspec URI), or a list of them; or a Parquet file or directory.
        format: "auto" (Parquet when the path ends in `.parquet` or a directory holds only Parquet
            files), "text" or "parquet".
        text_column: Parquet only: the column holding the text.
        id_column: Parquet only: the column holding document ids; by default the row number
            across the sorted files (stable only while the files are unchanged).
        max_documents: stop after this many documents.
        max_bytes: stop before the first document that would take the total UTF-8 size past
            this, so a subset is a deterministic prefix of the corpus.

    Returns:
        An iterator of `Document`. For files, `doc_id` is the path relative to the corpus root: the
        stdlib directory, the directory, the glob's fixed directory prefix, or a file's parent; for a
        list, the common parent of its entries' roots. Files and directories starting with "." are skipped.
    """
    if max_documents is not None and max_documents < 0 or max_bytes is not None and max_bytes < 0:
        raise ValueError("max_documents and max_bytes must be >= 0")
    if format not in ("auto", "text", "parquet"):
        raise ValueError(f"unknown corpus format {format!r}: use auto, text or parquet")
    if spec is None:
        docs = _read_files(*_stdlib_listing())
    else:
        fs, root, paths, is_parquet = _list(spec, format)
        if is_parquet:
            docs = _read_parquet(fs, paths, text_column, id_column)
        else:
            docs = _read_files(fs, root, paths)
    yield from _limit(docs, max_documents, max_bytes)


def corpus_fingerprint(documents: Iterable[Document]) -> str:
    """Digest of the documents' ids and texts (16 hex chars): the dataset identity in a cache key."""
    h = hashlib.sha256()
    for d in documents:
        for part in (d.doc_id.encode(), d.text.encode("utf-8", "surrogatepass")):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()[:16]


def _stdlib_listing() -> tuple[Any, str, list[str]]:
    import fsspec

    return fsspec.filesystem("file"), stdlib_root(), default_corpus_files()


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in rel.split("/"))


def _is_marker(path: str) -> bool:
    """Files such as _SUCCESS or _metadata that writers leave beside Parquet parts."""
    return posixpath.basename(path).startswith("_")


def _expand(fs: Any, path: str, entry: str) -> tuple[str, list[str]]:
    """(root, files) of one entry: a glob (root: its fixed prefix), a directory or a file (root: its parent)."""
    if any(c in path for c in "*?["):
        root = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        return root, [p for p in fs.glob(path) if fs.isfile(p) and not _hidden(posixpath.relpath(p, root))]
    if fs.isdir(path):
        root = path.rstrip("/")
        return root, [p for p in fs.find(root) if not _hidden(posixpath.relpath(p, root))]
    if fs.isfile(path):
        return posixpath.dirname(path), [path]
    raise DistillError(f"corpus entry {entry!r} does not exist", "give directories, globs or files")


def _list(spec: str | Sequence[str], format: str) -> tuple[Any, str, list[str], bool]:
    """(filesystem, root, sorted paths, is_parquet) for a corpus spec; ids are paths relative to root."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries:
        raise DistillError("the corpus is an empty list of files", "name at least one file, directory or glob")
    fs = storage.filesystem(entries[0])[0]  # every entry on the first one's filesystem
    roots, paths = [], []
    for entry in entries:
        root, found = _expand(fs, storage.filesystem(entry)[1], entry)
        roots.append(root)
        paths += found
    root = posixpath.commonpath(roots) if len(roots) > 1 else roots[0]
    if not paths:
        raise DistillError(f"corpus {spec!r} holds no files", "check the paths and globs")
    paths = sorted(set(paths), key=lambda p: posixpath.relpath(p, root))
    parquet = [p for p in paths if p.endswith(".parquet")]
    if format == "auto":
        is_parquet = bool(parquet) and all(p.endswith(".parquet") or _is_marker(p) for p in paths)
    else:
        is_parquet = format == "parquet"
    if is_parquet and not parquet:
        raise DistillError(f"corpus {spec!r} holds no .parquet files", "check the path, or use format='text'")
    return fs, root, parquet if is_parquet else paths, is_parquet


def _read_files(fs: Any, root: str, paths: list[str]) -> Iterator[Document]:
    for p in paths:
        with fs.open(p, "rb") as f:
            data = f.read()
        # errors="replace": one stray byte must not stop a corpus; the id still names the file.
        yield Document(posixpath.relpath(p, root).replace(os.sep, "/"), data.decode("utf-8", errors="replace"))


def _read_parquet(fs: Any, paths: list[str], text_column: str, id_column: str | None) -> Iterator[Document]:
    seen: set[str] = set()
    row = 0
    for p in paths:
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            wanted = [text_column] + ([id_column] if id_column else [])
            missing = [c for c in wanted if c not in names]
            if missing:
                raise DistillError(f"parquet corpus {p!r} lacks column(s) {missing}", f"available: {names}")
            for batch in pf.iter_batches(columns=wanted, batch_size=1024):
                texts = batch.column(text_column).to_pylist()
                ids = batch.column(id_column).to_pylist() if id_column else range(row, row + len(texts))
                for doc_id, text in zip(ids, texts):
                    doc_id = str(doc_id)
                    if id_column:
                        if doc_id in seen:
                            raise DistillError(f"parquet corpus has a duplicate id {doc_id!r} in column {id_column!r}",
                                               "ids must be unique: they become the sample ids of the windows")
                        seen.add(doc_id)
                    if isinstance(text, bytes):
                        text = text.decode("utf-8", errors="replace")
                    yield Document(doc_id, text or "")
                row += len(texts)


def _limit(docs: Iterator[Document], max_documents: int | None, max_bytes: int | None) -> Iterator[Document]:
    total = 0
    for n, d in enumerate(docs):
        if max_documents is not None and n >= max_documents:
            return
        if max_bytes is not None:
            total += len(d.text.encode("utf-8", "surrogatepass"))
            if total > max_bytes:
                return
        yield d


# ---------------------------------------------------------------------------------------------
# Tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _finish(tok: Tokenizer) -> Tokenizer:
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return _plain_text_specials(tok)


def _plain_text_specials(tok: Tokenizer) -> Tokenizer:
    # A document that contains the text "<eos>" is encoded as ordinary bytes: the only end of a
    # document is the one chunk_documents appends. The flag is not part of the JSON, so every
    # function here that hands out a tokenizer sets it.
    tok.encode_special_tokens = True
    return tok


def train_bpe(documents: Iterable[Document | str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) trained on the documents; any text round-trips exactly.

    Ids 0 and 1 are `<pad>` and `<eos>`, then the 256 byte symbols, then the merges. The result
    may have fewer than `vocab_size` entries when the corpus has too few frequent pairs.
    """
    if vocab_size < 258:
        raise ValueError(f"vocab_size {vocab_size} is below 258 (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((d if isinstance(d, str) else d.text for d in documents), trainer=trainer)
    return _finish(tok)


def byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte: id = byte + 2 (after `<pad>` 0 and `<eos>` 1); vocabulary 258."""
    table = _bytes_to_unicode()
    vocab = {PAD: 0, EOS: 1, **{table[b]: b + len(SPECIAL_TOKENS) for b in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges it would only cost time.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return _finish(tok)


def save_tokenizer(tok: Tokenizer, uri: str) -> None:
    """Write the tokenizer's JSON (the HF `tokenizer.json` format) to any fsspec URI, atomically."""
    storage.write_bytes_atomic(uri, tok.to_str().encode())


def load_tokenizer(uri: str) -> Tokenizer:
    """Read a tokenizer JSON written by `save_tokenizer` (or any HF `tokenizer.json`)."""
    if not storage.exists(uri):
        raise DistillError(f"tokenizer {uri!r} does not exist", "train one first (train_bpe + save_tokenizer) or fix the URI")
    try:
        tok = Tokenizer.from_str(storage.read_bytes(uri).decode())
    except Exception as e:  # noqa: BLE001 (the Rust side raises a bare Exception for malformed JSON)
        raise DistillError(f"tokenizer {uri!r} is not a valid tokenizer JSON: {e}", "point at a tokenizer.json") from None
    return _plain_text_specials(tok)


def tokenizer_digest(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (sorted keys, no whitespace), 16 hex chars."""
    canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def special_ids(tok: Tokenizer) -> tuple[int, int]:
    """(pad_id, eos_id). A tokenizer without a pad token pads with its end-of-text id."""
    eos = next((i for name in _EOS_NAMES if (i := tok.token_to_id(name)) is not None), None)
    if eos is None:
        raise DistillError("the tokenizer has no end-of-text token", f"add one of {list(_EOS_NAMES)} as a special token")
    pad = next((i for name in _PAD_NAMES if (i := tok.token_to_id(name)) is not None), eos)
    return pad, eos


def encode_texts(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added, on all cores."""
    _plain_text_specials(tok)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets (tokenizers >= 0.21)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


# ---------------------------------------------------------------------------------------------
# Windows


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


# ---------------------------------------------------------------------------------------------
# Split


def doc_id_of(sample_id: str) -> str:
    """The document a window came from (sample ids are f"{doc_id}@{offset}")."""
    return sample_id.rsplit("@", 1)[0]


def split_of(sample_id: str, val_fraction: float, seed: int = 0) -> str:
    """"train" or "val" by a salted hash of the document id, so a document's windows stay together.

    The same hash as `pipeline.data.sources.split_of_ids`, applied to the document id.
    """
    salt = str(seed).encode()
    bucket = int.from_bytes(hashlib.blake2b(salt + doc_id_of(sample_id).encode(), digest_size=8).digest(), "little")
    return "val" if bucket % 1_000_000 < int(val_fraction * 1_000_000) else "train"

