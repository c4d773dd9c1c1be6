"""The only writes crashcart ever makes to the source VM: stop it, swap its OS disk, start it, swap back.

They happen only on an explicit `prepare-dump --swap`, and only after a rollback manifest naming the
original OS disk is stored both locally and in the evidence container (scripts.rollback). Everything
here is a small function over the Azure compute client (azure-mgmt-compute), so each step can be
tested against the ARM double and reused by rollback:

- `power_state`, `power_off`, `deallocate`, `start`: the VM's power (POST powerOff/deallocate/start,
  long-running; state from the instance view's `PowerState/*` status);
- `check_swap`: refuses a swap when the prepared copy cannot boot the VM — Hyper-V generation,
  security type (Standard / Trusted Launch; Confidential VMs are never touched), disk controller
  (SCSI / NVMe), region or zone differ — with every reason;
- `swap_os_disk`: VM GET + PUT with `storageProfile.osDisk.managedDisk.id` and `name` replaced (what
  `az vm update --os-disk` does), refused unless the VM's current OS disk is the one expected;
- `detach_data_disk` / `attach_data_disk`: moves the prepared copy off / back onto the rescue VM;
- `wait_for_crash`: polls the serial log (boot diagnostics) until Windows bugchecks, sends or prints
  the serial console NMI when it hangs instead.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scripts.config.model import DISK_ID, VM_ID
from scripts.base.errors import CrashcartError, ExitCode

log = logging.getLogger("crashcart.swap")

SECURITY_REFUSED = ("ConfidentialVM",)
# How often a long-running ARM operation is polled when ARM sends no Retry-After (azure-core would wait 30 s).
DEFAULT_POLL_S = 10.0


class SwapRefused(CrashcartError):
    """The prepared copy cannot take the original's place: nothing was changed."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class VmRef:
    subscription_id: str
    resource_group: str
    name: str

    @classmethod
    def parse(cls, vm_id: str) -> "VmRef":
        m = VM_ID.fullmatch(vm_id or "")
        if m is None:
            raise CrashcartError(f"{vm_id!r} is not a VM resource ID", "check the repair stack's outputs (source_vm_id)",
                                 ExitCode.USAGE)
        return cls(m.group("sub"), m.group("rg"), m.group("name"))

    @property
    def id(self) -> str:
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
                f"/providers/Microsoft.Compute/virtualMachines/{self.name}")


def disk_parts(disk_id: str) -> tuple[str, str]:
    m = DISK_ID.fullmatch(disk_id or "")
    if m is None:
        raise CrashcartError(f"{disk_id!r} is not a managed disk resource ID",
                             "check the repair stack's outputs (disk_copy_id, source_os_disk_id)", ExitCode.USAGE)
    return m.group("rg"), m.group("name")


