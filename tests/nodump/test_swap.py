"""Swap, power and crash-trigger helpers (scripts/swap.py) against the ARM double, with the real
azure-mgmt-compute client: VM GET/PUT with LRO, deallocate/powerOff/start POSTs, instance view power
states, retrieveBootDiagnosticsData for the serial log."""

from __future__ import annotations

import logging
import os

import pytest

from scripts.azure import ids
from scripts.nodump import swap
from scripts.azure.clients import AzureClients
from scripts.base.errors import CrashcartError, ExitCode
from scripts.devkit.arm_vmops import repair_world
from tests.devkit.fakeaz import install_fake_az

FAST = {"poll_s": 0.01}  # LRO polling when the double sends no usable Retry-After


@pytest.fixture
def container_name(evidence_container):
    return evidence_container.container_name


def compute_for(world):
    return AzureClients(world.outputs["subscription_id"]).compute


def preflight(world):
    from scripts.config.stackoutputs import RepairOutputs

    return swap.preflight(compute_for(world), RepairOutputs.from_values(world.outputs))


@pytest.mark.parametrize("change, reason", [
    ({"copy_overrides": {"hyperVGeneration": "V1"}}, "Hyper-V generation differs"),
    ({"copy_overrides": {"securityProfile": None}}, "security type differs: the VM is TrustedLaunch, the copy Standard"),
    ({"controller": "NVMe"}, "disk controller differs: the VM uses NVMe, the copy supports SCSI"),
    ({"zone": "2"}, "zone differs"),
], ids=["generation", "security", "controller", "zone"])
def test_swap_is_refused_with_the_reason_and_nothing_changes(arm, azurite, container_name, change, reason):
    zone = change.pop("zone", None)
    world = repair_world(arm, azurite, container_name, **change)
    if zone:
        arm.get(world.copy_id)["zones"] = [zone]
    with pytest.raises(swap.SwapRefused) as err:
        preflight(world)
    assert reason in err.value.message
    assert err.value.exit_code == ExitCode.USAGE and "nothing was changed" in err.value.hint
    assert world.source_writes() == []


def test_a_matching_copy_passes(arm, azurite, container_name):
    world = repair_world(arm, azurite, container_name, controller="NVMe",
                         copy_overrides={"supportedCapabilities": {"diskControllerTypes": "SCSI, NVMe"}})
    check = preflight(world)
    assert check.ok and check.facts["vm_disk_controller"] == "NVMe"


# ---- zones and redundancy: Azure's rule, refused before anything changes -----------------------------------
def _swap_in(world):
    """Deallocate, detach the copy from the rescue VM, swap: what `prepare-dump --swap` does after preflight."""
    compute, vm = compute_for(world), ids.parse(world.vm_id, "vm")
    swap.stop_and_deallocate(compute, vm, **FAST)
    swap.detach_data_disk(compute, ids.parse(world.rescue_vm_id, "vm"), world.copy_id, **FAST)
    return swap.swap_os_disk(compute, vm, world.copy_id, expect_current=world.original_disk_id, **FAST)


@pytest.mark.parametrize("sku", ["Premium_ZRS", "StandardSSD_ZRS"])
def test_a_zone_redundant_copy_is_swapped_onto_a_zonal_vm(arm, azurite, container_name, sku):
    """A ZRS disk has no zone of its own and joins a VM in any zone (Azure: "a ZRS disk can be attached to a
    VM in a different zone"): the zonal VM takes it, and the kit does not refuse it for "zone differs"."""
    world = repair_world(arm, azurite, container_name, sku=sku)
    assert "zones" not in arm.get(world.copy_id) and world.vm()["zones"] == ["1"]
    check = preflight(world)
    assert check.ok and check.facts["copy_sku"] == sku and check.facts["copy_zones"] == []
    _swap_in(world)
    assert world.os_disk() == world.copy_id


