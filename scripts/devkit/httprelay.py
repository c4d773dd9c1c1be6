"""What the devkit's HTTP middlemen (copyshim: Azure's Blob behaviour Azurite lacks; latencyproxy: a slow link)
share: reading a request's body, one kept-alive upstream connection per handler thread, relaying the answer, and
the pacing of bodies through one link of limited bandwidth.

A middleman must not change what it relays: hop-by-hop headers are its own, everything else goes through, and
the body is streamed in chunks through the caller's `write` (which may pace or count it)."""

from __future__ import annotations

import http.client
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler
from typing import Callable

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def read_body(h: BaseHTTPRequestHandler) -> bytes:
    """The request's body, sent with a Content-Length or chunked."""
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                h.rfile.readline()
                break
            chunks.append(h.rfile.read(size))
            h.rfile.readline()
        return b"".join(chunks)
    length = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(length) if length else b""


class Upstream:
    """The server behind the middleman: one kept-alive connection per handler thread, HTTPS when the URL says so
    (trusting `cafile`)."""

    def __init__(self, parsed: urllib.parse.SplitResult, cafile: str | None = None, timeout: float = 300):
        self.tls = parsed.scheme == "https"
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or (443 if self.tls else 80)
        self.cafile = cafile
        self.timeout = timeout
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.tls:
                context = ssl.create_default_context(cafile=self.cafile)
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=context)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> http.client.HTTPResponse:
        """Sends one request. Retried once, on a fresh connection, only when a kept-alive connection turned out to
        be closed by the server (it then never read the request)."""
        for attempt in range(2):
            conn = self._connection()
            try:
                conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    conn.putheader(name, value)
                conn.endheaders(body if body else None)
                return conn.getresponse()
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected, ssl.SSLEOFError,
                    ssl.SSLZeroReturnError):  # (over TLS, a connection the server closed reads as an EOF)
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
            except Exception:
                conn.close()
                self._local.conn = None
                raise
        raise AssertionError("unreachable")  # pragma: no cover


def relay(h: BaseHTTPRequestHandler, response: http.client.HTTPResponse, write: Callable[[bytes], None], *,
          added: dict[str, str] | None = None, chunk: int = 1 << 20) -> None:
    """Sends `response` back on `h`: status, end-to-end headers (+ `added`), the body in chunks through `write`;
    drains the response so its connection can carry the next request."""
    length = response.getheader("Content-Length")
    h.send_response_only(response.status, response.reason)
    for name, value in response.getheaders():
        if name.lower() not in HOP and name.lower() != "content-length":
            h.send_header(name, value)
    for name, value in (added or {}).items():
        h.send_header(name, value)
    if length is None or h.command == "HEAD":
        data = response.read()  # (empty for HEAD) drains and closes the response
        if h.command == "HEAD":
            h.send_header("Content-Length", length or "0")
            h.end_headers()
            return
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if data:
            write(data)
        return
    h.send_header("Content-Length", length)
    h.end_headers()
    remaining = int(length)
    while remaining > 0:
        data = response.read(min(chunk, remaining))
        if not data:
            break
        write(data)
        remaining -= len(data)
    response.read()


class Link:
    """One link of `bytes_per_second` (None: no cap) that every connection's bodies share, in both directions:
    `pace(n)` holds the caller until `n` more bytes have gone through behind what is already on its way."""

    def __init__(self, bytes_per_second: float | None = None):
        self.bytes_per_second = bytes_per_second
        self._lock = threading.Lock()
        self._free_at = 0.0

    def pace(self, n: int) -> None:
        rate = self.bytes_per_second
        if not rate or n <= 0:
            return
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + n / rate
            wait = self._free_at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
