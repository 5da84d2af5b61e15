"""A real S3 endpoint for tests: moto's server on 127.0.0.1, started and stopped by the test."""

from __future__ import annotations

import contextlib
import os

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def set_fake_credentials() -> None:
    """Credentials live in the environment (never in configs); moto accepts any."""
    for k, v in FAKE_CREDENTIALS.items():
        os.environ.setdefault(k, v)


@contextlib.contextmanager
def moto_s3(buckets=("distill",)):
    from moto.server import ThreadedMotoServer

    set_fake_credentials()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        for b in buckets:  # moto keeps state per process, so start each bucket empty
            if fs.exists(b):
                fs.rm(b, recursive=True)
            fs.mkdir(b)
        yield endpoint, fs
    finally:
        server.stop()
