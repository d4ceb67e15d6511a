"""A small threaded HTTP proxy in front of the S3 server: counts the body bytes it serves per
request, and injects faults on chosen requests.

Requests are forwarded unchanged (the ``Host`` header too, so SigV4 signatures stay valid).
:class:`Fault` rules apply to the requests they match, ``count`` times each:

- ``status``: answer ``code`` with an S3 error document (503 SlowDown, 500, 403 AccessDenied...)
  without forwarding;
- ``reset``: send the headers and half the body, then reset the connection (RST);
- ``truncate``: announce the full Content-Length, send half the body, close (FIN);
- ``short``: announce and send only half the body (a consistent but short response).
"""
from __future__ import annotations

import http.client
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
_CODES = {503: "SlowDown", 500: "InternalError", 403: "AccessDenied", 404: "NoSuchKey"}


@dataclass
class Fault:
    kind: str  # "status" | "reset" | "truncate" | "short"
    match: str = ""  # substring of the request path
    method: str = "GET"
    code: int = 503
    count: int = 1  # how many matching requests it hits (-1: all)
    ranged_only: bool = True  # only requests with a Range header
    hits: int = 0


@dataclass
class Served:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int


@dataclass
class ProxyState:
    upstream: tuple[str, int]
    faults: list[Fault] = field(default_factory=list)
    served: list[Served] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_fault(self, method: str, path: str, ranged: bool) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if (f.method == method and f.match in path and (ranged or not f.ranged_only)
                        and (f.count < 0 or f.hits < f.count)):
                    f.hits += 1
                    return f
        return None

    def record(self, item: Served) -> None:
        with self.lock:
            self.served.append(item)

    def reset_counts(self) -> None:
        with self.lock:
            self.served.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _forward(self) -> None:
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        ranged = "Range" in self.headers
        fault = state.take_fault(self.command, self.path, ranged)
        if fault is not None and fault.kind == "status":
            return self._error(fault.code, state)
        conn = http.client.HTTPConnection(*state.upstream, timeout=60)
        try:
            conn.connect()
        except OSError:  # the server refused (overloaded): a 503 the client retries, never a hang-up
            return self._error(503, state)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP | {"content-length"}]
            if fault is None and resp.length is not None:
                return self._stream(resp, out_headers, state)
            data = resp.read()
            status = resp.status
        finally:
            conn.close()
        self._send(status, out_headers, data, fault, state)

    def _stream(self, resp: http.client.HTTPResponse, headers: list, state: ProxyState) -> None:
        """Forward the body as it arrives (1 MiB at a time), counting what reached the client."""
        self.send_response(resp.status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(resp.length))
        self.end_headers()
        sent = 0
        try:
            while self.command != "HEAD" and (chunk := resp.read(1 << 20)):
                self.wfile.write(chunk)
                sent += len(chunk)
        finally:
            state.record(Served(self.command, self.path, self.headers.get("Range"), resp.status, sent))

    def _send(self, status: int, headers: list, data: bytes, fault: Fault | None, state: ProxyState) -> None:
        half = len(data) // 2
        announced = half if fault is not None and fault.kind == "short" else len(data)
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        if self.command == "HEAD":
            state.record(Served(self.command, self.path, self.headers.get("Range"), status, 0))
            return
        if fault is None:
            self.wfile.write(data)
            state.record(Served(self.command, self.path, self.headers.get("Range"), status, len(data)))
            return
        self.wfile.write(data[:half])
        self.wfile.flush()
        state.record(Served(self.command, self.path, self.headers.get("Range"), status, half))
        if fault.kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if fault.kind in ("reset", "truncate"):
            self.close_connection = True
            self.connection.close()

    def _error(self, code: int, state: ProxyState) -> None:
        name = _CODES.get(code, "InternalError")
        doc = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{name}</Code><Message>injected by the '
               f'test proxy</Message><Resource>{self.path}</Resource></Error>').encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(doc) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(doc)
        state.record(Served(self.command, self.path, self.headers.get("Range"), code, 0))

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ProxyState
    aborted = 0  # responses the client hung up on before the body was sent

    def handle_error(self, request, client_address) -> None:  # a client closing early is counted, not printed
        import sys
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            with self.state.lock:
                self.aborted += 1
            return
        super().handle_error(request, client_address)


class CountingProxy:
    """``CountingProxy(upstream_url)``; ``endpoint`` is the proxy's URL; ``stop()`` ends it."""

    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self.state = ProxyState((parsed.hostname or "127.0.0.1", parsed.port or 80))
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def served(self) -> list[Served]:
        with self.state.lock:
            return list(self.state.served)

    def add_fault(self, fault: Fault) -> Fault:
        with self.state.lock:
            self.state.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self.state.lock:
            self.state.faults.clear()
            self.state.served.clear()

    def get_bytes(self) -> int:
        return sum(s.body_bytes for s in self.served if s.method == "GET")

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
