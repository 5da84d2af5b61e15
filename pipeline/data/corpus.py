"""Text corpora for language-model distillation: documents with stable ids, in a deterministic order.

The embedded default corpus is the source code of Python's own standard library: it ships with
every Python, so nothing is downloaded, and its document ids (paths relative to the stdlib
directory) are the same on every machine with the same Python version. A user's own corpus is a
list of text files, a directory, a glob (local or any fsspec URI), or a Parquet table with a
text column.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import DistillError

_STDLIB_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})


@dataclass(frozen=True)
class Document:
    """One document: `doc_id` is stable across runs and machines (a relative path or a table id)."""

    doc_id: str
    text: str


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
    options: storage.Options = None,
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
        options: the store remote files are read through.

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
        fs, root, paths, is_parquet = _list(spec, format, options)
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


def _list(spec: str | Sequence[str], format: str, options: storage.Options = None) -> tuple[Any, str, list[str], bool]:
    """(filesystem, root, sorted paths, is_parquet) for a corpus spec; ids are paths relative to root."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries:
        raise DistillError("the corpus is an empty list of files", "name at least one file, directory or glob")
    fs = storage.filesystem(entries[0], options)[0]  # every entry on the first one's filesystem
    roots, paths = [], []
    for entry in entries:
        root, found = _expand(fs, storage.filesystem(entry, options)[1], entry)
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