@pytest.mark.parametrize("copy_zones, said, azure_said", [
    (None, "the VM is in zone 1, the copy (Premium_LRS) in no zone", "is not in zone '1'."),
    (["3"], "the VM is in zone 1, the copy (Premium_LRS) in zone 3",
     "is not in the same zone as the VM. VM zone: '1'. Disk zone: '3'."),
], ids=["regional-lrs-copy", "lrs-copy-in-another-zone"])
def test_a_copy_azure_would_not_attach_is_refused_up_front(arm, azurite, container_name, copy_zones, said,
                                                           azure_said):
    world = repair_world(arm, azurite, container_name)
    copy = arm.get(world.copy_id)
    copy.pop("zones", None)
    if copy_zones:
        copy["zones"] = copy_zones
    with pytest.raises(swap.SwapRefused) as err:
        preflight(world)
    assert f"zone differs: {said}" in err.value.message and "zone-redundant" in err.value.message
    assert err.value.exit_code == ExitCode.USAGE and "nothing was changed" in err.value.hint
    assert world.source_writes() == []
    # and the reason is Azure's: the same swap, forced past the check, is refused by ARM and changes nothing
    with pytest.raises(CrashcartError) as refused:
        _swap_in(world)
    assert azure_said in refused.value.message
    assert world.os_disk() == world.original_disk_id


def test_swap_power_and_data_disk_moves(arm, azurite, container_name):
    world = repair_world(arm, azurite, container_name)
    compute = compute_for(world)
    vm = ids.parse(world.vm_id, "vm")
    rescue = ids.parse(world.rescue_vm_id, "vm")
    assert swap.power_state(compute, vm) == "running"

    # ARM refuses an OS disk change while the VM runs (and the copy is still on the rescue VM)
    with pytest.raises(CrashcartError) as err:
        swap.swap_os_disk(compute, vm, world.copy_id, expect_current=world.original_disk_id, **FAST)
    assert "OperationNotAllowed" in err.value.message
    assert world.os_disk() == world.original_disk_id

    assert swap.stop_and_deallocate(compute, vm, **FAST) == "running"
    assert swap.power_state(compute, vm) == "deallocated"
    assert world.sim.skip_shutdown == [True]
    assert [r.path.rsplit("/", 1)[-1] for r in world.source_writes()] == ["web-01", "powerOff", "deallocate"]
    assert swap.stop_and_deallocate(compute, vm, **FAST) == "deallocated"  # nothing more to do

    assert swap.detach_data_disk(compute, rescue, world.copy_id, **FAST) == 0
    assert world.rescue_data_disks() == [] and "managedBy" not in arm.get(world.copy_id)
    assert swap.detach_data_disk(compute, rescue, world.copy_id, **FAST) is None

    previous = swap.swap_os_disk(compute, vm, world.copy_id, expect_current=world.original_disk_id, **FAST)
    assert ids.same(previous, world.original_disk_id)
    assert world.os_disk() == world.copy_id
    stored = world.vm()["properties"]["storageProfile"]["osDisk"]
    assert stored["name"] == world.copy_id.rsplit("/", 1)[-1]
    assert arm.get(world.copy_id)["managedBy"] == world.vm_id and "managedBy" not in arm.get(world.original_disk_id)
    # every other property of the VM went back as it was
    assert world.vm()["properties"]["securityProfile"]["securityType"] == "TrustedLaunch"
    assert world.vm()["tags"] == {"app": "web"} and world.vm()["zones"] == ["1"]

    puts = len(arm.calls("PUT", world.vm_id))
    swap.swap_os_disk(compute, vm, world.copy_id, expect_current=world.original_disk_id, **FAST)  # already done
    with pytest.raises(CrashcartError, match="expected"):
        swap.swap_os_disk(compute, vm, world.original_disk_id, expect_current=world.rescue_vm_id, **FAST)
    assert len(arm.calls("PUT", world.vm_id)) == puts

    swap.swap_os_disk(compute, vm, world.original_disk_id, expect_current=world.copy_id, **FAST)
    swap.attach_data_disk(compute, rescue, world.copy_id, 0, **FAST)
    assert world.os_disk() == world.original_disk_id and world.rescue_data_disks() == [world.copy_id]
    swap.start(compute, vm, **FAST)
    assert swap.power_state(compute, vm) == "running"


def _on_copy_and_started(world):
    compute = compute_for(world)
    vm = ids.parse(world.vm_id, "vm")
    swap.stop_and_deallocate(compute, vm, **FAST)
    swap.detach_data_disk(compute, ids.parse(world.rescue_vm_id, "vm"), world.copy_id, **FAST)
    swap.swap_os_disk(compute, vm, world.copy_id, expect_current=world.original_disk_id, **FAST)
    swap.start(compute, vm, **FAST)
    return compute, vm


def test_wait_for_crash_reads_the_stop_from_the_serial_log(arm, azurite, container_name):
    world = repair_world(arm, azurite, container_name, crash_after=2)
    compute, vm = _on_copy_and_started(world)
    watch = swap.wait_for_crash(compute, vm, baseline="", timeout_s=10, poll_s=0.01, nmi_after_s=None, auto_nmi=False)
    assert watch.crashed and watch.reason == "bugcheck"
    assert watch.bugcheck["code"] == "0x0000007E" and watch.polls == 3
    assert world.sim.dumps_on == [world.copy_id]


