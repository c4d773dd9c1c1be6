"""scripts.azure: which endpoint gets which auth, and how SDK errors read to an operator."""

from __future__ import annotations

from azure.core.exceptions import ClientAuthenticationError

from scripts.azure.clients import is_loopback
from scripts.azure.errors import translate_azure_error
from scripts.base.errors import ExitCode


def test_only_plain_http_loopback_skips_authentication():
    assert is_loopback("http://127.0.0.1:8080")
    assert is_loopback("http://localhost:1")
    assert not is_loopback("https://127.0.0.1:8080")  # TLS to a loopback proxy still authenticates
    assert not is_loopback("http://management.azure.com")
    assert not is_loopback("https://management.usgovcloudapi.net")


def test_credential_failure_says_sign_in():
    err = translate_azure_error(ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token"),
                                "VM web-01")
    assert err.exit_code == ExitCode.AZURE_AUTH
    assert "could not sign in" in err.message and "az login" in err.hint
