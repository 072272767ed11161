"""S3 test fixtures: a real S3 API (moto's server on 127.0.0.1), fresh buckets, and a fault-injecting proxy.

- s3_server (session): starts moto, sets dummy AWS credentials, AWS_DEFAULT_REGION and DGM_S3_ENDPOINT_URL in
  os.environ (subprocesses inherit them), yields the endpoint URL.
- s3_bucket (function): a new empty bucket, yields "s3://<name>"; emptied and removed afterwards.
- flaky_s3 (function): a FlakyS3Proxy in front of moto; DGM_S3_ENDPOINT_URL points at it for the test, so every
  storage call (and subprocess) goes through it. Arm faults with fail_next() / drop_next_gets(); read counters.
"""

from __future__ import annotations

import functools
import http.client
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "content-length",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=4)
def _raw_client(endpoint: str):
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(s3={"addressing_style": "path"})
    )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 on 127.0.0.1 for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    mp.setenv("DGM_S3_ENDPOINT_URL", endpoint)
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
        mp.delenv(name, raising=False)
    try:
        yield endpoint
    finally:
        mp.undo()
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A fresh bucket on the moto server (created directly, not through a flaky proxy); yields "s3://<name>"."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    client = _raw_client(s3_server)
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=item["Key"])
    client.delete_bucket(Bucket=name)


@dataclass
class ProxiedRequest:
    method: str
    path: str
    range: str | None
    outcome: str  # "forwarded", "error" (injected status) or "dropped" (connection cut mid-body)


@dataclass
class FlakyS3Proxy:
    """An HTTP proxy to moto that injects faults on demand, then forwards faithfully.

    fail_next(n, status): the next n requests get ``status`` (an S3-style XML error) without reaching moto.
    drop_next_gets(n, after_bytes): the next n object GETs with a body get their headers and ``after_bytes`` of
    the body (default: half), then the connection is cut.
    ignore_ranges(n): the next n ranged GETs reach moto without their Range and If-Match headers (a proxy or
    store that ignores them answers with the whole object).
    """

    upstream: str
    endpoint_url: str = ""
    errors_injected: int = 0
    drops_injected: int = 0
    requests: list[ProxiedRequest] = field(default_factory=list)
    _errors_armed: int = 0
    _error_status: int = 500
    _drops_armed: int = 0
    _drop_after: int | None = None
    _ranges_ignored: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    def fail_next(self, n: int, status: int = 500) -> None:
        with self._lock:
            self._errors_armed, self._error_status = n, status

    def drop_next_gets(self, n: int, after_bytes: int | None = None) -> None:
        with self._lock:
            self._drops_armed, self._drop_after = n, after_bytes

    def ignore_ranges(self, n: int) -> None:
        with self._lock:
            self._ranges_ignored = n

    def take_range_ignored(self) -> bool:
        with self._lock:
            if self._ranges_ignored <= 0:
                return False
            self._ranges_ignored -= 1
            return True

    def reset(self) -> None:
        with self._lock:
            self._errors_armed = self._drops_armed = 0

    def start(self) -> None:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _decide(self, method: str, path: str, rng: str | None) -> tuple[str, int]:
        """('error', status), ('drop', bytes-or--1) or ('forward', 0) for the next request; counts injections."""
        with self._lock:
            if self._errors_armed > 0:
                self._errors_armed -= 1
                self.errors_injected += 1
                self.requests.append(ProxiedRequest(method, path, rng, "error"))
                return "error", self._error_status
            is_object = "/" in urlsplit(path).path.strip("/")
            if method == "GET" and is_object and self._drops_armed > 0:
                return "drop", -1 if self._drop_after is None else self._drop_after
            self.requests.append(ProxiedRequest(method, path, rng, "forwarded"))
            return "forward", 0

    def _record(self, method: str, path: str, rng: str | None, outcome: str) -> None:
        with self._lock:
            if outcome == "dropped":
                self._drops_armed -= 1
                self.drops_injected += 1
            self.requests.append(ProxiedRequest(method, path, rng, outcome))


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FlakyS3Proxy

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        if length is None:
            return None
        return self.rfile.read(int(length))

    def _send_error(self, status: int) -> None:
        body = (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
            f"<Message>injected fault (HTTP {status})</Message></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        body = self._read_body()
        rng = self.headers.get("Range")
        action, arg = self.owner._decide(self.command, self.path, rng)
        if action == "error":
            self._send_error(arg)
            return
        host, port = urlsplit(self.owner.upstream).netloc.split(":")
        upstream = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if rng and self.command == "GET" and self.owner.take_range_ignored():
                headers = {k: v for k, v in headers.items() if k.lower() not in ("range", "if-match")}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response_only(response.status, response.reason)
        for k, v in response.getheaders():
            if k.lower() not in _HOP_BY_HOP:
                self.send_header(k, v)
        if self.command == "HEAD":
            if response.getheader("Content-Length") is not None:
                self.send_header("Content-Length", response.getheader("Content-Length"))
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if action == "drop" and response.status in (200, 206) and len(data) > 1:
            cut = arg if 0 <= arg < len(data) else len(data) // 2
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.owner._record(self.command, self.path, rng, "dropped")
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if action == "drop":
            self.owner._record(self.command, self.path, rng, "forwarded")
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


@pytest.fixture
def flaky_s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyS3Proxy]:
    """A FlakyS3Proxy in front of moto; DGM_S3_ENDPOINT_URL points at it for this test. Faults start disarmed."""
    proxy = FlakyS3Proxy(upstream=s3_server)
    proxy.start()
    monkeypatch.setenv("DGM_S3_ENDPOINT_URL", proxy.endpoint_url)
    try:
        yield proxy
    finally:
        proxy.stop()
