"""snapshot_access without Azure: where a disk token may go, and what the export target is named after."""

from __future__ import annotations

import pytest

from scripts.base.errors import CrashcartError, ExitCode
from scripts.azure.identity import vm_key
from scripts.collection import snapshot_access
from scripts.config.stackoutputs import RepairOutputs

SUB = "00000000-0000-0000-0000-000000000001"
VM = f"/subscriptions/{SUB}/resourceGroups/prod-web/providers/Microsoft.Compute/virtualMachines/web-01"


def test_a_disk_token_is_never_sent_to_a_host_that_is_not_azure_storage():
    with pytest.raises(CrashcartError, match="refusing to send an Azure AD token") as caught:
        snapshot_access.open_export("https://disks.example.com/abcd?sig=x", bearer=lambda: "t")
    assert caught.value.exit_code == ExitCode.USAGE


def test_the_target_is_named_after_the_source_vm_of_the_repair_stack():
    outputs = RepairOutputs(
        subscription_id=SUB, resource_group_name="crashcart-repair-web-01", rescue_vm_id="", rescue_vm_name="",
        rescue_vm_principal_id="", rescue_os="windows", disk_copy_id="", disk_copy_lun=0,
        snapshot_id=f"/subscriptions/{SUB}/resourceGroups/crashcart-repair-web-01/providers/Microsoft.Compute/"
                    "snapshots/snap-1",
        source_vm_id=VM, source_os_disk_id="", evidence_account_name="a", evidence_blob_endpoint="https://a",
        evidence_container="dumps")
    target = snapshot_access.ExportTarget.from_outputs(outputs)
    assert target.source_vm_name == "web-01" and target.snapshot_id == outputs.snapshot_id
    assert target.source_vm_id == VM and target.vm_key == vm_key(VM)
    assert target.tags == {"crashcart": "export-snapshot"}
    # A VM is its resource ID: without one (neither the outputs' nor a config's) nothing can be keyed by it,
    # so the export does not start (it used to fall back to a shared name, "source-vm").
    with pytest.raises(CrashcartError, match="not a VM resource ID") as caught:
        snapshot_access.ExportTarget.from_outputs(RepairOutputs(**{**outputs.__dict__, "source_vm_id": "x"}))
    assert caught.value.exit_code == ExitCode.USAGE


def test_the_kits_snapshot_name_keeps_the_vm_keys_hash_and_the_stamp_within_80_characters():
    stamp = "20250517T031245Z"
    assert snapshot_access.snapshot_name(vm_key(VM), stamp) == f"crashcart-export-{vm_key(VM)}-20250517t031245z"
    long_a, long_b = (VM.replace("prod-web", rg).replace("web-01", "w" * 64) for rg in ("rg-a", "rg-b"))
    names = set()
    for vm in (long_a, long_b):
        name = snapshot_access.snapshot_name(vm_key(vm), stamp)
        assert len(name) <= 80 and name.endswith("-20250517t031245z") and vm_key(vm)[-8:] in name
        names.add(name)
    assert len(names) == 2  # the same 64-character name in two groups: still two snapshots


# -- a disk encrypted with a customer-managed key (issue #15) ------------------------------------------------
DES = f"/subscriptions/{SUB}/resourceGroups/keys/providers/Microsoft.Compute/diskEncryptionSets/des-web"


@pytest.mark.parametrize("kind", ["EncryptionAtRestWithCustomerKey", "EncryptionAtRestWithPlatformAndCustomerKeys"])
def test_the_snapshot_of_a_cmk_disk_is_encrypted_with_the_disks_encryption_set(arm, kind):
    """The body the kit sends names the source's disk encryption set (REST: properties.encryption
    {diskEncryptionSetId, type}), and the ARM double's snapshot carries it; before #15 it got a platform key."""
    import contextlib
    import datetime as dt

    from scripts.devkit.arm_resources import add_resource_group_routes
    from scripts.devkit.arm_snapshot import install_snapshot_routes
    from scripts.devkit.arm_vm import add_broken_vm

    vm = add_broken_vm(arm)
    arm.get(vm.disk_id)["properties"]["encryption"] = {"type": kind, "diskEncryptionSetId": DES}
    routes = install_snapshot_routes(arm, lambda snapshot_id, snapshot: "https://md-x.blob.storage.azure.net/a?sig=x")
    add_resource_group_routes(arm)
    target = _target(vm)
    made: dict = {}
    with contextlib.ExitStack() as undo:
        access = snapshot_access.SnapshotAccess(target, undo, {"snapshot": {}}, [], [], credential=lambda: None,
                                                poll_seconds=0.01, stamp="20261201T000000Z",
                                                now=dt.datetime.now(dt.timezone.utc))
        snapshot_id = access.prepare()
        made.update(arm.get(snapshot_id))
    assert routes.creates == [snapshot_id]
    assert made["properties"]["encryption"] == {"type": kind, "diskEncryptionSetId": DES}


def test_the_snapshot_of_a_platform_key_disk_names_no_encryption_set(arm):
    from azure.mgmt.compute.models import Disk, Encryption

    disk = Disk(location="westeurope", encryption=Encryption(type="EncryptionAtRestWithPlatformKey"))
    assert snapshot_access.customer_key(disk) is None
    body = snapshot_access._snapshot_body(disk, _target_for(VM, VM_DISK), __import__("datetime").datetime(2026, 1, 1))
    assert body.properties.encryption is None


VM_DISK = f"/subscriptions/{SUB}/resourceGroups/prod-web/providers/Microsoft.Compute/disks/web-01_OsDisk_1"


def _target_for(vm_id: str, disk_id: str) -> snapshot_access.ExportTarget:
    outputs = RepairOutputs(
        subscription_id=SUB, resource_group_name="crashcart-repair-web-01", rescue_vm_id="", rescue_vm_name="",
        rescue_vm_principal_id="", rescue_os="windows", disk_copy_id="", disk_copy_lun=0, snapshot_id="",
        source_vm_id=vm_id, source_os_disk_id=disk_id, evidence_account_name="devstoreaccount1",
        evidence_blob_endpoint="http://127.0.0.1:10000/devstoreaccount1", evidence_container="dumps")
    return snapshot_access.ExportTarget(outputs, vm_id, "", disk_id, snapshot_group="crashcart-repair-web-01",
                                        tags={"crashcart": "export-snapshot"})


def _target(vm) -> snapshot_access.ExportTarget:
    return _target_for(vm.vm_id, vm.disk_id)
