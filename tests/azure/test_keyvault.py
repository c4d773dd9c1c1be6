"""scripts.azure.keyvault: where ADE keeps a disk's BitLocker key (the disk's or the VM's encryption settings), the
key read from the Key Vault double with the real SDK clients, unwrapped with the KEK, and the errors an operator
gets (exit 3 naming the vault and the role, 4, 2, 11)."""

from __future__ import annotations

import base64
import os
import struct

import pytest

from scripts.azure import keyvault as kv
from scripts.base.errors import CrashcartError, ExitCode
from scripts.devkit.keyvault import Credential, KeyVaultDouble

# a .BEK file's shape: its size and version 1 first (FVE metadata block); the rest any bytes
BEK = struct.pack("<IIII", 156, 1, 0x30, 156) + os.urandom(140)
TAGS = {"DiskEncryptionKeyFileName": "0C0A6B39-8A54-4B1D-9D0C-1E2F3A4B5C6D.BEK", "MachineName": "web-01",
        "VolumeLetter": "C:\\"}


@pytest.fixture
def vault():
    with KeyVaultDouble() as double:
        yield double


def _read(vault, reference, principal="pipeline"):
    return kv.read_bek(reference, Credential(principal), connection_verify=vault.ca_file)


def _disk(secret_url, vault_id, kek_url=None):
    element = {"diskEncryptionKey": {"secretUrl": secret_url, "sourceVault": {"id": vault_id}}}
    if kek_url:
        element["keyEncryptionKey"] = {"keyUrl": kek_url, "sourceVault": {"id": vault_id}}
    return {"encryptionSettingsCollection": {"enabled": True, "encryptionSettings": [element],
                                             "encryptionSettingsVersion": "1.1"}}


def test_references_come_from_the_disks_encryption_settings_collection():
    vid = "/subscriptions/s/resourceGroups/g/providers/Microsoft.KeyVault/vaults/ade-kv"
    refs = kv.references(disk=_disk("https://ade-kv.vault.azure.net/secrets/abc/1", vid,
                                    "https://ade-kv.vault.azure.net/keys/kek/2"))
    assert refs == [kv.AdeKeyReference("https://ade-kv.vault.azure.net/secrets/abc/1", vid,
                                       "https://ade-kv.vault.azure.net/keys/kek/2", vid)]
    assert refs[0].vault_name == "ade-kv"


def test_references_from_sdk_models_and_the_vms_os_disk_settings_of_dual_pass_ade():
    from azure.mgmt.compute import models

    disk = models.Disk(location="westeurope", creation_data=models.CreationData(create_option="Empty"))
    vm = {"storageProfile": {"osDisk": {"encryptionSettings": {
        "enabled": True, "diskEncryptionKey": {"secretUrl": "https://v.vault.azure.net/secrets/s/1",
                                               "sourceVault": {"id": "/x/vaults/v"}}}}}}
    assert kv.references(disk=disk, vm=vm) == [kv.AdeKeyReference("https://v.vault.azure.net/secrets/s/1", "/x/vaults/v")]
    assert kv.references(disk=disk) == [] and kv.references() == []
    setting = models.EncryptionSettingsElement(disk_encryption_key=models.KeyVaultAndSecretReference(
        source_vault=models.SourceVault(id="/x/vaults/w"), secret_url="https://w.vault.azure.net/secrets/s/2"))
    disk.encryption_settings_collection = models.EncryptionSettingsCollection(enabled=True,
                                                                              encryption_settings=[setting])
    assert kv.references(disk=disk)[0].secret_url == "https://w.vault.azure.net/secrets/s/2"


def test_the_bek_is_read_and_decoded_and_never_shown(vault):
    url = vault.set_secret("bek-web-01", base64.b64encode(BEK).decode(), content_type="BEK", tags=TAGS)
    vault.grant("pipeline", kv.SECRETS_USER)
    ref = kv.references(disk=_disk(url, vault.resource_id))[0]
    bek = _read(vault, ref)
    assert bek.data == BEK and bek.file_name == TAGS["DiskEncryptionKeyFileName"] and bek.machine_name == "web-01"
    assert bek.wrapped_with == ""
    assert BEK.hex()[:16] not in repr(bek) and "data" not in bek.describe() and bek.describe()["bytes"] == 156


