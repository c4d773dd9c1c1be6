"""The simulated guest of the ARM double (scripts/devkit/arm_vmops.py, arm_guest.py), read through the real
azure-mgmt-compute client and the kit's own readers: the guest agent in the instance view (what `fix --verify`
judges a boot by), the crash decided from the OS disk's content, and the dump a crash writes onto that disk."""

from __future__ import annotations

import hashlib
import struct

import pytest

from scripts.azure import ids
from scripts.azure.clients import AzureClients
from scripts.azure.runcommand import agent_status
from scripts.devkit.arm_guest import ImageDisk
from scripts.devkit.arm_vmops import BLUESCREEN_XML, repair_world
from scripts.nodump import swap
from tests.remote.test_remote_fix import disk, services_hive
from tests.remote.test_remote_prepare import ntfs_file, partitions

POLL = {"poll_s": 0.01}


def _vm(world):
    compute = AzureClients(world.outputs["subscription_id"]).compute
    return compute, ids.parse(world.vm_id, "vm")


def test_the_guest_agent_is_ready_after_a_good_boot_and_never_on_a_boot_that_crashes(arm, azurite,
                                                                                      evidence_container):
    world = repair_world(arm, azurite, evidence_container.container_name)
    compute, vm = _vm(world)
    # running on its own disk, which boots: Not Ready at first, then Ready (VirtualMachineAgentInstanceView)
    assert agent_status(compute, vm.resource_group, vm.name) == (
        False, "agent 2.7.41491.1102 - Not Ready: VM status blob is found but not yet populated. (VM: VM running)")
    ready, said = agent_status(compute, vm.resource_group, vm.name)
    assert ready and said.startswith("agent 2.7.41491.1102 - Ready: GuestAgent is running")
    view = compute.virtual_machines.instance_view(vm.resource_group, vm.name)
    assert [(s.code, s.level, s.display_status) for s in view.vm_agent.statuses] == [
        ("ProvisioningState/succeeded", "Info", "Ready")]
    # deallocated: no agent at all
    swap.stop_and_deallocate(compute, vm, **POLL)
    assert compute.virtual_machines.instance_view(vm.resource_group, vm.name).vm_agent is None
    # started on a disk that crashes (the marker): never Ready, the stop on the serial log, no dump without content
    world.sim.crash_disk = world.original_disk_id
    swap.start(compute, vm, **POLL)
    for _ in range(4):
        swap.serial_log(compute, vm)
        assert agent_status(compute, vm.resource_group, vm.name)[0] is False
    assert world.sim.crashed and BLUESCREEN_XML in swap.serial_log(compute, vm)
    assert world.sim.crashes == [{"disk": world.original_disk_id, "why": "crash", "dump": None}]
    # the guest without an agent installed reports none
    world.sim.agent = False
    assert compute.virtual_machines.instance_view(vm.resource_group, vm.name).vm_agent is None


def _dump_file(image, path):
    (start, sectors) = [p for p in partitions(image)][-1]
    return ntfs_file(image, start, sectors, path)


@pytest.mark.root
def test_an_image_disk_decides_the_boot_from_its_hive_and_a_crash_writes_what_crash_control_asks(tmp_path):
    loads = ImageDisk(disk(tmp_path / "loads"))
    assert loads.boot_problem() == "CSAgent loads (Start 1 in ControlSet002)"
    written = loads.write_dump(seed=3)  # CrashDumpEnabled 7: a kernel dump at %SystemRoot%\MEMORY.DMP
    data = _dump_file(loads.image, "Windows/MEMORY.DMP")
    assert written == {"path": "Windows/MEMORY.DMP", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                       "bugcheck_code": 0x7E, "crash_dump_enabled": 7}
    assert data[:8] == b"PAGEDU64" and struct.unpack_from("<I", data, 0x38)[0] == 0x7E
    # disabled in the current control set: it boots; CrashDumpEnabled 3 writes a small dump, 0 none
    fixed = ImageDisk(disk(tmp_path / "fixed", services_hive(extra={r"Services\CSAgent": ("Start", 4),
                                                                    r"Control\CrashControl": ("CrashDumpEnabled", 3)})))
    assert fixed.boot_problem() is None
    mini = fixed.write_dump(seed=4)
    assert mini["path"].startswith("Windows/Minidump/") and mini["path"].endswith("-1-01.dmp")
    assert hashlib.sha256(_dump_file(fixed.image, mini["path"])).hexdigest() == mini["sha256"]
    none = ImageDisk(disk(tmp_path / "none", services_hive(extra={r"Control\CrashControl": ("CrashDumpEnabled", 0)})))
    assert none.write_dump(seed=5) == {"path": None, "why": "CrashDumpEnabled is 0: Windows writes no dump"}
    assert none.written == [{"path": None, "why": "CrashDumpEnabled is 0: Windows writes no dump"}]
