"""rescue-vm on an Azure Disk Encryption (BitLocker) source: the BEK is read from the VM's Key Vault (the Key Vault
double, real SDK clients) as the source disk's encryption settings name it, and reaches the rescue VM's script
only as the protected Run Command parameter BitLockerKey: never a plain parameter, never in the script, never in
what ARM answers (instance views), the report or the result. Without a role on the vault the run stops before any
command runs (exit 3 naming the vault and the role); a disk without encryption settings sends no key."""

from __future__ import annotations

import base64
import json
import os
import struct

import pytest

from scripts import remote
from scripts.azure import keyvault as kv
from scripts.base.errors import ExitCode
from scripts.collection.contract import CollectError, CollectRequest
from scripts.collection.rescue_vm import RescueVmCollector
from scripts.devkit import arm_vm
from scripts.devkit.arm_compute import Scripted, install_rescue_vm, install_run_commands, result_line
from scripts.devkit.keyvault import Credential, KeyVaultDouble
from tests.collection.test_rescue_vm import outputs_for, store  # noqa: F401 - fixture

PRINCIPAL = "crashcart-operator"
BEK = struct.pack("<IIII", 156, 1, 0x30, 156) + os.urandom(140)  # a .BEK file's shape: its size, version 1
KEY = base64.b64encode(BEK).decode()


@pytest.fixture
def vault(monkeypatch):
    with KeyVaultDouble() as double:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", double.ca_file)
        yield double


def _ade_source(arm, vault):
    vm = arm_vm.add_broken_vm(arm)
    secret = vault.set_secret("web-01-bek", KEY, content_type="BEK", tags={"MachineName": "web-01"})
    disk = arm.get(vm.disk_id)
    disk["properties"]["encryptionSettingsCollection"] = {"enabled": True, "encryptionSettingsVersion": "1.1",
        "encryptionSettings": [{"diskEncryptionKey": {"secretUrl": secret, "sourceVault": {"id": vault.resource_id}}}]}
    arm.put(vm.disk_id, disk)
    return vm


def _collect(outputs, tmp_path):
    return RescueVmCollector(credential=Credential(PRINCIPAL)).collect(CollectRequest(
        outputs, None, timeout_minutes=5, progress=False, poll_seconds=0.01, out_dir=tmp_path / "out"))


@pytest.mark.parametrize("rescue_os", ["linux", "windows"])
def test_the_bek_reaches_the_script_only_as_a_protected_parameter(arm, store, vault, tmp_path, rescue_os):
    service, container = store
    vm = _ade_source(arm, vault)
    vault.grant(PRINCIPAL, kv.SECRETS_USER)
    seen: dict = {}

    def effect(params):
        seen.update(params)
        return {"output": result_line("no_dump", message="the broken volume holds no memory dump")}

    install_rescue_vm(arm)
    commands = install_run_commands(arm, Scripted(["Running", "Succeeded"], effect=effect))
    outputs = outputs_for(container.url.rsplit("/", 1)[0], container.container_name, rescue_os=rescue_os,
                          source_os_disk_id=vm.disk_id, source_vm_id=vm.vm_id)
    with pytest.raises(CollectError) as caught:
        _collect(outputs, tmp_path)
    assert caught.value.exit_code == ExitCode.NO_DUMP
    assert seen["BitLockerKey"] == KEY  # the script got it ...
    (body,) = commands.created
    props = body["properties"]
    assert props["source"]["script"] == remote.render(rescue_os)  # ... never in its code
    assert "BitLockerKey" not in {p["name"] for p in props["parameters"]}
    assert {p["name"]: p["value"] for p in props["protectedParameters"]} == {"BitLockerKey": KEY}
    answered = json.dumps(commands.served, default=str)
    result = caught.value.result
    local = "".join(p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file())
    blobs = "".join(container.download_blob(b.name).readall().decode(errors="replace") for b in container.list_blobs())
    plain = json.dumps({k: v for k, v in props.items() if k != "protectedParameters"})
    for text in (answered, json.dumps(result.to_dict(), default=str), local, blobs, plain):
        assert KEY not in text
    assert any("protected parameter" in n for n in result.notes)


def test_without_the_secrets_role_nothing_runs_and_it_is_exit_3_naming_the_vault(arm, store, vault, tmp_path):
    service, container = store
    vm = _ade_source(arm, vault)
    install_rescue_vm(arm)
    commands = install_run_commands(arm, Scripted(["Succeeded"], output=result_line("no_dump")))
    outputs = outputs_for(container.url.rsplit("/", 1)[0], container.container_name,
                          source_os_disk_id=vm.disk_id, source_vm_id=vm.vm_id)
    with pytest.raises(CollectError) as caught:
        _collect(outputs, tmp_path)
    err = caught.value
    assert err.exit_code == ExitCode.AZURE_AUTH
    assert vault.name in err.message + err.hint and "Key Vault Secrets User" in err.hint
    assert commands.created == []


def test_a_disk_without_encryption_settings_sends_no_key(arm, store, vault, tmp_path):
    service, container = store
    vm = arm_vm.add_broken_vm(arm)
    install_rescue_vm(arm)
    commands = install_run_commands(arm, Scripted(["Succeeded"], output=result_line("no_dump")))
    outputs = outputs_for(container.url.rsplit("/", 1)[0], container.container_name,
                          source_os_disk_id=vm.disk_id, source_vm_id=vm.vm_id)
    with pytest.raises(CollectError):
        _collect(outputs, tmp_path)
    (body,) = commands.created
    assert not body["properties"].get("protectedParameters") and not vault.requests
