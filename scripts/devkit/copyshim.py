"""A loopback proxy in front of Azurite that adds what Azurite 3.35 lacks: Put Block From URL, and the
service's CRC-64 of each block a Put Block stores.

Azurite 3.35.0 (the newest whose engines accept Node 20) answers Put Block From URL with 501
APINotImplemented; 3.37 implements it but needs Node 22. So the tests, the benchmark and `make demo`
put this shim in front of Azurite and give crashcart the shim's address as the Blob endpoint. crashcart's
code does exactly what it does against Azure (`BlobClient.stage_block_from_url`); the shim does what the
service does with that request:

- every request is first forwarded to Azurite unchanged. Azurite authenticates it (SharedKey, SAS or
  bearer) before it looks at the operation, so a request that is not allowed fails there with Azurite's
  own 403, exactly as the service would answer; any answer but 501 APINotImplemented is passed back as is
  (so a newer Azurite that implements the operation is used directly);
- on 501 for `PUT ?comp=block` carrying `x-ms-copy-source`, the shim performs the operation: it checks
  Content-Length is 0, GETs the source URL with `Range` from `x-ms-source-range` (and `Authorization` from
  `x-ms-copy-source-authorization`, as the service forwards it), checks `x-ms-source-content-md5` when
  given, and stages the bytes as the block with a Put Block into Azurite (signed with Azurite's
  well-known development key, which the shim holds as the service holds its own). It answers 201 with the
  block's Content-MD5 and `x-ms-content-crc64` (the CRC-64 the Blob service computes over the block it
  wrote, documented for Put Block From URL from service version 2019-02-02 on; the SDK returns it as
  `content_crc64`), or the source's failure as `CannotVerifyCopySource` with the source's status.
  Azurite 3.35 itself returns neither header on Put Block (checked: `stage_block` answers content_md5 and
  content_crc64 None), so this CRC is the shim's, computed from the bytes it staged exactly as Azure's
  service would; it lets the kit's proof (the composed CRC-64) be tested end to end (`report_crc64 =
  False` answers as a service that sends none). Like the service, the shim hashes at machine speed
  (scripts.devkit.servicecrc: C through ctypes, scripts.evidence.crc64 without a compiler);
- a plain Put Block (its bytes in the request body) is forwarded to Azurite as it is; when Azurite stored it
  (201) and answered no `x-ms-content-crc64`, the shim adds the one Azure returns: the Put Block REST page
  documents `x-ms-content-crc64` in the response "for versions 2019-02-02 or later ... computed by the Blob
  service ... returned when the Content-md5 header isn't present in the request" (and Content-MD5 in the
  response only when the request carried one). So the shim adds it only for a request of such a version
  without Content-MD5 (and not when `report_crc64` is False), computed over the body Azurite accepted.
  The rescue VM's upload (scripts/remote/_upload.sh.j2) composes these into the blob's CRC-64;
- with `certfile`/`keyfile` the shim serves HTTPS (the rescue scripts send a bearer token, which Azurite
  takes only over HTTPS) and talks HTTPS to an Azurite that does, trusting `certfile`;
- the bytes of a copied block travel source -> shim -> Azurite, never through the client: the shim counts
  them (`copied_bytes`, `copies`) so tests can tell server-side bytes from what the client sent
  (`client_body_bytes`: request bodies the client uploaded through the shim; `client_response_bytes`:
  response bodies it read back through the shim).

`client_bytes_per_second` (benchmark only) paces what crosses the client's side of the shim, request and
response bodies, as the operator's network link would, while server-side fetches run at local speed (the
region's network). A copy source URL that points at the shim itself is fetched from Azurite directly.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import threading
import urllib.parse
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from scripts.base.errors import first_line
from scripts.devkit.azurite import Azurite
from scripts.devkit.httprelay import HOP, Link, Upstream, read_body, relay
from scripts.devkit.servicecrc import block_crc64
from scripts.evidence import crc64



@dataclass
class CopyRecord:
    blob: str
    block_id: str
    source: str  # the source URL without its query (a SAS never lands in a record)
    offset: int
    length: int
    authorization: str  # "" | "Bearer" (the scheme of x-ms-copy-source-authorization, never the token)
    status: int


@dataclass
class ShimStats:
    copies: list[CopyRecord] = field(default_factory=list)
    copied_bytes: int = 0  # bytes the shim fetched from copy sources (server-side traffic)
    client_body_bytes: int = 0  # request bodies uploaded by clients through the shim
    client_response_bytes: int = 0  # response bodies sent back to clients (what they read, e.g. a blob read back)
    forwarded: int = 0


class CopyShim:
    """`with CopyShim(azurite) as shim:` ... `shim.blob_endpoint` is what crashcart is given."""

    def __init__(self, azurite: Azurite, certfile: str | None = None, keyfile: str | None = None):
        self.azurite = azurite
        parsed = urllib.parse.urlsplit(azurite.blob_endpoint)
        self._upstream = Upstream(parsed, certfile)
        self.certfile, self.keyfile = certfile, keyfile
        self._account_path = parsed.path.rstrip("/")  # /devstoreaccount1
        self.stats = ShimStats()
        self._lock = threading.Lock()
        self._local = threading.local()  # per handler thread: the requests session and SDK client of copies
        self._server: ThreadingHTTPServer | None = None
        self.fail_next_copy: tuple[int, str] | None = None  # (status, error code): one injected failure
        self.report_crc64 = True  # False: answer as a service that sends no x-ms-content-crc64 (tests)
        self._client_link = Link()  # the client's link, paced by the benchmark (client_bytes_per_second)

    # ---- lifecycle ------------------------------------------------------------------------------------
    @property
    def blob_endpoint(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"{'https' if self.keyfile else 'http'}://{host}:{port}{self._account_path}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={self.azurite.account};AccountKey={self.azurite.key};"
                f"BlobEndpoint={self.blob_endpoint};")

    def start(self) -> "CopyShim":
        shim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                shim._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.certfile and self.keyfile:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.certfile, self.keyfile)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> "CopyShim":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- plumbing -------------------------------------------------------------------------------------
    @property
    def client_bytes_per_second(self) -> float | None:
        return self._client_link.bytes_per_second

    @client_bytes_per_second.setter
    def client_bytes_per_second(self, rate: float | None) -> None:
        self._client_link.bytes_per_second = rate

    def _pace(self, n: int, read: bool = False) -> None:
        """Holds the caller until `n` more bytes fit through the client's link (when one is set); `read`:
        they are a response body the client reads (counted)."""
        if read:
            with self._lock:
                self.stats.client_response_bytes += n
        self._client_link.pace(n)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = read_body(h)
        self._pace(len(body))
        with self._lock:
            self.stats.forwarded += 1
            self.stats.client_body_bytes += len(body)
        # Host names Azurite (it is not part of what SharedKey signs, and Azurite reads it)
        headers = [(k, v) for k, v in h.headers.items() if k.lower() not in HOP and k.lower() != "host"]
        headers.append(("Host", f"{self._upstream.host}:{self._upstream.port}"))
        if body and not any(k.lower() == "content-length" for k, _ in headers):
            headers.append(("Content-Length", str(len(body))))
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"] + [("Content-Length", str(len(body)))]
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)
        copy = (h.command == "PUT" and query.get("comp") == ["block"] and h.headers.get("x-ms-copy-source"))
        response = self._upstream.request(h.command, h.path, headers, body)
        if copy and response.status == 501:
            response.read()
            self._put_block_from_url(h, query)
            return
        added = {}
        if (h.command == "PUT" and query.get("comp") == ["block"] and not copy and response.status == 201
                and self.report_crc64 and _returns_crc64(h.headers) and not response.getheader("x-ms-content-crc64")):
            added["x-ms-content-crc64"] = crc64.to_header(block_crc64(body))  # the service's CRC of the block it stored
        relay(h, response, lambda data: self._write(h, data), added=added)

    def _write(self, h: BaseHTTPRequestHandler, data: bytes) -> None:
        self._pace(len(data), read=True)
        h.wfile.write(data)

    # ---- Put Block From URL, the way the service does it ------------------------------------------------
    def _put_block_from_url(self, h: BaseHTTPRequestHandler, query: dict[str, list[str]]) -> None:
        import requests

        if int(h.headers.get("Content-Length") or 0) != 0:
            _error(h, 400, "InvalidHeaderValue", "Content-Length must be 0 for Put Block From URL.")
            return
        source = h.headers["x-ms-copy-source"]
        if source.startswith(self.blob_endpoint + "/"):  # "inside the region": not over the client's link
            source = self.azurite.blob_endpoint + source[len(self.blob_endpoint):]
        block_id = query.get("blockid", [""])[0]
        if not block_id:
            _error(h, 400, "MissingRequiredQueryParameter", "blockid is required.")
            return
        path = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path)
        blob = path[len(self._account_path) + 1:] if path.startswith(self._account_path + "/") else path.lstrip("/")
        container, _, blob_name = blob.partition("/")
        fetch_headers = {"x-ms-version": h.headers.get("x-ms-version", "2025-01-05")}
        source_range = h.headers.get("x-ms-source-range")
        offset, length = 0, None
        if source_range:
            spec = source_range.split("=", 1)[-1]
            lo, _, hi = spec.partition("-")
            offset, length = int(lo), int(hi) - int(lo) + 1
            fetch_headers["Range"] = f"bytes={lo}-{hi}"
        auth = h.headers.get("x-ms-copy-source-authorization", "")
        if auth:
            if not auth.lower().startswith("bearer "):
                _error(h, 400, "InvalidHeaderValue", "x-ms-copy-source-authorization must use the Bearer scheme.")
                return
            fetch_headers["Authorization"] = auth
        record = CopyRecord(blob, block_id, source.split("?", 1)[0], offset, length or 0,
                            auth.split(" ", 1)[0] if auth else "", 0)
        injected, self.fail_next_copy = self.fail_next_copy, None
        if injected is not None:
            record.status = injected[0]
            self._record(record, 0)
            _error(h, injected[0], injected[1], "injected failure")
            return
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        try:
            got = session.get(source, headers=fetch_headers, timeout=300,
                              verify=(self.certfile or True) if source.startswith("https://") else True)
        except requests.RequestException as err:
            record.status = 400
            self._record(record, 0)
            _error(h, 400, "CannotVerifyCopySource", f"Could not reach the copy source: {err}")
            return
        if got.status_code not in (200, 206):
            record.status = got.status_code
            self._record(record, 0)
            _error(h, got.status_code, "CannotVerifyCopySource",
                        f"The copy source answered {got.status_code} {got.headers.get('x-ms-error-code', '')}".strip())
            return
        data = got.content
        if length is not None and len(data) != length:
            record.status = 416
            self._record(record, len(data))
            _error(h, 416, "CannotVerifyCopySource", f"asked for {length} bytes, the source sent {len(data)}")
            return
        md5 = hashlib.md5(data).digest()
        expected = h.headers.get("x-ms-source-content-md5")
        if expected and base64.b64decode(expected) != md5:
            record.status = 400
            self._record(record, len(data))
            _error(h, 400, "Md5Mismatch", "The MD5 value specified in the request did not match the source.")
            return
        service = getattr(self._local, "service", None)
        if service is None:
            from azure.storage.blob import BlobServiceClient

            service = self._local.service = BlobServiceClient.from_connection_string(
                f"DefaultEndpointsProtocol=http;AccountName={self.azurite.account};AccountKey={self.azurite.key};"
                f"BlobEndpoint={self.azurite.blob_endpoint};",
                **({"connection_verify": self.certfile or True} if self._upstream.tls else {}))
        client = service.get_blob_client(container, blob_name)
        try:
            # the SDK base64-encodes the id it is given: hand it the id the client encoded
            client.stage_block(base64.b64decode(block_id).decode("utf-8"), data, length=len(data))
        except Exception as err:  # the destination refused it (container missing, bad block id...)
            status = getattr(err, "status_code", 500) or 500
            record.status = status
            self._record(record, len(data))
            _error(h, status, getattr(err, "error_code", None) or "InternalError", first_line(err))
            return
        record.status = 201
        self._record(record, len(data))
        crc = {"x-ms-content-crc64": crc64.to_header(block_crc64(data))} if self.report_crc64 else {}  # of the block
        _reply(h, 201, {"Content-MD5": base64.b64encode(md5).decode(), "x-ms-request-server-encrypted": "true", **crc})

    def _record(self, record: CopyRecord, fetched: int) -> None:
        with self._lock:
            self.stats.copies.append(record)
            self.stats.copied_bytes += fetched


# ---- HTTP on the client's side of the shim ------------------------------------------------------------
def _returns_crc64(headers: Any) -> bool:
    """Whether Azure answers this Put Block with x-ms-content-crc64: version 2019-02-02 or later, no Content-MD5."""
    return not headers.get("Content-MD5") and headers.get("x-ms-version", "") >= "2019-02-02"


def _reply(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes = b"") -> None:
    h.send_response_only(status)
    h.send_header("Date", formatdate(usegmt=True))
    h.send_header("x-ms-request-id", str(uuid.uuid4()))
    h.send_header("x-ms-version", h.headers.get("x-ms-version", "2025-01-05"))
    h.send_header("Server", "crashcart-copyshim (Put Block From URL) over Azurite")
    for name, value in headers.items():
        h.send_header(name, value)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if body:
        h.wfile.write(body)


def _error(h: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
    """An error the way the Blob service words it: x-ms-error-code and an XML body."""
    body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{message}\n'
            f"RequestId:{uuid.uuid4()}</Message></Error>").encode()
    _reply(h, status, {"x-ms-error-code": code, "Content-Type": "application/xml"}, body)
