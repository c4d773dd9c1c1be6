"""What the rescue VM talks to, on loopback: Azurite over HTTPS with OAuth, the managed identity
endpoint (IMDS), and a proxy that injects storage failures.

Why HTTPS: Azurite accepts a bearer token only over HTTPS and only with `--oauth basic`, and the
remote scripts upload with a managed identity token, never a key — so the tests run them exactly that
way. Azurite's basic OAuth checks the token's audience (https://storage.azure.com), issuer
(https://sts.windows.net/<tenant>/) and lifetime, not its signature; the fake IMDS issues such a
token, as the real IMDS would for the VM's identity.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import json
import os
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from scripts.devkit.azurite import Azurite, start_azurite

TENANT = "72f988bf-0000-0000-0000-000000000001"
VM_PRINCIPAL = "5b0e4c3a-0000-0000-0000-0000000000aa"


@dataclass(frozen=True)
class Tls:
    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


def make_tls(folder: Path) -> Tls:
    """A self-signed certificate for 127.0.0.1 (also the CA bundle clients trust)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True)
    return Tls(cert, key)


def storage_token(audience: str = "https://storage.azure.com/", lifetime: int = 3600, oid: str = VM_PRINCIPAL) -> str:
    """A JWT shaped like the one Azure AD issues to a managed identity for Azure Storage."""
    now = int(time.time())
    claims = {"aud": audience, "iss": f"https://sts.windows.net/{TENANT}/", "iat": now - 60, "nbf": now - 60,
              "exp": now + lifetime, "oid": oid, "sub": oid, "tid": TENANT, "appid": "fake-msi", "ver": "1.0",
              "xms_mirid": "/subscriptions/x/resourcegroups/y/providers/Microsoft.Compute/virtualMachines/rescue"}

    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'typ': 'JWT', 'alg': 'RS256', 'kid': 'fake'})}.{b64(claims)}.{b64({'sig': 'not-checked'})}"


@contextlib.contextmanager
def start_azurite_oauth(tls: Tls) -> Iterator[Azurite]:
    """Azurite over HTTPS accepting bearer tokens (and the well-known key, for the test's own checks)."""
    with start_azurite(("--cert", str(tls.cert), "--key", str(tls.key), "--oauth", "basic")) as plain:
        yield dataclasses.replace(plain, blob_endpoint=plain.blob_endpoint.replace("http://", "https://", 1))


def service_client(azurite: Azurite, tls: Tls | None = None):
    """A key-authenticated client for the test's own setup and checks (never what the scripts use)."""
    from azure.storage.blob import BlobServiceClient

    kwargs: dict[str, Any] = {}
    if tls is not None:
        kwargs["connection_verify"] = str(tls.cert)
    return BlobServiceClient.from_connection_string(azurite.connection_string, **kwargs)


