"""The only writes crashcart ever makes to the source VM: stop it, swap its OS disk, start it, swap back.

They happen only on an explicit `prepare-dump --swap`, and only after a rollback manifest naming the
original OS disk is stored both locally and in the evidence container (scripts.nodump.rollback).
Everything here is a small function over the Azure compute client (azure-mgmt-compute), so each step
can be tested against the ARM double and reused by rollback:

- `power_state`, `power_off`, `deallocate`, `start`: the VM's power (POST powerOff/deallocate/start,
  long-running; state from the instance view's `PowerState/*` status);
- `check_swap` / `preflight`: refuses a swap before any change when the copy cannot boot the VM: Hyper-V
  generation, security type (Confidential VMs are never touched), disk controller or region differ, or
  Azure's zone rule forbids it (a ZRS disk joins a VM in any zone, any other only in its own) — every reason;
- `swap_os_disk`: VM GET + PUT with `storageProfile.osDisk.managedDisk.id` and `name` replaced (what
  `az vm update --os-disk` does), refused unless the VM's current OS disk is the one expected;
- `detach_data_disk` / `attach_data_disk`: moves the prepared copy off / back onto the rescue VM;
- `wait_for_crash`: polls the serial log (boot diagnostics) until Windows bugchecks, sends or prints
  the serial console NMI when it hangs instead; `wait_for_dump` then gives Windows time to write it. A
  refusal (401/403: a role the identity lacks) ends the wait at once with exit 3: waiting cannot grant it.

A VM or disk is its resource ID (scripts.azure.ids): functions take the parsed `ResourceId` of the VM.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scripts.azure import ids
from scripts.azure.errors import azure_call, translate_azure_error
from scripts.azure.poll import poll
from scripts.base.errors import CrashcartError, ExitCode, for_status
from scripts.base.stop import StopRequest
from scripts.config.stackoutputs import RepairOutputs
from scripts.evidence import bootdiag

log = logging.getLogger("crashcart.swap")

SECURITY_REFUSED = ("ConfidentialVM",)
SERIAL_CONSOLE_API = "2018-05-01"  # Microsoft.SerialConsole, the api-version the az extension uses
# How often a long-running ARM operation is polled when ARM sends no Retry-After (azure-core would wait 30 s).
DEFAULT_POLL_S = 10.0
OUTPUTS_HINT = "check the repair stack's outputs (source_vm_id, rescue_vm_id, disk_copy_id, source_os_disk_id)"


class SwapRefused(CrashcartError):
    """The prepared copy cannot take the original's place: nothing was changed."""

    exit_code = ExitCode.USAGE


def _leaf(resource_id: str) -> str:
    return resource_id.rstrip("/").rsplit("/", 1)[-1]


def _text(value: Any) -> str:
    return "" if value is None else str(getattr(value, "value", value))


def _lro(call: Callable[[], Any], vm: ids.ResourceId, doing: str) -> None:
    """One long-running VM operation, waited for; an Azure error names what was being done."""
    azure_call(lambda: call().result(), f"VM {vm.name}", doing=doing)


# ---- reading --------------------------------------------------------------------------------------------------
def get_vm(compute: Any, vm: ids.ResourceId) -> Any:
    return azure_call(lambda: compute.virtual_machines.get(vm.resource_group, vm.name), f"VM {vm.name}")


def get_disk(compute: Any, disk_id: str) -> Any:
    disk = ids.require(disk_id, "disk", OUTPUTS_HINT)
    return azure_call(lambda: compute.disks.get(disk.resource_group, disk.name), f"disk {disk.name}")


def os_disk_id(vm_model: Any) -> str:
    os_disk = vm_model.storage_profile.os_disk
    return (os_disk.managed_disk.id if os_disk.managed_disk else "") or ""


