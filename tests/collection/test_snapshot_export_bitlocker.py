"""snapshot-export of an Azure Disk Encryption (BitLocker) OS disk, end to end through the real SDK clients:

- the disk image: a GPT disk whose Windows partition is dissect.fve's real recovery-key BitLocker volume (from its
  source distribution on PyPI, downloaded in the test setup, tests/windisk/conftest.py) holding our NTFS with a
  fragmented MEMORY.DMP and a minidump;
- ARM (azure-mgmt-compute) against the loopback ARM double: the source disk names its key in
  encryptionSettingsCollection, as single-pass ADE writes it;
- Key Vault (azure-keyvault-secrets / keys) against the loopback Key Vault double over HTTPS: the BEK as ADE
  stores it (plain, or wrapped with a KEK and unwrapped by the vault), RBAC decided per role;
- storage against Azurite through the copy shim.

What an operator sees: the stored dumps are byte-identical to the files inside the encrypted volume (SHA-256 of the
download), the report says the bytes passed through the kit and why, the key is in no output; without a role on
the vault the run is exit 3 naming the vault and the role; a BitLocker disk whose settings name no key stays the
exit-11 refusal."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from scripts.azure import keyvault as kv
from scripts.base.errors import ExitCode
from scripts.collection.contract import CollectError
from scripts.devkit import arm_snapshot
from scripts.devkit.keyvault import Credential, KeyVaultDouble
from tests.collection.test_snapshot_export import _run, env, exported, shim  # noqa: F401 - fixtures
from tests.windisk.conftest import bde_data, bitlocker_disk  # noqa: F401 - fixtures

PRINCIPAL = "crashcart-operator"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def vault(monkeypatch):
    with KeyVaultDouble() as double:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", double.ca_file)  # the double's self-signed certificate
        yield double


def _encrypt_disk(env, vault, bek: bytes, *, kek: bool = False) -> None:
    """The source disk as single-pass ADE leaves it: encryptionSettingsCollection naming the secret (and KEK)."""
    element: dict = {}
    if kek:
        key_url = vault.add_rsa_key("ade-kek")
        secret = vault.set_secret("0c0a6b39-bek", vault.wrap(key_url, bek), content_type="Wrapped BEK",
                                  tags={"DiskEncryptionKeyFileName": "0C0A6B39.BEK", "MachineName": "web-01",
                                        "DiskEncryptionKeyEncryptionKeyURL": key_url,
                                        "DiskEncryptionKeyEncryptionAlgorithm": "RSA-OAEP"})
        element["keyEncryptionKey"] = {"keyUrl": key_url, "sourceVault": {"id": vault.resource_id}}
    else:
        secret = vault.set_secret("0c0a6b39-bek", base64.b64encode(bek).decode(), content_type="BEK",
                                  tags={"DiskEncryptionKeyFileName": "0C0A6B39.BEK", "MachineName": "web-01"})
    element["diskEncryptionKey"] = {"secretUrl": secret, "sourceVault": {"id": vault.resource_id}}
    disk = env.arm.get(env.vm.disk_id)
    disk["properties"]["encryptionSettingsCollection"] = {"enabled": True, "encryptionSettings": [element],
                                                          "encryptionSettingsVersion": "1.1"}
    env.arm.put(env.vm.disk_id, disk)


def _export(env, azurite, bitlocker_disk):
    env.sas["url"] = arm_snapshot.export_page_blob(azurite, bitlocker_disk.path)


@pytest.mark.parametrize("kek", [False, True], ids=["bek", "bek-wrapped-with-kek"])
def test_an_ade_disk_is_decrypted_in_the_kit_and_the_dumps_are_byte_identical(env, azurite, vault, bitlocker_disk,
                                                                              tmp_path, kek):
    _encrypt_disk(env, vault, bitlocker_disk.volume.bek, kek=kek)
    vault.grant(PRINCIPAL, kv.SECRETS_USER)
    if kek:
        vault.grant(PRINCIPAL, kv.CRYPTO_USER)
    _export(env, azurite, bitlocker_disk)
    copied_before = env.shim.stats.copied_bytes

    result = _run(env, "bitlocker", tmp_path, credential=Credential(PRINCIPAL))

    assert result.status == "collected", result.message
    originals = bitlocker_disk.windows.originals
    memory = env.blob(f"{result.run}/MEMORY.DMP")
    assert _sha(memory) == _sha(originals["Windows/MEMORY.DMP"].read_bytes())
    minidump = env.blob(f"{result.run}/Minidump/051724-21453-01.dmp")
    assert _sha(minidump) == _sha(originals["Windows/Minidump/051724-21453-01.dmp"].read_bytes())
    # the ciphertext on the disk is not what was stored: no block came server-side from the snapshot
    copies = result.export["copies"]
    assert env.shim.stats.copied_bytes - copied_before == sum(c["zero_bytes"] for c in copies)  # zeros only
    assert sum(c["uploaded_by_kit"] for c in copies) == len(memory) + len(minidump) - sum(c["zero_bytes"] for c in copies)
    assert "through the kit" in result.message and "BitLocker" in result.message
    assert any("pass through this machine" in n for n in result.notes)
    assert "pass through this machine" in result.volume["read"]
    manifest = json.loads(env.blob(f"{result.run}/MEMORY.DMP.manifest.json"))
    assert manifest["copy"]["through_kit"] is True and "decrypted in the kit" in manifest["copy"]["method"]
    assert manifest["crc64_by"] == "kit"
    assert result.export["bytes_through_kit"]["copy"] >= len(memory) + len(minidump)
    assert bool(result.export["bitlocker"]["key"]["kek"]) is kek
    # the key itself is nowhere in what the run wrote
    key_b64 = base64.b64encode(bitlocker_disk.volume.bek).decode()
    report = env.blob(f"{result.run}/report.json").decode() if f"{result.run}/report.json" in env.names() else ""
    local = "".join(p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file())
    for text in (report, local, json.dumps(result.export, default=str)):
        assert key_b64 not in text and bitlocker_disk.volume.bek.hex() not in text
    assert env.routes.revokes and env.routes.revokes == env.routes.deletes and not env.routes.active


def test_without_the_secrets_role_on_the_vault_it_is_exit_3_naming_the_vault_and_the_role(env, azurite, vault,
                                                                                           bitlocker_disk, tmp_path):
    _encrypt_disk(env, vault, bitlocker_disk.volume.bek)
    _export(env, azurite, bitlocker_disk)
    with pytest.raises(CollectError) as caught:
        _run(env, "bitlocker", tmp_path, credential=Credential(PRINCIPAL))
    err = caught.value
    assert err.exit_code == ExitCode.AZURE_AUTH
    assert vault.name in err.message + err.hint and "Key Vault Secrets User" in err.hint
    assert env.routes.revokes and env.routes.revokes == env.routes.deletes and not env.routes.active


def test_an_encrypted_volume_whose_disk_names_no_key_stays_exit_11_naming_the_ways_out(env, azurite, vault,
                                                                                      bitlocker_disk, tmp_path):
    _export(env, azurite, bitlocker_disk)
    with pytest.raises(CollectError) as caught:
        _run(env, "bitlocker", tmp_path, credential=Credential(PRINCIPAL))
    err = caught.value
    assert err.exit_code == ExitCode.DISK_NOT_FOUND
    assert "BitLocker" in err.message and "encryption settings name no" in err.message
    assert "Key Vault Secrets User" in err.hint and "manage-bde" in err.hint
    assert not vault.requests  # nothing asked of any vault
