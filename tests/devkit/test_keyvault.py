"""The Key Vault double driven by the real SDK clients (azure-keyvault-secrets SecretClient, azure-keyvault-keys
CryptographyClient), over HTTPS with its own certificate: the challenge, the token, RBAC, the answers."""

from __future__ import annotations

import base64
import os

import pytest
import requests
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm
from azure.keyvault.secrets import SecretClient

from scripts.azure import keyvault as kv
from scripts.devkit.keyvault import RESOURCE, Credential, KeyVaultDouble, token_for

BEK = bytes.fromhex("9c000000010000003000000000") + os.urandom(143)  # any bytes: the double does not read them


@pytest.fixture
def vault():
    with KeyVaultDouble() as double:
        yield double


def _secrets(vault, principal="reader", **options):
    options.setdefault("verify_challenge_resource", False)
    return SecretClient(vault.url, Credential(principal), connection_verify=vault.ca_file, **options)


def test_a_request_without_a_token_gets_key_vaults_401_challenge(vault):
    vault.set_secret("bek", "eA==")
    answer = requests.get(f"{vault.url}/secrets/bek?api-version=7.5", verify=vault.ca_file, timeout=10)
    assert answer.status_code == 401
    challenge = answer.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and 'authorization="https://login.microsoftonline.com/' in challenge
    assert f'resource="{RESOURCE}"' in challenge
    assert answer.json()["error"]["code"] == "Unauthorized" and "AKV10000" in answer.json()["error"]["message"]


def test_secret_client_answers_the_challenge_and_reads_the_secret_with_its_tags(vault):
    url = vault.set_secret("3f2a-bek", base64.b64encode(BEK).decode(), content_type="BEK",
                           tags={"DiskEncryptionKeyFileName": "3F2A.BEK", "MachineName": "web-01"})
    vault.grant("reader", kv.SECRETS_USER)
    client = _secrets(vault)
    secret = client.get_secret("3f2a-bek", url.rsplit("/", 1)[1])
    assert base64.b64decode(secret.value) == BEK and secret.properties.content_type == "BEK"
    assert secret.properties.tags["DiskEncryptionKeyFileName"] == "3F2A.BEK"
    # first without a token (the SDK elicits the challenge), then with one for the challenge's resource
    assert [r["token"] for r in vault.requests] == [False, True]
    assert client._client._config.authentication_policy._credential.scopes[0] == (f"{RESOURCE}/.default",)


def test_the_sdk_checks_the_challenge_resource_against_the_host_so_a_loopback_vault_needs_it_off(vault):
    vault.set_secret("bek", "eA==")
    vault.grant("reader", kv.SECRETS_USER)
    with pytest.raises(ValueError, match="verify_challenge_resource"):
        SecretClient(vault.url, Credential("reader"), connection_verify=vault.ca_file).get_secret("bek")


def test_a_caller_without_the_data_action_gets_key_vaults_403_forbidden_by_rbac(vault):
    vault.set_secret("bek", "eA==")
    vault.grant("reader", kv.CRYPTO_USER)  # a role on the vault, but not one that reads secrets
    with pytest.raises(HttpResponseError) as caught:
        _secrets(vault).get_secret("bek")
    err = caught.value
    assert err.status_code == 403 and err.error.code == "Forbidden"
    assert "Caller is not authorized to perform action on resource." in err.error.message
    assert f"Action: '{kv.GET_SECRET}'" in err.error.message and "oid=reader" in err.error.message


def test_a_role_on_another_vault_or_secret_does_not_grant(vault):
    vault.set_secret("bek", "eA==")
    vault.grant("reader", kv.SECRETS_USER, scope=vault.resource_id + "/secrets/other")
    with pytest.raises(HttpResponseError) as caught:
        _secrets(vault).get_secret("bek")
    assert caught.value.status_code == 403


def test_a_token_for_another_resource_is_refused_401():
    with KeyVaultDouble() as vault:
        vault.grant("reader", kv.SECRETS_USER)
        headers = {"Authorization": f"Bearer {token_for('reader', 'https://management.azure.com')}"}
        answer = requests.get(f"{vault.url}/secrets/bek?api-version=7.5", headers=headers, verify=vault.ca_file,
                              timeout=10)
        assert answer.status_code == 401 and "AKV10022" in answer.json()["error"]["message"]


def test_a_missing_secret_is_404_secret_not_found(vault):
    vault.grant("reader", kv.SECRETS_USER)
    with pytest.raises(HttpResponseError) as caught:
        _secrets(vault).get_secret("nope")
    assert caught.value.status_code == 404 and caught.value.error.code == "SecretNotFound"


@pytest.mark.parametrize("algorithm", ["RSA-OAEP", "RSA-OAEP-256", "RSA1_5"])
def test_cryptography_client_unwraps_a_wrapped_bek_in_the_vault(vault, algorithm):
    key_url = vault.add_rsa_key("ade-kek")
    wrapped = base64.urlsafe_b64decode(vault.wrap(key_url, BEK, algorithm) + "==")
    vault.grant("reader", kv.CRYPTO_USER)
    client = CryptographyClient(key_url, Credential("reader"), connection_verify=vault.ca_file,
                                verify_challenge_resource=False)
    assert client.unwrap_key(KeyWrapAlgorithm(algorithm), wrapped).key == BEK
    assert any(r["method"] == "POST" and r["path"].endswith("/unwrapkey") for r in vault.requests)


def test_unwrap_without_the_crypto_role_is_403(vault):
    key_url = vault.add_rsa_key("ade-kek")
    wrapped = base64.urlsafe_b64decode(vault.wrap(key_url, BEK) + "==")
    vault.grant("reader", kv.SECRETS_USER)
    client = CryptographyClient(key_url, Credential("reader"), connection_verify=vault.ca_file,
                                verify_challenge_resource=False)
    with pytest.raises(HttpResponseError) as caught:
        client.unwrap_key(KeyWrapAlgorithm.rsa_oaep, wrapped)
    assert caught.value.status_code == 403 and kv.UNWRAP_KEY in caught.value.error.message