def power_state(compute: Any, vm: ids.ResourceId) -> str:
    """running | deallocated | stopped | starting | stopping | deallocating | unknown"""
    view = azure_call(lambda: compute.virtual_machines.instance_view(vm.resource_group, vm.name),
                      f"the instance view of VM {vm.name}")
    for status in view.statuses or []:
        code = status.code or ""
        if code.startswith("PowerState/"):
            return code.split("/", 1)[1]
    return "unknown"


# ---- power ----------------------------------------------------------------------------------------------------
def power_off(compute: Any, vm: ids.ResourceId, *, skip_shutdown: bool = True, poll_s: float = DEFAULT_POLL_S) -> None:
    """Stops the VM at once (a VM on a blue screen cannot shut down gracefully)."""
    log.info("    powering off %s%s", vm.name, " (no guest shutdown)" if skip_shutdown else "")
    _lro(lambda: compute.virtual_machines.begin_power_off(vm.resource_group, vm.name, skip_shutdown=skip_shutdown,
                                                          polling_interval=poll_s), vm, f"power off VM {vm.name}")


def deallocate(compute: Any, vm: ids.ResourceId, *, poll_s: float = DEFAULT_POLL_S) -> None:
    log.info("    deallocating %s", vm.name)
    _lro(lambda: compute.virtual_machines.begin_deallocate(vm.resource_group, vm.name, polling_interval=poll_s),
         vm, f"deallocate VM {vm.name}")


def start(compute: Any, vm: ids.ResourceId, *, poll_s: float = DEFAULT_POLL_S) -> None:
    log.info("    starting %s", vm.name)
    _lro(lambda: compute.virtual_machines.begin_start(vm.resource_group, vm.name, polling_interval=poll_s),
         vm, f"start VM {vm.name}")


def stop_and_deallocate(compute: Any, vm: ids.ResourceId, *, poll_s: float = DEFAULT_POLL_S) -> str:
    """Brings the VM to `deallocated` (the state an OS disk swap needs); returns the state it was in."""
    state = power_state(compute, vm)
    if state == "deallocated":
        return state
    if state not in ("stopped", "deallocating"):
        power_off(compute, vm, skip_shutdown=True, poll_s=poll_s)
    deallocate(compute, vm, poll_s=poll_s)
    return state


# ---- can the copy take the original's place? ------------------------------------------------------------------
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


def _zone_reason(vm_model: Any, copy: Any) -> str:
    """Azure's zone rule: a *_ZRS disk joins a VM in any zone, any other only a VM in its own zone (or none)."""
    sku = _text(getattr(getattr(copy, "sku", None), "name", None))
    vm_zone, disk_zone = next(iter(vm_model.zones or []), ""), next(iter(copy.zones or []), "")
    if sku.upper().endswith("_ZRS") or vm_zone == disk_zone:
        return ""
    return (f"zone differs: the VM is in {f'zone {vm_zone}' if vm_zone else 'no zone'}, the copy ({sku or 'LRS'}) "
            f"in {f'zone {disk_zone}' if disk_zone else 'no zone'}: Azure attaches a disk only to a VM in its own "
            "zone, unless the disk is zone-redundant (Premium_ZRS, StandardSSD_ZRS)")


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
        "copy_sku": _text(getattr(getattr(copy, "sku", None), "name", None)), "copy_zones": list(copy.zones or [])}
    if not ids.same(current, expected_original_id) and not ids.same(current, copy.id):
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
    r.extend(filter(None, [_zone_reason(vm_model, copy)]))
    holder = getattr(copy, "managed_by", None)
    if holder and not ids.same(holder, vm_model.id) and not any(ids.same(holder, h) for h in allowed_holder_ids):
        r.append(f"the copy is attached to {holder}")
    return check