def same_id(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and a.strip("/").lower() == b.strip("/").lower()  # type: ignore[union-attr]


def _text(value: Any) -> str:
    return "" if value is None else str(getattr(value, "value", value))


def azure_call(call: Callable[[], Any], what: str) -> Any:
    """Runs one ARM call; an Azure error becomes a CrashcartError naming `what`."""
    from azure.core.exceptions import AzureError

    from scripts.azure.errors import translate_azure_error

    try:
        return call()
    except AzureError as err:
        raise translate_azure_error(err, what) from None


# ---- reading --------------------------------------------------------------------------------------------------
def get_vm(compute: Any, vm: VmRef) -> Any:
    return azure_call(lambda: compute.virtual_machines.get(vm.resource_group, vm.name), f"VM {vm.name}")


def get_disk(compute: Any, disk_id: str) -> Any:
    rg, name = disk_parts(disk_id)
    return azure_call(lambda: compute.disks.get(rg, name), f"disk {name}")


def os_disk_id(vm_model: Any) -> str:
    os_disk = vm_model.storage_profile.os_disk
    return (os_disk.managed_disk.id if os_disk.managed_disk else "") or ""


def power_state(compute: Any, vm: VmRef) -> str:
    """running | deallocated | stopped | starting | stopping | deallocating | unknown"""
    view = azure_call(lambda: compute.virtual_machines.instance_view(vm.resource_group, vm.name),
                      f"the instance view of VM {vm.name}")
    for status in view.statuses or []:
        code = status.code or ""
        if code.startswith("PowerState/"):
            return code.split("/", 1)[1]
    return "unknown"


# ---- power ----------------------------------------------------------------------------------------------------
def power_off(compute: Any, vm: VmRef, *, skip_shutdown: bool = True, poll_s: float = DEFAULT_POLL_S) -> None:
    """Stops the VM at once (a VM on a blue screen cannot shut down gracefully)."""
    log.info("    powering off %s%s", vm.name, " (no guest shutdown)" if skip_shutdown else "")
    azure_call(lambda: compute.virtual_machines.begin_power_off(vm.resource_group, vm.name,
                                                                skip_shutdown=skip_shutdown,
                                                                polling_interval=poll_s).result(),
               f"powering off VM {vm.name}")


def deallocate(compute: Any, vm: VmRef, *, poll_s: float = DEFAULT_POLL_S) -> None:
    log.info("    deallocating %s", vm.name)
    azure_call(lambda: compute.virtual_machines.begin_deallocate(vm.resource_group, vm.name,
                                                                           polling_interval=poll_s).result(),
               f"deallocating VM {vm.name}")


def start(compute: Any, vm: VmRef, *, poll_s: float = DEFAULT_POLL_S) -> None:
    log.info("    starting %s", vm.name)
    azure_call(lambda: compute.virtual_machines.begin_start(vm.resource_group, vm.name, polling_interval=poll_s).result(),
               f"starting VM {vm.name}")


def stop_and_deallocate(compute: Any, vm: VmRef, *, poll_s: float = DEFAULT_POLL_S) -> str:
    """Brings the VM to `deallocated` (the state an OS disk swap needs); returns the state it was in."""
    state = power_state(compute, vm)
    if state == "deallocated":
        return state
    if state not in ("stopped", "deallocating"):
        power_off(compute, vm, skip_shutdown=True, poll_s=poll_s)
    deallocate(compute, vm, poll_s=poll_s)
    return state


# ---- the swap -------------------------------------------------------------------------------------------------
@dataclass
class SwapCheck:
    reasons: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.reasons


def _vm_security(vm_model: Any) -> str:
    return _text(getattr(getattr(vm_model, "security_profile", None), "security_type", None)) or "Standard"


def _disk_security(disk: Any) -> str:
    value = _text(getattr(getattr(disk, "security_profile", None), "security_type", None)) or "Standard"
    return "ConfidentialVM" if value.startswith("ConfidentialVM") else value


def _disk_controllers(disk: Any) -> list[str]:
    caps = getattr(disk, "supported_capabilities", None)
    raw = _text(getattr(caps, "disk_controller_types", None))
    return [c.strip() for c in raw.split(",") if c.strip()] or ["SCSI"]


def check_swap(vm_model: Any, original: Any, copy: Any, *, expected_original_id: str,
               allowed_holder_ids: tuple[str, ...] = ()) -> SwapCheck:
    """Whether the prepared copy can boot the VM in place of its original OS disk, with every reason not."""
    check = SwapCheck()
    r = check.reasons
    current = os_disk_id(vm_model)
    vm_security = _vm_security(vm_model)
    controller = _text(getattr(vm_model.storage_profile, "disk_controller_type", None)) or "SCSI"
    check.facts = {
        "vm_os_disk_id": current, "vm_security_type": vm_security, "vm_disk_controller": controller,
        "original_generation": _text(original.hyper_v_generation) or "V1",
        "copy_generation": _text(copy.hyper_v_generation) or "V1",
        "copy_security_type": _disk_security(copy), "copy_disk_controllers": _disk_controllers(copy),
    }
    if not same_id(current, expected_original_id) and not same_id(current, copy.id):
        r.append(f"the VM's OS disk is {current or 'not a managed disk'}, not the original {expected_original_id} "
                 "recorded for this repair")
    if vm_security in SECURITY_REFUSED or _disk_security(copy) in SECURITY_REFUSED:
        r.append("Confidential VMs are never swapped: their OS disk is bound to the VM's vTPM")
    if _text(copy.os_type or "") and _text(copy.os_type).lower() != "windows":
        r.append(f"the copy's OS type is {_text(copy.os_type)}, not Windows")
    if check.facts["original_generation"] != check.facts["copy_generation"]:
        r.append(f"Hyper-V generation differs: the VM's original disk is {check.facts['original_generation']}, "
                 f"the copy {check.facts['copy_generation']} (a Generation {check.facts['original_generation'][-1]} "
                 "VM cannot boot it)")
    if vm_security != check.facts["copy_security_type"]:
        r.append(f"security type differs: the VM is {vm_security}, the copy {check.facts['copy_security_type']}")
    if controller not in check.facts["copy_disk_controllers"]:
        r.append(f"disk controller differs: the VM uses {controller}, the copy supports "
                 f"{', '.join(check.facts['copy_disk_controllers'])}")
    if (copy.location or "").lower() != (vm_model.location or "").lower():
        r.append(f"region differs: the VM is in {vm_model.location}, the copy in {copy.location}")
    vm_zones, copy_zones = list(vm_model.zones or []), list(copy.zones or [])
    if vm_zones != copy_zones:
        r.append(f"zone differs: the VM is in zone {','.join(vm_zones) or 'none'}, the copy in "
                 f"{','.join(copy_zones) or 'none'}")
    holder = getattr(copy, "managed_by", None)
    if holder and not same_id(holder, vm_model.id) and not any(same_id(holder, h) for h in allowed_holder_ids):
        r.append(f"the copy is attached to {holder}")
    return check


def swap_os_disk(compute: Any, vm: VmRef, new_disk_id: str, *, expect_current: str,
                 poll_s: float = DEFAULT_POLL_S) -> str:
    """Makes `new_disk_id` the VM's OS disk (the VM must be deallocated). Refuses unless the current OS
    disk is `expect_current` (or already `new_disk_id`: then nothing is done). Returns the previous ID."""
    model = get_vm(compute, vm)
    current = os_disk_id(model)
    if same_id(current, new_disk_id):
        log.info("    %s already runs on %s", vm.name, new_disk_id.rsplit("/", 1)[-1])
        return current
    if not same_id(current, expect_current):
        raise CrashcartError(
            f"VM {vm.name}'s OS disk is {current}, expected {expect_current}: not swapping",
            "someone changed the VM meanwhile; check it in the portal (Disks) before anything else", ExitCode.USAGE)
    os_disk = model.storage_profile.os_disk
    os_disk.managed_disk.id = new_disk_id
    os_disk.name = new_disk_id.rstrip("/").rsplit("/", 1)[-1]
    log.info("    %s: OS disk %s -> %s", vm.name, current.rsplit("/", 1)[-1], os_disk.name)
    azure_call(lambda: compute.virtual_machines.begin_create_or_update(vm.resource_group, vm.name, model,
                                                                              polling_interval=poll_s).result(),
               f"swapping the OS disk of VM {vm.name}")
    return current


def data_disk_lun(vm_model: Any, disk_id: str) -> int | None:
    for disk in vm_model.storage_profile.data_disks or []:
        if disk.managed_disk is not None and same_id(disk.managed_disk.id, disk_id):
            return int(disk.lun)
    return None


def detach_data_disk(compute: Any, vm: VmRef, disk_id: str, *, poll_s: float = DEFAULT_POLL_S) -> int | None:
    """Detaches `disk_id` from the VM (a PUT without it); returns the LUN it had, None when not attached."""
    model = get_vm(compute, vm)
    lun = data_disk_lun(model, disk_id)
    if lun is None:
        return None
    model.storage_profile.data_disks = [d for d in model.storage_profile.data_disks
                                        if not (d.managed_disk is not None and same_id(d.managed_disk.id, disk_id))]
    log.info("    detaching %s from %s (LUN %d)", disk_id.rsplit("/", 1)[-1], vm.name, lun)
    azure_call(lambda: compute.virtual_machines.begin_create_or_update(vm.resource_group, vm.name, model,
                                                                              polling_interval=poll_s).result(),
               f"detaching the disk copy from {vm.name}")
    return lun


def attach_data_disk(compute: Any, vm: VmRef, disk_id: str, lun: int, *, poll_s: float = DEFAULT_POLL_S) -> None:
    """Attaches `disk_id` at `lun` (nothing to do when it is already there)."""
    from azure.mgmt.compute import models

    model = get_vm(compute, vm)
    at = data_disk_lun(model, disk_id)
    if at is not None:
        if at != lun:
            log.warning("    %s is attached to %s at LUN %d, not %d", disk_id.rsplit("/", 1)[-1], vm.name, at, lun)
        return
    if any(int(d.lun) == lun for d in model.storage_profile.data_disks or []):
        raise CrashcartError(f"LUN {lun} of {vm.name} is taken by another disk",
                             f"detach it, then re-run `pipenv run rollback` to put the disk copy back at LUN {lun}",
                             ExitCode.AZURE_FAILED)
    model.storage_profile.data_disks = list(model.storage_profile.data_disks or []) + [models.DataDisk(
        lun=lun, create_option="Attach", caching="None", name=disk_id.rstrip("/").rsplit("/", 1)[-1],
        managed_disk=models.ManagedDiskParameters(id=disk_id))]
    log.info("    attaching %s to %s at LUN %d", disk_id.rsplit("/", 1)[-1], vm.name, lun)
    azure_call(lambda: compute.virtual_machines.begin_create_or_update(vm.resource_group, vm.name, model,
                                                                              polling_interval=poll_s).result(),
               f"attaching the disk copy to {vm.name}")


def delete_disk(compute: Any, disk_id: str, *, poll_s: float = DEFAULT_POLL_S) -> None:
    rg, name = disk_parts(disk_id)
    log.info("    deleting disk %s", name)
    azure_call(lambda: compute.disks.begin_delete(rg, name, polling_interval=poll_s).result(), f"deleting disk {name}")


# ---- triggering the crash -------------------------------------------------------------------------------------
def nmi_command(vm: VmRef) -> list[str]:
    """The Azure CLI command that sends an NMI through the serial console (extension serial-console)."""
    return ["az", "serial-console", "send", "nmi", "--subscription", vm.subscription_id,
            "--resource-group", vm.resource_group, "--name", vm.name]


def send_nmi(vm: VmRef, timeout_s: float = 120.0) -> tuple[bool, str]:
    """Runs `az serial-console send nmi` (argv, no shell). (sent, what happened)."""
    command = nmi_command(vm)
    if shutil.which(command[0]) is None:
        return False, "the Azure CLI (az) is not installed here"
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"az serial-console send nmi did not complete: {err}"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return False, f"az serial-console send nmi failed: {tail[0]}"
    return True, "NMI sent through the serial console"


@dataclass
class CrashWatch:
    """How the wait for the crash ended."""

    crashed: bool
    reason: str  # bugcheck | stopped | timeout
    seconds: float
    bugcheck: dict[str, Any] | None = None
    nmi: str = ""  # "" | sent | printed | failed: <why>
    nmi_command: list[str] = field(default_factory=list)
    polls: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"crashed": self.crashed, "reason": self.reason, "seconds": round(self.seconds, 1),
                "bugcheck": self.bugcheck, "nmi": self.nmi, "nmi_command": " ".join(self.nmi_command),
                "polls": self.polls}


