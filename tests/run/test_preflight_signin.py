"""`preflight` on a machine that is not signed in to Azure: one finding that says to sign in (exit 3), not a
blocker per check, and the credential asked once, not once per check and SDK retry."""

from __future__ import annotations

import json
import socket

import pytest
from azure.core.exceptions import ClientAuthenticationError

from scripts.__main__ import main
from scripts.azure import clients
from scripts.evidence import blobs
from tests.run.test_preflight import world  # noqa: F401 - fixture


class NotSignedIn:
    """DefaultAzureCredential with no source available: every get_token fails."""

    calls = 0

    def __init__(self, **kwargs):
        pass

    def get_token(self, *scopes, **kwargs):
        NotSignedIn.calls += 1
        raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token from the included credentials.")

    def get_token_info(self, *scopes, **kwargs):
        return self.get_token(*scopes, **kwargs)


def sign_out(monkeypatch) -> None:
    import azure.identity

    with socket.socket() as sock:  # an https ARM endpoint that is not a loopback double: a token is asked for
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("CRASHCART_ARM_ENDPOINT", f"https://127.0.0.1:{port}")
    monkeypatch.delenv(blobs.CONNECTION_STRING_ENV, raising=False)
    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", NotSignedIn)
    NotSignedIn.calls = 0
    clients.credential.cache_clear()


@pytest.fixture
def forget_credential():
    yield
    clients.credential.cache_clear()


def test_not_signed_in_is_one_finding_that_says_sign_in(world, monkeypatch, forget_credential):  # noqa: F811
    config = world.config()  # made from the ARM double while signed in
    sign_out(monkeypatch)
    code = main(["preflight", "--config", str(config)])
    out = world.capsys.readouterr()
    verdict = json.loads(out.out)
    assert code == 3, out.err
    failed = [c for c in verdict["checks"] if c["status"] == "fail"]
    assert len(failed) == 1 and failed[0]["check"] == "sign-in", failed
    assert "could not sign in" in failed[0]["detail"] and "az login" in failed[0]["fix"]
    assert NotSignedIn.calls == 1