def preflight(compute: Any, outputs: RepairOutputs) -> SwapCheck:
    """Read-only: can the disk copy take the VM's OS disk's place? Raises SwapRefused with every reason."""
    vm = ids.require(outputs.source_vm_id, "vm", OUTPUTS_HINT)
    model = get_vm(compute, vm)
    original = get_disk(compute, outputs.source_os_disk_id)
    copy = get_disk(compute, outputs.disk_copy_id)
    check = check_swap(model, original, copy, expected_original_id=outputs.source_os_disk_id,
                       allowed_holder_ids=(outputs.rescue_vm_id,))
    if not check.ok:
        raise SwapRefused(
            f"the disk copy cannot take VM {vm.name}'s OS disk's place: " + "; ".join(check.reasons),
            "nothing was changed. The repair stack makes the copy match the source (generation, security type, "
            "controller, zone): redeploy it from a config refreshed with `pipenv run discover`")
    return check


# ---- the disk moves -------------------------------------------------------------------------------------------
def swap_os_disk(compute: Any, vm: ids.ResourceId, new_disk_id: str, *, expect_current: str,
                 poll_s: float = DEFAULT_POLL_S) -> str:
    """Makes `new_disk_id` the VM's OS disk (the VM must be deallocated). Refuses unless the current OS
    disk is `expect_current` (or already `new_disk_id`: then nothing is done). Returns the previous ID."""
    model = get_vm(compute, vm)
    current = os_disk_id(model)
    if ids.same(current, new_disk_id):
        log.info("    %s already runs on %s", vm.name, _leaf(new_disk_id))
        return current
    if not ids.same(current, expect_current):
        raise CrashcartError(
            f"VM {vm.name}'s OS disk is {current}, expected {expect_current}: not swapping",
            "someone changed the VM meanwhile; check it in the portal (Disks) before anything else", ExitCode.USAGE)
    os_disk = model.storage_profile.os_disk
    os_disk.managed_disk.id = new_disk_id
    os_disk.name = _leaf(new_disk_id)
    log.info("    %s: OS disk %s -> %s", vm.name, _leaf(current), os_disk.name)
    _lro(lambda: compute.virtual_machines.begin_create_or_update(vm.resource_group, vm.name, model,
                                                                 polling_interval=poll_s),
         vm, f"swap the OS disk of VM {vm.name}")
    return current


def data_disk_lun(vm_model: Any, disk_id: str) -> int | None:
    for disk in vm_model.storage_profile.data_disks or []:
        if disk.managed_disk is not None and ids.same(disk.managed_disk.id, disk_id):
            return int(disk.lun)
    return None


def detach_data_disk(compute: Any, vm: ids.ResourceId, disk_id: str, *, poll_s: float = DEFAULT_POLL_S) -> int | None:
    """Detaches `disk_id` from the VM (a PUT without it); returns the LUN it had, None when not attached."""
    model = get_vm(compute, vm)
    lun = data_disk_lun(model, disk_id)
    if lun is None:
        return None
    model.storage_profile.data_disks = [d for d in model.storage_profile.data_disks
                                        if not (d.managed_disk is not None and ids.same(d.managed_disk.id, disk_id))]
    log.info("    detaching %s from %s (LUN %d)", _leaf(disk_id), vm.name, lun)
    _lro(lambda: compute.virtual_machines.begin_create_or_update(vm.resource_group, vm.name, model,
                                                                 polling_interval=poll_s),
         vm, f"detach the disk copy from {vm.name}")
    return lun


