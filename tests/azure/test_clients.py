"""scripts.azure: which endpoint gets which auth, and how SDK errors read to an operator."""

from __future__ import annotations

import pytest
from azure.core.exceptions import ClientAuthenticationError

from scripts.azure.clients import AzureClients, arm_endpoint, is_loopback
from scripts.azure.errors import translate_azure_error
from scripts.base.errors import CrashcartError, ExitCode


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


@pytest.mark.parametrize("value, said", [
    ("garbage", "names no host"),
    ("https://[::1", "is not a valid URL"),
    ("https://management.example:99999", "is not a valid URL"),
    ("http://management.example.com", "is not an https:// URL"),
])
def test_a_malformed_arm_endpoint_is_a_usage_error_naming_the_variable(monkeypatch, value, said):
    monkeypatch.setenv("CRASHCART_ARM_ENDPOINT", value)
    with pytest.raises(CrashcartError) as caught:
        AzureClients("00000000-0000-0000-0000-000000000000").resource
    assert caught.value.exit_code == ExitCode.USAGE
    assert caught.value.message.startswith("CRASHCART_ARM_ENDPOINT") and said in caught.value.message


@pytest.mark.parametrize("value", ["https://management.usgovcloudapi.net/", "http://127.0.0.1:8080"])
def test_a_sovereign_cloud_or_a_loopback_double_is_accepted(monkeypatch, value):
    monkeypatch.setenv("CRASHCART_ARM_ENDPOINT", value)
    assert arm_endpoint() == value.rstrip("/")
