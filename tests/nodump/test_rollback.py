"""Rollback (scripts/rollback.py): the original OS disk goes back on the VM from the manifest written
before the swap, idempotently, against the ARM double with the real azure-mgmt-compute client."""

from __future__ import annotations

import json

import pytest

from scripts.evidence import blobs as evidence
from scripts.nodump import rollback
from scripts.azure import ids
from scripts.nodump import swap
from scripts.__main__ import main
from scripts.azure.clients import AzureClients
from scripts.base.errors import CrashcartError, ExitCode
from scripts.devkit.arm_vmops import repair_world, write_config

FAST = {"poll_s": 0.01}
PREFIX = "web-01/20250517T031245Z"


@pytest.fixture
def container(evidence_container):
    return evidence_container


def swapped_world(arm, azurite, container, tmp_path, **sim):
    """The state after `prepare-dump --swap` stopped half-way: the VM runs on the disk copy."""
    world = repair_world(arm, azurite, container.container_name, **sim)
    compute = AzureClients(world.outputs["subscription_id"]).compute
    vm = ids.parse(world.vm_id, "vm")
    manifest = rollback.RollbackManifest(
        source_vm_id=world.vm_id, original_os_disk_id=world.original_disk_id,
        original_os_disk_name=world.original_disk_id.rsplit("/", 1)[-1], prepared_disk_id=world.copy_id,
        rescue_vm_id=world.rescue_vm_id, rescue_lun=0, power_state_before="running", run=PREFIX,
        evidence_blob_endpoint=world.outputs["evidence_blob_endpoint"], evidence_container=container.container_name,
        local_path=str(tmp_path / "out" / PREFIX / rollback.MANIFEST_NAME),
        evidence_blob=f"{PREFIX}/{rollback.MANIFEST_NAME}")
    rollback.save(manifest, container, require_evidence=True)
    swap.stop_and_deallocate(compute, vm, **FAST)
    swap.detach_data_disk(compute, ids.parse(world.rescue_vm_id, "vm"), world.copy_id, **FAST)
    swap.swap_os_disk(compute, vm, world.copy_id, expect_current=world.original_disk_id, **FAST)
    swap.start(compute, vm, **FAST)
    assert world.os_disk() == world.copy_id
    return world, compute, manifest


def test_restore_puts_the_original_back_and_is_idempotent(arm, azurite, container, tmp_path):
    world, compute, manifest = swapped_world(arm, azurite, container, tmp_path)
    result = rollback.restore(compute, manifest, container, **FAST)
    assert world.os_disk() == world.original_disk_id
    assert arm.get(world.original_disk_id)["managedBy"] == world.vm_id
    assert world.rescue_data_disks() == [world.copy_id] and arm.get(world.copy_id)["managedBy"] == world.rescue_vm_id
    assert world.sim.power == "running" and result.started  # it was running before the swap
    assert world.sim.skip_shutdown[-1] is True  # the VM on the copy was stopped without a guest shutdown
    assert result.copy == "reattached to crashcart-rescue at LUN 0"
    stored = json.loads(evidence.read_bytes(container, manifest.evidence_blob))
    local = json.loads((tmp_path / "out" / PREFIX / rollback.MANIFEST_NAME).read_text())
    assert stored["state"] == local["state"] == "restored"

    writes = len(world.source_writes())
    again = rollback.restore(compute, rollback.load_local(tmp_path / "out" / PREFIX / rollback.MANIFEST_NAME),
                             container, **FAST)
    assert "already runs on its original OS disk" in again.steps[0]
    assert again.copy.startswith("already attached") and not again.started
    assert len(world.source_writes()) == writes


def test_a_third_disk_is_never_touched(arm, azurite, container, tmp_path):
    world, compute, manifest = swapped_world(arm, azurite, container, tmp_path)
    other = world.original_disk_id.replace("web-01_OsDisk_1_0f4c2d", "someone-elses-disk")
    arm.put(other, {**arm.get(world.original_disk_id), "id": other, "name": "someone-elses-disk"})
    world.vm()["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"] = other
    writes = len(world.source_writes())
    with pytest.raises(CrashcartError) as err:
        rollback.restore(compute, manifest, container, **FAST)
    assert "neither the original" in err.value.message and err.value.exit_code == ExitCode.USAGE
    assert "az vm update -g prod-web -n web-01 --os-disk" in err.value.hint
    assert len(world.source_writes()) == writes


def test_the_verb_from_the_local_manifest(arm, azurite, container, tmp_path, capsys):
    world, _, manifest = swapped_world(arm, azurite, container, tmp_path)
    code = main(["rollback", "--manifest", manifest.local_path, "--leave-stopped", "--poll-seconds", "0.01"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out)["rollback"]
    assert result["os_disk_id"] == world.original_disk_id and result["started"] is False
    assert world.os_disk() == world.original_disk_id and world.sim.power == "deallocated"


def test_the_verb_from_evidence_and_deleting_the_copy(arm, azurite, container, tmp_path, capsys, monkeypatch):
    world, _, manifest = swapped_world(arm, azurite, container, tmp_path)
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "repair.toml", world)
    code = main(["rollback", "--config", str(config), "--evidence-blob", manifest.evidence_blob, "--delete-copy",
                 "--out-dir", str(tmp_path / "elsewhere"), "--poll-seconds", "0.01"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert world.os_disk() == world.original_disk_id
    assert arm.get(world.copy_id) is None and json.loads(out.out)["rollback"]["copy"] == "deleted"
    assert (tmp_path / "elsewhere" / PREFIX / rollback.MANIFEST_NAME).exists()


def test_a_copy_crashcart_did_not_make_is_not_deleted(arm, azurite, container, tmp_path):
    world, compute, manifest = swapped_world(arm, azurite, container, tmp_path)
    arm.get(world.copy_id)["tags"] = {"owner": "someone"}
    with pytest.raises(CrashcartError, match="no crashcart tag"):
        rollback.restore(compute, manifest, container, delete_copy=True, **FAST)
    assert world.os_disk() == world.original_disk_id  # the VM itself was restored first
    assert arm.get(world.copy_id) is not None


def test_unusable_manifests_are_usage_errors(tmp_path, capsys):
    bad = tmp_path / "rollback-manifest.json"
    bad.write_text("{not json")
    assert main(["rollback", "--manifest", str(bad)]) == ExitCode.USAGE
    assert "cannot read the rollback manifest" in capsys.readouterr().err
    bad.write_text(json.dumps({"schema": "something/else"}))
    assert main(["rollback", "--manifest", str(bad)]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "not a crashcart rollback manifest" in err and "Traceback" not in err
    bad.write_bytes(b"\xef\xbb\xbf" + json.dumps({"schema": "something/else"}).encode())  # saved by Notepad
    assert main(["rollback", "--manifest", str(bad)]) == ExitCode.USAGE
    assert "not a crashcart rollback manifest" in capsys.readouterr().err  # read past its byte-order mark