def test_a_wrapped_bek_is_unwrapped_with_the_kek_the_tags_name(vault):
    kek = vault.add_rsa_key("ade-kek")
    url = vault.set_secret("bek-web-01", vault.wrap(kek, BEK, "RSA-OAEP-256"), content_type="Wrapped BEK",
                           tags={**TAGS, "DiskEncryptionKeyEncryptionAlgorithm": "RSA-OAEP-256",
                                 "DiskEncryptionKeyEncryptionKeyURL": kek})
    vault.grant("pipeline", kv.SECRETS_USER)
    vault.grant("pipeline", kv.CRYPTO_USER)
    bek = _read(vault, kv.AdeKeyReference(url, vault.resource_id))  # no KEK in the settings: the tag names it
    assert bek.data == BEK and bek.wrapped_with == kek
    assert [r["path"].rsplit("/", 1)[-1] for r in vault.requests if r["method"] == "POST"] == ["unwrapkey"]


def test_no_secret_role_is_exit_3_naming_the_vault_and_the_role(vault):
    url = vault.set_secret("bek-web-01", base64.b64encode(BEK).decode(), content_type="BEK", tags=TAGS)
    with pytest.raises(CrashcartError) as caught:
        _read(vault, kv.AdeKeyReference(url, vault.resource_id))
    err = caught.value
    assert err.exit_code == ExitCode.AZURE_AUTH
    assert "bek-web-01" in err.message and vault.name in err.message and "Forbidden" in err.message
    assert "'Key Vault Secrets User'" in err.hint and vault.resource_id in err.hint
    assert "--secret-permissions get" in err.hint


def test_no_unwrap_permission_is_exit_3_naming_the_crypto_role(vault):
    kek = vault.add_rsa_key("ade-kek")
    url = vault.set_secret("bek", vault.wrap(kek, BEK), content_type="Wrapped BEK",
                           tags={"DiskEncryptionKeyEncryptionAlgorithm": "RSA-OAEP"})
    vault.grant("pipeline", kv.SECRETS_USER)
    with pytest.raises(CrashcartError) as caught:
        _read(vault, kv.AdeKeyReference(url, vault.resource_id, kek, vault.resource_id))
    assert caught.value.exit_code == ExitCode.AZURE_AUTH and "ade-kek" in caught.value.message
    assert "'Key Vault Crypto User'" in caught.value.hint and "unwrapKey" in caught.value.hint


def test_a_deleted_secret_is_exit_4(vault):
    vault.grant("pipeline", kv.SECRETS_USER)
    with pytest.raises(CrashcartError) as caught:
        _read(vault, kv.AdeKeyReference(f"{vault.url}/secrets/gone/0123", vault.resource_id))
    assert caught.value.exit_code == ExitCode.AZURE_NOT_FOUND and "gone" in caught.value.message


@pytest.mark.parametrize("url", ["https://evil.example.com/secrets/bek/1", "http://ade-kv.vault.azure.net/secrets/b/1",
                                 "https://ade-kv.vault.azure.net/certificates"])
def test_a_url_that_is_no_key_vault_object_gets_no_token_exit_2(url):
    credential = Credential("pipeline")
    with pytest.raises(CrashcartError) as caught:
        kv.read_bek(kv.AdeKeyReference(url), credential)
    assert caught.value.exit_code == ExitCode.USAGE and credential.scopes == []


@pytest.mark.parametrize("value", ["bm90IGEga2V5", "***"])  # a passphrase (Linux ADE), not base64
def test_a_secret_that_is_no_bek_file_is_exit_11(vault, value):
    url = vault.set_secret("linux-passphrase", value)
    vault.grant("pipeline", kv.SECRETS_USER)
    with pytest.raises(CrashcartError) as caught:
        _read(vault, kv.AdeKeyReference(url, vault.resource_id))
    assert caught.value.exit_code == ExitCode.DISK_NOT_FOUND
