"""Where caches, weights and runs live: any fsspec URI (local path, file://, s3://, ...).

One place resolves a URI to a filesystem. Where a store is not the default AWS endpoint (MinIO,
Ceph, a test server), the caller passes its `StorageOptions` (a config's `storage:` section, or a
URI command's `--endpoint-url`) to every call: there is no process-wide setting, so a driver, a
Train worker and a teacher actor each read exactly the options their config names. Without them,
the standard `AWS_ENDPOINT_URL(_S3)` variables apply. Credentials are never passed here:
s3fs/botocore find them in the standard AWS chain (environment, profiles, instance roles) on each node.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.core import url_to_fs
from pydantic import BaseModel, ConfigDict

from pipeline.errors import DistillError

_S3_SCHEMES = ("s3://", "s3a://")


class StorageOptions(BaseModel):
    """S3-compatible endpoint override (MinIO, Ceph, a test server). Credentials never go here:
    they come from the standard AWS chain (environment, profiles, instance roles) on each node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None
    region: str | None = None


Options = StorageOptions | None  # None: the standard AWS chain and AWS_ENDPOINT_URL(_S3)


def endpoint_of(options: Options = None) -> str | None:
    """The S3 endpoint these options reach (None: the default AWS endpoint)."""
    return ((options.endpoint_url if options else None) or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL"))


def _s3_kwargs(options: Options) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    endpoint = endpoint_of(options)
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    if options is not None and options.region:
        kwargs["client_kwargs"] = {"region_name": options.region}
    return kwargs


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return os.path.abspath(uri.removeprefix("file://"))


def filesystem(uri: str, options: Options = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it."""
    if is_local(uri):
        return fsspec.filesystem("file"), local_path(uri)
    if uri.startswith(_S3_SCHEMES):
        import s3fs

        return s3fs.S3FileSystem(**_s3_kwargs(options)), uri.split("://", 1)[1].rstrip("/")
    fs, path = url_to_fs(uri)
    return fs, path


def arrow_filesystem(uri: str, options: Options = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for Ray Data and pyarrow readers/writers (native for local disk)."""
    if is_local(uri):
        return pafs.LocalFileSystem(), local_path(uri)
    fs, path = filesystem(uri, options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str, options: Options = None) -> bool:
    fs, path = filesystem(uri, options)
    return fs.exists(path)


def read_bytes(uri: str, options: Options = None) -> bytes:
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes, options: Options = None) -> None:
    """Readers see the old file or the whole new one, never a part.

    On local disk: write a temp file beside it, fsync, rename. On object stores a single
    PUT is already atomic, so the object is written directly.
    """
    fs, path = filesystem(uri, options)
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


def sha256_of(uri_or_path: str, fs: fsspec.AbstractFileSystem | None = None, chunk: int = 8 << 20,
              options: Options = None) -> str:
    if fs is None:
        fs, uri_or_path = filesystem(uri_or_path, options)
    h = hashlib.sha256()
    with fs.open(uri_or_path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_file(uri: str, options: Options = None) -> None:
    """Delete one object if it is there (a manifest, a lock)."""
    fs, path = filesystem(uri, options)
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


def remove_tree(uri: str, options: Options = None) -> None:
    fs, path = filesystem(uri, options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def info(uri: str, options: Options = None) -> dict[str, Any]:
    fs, path = filesystem(uri, options)
    return fs.info(path)


def check_reachable(uri: str, what: str, options: Options = None) -> None:
    """Fail early, in one line, when an object-store location cannot be used: no bucket, no credentials, no endpoint."""
    if is_local(uri) or not uri.startswith(_S3_SCHEMES):
        return
    fs, path = filesystem(uri, options)
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise DistillError(f"bucket {bucket!r} for the {what} ({uri}) does not exist at "
                           f"{endpoint_of(options) or 'the default AWS endpoint'}",
                           "create the bucket, or fix the URI or the endpoint (--endpoint-url, AWS_ENDPOINT_URL)") from None
    except Exception as e:
        error = storage_error(e, uri, what, options)
        if error is None:
            raise
        raise error from None


def storage_error(e: BaseException, uri: str, what: str = "location", options: Options = None) -> DistillError | None:
    """The one line for an object-store failure (missing bucket, denied, no credentials, no endpoint),
    or None when `e` is not one. botocore's exceptions are named, not imported."""
    if not uri.startswith(_S3_SCHEMES):
        return None
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    endpoint = endpoint_of(options) or "the default AWS endpoint"
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