def attach_data_disk(compute: Any, vm: ids.ResourceId, disk_id: str, lun: int, *,
                     poll_s: float = DEFAULT_POLL_S) -> None:
    """Attaches `disk_id` at `lun` (nothing to do when it is already there)."""
    from azure.mgmt.compute import models

    model = get_vm(compute, vm)
    at = data_disk_lun(model, disk_id)
    if at is not None:
        if at != lun:
            log.warning("    %s is attached to %s at LUN %d, not %d", _leaf(disk_id), vm.name, at, lun)
        return
    if any(int(d.lun) == lun for d in model.storage_profile.data_disks or []):
        raise CrashcartError(f"LUN {lun} of {vm.name} is taken by another disk",
                             f"detach it, then re-run `pipenv run rollback` to put the disk copy back at LUN {lun}",
                             ExitCode.AZURE_FAILED)
    model.storage_profile.data_disks = list(model.storage_profile.data_disks or []) + [models.DataDisk(
        lun=lun, create_option="Attach", caching="None", name=_leaf(disk_id),
        managed_disk=models.ManagedDiskParameters(id=disk_id))]
    log.info("    attaching %s to %s at LUN %d", _leaf(disk_id), vm.name, lun)
    _lro(lambda: compute.virtual_machines.begin_create_or_update(vm.resource_group, vm.name, model,
                                                                 polling_interval=poll_s),
         vm, f"attach the disk copy to {vm.name}")


def delete_disk(compute: Any, disk_id: str, *, poll_s: float = DEFAULT_POLL_S) -> None:
    disk = ids.require(disk_id, "disk", OUTPUTS_HINT)
    log.info("    deleting disk %s", disk.name)
    azure_call(lambda: compute.disks.begin_delete(disk.resource_group, disk.name, polling_interval=poll_s).result(),
               f"disk {disk.name}", doing=f"delete disk {disk.name}")


# ---- triggering the crash -------------------------------------------------------------------------------------
def nmi_command(vm: ids.ResourceId) -> list[str]:
    """The Azure CLI command that sends an NMI through the serial console (extension serial-console)."""
    return ["az", "serial-console", "send", "nmi", "--subscription", vm.subscription,
            "--resource-group", vm.resource_group, "--name", vm.name]


def send_nmi(vm: ids.ResourceId, timeout_s: float = 120.0) -> tuple[bool, str]:
    """Runs `az serial-console send nmi` (argv, no shell). (sent, what happened)."""
    command = nmi_command(vm)
    if shutil.which(command[0]) is None:
        return False, "the Azure CLI (az) is not installed here"
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"az serial-console send nmi did not complete: {err}"
    said = (proc.stderr or "") + "\n" + (proc.stdout or "")
    # The extension exits 0 after printing "Failed to send NMI" when the console refused it.
    if proc.returncode != 0 or "failed to send nmi" in said.lower():
        tail = said.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
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


def serial_log(compute: Any, vm: ids.ResourceId) -> str:
    """The VM's serial log, "" when it cannot be read (yet): a missing read only delays what it would show."""
    try:
        return bootdiag.read_serial_log(compute, vm.resource_group, vm.name)
    except Exception as err:  # noqa: BLE001 - read again at the next poll; before a swap, no baseline
        log.debug("serial log of %s not readable: %s", vm.name, err)
        return ""


class _NoCrash(Exception):
    """The wait for the crash reached its timeout."""


def _serial_log_while_waiting(compute: Any, vm: ids.ResourceId) -> str:
    """The serial log for the wait: "" when it cannot be read yet, but Azure refusing the read (401/403) is
    final: the role is missing and will not appear while we wait."""
    from azure.core.exceptions import HttpResponseError

    try:
        return bootdiag.read_serial_log(compute, vm.resource_group, vm.name)
    except HttpResponseError as err:
        if err.status_code in (401, 403):
            raise translate_azure_error(err, f"the boot diagnostics of VM {vm.name}",
                                        doing=f"read the serial log (boot diagnostics) of VM {vm.name}") from None
        log.debug("serial log of %s not readable: %s", vm.name, err)
    except Exception as err:  # noqa: BLE001 - read again at the next poll
        log.debug("serial log of %s not readable: %s", vm.name, err)
    return ""


