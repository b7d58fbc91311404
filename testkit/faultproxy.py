"""A fault-injecting HTTP proxy for S3 traffic, on loopback (tests and benchmarks only).

Sits between the job and a real S3 server and, on a chosen share of requests, answers
``503 SlowDown``, answers ``500 InternalError``, resets the connection, or delays the request,
before (or instead of) forwarding it unchanged. Requests are forwarded with their own ``Host``
header, so SigV4 signatures made for the proxy's address still verify upstream.

Faults are drawn from a seeded generator, so a run sees the same sequence each time; a
``permanent`` prefix makes every matching request fail (a storage outage for that prefix).
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULTS = ("slowdown", "internal", "reset", "delay")
XML_ERROR = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
             '<Resource>{path}</Resource><RequestId>fault-proxy</RequestId></Error>')


class FaultProxy:
    """Args:
        upstream: the S3 endpoint URL (``http://127.0.0.1:port``).
        rate: share of requests that get a fault (0 = a plain proxy).
        faults: which faults to draw from.
        delay_s: how long a ``delay`` fault holds the request.
        permanent: requests whose path starts with this (``/bucket/prefix``) always get a 500 ...
        permanent_methods: ... when their method is one of these (default: every method).
        seed: the fault sequence.
    """

    def __init__(self, upstream: str, *, rate: float = 0.1, faults: tuple[str, ...] = FAULTS, delay_s: float = 0.3,
                 permanent: str | None = None, permanent_methods: tuple[str, ...] = (), seed: int = 0):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.rate = rate
        self.faults = faults
        self.delay_s = delay_s
        self.permanent = permanent
        self.permanent_methods = permanent_methods
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _draw(self, method: str, path: str) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            if self.permanent and path.startswith(self.permanent) and (
                    not self.permanent_methods or method in self.permanent_methods):
                self.counts["permanent"] += 1
                return "permanent"
            if self.random.random() >= self.rate:
                return None
            fault = self.random.choice(self.faults)
            self.counts[fault] += 1
            return fault

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        chunk = self.rfile.read(size + 2)
                        raw += chunk
                        if size == 0:
                            while chunk not in (b"\r\n", b""):  # trailers
                                chunk = self.rfile.readline()
                                raw += chunk
                            return raw
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _error(self, status: int, code: str, message: str) -> None:
                body = XML_ERROR.format(code=code, message=message, path=self.path).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._draw(self.command, self.path)
                if fault == "permanent":
                    return self._error(500, "InternalError", "injected permanent failure")
                if fault == "slowdown":
                    return self._error(503, "SlowDown", "Please reduce your request rate.")
                if fault == "internal":
                    return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
                if fault == "reset":
                    self.close_connection = True
                    try:  # RST, not a polite FIN: what a dropped connection looks like
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                        self.connection.close()
                    except OSError:
                        pass
                    return None
                if fault == "delay":
                    time.sleep(proxy.delay_s)
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        upstream.putheader(name, value)
                    upstream.endheaders(body if body else None)
                    response = upstream.getresponse()
                    data = response.read()
                    self.send_response(response.status, response.reason)
                    head = self.command == "HEAD"  # its Content-Length is the object's size
                    for name, value in response.getheaders():
                        if name.lower() not in ("transfer-encoding", "connection") and (
                                head or name.lower() != "content-length"):
                            self.send_header(name, value)
                    if not head:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()
                return None

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
