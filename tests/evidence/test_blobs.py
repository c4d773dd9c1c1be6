"""scripts/evidence.py against Azurite: which credential is used where, the wait for a role assignment to
take effect, reads of growing logs, and read-only user-delegation SAS links (Azurite over HTTPS with
OAuth, a bearer token credential: the same flow as Azure AD, no account key)."""

from __future__ import annotations

import datetime
import time
import urllib.parse

import pytest
from azure.core.credentials import AccessToken

from scripts.evidence import blobs as evidence
from scripts.base.errors import CrashcartError, ExitCode
from tests.support.rescue import azurite_https, tls  # noqa: F401 - fixtures
from tests.support.storagefakes import (
    AUTHORIZATION_PERMISSION_MISMATCH, TENANT, VM_PRINCIPAL, FaultProxy, _reply, service_client, storage_token,
)


class TokenCredential:
    """What DefaultAzureCredential hands the SDK: a bearer token for https://storage.azure.com/."""

    def __init__(self):
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken(storage_token(), int(time.time()) + 3600)


def test_connection_string_is_for_loopback_only(monkeypatch):
    monkeypatch.setenv(evidence.CONNECTION_STRING_ENV,
                       "DefaultEndpointsProtocol=https;AccountName=prod;AccountKey=a2V5;"
                       "BlobEndpoint=https://prod.blob.core.windows.net/;")
    with pytest.raises(CrashcartError) as caught:
        evidence.container_client("https://prod.blob.core.windows.net/", "dumps")
    assert caught.value.exit_code == ExitCode.USAGE
    assert "only for the local storage emulator" in caught.value.message


def test_azure_ad_is_the_default(monkeypatch):
    monkeypatch.delenv(evidence.CONNECTION_STRING_ENV, raising=False)
    client = evidence.container_client("https://prod.blob.core.windows.net", "dumps")
    assert type(client.credential).__name__ == "DefaultAzureCredential"
    assert client.url == "https://prod.blob.core.windows.net/dumps"


def test_reads_through_the_emulator(azurite, monkeypatch):
    monkeypatch.setenv(evidence.CONNECTION_STRING_ENV, azurite.connection_string)
    azurite.service_client().create_container("evreads")
    container = evidence.container_client(azurite.blob_endpoint, "evreads")
    assert evidence.properties(container, "nope") is None
    assert evidence.read_bytes(container, "nope") is None
    assert evidence.read_tail(container, "run/output.log") is None
    log = container.get_blob_client("run/output.log")
    log.create_append_blob()
    log.append_block(b"x" * 10_000)
    log.append_block(b"\nCRASHCART_RESULT {}\n")
    assert evidence.read_tail(container, "run/output.log", 100).endswith("CRASHCART_RESULT {}\n")
    assert len(evidence.read_tail(container, "run/output.log", 100)) == 100
    url = evidence.upload_text(container, "run/report.md", "# report", "text/markdown")
    assert url.endswith("/evreads/run/report.md")
    assert evidence.list_names(container, "run/") == ["run/output.log", "run/report.md"]
    assert evidence.sha256(container, "run/report.md") == __import__("hashlib").sha256(b"# report").hexdigest()


def test_waits_for_a_role_assignment_to_take_effect(azurite_https, tls, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls.cert))
    service_client(azurite_https, tls).create_container("evrbac").upload_blob("a.txt", b"hello")
    refusals = {"n": 0}

    def rule(req):
        if refusals["n"] < 2:
            refusals["n"] += 1
            return AUTHORIZATION_PERMISSION_MISMATCH
        return None

    with FaultProxy(azurite_https.blob_endpoint, tls, rule) as proxy:
        container = evidence.container_client(proxy.blob_endpoint, "evrbac", credential=TokenCredential())
        data = evidence.auth_retry(lambda: container.download_blob("a.txt").readall(), "read a.txt",
                                   wait_seconds=10, first_delay=0.05)
        assert data == b"hello"
        assert [r.answered for r in proxy.requests] == [403, 403, 206]
        assert proxy.requests[-1].headers["authorization"].startswith("Bearer ")

    with FaultProxy(azurite_https.blob_endpoint, tls, lambda req: AUTHORIZATION_PERMISSION_MISMATCH) as proxy:
        container = evidence.container_client(proxy.blob_endpoint, "evrbac", credential=TokenCredential())
        with pytest.raises(CrashcartError) as caught:
            evidence.auth_retry(lambda: container.download_blob("a.txt").readall(), "read a.txt",
                                wait_seconds=0.2, first_delay=0.05)
        assert caught.value.exit_code == ExitCode.AZURE_AUTH
        assert "Storage Blob Data Reader" in caught.value.hint


