"""Preflight on an Azure Disk Encryption (BitLocker) disk whose encryption settings name its key: no longer a
refusal but a warning saying what crashcart will do (read the BEK from Key Vault with the roles it names;
snapshot-export decrypts in the kit, so the dump's bytes pass through this machine). Exit 11 stays for an ADE
VM whose disk names no key (tests/run/test_preflight.py)."""

from __future__ import annotations

from scripts.devkit import arm_usage, arm_vm
from tests.run.test_preflight import world  # noqa: F401 - fixture

VAULT = f"/subscriptions/{arm_vm.SUB}/resourceGroups/prod-web/providers/Microsoft.KeyVault/vaults/web-ade-kv"


def test_an_ade_disk_that_names_its_key_is_a_warning_saying_the_bytes_pass_through_the_kit(world):
    arm_usage.add_disk_encryption(world.arm, world.vm.vm_id)
    world.disk()["properties"]["encryptionSettingsCollection"] = {"enabled": True, "encryptionSettingsVersion": "1.1",
        "encryptionSettings": [{"diskEncryptionKey": {"secretUrl": "https://web-ade-kv.vault.azure.net/secrets/bek/0a1b",
                                                      "sourceVault": {"id": VAULT}},
                                "keyEncryptionKey": {"keyUrl": "https://web-ade-kv.vault.azure.net/keys/kek/9f8e",
                                                     "sourceVault": {"id": VAULT}}}]}
    code, verdict, said = world.preflight()
    found = world.finding(verdict, "encryption")
    assert found["status"] == "warn", found
    assert code == 0, said
    assert "pass through this machine" in found["detail"] and "web-ade-kv" in found["detail"]
    assert "Key Vault Secrets User" in found["fix"] and "Key Vault Crypto User" in found["fix"]
