"""Where caches, weights and runs live: any fsspec URI (local path, file://, s3://, ...).

One place resolves a URI to a filesystem, so an S3 endpoint override is configured once and
every reader and writer agrees. Credentials are never passed here: s3fs/botocore find them
in the standard AWS chain (environment, profiles, instance roles) on each node.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.core import url_to_fs

from pipeline.errors import DistillError

_S3_SCHEMES = ("s3://", "s3a://")
_options: dict[str, str | None] = {"endpoint_url": None, "region": None}


def configure(endpoint_url: str | None = None, region: str | None = None) -> None:
    """Set the S3 endpoint override for this process (from a config's `storage:` section)."""
    _options.update(endpoint_url=endpoint_url, region=region)


def options() -> dict[str, str | None]:
    return dict(_options)


def _s3_kwargs() -> dict[str, Any]:
    endpoint = _options["endpoint_url"] or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    if _options["region"]:
        kwargs["client_kwargs"] = {"region_name": _options["region"]}
    return kwargs


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return os.path.abspath(uri.removeprefix("file://"))


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it."""
    if is_local(uri):
        return fsspec.filesystem("file"), local_path(uri)
    if uri.startswith(_S3_SCHEMES):
        import s3fs

        return s3fs.S3FileSystem(**_s3_kwargs()), uri.split("://", 1)[1].rstrip("/")
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


def remove_file(uri: str) -> None:
    """Delete one object if it is there (a manifest, a lock)."""
    fs, path = filesystem(uri)
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


def remove_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def info(uri: str) -> dict[str, Any]:
    fs, path = filesystem(uri)
    return fs.info(path)


def check_reachable(uri: str, what: str) -> None:
    """Fail early, in one line, when an object-store location cannot be used: no bucket, no credentials, no endpoint."""
    if is_local(uri) or not uri.startswith(_S3_SCHEMES):
        return
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise DistillError(f"bucket {bucket!r} for the {what} ({uri}) does not exist at "
                           f"{_s3_kwargs().get('endpoint_url', 'the default AWS endpoint')}",
                           "create the bucket, or fix the URI or the endpoint (--endpoint-url, AWS_ENDPOINT_URL)") from None
    except Exception as e:
        error = storage_error(e, uri, what)
        if error is None:
            raise
        raise error from None


def storage_error(e: BaseException, uri: str, what: str = "location") -> DistillError | None:
    """The one line for an object-store failure (missing bucket, denied, no credentials, no endpoint),
    or None when `e` is not one. botocore's exceptions are named, not imported."""
    if not uri.startswith(_S3_SCHEMES):
        return None
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    endpoint = _s3_kwargs().get("endpoint_url", "the default AWS endpoint")
    kind = type(e).__name__
    if isinstance(e, FileNotFoundError):
        return DistillError(f"{uri} ({what}) does not exist at {endpoint}",
                            "check the URI and the endpoint (--endpoint-url, AWS_ENDPOINT_URL or `storage.endpoint_url`)")
    if isinstance(e, PermissionError) or kind in ("ClientError", "AccessDenied"):
        return DistillError(f"access denied to bucket {bucket!r} for the {what} at {endpoint}: {str(e).splitlines()[0]}",
                            "check the credentials and their permissions (AWS_PROFILE, AWS_ACCESS_KEY_ID)")
    if kind in ("NoCredentialsError", "PartialCredentialsError"):
        return DistillError(f"no S3 credentials found for the {what} ({uri})",
                            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE in the environment (never in the config)")
    if kind in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionClosedError") \
            or isinstance(e, (OSError, ConnectionError)):
        return DistillError(f"the S3 endpoint {endpoint} does not answer ({kind})",
                            "check --endpoint-url, AWS_ENDPOINT_URL or `storage.endpoint_url`")
    return None