def _serial_console_refusal(compute: Any, vm: ids.ResourceId) -> CrashcartError | None:
    """Why `az serial-console send nmi` failed when the reason is a missing role: the CLI hides ARM's answer
    ("Could not establish connection to VM"), so ask ARM for the serial port's connection the way the CLI
    does (POST .../serialPorts/0/connect) and translate a refusal. None when ARM allows it (or cannot say)."""
    from azure.core.rest import HttpRequest

    request = HttpRequest("POST", f"{vm.id}/providers/Microsoft.SerialConsole/serialPorts/0/connect",
                          params={"api-version": SERIAL_CONSOLE_API})
    try:
        response = compute.send_request(request)
        if response.status_code not in (401, 403):
            return None
        error = (response.json() or {}).get("error") or {}
    except Exception as err:  # noqa: BLE001 - only a diagnosis: the NMI failure is reported anyway
        log.debug("serial console of %s: %s", vm.name, err)
        return None
    return for_status(response.status_code, str(error.get("code") or ""), f"the serial console of VM {vm.name}",
                      str(error.get("message") or ""), doing=f"send an NMI through the serial console of VM {vm.name}")


def _nmi(compute: Any, watch: CrashWatch, vm: ids.ResourceId, auto_nmi: bool, elapsed: float) -> None:
    shown = " ".join(watch.nmi_command)
    if auto_nmi:
        sent, said = send_nmi(vm)
        watch.nmi = "sent" if sent else f"failed: {said}"
        log.info("    %s", said)
        if not sent:
            refused = _serial_console_refusal(compute, vm)
            if refused is not None:
                raise refused
            log.warning("    send it yourself: %s", shown)
    else:
        watch.nmi = "printed"
        log.warning("    no crash after %.0f min: if the VM hangs, send an NMI now:\n      %s", elapsed / 60, shown)


def wait_for_crash(compute: Any, vm: ids.ResourceId, *, baseline: str, timeout_s: float, poll_s: float,
                   nmi_after_s: float | None, auto_nmi: bool, on_poll: Callable[[str], None] | None = None,
                   stop: StopRequest | None = None) -> CrashWatch:
    """Polls the VM's serial log (and power state) until Windows bugchecks. After `nmi_after_s` without
    one (a hang), sends the NMI through the serial console (`auto_nmi`) or prints the exact command.
    Never raises for a transient read failure of the serial log; ends at `timeout_s`. Raises exit 3 at once
    when Azure refuses a read or the NMI for lack of a role."""
    started = time.monotonic()
    watch = CrashWatch(crashed=False, reason="timeout", seconds=0.0, nmi_command=nmi_command(vm))

    def probe() -> CrashWatch | None:
        watch.polls += 1
        elapsed = time.monotonic() - started
        state = power_state(compute, vm)
        found = bootdiag.serial_bugcheck(new_text(baseline, _serial_log_while_waiting(compute, vm)))
        if on_poll:
            on_poll(f"{state}, {elapsed:.0f}s" + (f", stop {found.get('code')}" if found else ""))
        if found:
            watch.crashed, watch.reason, watch.bugcheck = True, "bugcheck", found
            return watch
        if state in ("stopped", "deallocated"):
            watch.reason = "stopped"
            return watch
        if nmi_after_s is not None and not watch.nmi and elapsed >= nmi_after_s:
            _nmi(compute, watch, vm, auto_nmi, elapsed)
        return None

    try:
        poll(probe, timeout_s=timeout_s, interval_s=poll_s, jitter=0.0, stop=stop, on_timeout=_NoCrash)
    except _NoCrash:
        pass  # the watch says "timeout"
    watch.seconds = time.monotonic() - started
    return watch


def wait_for_dump(seconds: float, *, poll_s: float = DEFAULT_POLL_S, stop: StopRequest | None = None) -> None:
    """Gives Windows `seconds` after the bugcheck to write the dump: nothing reports when it is done (with
    AutoReboot 0 the VM just stays on the stop screen), so this is a plain wait that still hears a stop."""
    until = time.monotonic() + max(0.0, seconds)
    step = max(0.01, min(poll_s, seconds))
    poll(lambda: True if time.monotonic() >= until else None, timeout_s=max(0.0, seconds) + step,
         interval_s=step, jitter=0.0, stop=stop)
