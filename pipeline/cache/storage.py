"""Where caches, weights and runs live: any fsspec URI (local path, file://, s3://, ...).

One place resolves a URI to a filesystem, so S3 endpoints and credentials are configured
once (issue 3 adds endpoint overrides here) and every reader and writer agrees.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.core import url_to_fs


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return os.path.abspath(uri.removeprefix("file://"))


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it."""
    if is_local(uri):
        return fsspec.filesystem("file"), local_path(uri)
    fs, path = url_to_fs(uri)
    return fs, path


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for Ray Data and pyarrow readers/writers (native for local disk)."""
    if is_local(uri):
        return pafs.LocalFileSystem(), local_path(uri)
    fs, path = filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Readers see the old file or the whole new one, never a part.

    On local disk: write a temp file beside it, fsync, rename. On object stores a single
    PUT is already atomic, so the object is written directly.
    """
    fs, path = filesystem(uri)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    if is_local(uri):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def sha256_of(uri_or_path: str, fs: fsspec.AbstractFileSystem | None = None, chunk: int = 8 << 20) -> str:
    if fs is None:
        fs, uri_or_path = filesystem(uri_or_path)
    h = hashlib.sha256()
    with fs.open(uri_or_path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def info(uri: str) -> dict[str, Any]:
    fs, path = filesystem(uri)
    return fs.info(path)
