"""A storage firewall that refuses the runner reads as a network rule, not a missing role (issue 12, break 2).

The "storage account" is a loopback HTTP server answering every request the way Azure Storage answers a
request its network rules refuse (403, x-ms-error-code AuthorizationFailure, the service's XML body), and
the kit's own evidence code talks to it through the real azure-storage-blob client."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scripts.base.errors import CrashcartError, ExitCode
from scripts.evidence import blobs

FIREWALL_BODY = ('<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{message}\n'
                 'RequestId:0b3c2f0e-001e-0042-1d2b-000000000000\nTime:2026-12-01T21:00:00.0000000Z</Message></Error>')
REFUSALS = {
    # a network rule (default-deny firewall without this machine's IP)
    "AuthorizationFailure": "This request is not authorized to perform this operation.",
    # a data role the identity lacks (what the role hint is for)
    "AuthorizationPermissionMismatch": "This request is not authorized to perform this operation using this "
                                       "permission.",
}


class _Refusing(BaseHTTPRequestHandler):
    code = "AuthorizationFailure"

    def _refuse(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = FIREWALL_BODY.format(code=self.code, message=REFUSALS[self.code]).encode()
        self.send_response(403, REFUSALS[self.code])
        self.send_header("x-ms-error-code", self.code)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)) if self.command != "HEAD" else "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = _refuse

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_account(monkeypatch):
    monkeypatch.delenv(blobs.CONNECTION_STRING_ENV, raising=False)
    servers = []

    def make(code: str):
        handler = type("Handler", (_Refusing,), {"code": code})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        from azure.storage.blob import ContainerClient

        return ContainerClient(f"http://127.0.0.1:{server.server_port}/evidenceacct", "dumps")

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_firewall_refusal_says_network_rule_and_names_the_config_key(refusing_account):
    container = refusing_account("AuthorizationFailure")
    with pytest.raises(CrashcartError) as caught:
        blobs.upload_text(container, "web-01-1a2b3c4d/20261201T210000Z/report.json", "{}", "application/json")
    err = caught.value
    assert err.exit_code == ExitCode.AZURE_AUTH == 3
    assert "AuthorizationFailure" in err.message and "network rules refused this machine" in err.message
    assert "evidence.allowed_ip_ranges" in err.hint and "firewall" in err.hint
    assert "Storage Blob Data" not in err.hint  # no role fixes a network rule: the role hint would mislead
    assert "\n" not in err.message and "\n" not in err.hint


def test_a_missing_data_role_still_names_the_role(refusing_account):
    container = refusing_account("AuthorizationPermissionMismatch")
    with pytest.raises(CrashcartError) as caught:
        # read: a missing role fails after the kit's propagation wait; zero it so the test is quick
        blobs.auth_retry(lambda: container.get_blob_client("x").download_blob().readall(), "read x",
                         wait_seconds=0.0, first_delay=0.01)
    err = caught.value
    assert err.exit_code == ExitCode.AZURE_AUTH
    assert "Storage Blob Data" in err.hint and "allowed_ip_ranges" not in err.hint
    assert "network rules" not in err.message