def test_user_delegation_sas_is_read_only(azurite_https, tls, monkeypatch):
    """The link is signed with a user delegation key that Azurite issues to a bearer token (Azure AD
    flow, no account key), is read-only, HTTPS-only and expires within 7 days.

    Not checked here: that Azurite accepts the link. This azure-storage-blob signs SAS as version
    2026-10-06, whose string-to-sign adds request header/query lines that Azurite 3.35 (formats up to
    2025-07-05) does not know, so Azurite refuses every user delegation SAS this SDK makes."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls.cert))
    service_client(azurite_https, tls).create_container("evsas").upload_blob("web-01/run/MEMORY.DMP", b"PAGEDU64 dump")
    credential = TokenCredential()
    container = evidence.container_client(azurite_https.blob_endpoint, "evsas", credential=credential)
    url, expiry = evidence.user_delegation_sas(container, "web-01/run/MEMORY.DMP", 7)
    parts = urllib.parse.urlsplit(url)
    query = {k: v[0] for k, v in urllib.parse.parse_qs(parts.query).items()}
    assert parts.path.endswith("/evsas/web-01/run/MEMORY.DMP") and parts.scheme == "https"
    assert query["sp"] == "r" and query["spr"] == "https" and query["sr"] == "b"
    assert query["skoid"] == VM_PRINCIPAL and query["sktid"] == TENANT  # the key belongs to the token's identity
    assert query["sig"] and "AccountKey" not in url
    now = datetime.datetime.now(datetime.timezone.utc)
    assert 6.9 < (expiry - now).total_seconds() / 86400 <= 7
    assert datetime.datetime.fromisoformat(query["se"].replace("Z", "+00:00")) <= now + datetime.timedelta(days=7)
    assert credential.scopes and all(s == ("https://storage.azure.com/.default",) for s in credential.scopes)


@pytest.mark.parametrize("days", [0, 8, 30])
def test_sas_validity_is_bounded_by_the_user_delegation_key(days):
    with pytest.raises(CrashcartError) as caught:
        evidence.check_sas_days(days)
    assert caught.value.exit_code == ExitCode.USAGE and "1 to 7 days" in caught.value.message


# ---- nothing the kit writes replaces a blob (#13: If-None-Match: *) ----------------------------------------
def test_a_write_never_replaces_a_blob_that_is_there(evidence_container):
    """The same VM collected twice with the same run stamp used to overwrite the first run's blobs silently."""
    name = "web-01-1a2b3c4d/20250517T031245Z/MEMORY.DMP.manifest.json"
    evidence.upload_text(evidence_container, name, '{"run": "first"}', "application/json")
    with pytest.raises(evidence.BlobExists) as caught:
        evidence.upload_text(evidence_container, name, '{"run": "second"}', "application/json")
    err = caught.value
    assert err.exit_code == ExitCode.COLLECT_FAILED == 12 and err.name == name
    assert name in err.message and "nothing was overwritten" in err.message
    assert "web-01-1a2b3c4d/20250517T031245Z/" in err.hint and "run again" in err.hint
    assert evidence.read_bytes(evidence_container, name) == b'{"run": "first"}'


class LostAnswerProxy(FaultProxy):
    """Forwards every request, but the answer to the first PUT is lost on its way back (a 500 instead), as
    when a connection drops after the service did the write: the SDK then sends the same write again."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.answers: list[int] = []

    def handle(self, h, body: bytes) -> None:
        import http.client

        if h.command != "PUT" or self.answers:
            return super().handle(h, body)
        conn = http.client.HTTPSConnection(self.upstream.hostname, self.upstream.port, context=self.tls.context(),
                                           timeout=60)
        try:
            conn.request(h.command, h.path, body=body,
                         headers={k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection", "expect")})
            response = conn.getresponse()
            response.read()
            self.answers.append(response.status)
        finally:
            conn.close()
        return _reply(h, 500, b"", {"x-ms-error-code": "InternalError"})


def test_a_write_the_sdk_retried_after_the_service_did_it_is_not_a_collision(azurite_https, tls, monkeypatch):
    """If-None-Match: * must not turn a lost answer into a false "already exists": the blob carries the
    write's own id, so the retry that finds it recognises it."""
    from azure.storage.blob import ContainerClient

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls.cert))
    service_client(azurite_https, tls).create_container("evretry")
    with LostAnswerProxy(azurite_https.blob_endpoint, tls) as proxy:
        container = ContainerClient(proxy.blob_endpoint, "evretry", credential=TokenCredential(),
                                    initial_backoff=0.05, increment_base=1)
        url = evidence.upload_text(container, "k/run/report.md", "# report", "text/markdown")
        assert proxy.answers == [201]  # the first PUT was done by the service; the kit saw a 500
        (retry,) = [r for r in proxy.requests if r.method == "PUT"]  # the SDK's retry of the same write
        assert retry.answered == 409 and retry.headers["if-none-match"] == "*"
    assert url.endswith("/evretry/k/run/report.md")
    assert service_client(azurite_https, tls).get_blob_client("evretry", "k/run/report.md").download_blob().readall() \
        == b"# report"
