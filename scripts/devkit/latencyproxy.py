"""A loopback HTTP proxy that puts a wide-area link between crashcart and Azurite (or any HTTP server).

On loopback a range request costs a fraction of a millisecond, so a reader that waits for each request
before it sends the next looks fast in tests and is slow on an operator's link (20-30 ms to a region).
`LatencyProxy` forwards every request to the upstream server unchanged (a SAS does not sign the host, so
a blob URL keeps working when its host:port is swapped for the proxy's: `proxy.url(blob_url)`) and adds:

- `rtt` seconds to every request (held before it is forwarded: the request's way out and the answer's
  way back), and the TCP handshake: a connection is usable `rtt` after it was opened (accepted), so a
  request sent on it at once waits one more `rtt`, one sent on a connection opened ahead (a client that
  warms its pool while its first request is out) waits only for what is left of the handshake;
- `bytes_per_second`: one link shared by every connection (bodies in both directions queue behind each
  other, as on the operator's line), or None for no cap.

`stats` counts what crossed it (requests, new connections - a connection opened and not used counts
here and nowhere else -, the most requests in flight at once, body bytes each way, and each request's
method, path without query and Range header), so tests can assert round trips and concurrency without
timing anything; `stats.timings` says where each request's time went (held for the link's latency,
waiting for the upstream server's answer, the body's relay paced by the bandwidth).
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from scripts.devkit.httprelay import HOP, Link, Upstream, read_body, relay

_CHUNK = 64 << 10


@dataclass
class ProxyStats:
    requests: int = 0
    connections: int = 0  # client connections opened to the proxy
    most_in_flight: int = 0  # requests being served at the same moment, at most
    bytes_up: int = 0  # request bodies
    bytes_down: int = 0  # response bodies
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path without query, Range)
    timings: list["Timing"] = field(default_factory=list)  # one per request, in the order they arrived


@dataclass
class Timing:
    """Where one request's time went through the proxy (seconds; `arrived` on time.monotonic())."""
    arrived: float = 0.0
    held: float = 0.0  # the link's latency: the RTT, and what was left of the connection's handshake
    upstream: float = 0.0  # from forwarding to the upstream server's status line (its serving time)
    relay: float = 0.0  # the body through the proxy, paced by the bandwidth (and the request body before)


class LatencyProxy:
    """`with LatencyProxy("http://127.0.0.1:10000", rtt=0.025) as proxy:` ... `proxy.url(blob_url)`."""

    def __init__(self, upstream: str, rtt: float = 0.025, bytes_per_second: float | None = None):
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"the upstream must be an http://host:port URL, not {upstream!r}")
        self._upstream = Upstream(parsed, timeout=120)
        self.rtt = rtt
        self.link = Link(bytes_per_second)
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._server: ThreadingHTTPServer | None = None

    # ---- lifecycle --------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, upstream_url: str) -> str:
        """`upstream_url` (path and query kept) addressed to the proxy instead of the upstream server."""
        parsed = urllib.parse.urlsplit(upstream_url)
        return urllib.parse.urlunsplit(("http", self.endpoint.split("//", 1)[1], parsed.path, parsed.query, ""))

    def reset(self) -> ProxyStats:
        """Starts counting afresh; returns what was counted so far."""
        with self._lock:
            old, self.stats = self.stats, ProxyStats()
        return old

    def start(self) -> "LatencyProxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else headers and body, written apart, wait for a delayed ACK

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                # the handshake: usable one RTT after the connection was accepted (stamped in _Server)
                self.ready_at = self.server.accepted_at(self.request) + proxy.rtt
                with proxy._lock:
                    proxy.stats.connections += 1

            def _serve(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _serve

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="latencyproxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "LatencyProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- one request --------------------------------------------------------------------------------
    def _handle(self, h: Any) -> None:
        arrived = time.monotonic()
        timing = Timing(arrived)
        with self._lock:
            self._in_flight += 1
            self.stats.requests += 1
            self.stats.most_in_flight = max(self.stats.most_in_flight, self._in_flight)
            self.stats.seen.append((h.command, urllib.parse.urlsplit(h.path).path, h.headers.get("Range", "")))
            self.stats.timings.append(timing)
        try:
            # the request leaves once the connection's handshake is done, its answer is back one RTT later
            _sleep_until(max(arrived, h.ready_at) + self.rtt)
            forwarded = time.monotonic()
            timing.held = forwarded - arrived
            body = read_body(h)
            self.link.pace(len(body))
            headers = [(k, v) for k, v in h.headers.items() if k.lower() not in HOP and k.lower() != "host"]
            headers.append(("Host", f"{self._upstream.host}:{self._upstream.port}"))
            if body:
                headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
                headers.append(("Content-Length", str(len(body))))
            with self._lock:
                self.stats.bytes_up += len(body)
            answered = time.monotonic()
            response = self._upstream.request(h.command, h.path, headers, body)
            timing.upstream = time.monotonic() - answered
            relay(h, response, lambda data: self._send(h, data), chunk=_CHUNK)
            timing.relay = time.monotonic() - forwarded - timing.upstream
        finally:
            with self._lock:
                self._in_flight -= 1

    def _send(self, h: Any, data: bytes) -> None:
        self.link.pace(len(data))
        with self._lock:
            self.stats.bytes_down += len(data)
        h.wfile.write(data)


def _sleep_until(moment: float) -> None:
    while (left := moment - time.monotonic()) > 0:
        time.sleep(left)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog (socketserver's 5 drops a reader's burst of 32 connects)

    def __init__(self, *args: Any, **kwargs: Any):
        self._accepted: dict[int, float] = {}
        super().__init__(*args, **kwargs)

    def get_request(self) -> Any:
        """Accepts a connection and notes when (its handshake is timed from there, not from when a thread
        got round to it)."""
        sock, address = super().get_request()
        self._accepted[id(sock)] = time.monotonic()
        return sock, address

    def accepted_at(self, sock: Any) -> float:
        return self._accepted.pop(id(sock), time.monotonic())

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer (a reader closed with read-ahead in flight) is no error."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)