@pytest.fixture
def fake_az(tmp_path, monkeypatch):
    """`az serial-console send nmi` as the Azure CLI extension runs it (tests/devkit/fakeaz.py)."""
    return install_fake_az(tmp_path, monkeypatch)


def test_a_hang_gets_the_nmi_sent(arm, azurite, container_name, fake_az):
    world = repair_world(arm, azurite, container_name, mode="hang")
    compute, vm = _on_copy_and_started(world)
    watch = swap.wait_for_crash(compute, vm, baseline="", timeout_s=10, poll_s=0.01, nmi_after_s=0.05, auto_nmi=True)
    assert watch.crashed and watch.nmi == "sent" and world.sim.nmis == 1
    assert fake_az.read_text().split() == ["serial-console", "send", "nmi", "--subscription", vm.subscription,
                                           "--resource-group", "prod-web", "--name", "web-01"]


def test_a_hang_without_az_prints_the_exact_command(arm, azurite, container_name, caplog):
    world = repair_world(arm, azurite, container_name, mode="hang")
    compute, vm = _on_copy_and_started(world)
    with caplog.at_level(logging.INFO, logger="crashcart"):
        watch = swap.wait_for_crash(compute, vm, baseline="", timeout_s=0.2, poll_s=0.02, nmi_after_s=0.0,
                                    auto_nmi=False)
    assert not watch.crashed and watch.reason == "timeout" and watch.nmi == "printed"
    command = f"az serial-console send nmi --subscription {vm.subscription} --resource-group prod-web --name web-01"
    assert command in caplog.text and watch.to_dict()["nmi_command"] == command
    assert world.sim.nmis == 0


def test_a_refused_serial_log_ends_the_wait_at_once_with_exit_3(arm, azurite, container_name):
    """A 403 while polling is final: the missing role does not appear while the VM hangs (before: the wait
    swallowed it until its timeout and reported no crash)."""
    action = "Microsoft.Compute/virtualMachines/retrieveBootDiagnosticsData/action"
    world = repair_world(arm, azurite, container_name, crash_after=2)
    compute, vm = _on_copy_and_started(world)
    arm.rbac.remove_action(action)
    with pytest.raises(CrashcartError) as err:
        swap.wait_for_crash(compute, vm, baseline="", timeout_s=5, poll_s=0.01, nmi_after_s=None, auto_nmi=False)
    assert err.value.exit_code == ExitCode.AZURE_AUTH
    assert action in err.value.message and "AuthorizationFailed" in err.value.message
    assert len(arm.calls("POST", "/retrieveBootDiagnosticsData")) == 1


def test_an_nmi_refused_for_lack_of_a_role_ends_the_wait_with_exit_3_naming_it(arm, azurite, container_name,
                                                                               fake_az, caplog):
    """az only says it could not connect; the kit asks ARM itself and names the missing action."""
    action = "Microsoft.SerialConsole/serialPorts/connect/action"
    world = repair_world(arm, azurite, container_name, mode="hang")
    compute, vm = _on_copy_and_started(world)
    arm.rbac.remove_action(action)
    with caplog.at_level(logging.INFO, logger="crashcart"), pytest.raises(CrashcartError) as err:
        swap.wait_for_crash(compute, vm, baseline="", timeout_s=5, poll_s=0.01, nmi_after_s=0.0, auto_nmi=True)
    assert err.value.exit_code == ExitCode.AZURE_AUTH and action in err.value.message
    assert "Could not establish connection" in caplog.text  # what az said
    assert world.sim.nmis == 0 and fake_az.read_text().count("send nmi") == 1


def test_an_nmi_the_console_refused_is_not_reported_as_sent(tmp_path, monkeypatch):
    """The serial-console extension exits 0 after printing "Failed to send NMI" (custom.py): that is a
    failure, not an NMI on its way."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "az").write_text("#!/bin/sh\necho 'Failed to send NMI'\nexit 0\n")
    (bin_dir / "az").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    vm = ids.parse("/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/prod-web/providers/"
                   "Microsoft.Compute/virtualMachines/web-01", "vm")
    sent, said = swap.send_nmi(vm, timeout_s=10)
    assert not sent and "Failed to send NMI" in said