def new_text(before: str, now: str) -> str:
    """What the serial log gained since `before` (all of it when the log was started afresh)."""
    return now[len(before):] if before and now.startswith(before) else now


def wait_for_crash(compute: Any, vm: VmRef, *, baseline: str, timeout_s: float, poll_s: float,
                   nmi_after_s: float | None, auto_nmi: bool,
                   on_poll: Callable[[str], None] | None = None) -> CrashWatch:
    """Polls the VM's serial log (and power state) until Windows bugchecks. After `nmi_after_s` without
    one (a hang), sends the NMI through the serial console (`auto_nmi`) or prints the exact command.
    Never raises for a transient read failure of the serial log; ends at `timeout_s`."""
    from scripts.evidence import bootdiag

    started = time.monotonic()
    watch = CrashWatch(crashed=False, reason="timeout", seconds=0.0, nmi_command=nmi_command(vm))
    while True:
        watch.polls += 1
        elapsed = time.monotonic() - started
        state = power_state(compute, vm)
        try:
            text = bootdiag.read_serial_log(compute, vm.resource_group, vm.name)
        except Exception as err:  # noqa: BLE001 - a serial log read is retried at the next poll
            log.debug("serial log not readable yet: %s", err)
            text = ""
        found = bootdiag.serial_bugcheck(new_text(baseline, text))
        if on_poll:
            on_poll(f"{state}, {elapsed:.0f}s" + (f", stop {found.get('code')}" if found else ""))
        if found:
            watch.crashed, watch.reason, watch.bugcheck = True, "bugcheck", found
            break
        if state in ("stopped", "deallocated"):
            watch.reason = "stopped"
            break
        if nmi_after_s is not None and not watch.nmi and elapsed >= nmi_after_s:
            shown = " ".join(watch.nmi_command)
            if auto_nmi:
                sent, said = send_nmi(vm)
                watch.nmi = "sent" if sent else f"failed: {said}"
                log.info("    %s", said)
                if not sent:
                    log.warning("    send it yourself: %s", shown)
            else:
                watch.nmi = "printed"
                log.warning("    no crash after %.0f min: if the VM hangs, send an NMI now:\n      %s",
                            elapsed / 60, shown)
        if elapsed >= timeout_s:
            break
        time.sleep(poll_s)
    watch.seconds = time.monotonic() - started
    return watch
