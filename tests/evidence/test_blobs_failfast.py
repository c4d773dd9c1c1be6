"""A storage call that cannot succeed fails at once with the operator's error: not signed in (exit 3, the
credential asked once, not once per SDK retry) or an endpoint that cannot be reached (exit 5, the network
hint, never a traceback)."""

from __future__ import annotations

import socket

import pytest
from azure.core.exceptions import ClientAuthenticationError

from scripts.base.errors import CrashcartError, ExitCode
from scripts.evidence import blobs as evidence


class NotSignedIn:
    """A credential like DefaultAzureCredential with no source available: every get_token fails."""

    def __init__(self) -> None:
        self.calls = 0

    def get_token(self, *scopes, **kwargs):
        self.calls += 1
        raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token from the included credentials.")

    def get_token_info(self, *scopes, **kwargs):
        return self.get_token(*scopes, **kwargs)


@pytest.mark.parametrize("call", [
    lambda c: evidence.properties(c, "vm/MEMORY.DMP"),
    lambda c: evidence.read_bytes(c, "vm/MEMORY.DMP.manifest.json"),
    lambda c: evidence.list_names(c, "vm/"),
])
def test_a_credential_that_cannot_sign_in_is_asked_once(monkeypatch, call):
    monkeypatch.delenv(evidence.CONNECTION_STRING_ENV, raising=False)
    credential = NotSignedIn()
    container = evidence.container_client("https://acct.blob.core.windows.net", "dumps", credential=credential)
    with pytest.raises(CrashcartError) as caught:
        call(container)
    assert caught.value.exit_code == ExitCode.AZURE_AUTH
    assert "sign in" in str(caught.value)
    assert credential.calls == 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_account_is_a_network_error_not_a_traceback(monkeypatch):
    port = _closed_port()
    monkeypatch.setenv(evidence.CONNECTION_STRING_ENV,
                       "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
                       f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")
    container = evidence.container_client("", "dumps")
    with pytest.raises(CrashcartError) as caught:
        evidence.properties(container, "vm/MEMORY.DMP")
    assert caught.value.exit_code == ExitCode.AZURE_FAILED
    assert f"127.0.0.1', port={port}" in caught.value.message
    assert "check the network path to the storage account (firewall, private endpoint, proxy)" in caught.value.hint


def test_an_unreachable_account_is_tried_once_more_not_for_minutes(monkeypatch):
    """The SDK's connection retries are bounded: one more try after a short backoff (counted, not timed)."""
    import urllib3.util.connection

    monkeypatch.delenv(evidence.CONNECTION_STRING_ENV, raising=False)
    port = _closed_port()
    connects: list[object] = []
    real = urllib3.util.connection.create_connection

    def counting(address, *args, **kwargs):
        connects.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", counting)
    container = evidence.container_client(f"http://127.0.0.1:{port}/devstoreaccount1", "dumps")
    with pytest.raises(CrashcartError) as caught:
        evidence.read_bytes(container, "vm/MEMORY.DMP.manifest.json")
    assert caught.value.exit_code == ExitCode.AZURE_FAILED
    assert connects == [("127.0.0.1", port)] * (1 + evidence.RETRY_CONNECT)


def test_an_unreachable_account_read_with_a_sas_does_not_repeat_the_sas(monkeypatch):
    monkeypatch.delenv(evidence.CONNECTION_STRING_ENV, raising=False)
    container = evidence.container_client(f"http://127.0.0.1:{_closed_port()}/devstoreaccount1", "dumps",
                                          credential="sv=2021-08-06&sr=c&sp=r&sig=SECRETSIGNATURE")
    with pytest.raises(CrashcartError) as caught:
        evidence.read_bytes(container, "vm/MEMORY.DMP.manifest.json")
    assert caught.value.exit_code == ExitCode.AZURE_FAILED
    assert "SECRETSIGNATURE" not in caught.value.message + caught.value.hint
