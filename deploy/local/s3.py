"""A real S3 endpoint on 127.0.0.1 for tests and benchmarks: moto's server, and a proxy in front of it
that fails chosen requests or counts the bytes each object served."""

from __future__ import annotations

import contextlib
import logging
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
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's line per request
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


class S3Proxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server: what the object store served, per path
    (`served`: bytes of GET answers), and failures on purpose.

    `fail(method, path, n)` decides per request: return (status, S3 error code) to fail it with,
    "drop" to close the connection without an answer, or None to forward it. Requests are counted, so the tests stay deterministic and bounded.
    """

    def __init__(self, upstream: str, fail=None):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import unquote, urlparse

        up = urlparse(upstream)
        self.failed: list[tuple[str, str, int]] = []
        self.count = 0
        self.served: dict[str, int] = {}
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _handle(self):
                body = self._body()
                with lock:
                    proxy.count += 1
                    n = proxy.count
                verdict = fail(self.command, self.path, n) if fail else None
                if verdict == "drop":  # a dropped connection: no response at all
                    proxy.failed.append((self.command, self.path, 0))
                    self.close_connection = True
                    return
                if verdict:
                    status, code = verdict
                    proxy.failed.append((self.command, self.path, status))
                    payload = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                # HEAD answers carry the object's size, not the (empty) body's.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                if self.command == "GET":
                    with lock:
                        key = unquote(self.path.split("?", 1)[0])
                        proxy.served[key] = proxy.served.get(key, 0) + len(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