# ---- a small loopback HTTP(S) server base -------------------------------------------------------------
class _Server:
    def __init__(self, tls: Tls | None = None):
        self.tls = tls
        self._server: ThreadingHTTPServer | None = None

    def handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def __enter__(self):
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.handle(self, body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self.tls.cert), str(self.tls.key))
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _reply(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


class FakeImds(_Server):
    """The instance metadata service's managed identity endpoint, as documented: GET
    /metadata/identity/oauth2/token?api-version=...&resource=... with header `Metadata: true`."""

    def __init__(self, fail_first: int = 0):
        super().__init__()
        self.fail_first = fail_first
        self.requests: list[dict[str, Any]] = []

    def handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        parsed = urllib.parse.urlsplit(h.path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        self.requests.append({"path": parsed.path, "query": query, "metadata": h.headers.get("Metadata")})
        if parsed.path != "/metadata/identity/oauth2/token":
            return _reply(h, 404, b'{"error":"not_found"}')
        if h.headers.get("Metadata") != "true":
            return _reply(h, 400, b'{"error":"invalid_request","error_description":"Required metadata header not specified"}')
        if "api-version" not in query or "resource" not in query:
            return _reply(h, 400, b'{"error":"invalid_request","error_description":"resource and api-version required"}')
        if len(self.requests) <= self.fail_first:
            return _reply(h, 500, b'{"error":"unknown","error_description":"Failed to retrieve token from the Active directory"}')
        now = int(time.time())
        token = {"access_token": storage_token(query["resource"]), "client_id": "fake-msi",
                 "expires_in": "86399", "expires_on": str(now + 86399), "ext_expires_in": "86399",
                 "not_before": str(now), "resource": query["resource"], "token_type": "Bearer"}
        _reply(h, 200, json.dumps(token).encode(), {"Content-Type": "application/json"})


@dataclass
class Fault:
    """An answer the proxy gives instead of forwarding: status, x-ms-error-code and message."""

    status: int
    code: str
    message: str = ""

    def body(self) -> bytes:
        return (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{self.code}</Code>'
                f"<Message>{self.message or self.code}</Message></Error>").encode()


AUTHORIZATION_PERMISSION_MISMATCH = Fault(
    403, "AuthorizationPermissionMismatch", "This request is not authorized to perform this operation using this permission.")
SERVER_BUSY = Fault(503, "ServerBusy", "The server is currently unable to receive requests. Please retry your request.")
INTERNAL_ERROR = Fault(500, "InternalError", "The server encountered an internal error. Please retry the request.")


@dataclass
class ProxyRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    size: int
    answered: int = 0


class FaultProxy(_Server):
    """HTTPS in front of Azurite: forwards every request unless `rule(request)` returns a Fault.
    Records every request (method, path, query, size, status) for assertions."""

    def __init__(self, upstream: str, tls: Tls, rule: Callable[[ProxyRequest], Fault | None] | None = None):
        super().__init__(tls)
        self.upstream = urllib.parse.urlsplit(upstream)
        self.rule = rule or (lambda req: None)
        self.requests: list[ProxyRequest] = []
        self._lock = threading.Lock()

    @property
    def blob_endpoint(self) -> str:
        return self.url + self.upstream.path

    def handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        parsed = urllib.parse.urlsplit(h.path)
        req = ProxyRequest(h.command, urllib.parse.unquote(parsed.path), dict(urllib.parse.parse_qsl(parsed.query)),
                           {k.lower(): v for k, v in h.headers.items()}, len(body))
        with self._lock:
            self.requests.append(req)
            fault = self.rule(req)
        if fault is not None:
            req.answered = fault.status
            return _reply(h, fault.status, fault.body(), {"x-ms-error-code": fault.code, "Content-Type": "application/xml"})
        conn = http.client.HTTPSConnection(self.upstream.hostname, self.upstream.port, context=self.tls.context(),
                                           timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection", "expect")}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            req.answered = resp.status
            passthrough = {k: v for k, v in resp.getheaders()
                           if k.lower() not in ("content-length", "connection", "transfer-encoding", "keep-alive")}
            _reply(h, resp.status, data, passthrough)
        finally:
            conn.close()

    def calls(self, comp: str | None = None) -> list[ProxyRequest]:
        return [r for r in self.requests if comp is None or r.query.get("comp") == comp]


def env_for_script(*, blob_endpoint: str, container: str, prefix: str, device: Path | str, imds: str,
                   ca_bundle: Path, **extra: str) -> dict[str, str]:
    """The environment a Linux managed Run Command would give the script, plus the CA bundle curl
    needs to trust the test's HTTPS endpoints (CURL_CA_BUNDLE: a curl setting, not a script input)."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": "/root",
           "CURL_CA_BUNDLE": str(ca_bundle),
           "BlobEndpoint": blob_endpoint, "Container": container, "Prefix": prefix, "Device": str(device),
           "ImdsEndpoint": imds}
    env.update(extra)
    return env
