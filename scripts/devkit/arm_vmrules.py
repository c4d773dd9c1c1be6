"""What ARM refuses in a PUT of an existing VM (VirtualMachines_CreateOrUpdate), for the changes crashcart
makes: an OS disk swap, data disks attached and detached, and whatever the VM's size cannot host.

- the OS disk may change only while the VM is deallocated (409 OperationNotAllowed), to an existing disk
  (404) not attached elsewhere (409), of the same Hyper-V generation (409) and security type (400);
- a data disk attaches only when it is not attached to another VM (409); two data disks never share a LUN;
- a disk joining the VM (OS or data) obeys the zone rule (scripts.devkit.arm_skus.attach_refusal: a ZRS
  disk anywhere in the region, a zonal disk only in its zone, a regional one never on a zonal VM);
- the resulting model must fit its size (arm_skus.vm_refusal: region and zone offered, Hyper-V generation
  of the OS disk, declared disk controller, Trusted Launch), as Azure validates the whole model on a PUT.
Messages are Azure's where it is known (see arm_skus); the others say what was refused in Azure's style.
"""

from __future__ import annotations

from typing import Any

from scripts.azure import ids
from scripts.devkit import arm_skus
from scripts.devkit.armdouble import ArmDouble, Response, error_response


def _leaf(resource_id: str | None) -> str:
    return (resource_id or "").rstrip("/").rsplit("/", 1)[-1]


def _managed_id(disk: dict[str, Any] | None) -> str:
    return ((disk or {}).get("managedDisk") or {}).get("id") or ""


def data_disk_ids(storage: dict[str, Any], *, skip_detaching: bool = False) -> set[str]:
    """The lower-cased managed disk IDs of a storage profile's data disks."""
    return {_managed_id(dd).lower() for dd in storage.get("dataDisks") or []
            if not (skip_detaching and dd.get("toBeDetached"))} - {""}


def update_refusal(d: ArmDouble, vm_id: str, body: dict[str, Any], stored: dict[str, Any],
                   power: str) -> Response | None:
    """ARM's refusal of `body` replacing the stored VM `stored` (None: accepted)."""
    name = _leaf(vm_id)
    props = body.get("properties") or {}
    storage = props.get("storageProfile") or {}
    old_storage = stored["properties"]["storageProfile"]
    old_os, new_os = _managed_id(old_storage.get("osDisk")), _managed_id(storage.get("osDisk"))
    joining: list[str] = []
    if new_os and not ids.same(new_os, old_os):
        if power != "deallocated":
            return error_response(409, "OperationNotAllowed",
                                  f"Changing the OS disk of VM '{name}' is only allowed when the VM is "
                                  f"deallocated; it is {power}.")
        disk = d.get(new_os)
        if disk is None:
            return error_response(404, "NotFound", f"Disk {_leaf(new_os)} is not found.")
        holder = disk.get("managedBy")
        if holder and not ids.same(holder, vm_id):
            return error_response(409, "OperationNotAllowed", f"Disk {_leaf(new_os)} is already attached to VM {holder}.")
        gen_old = (d.get(old_os) or {}).get("properties", {}).get("hyperVGeneration", "V1")
        gen_new = disk.get("properties", {}).get("hyperVGeneration", "V1")
        if gen_old != gen_new:
            return error_response(409, "OperationNotAllowed",
                                  f"The OS disk's Hyper-V generation {gen_new} does not match the VM's {gen_old}.")
        vm_sec = (stored["properties"].get("securityProfile") or {}).get("securityType", "Standard")
        disk_sec = (disk.get("properties", {}).get("securityProfile") or {}).get("securityType", "Standard")
        if vm_sec != disk_sec:
            return error_response(400, "BadRequest", f"The security type of disk {_leaf(new_os)} ({disk_sec}) does "
                                                     f"not match the VM's ({vm_sec}).")
        joining.append(new_os)
    for disk_id in sorted(data_disk_ids(storage, skip_detaching=True) - data_disk_ids(old_storage)):
        disk = d.get(disk_id)
        if disk is None:
            return error_response(404, "NotFound", f"Disk {_leaf(disk_id)} is not found.")
        if disk.get("managedBy") and not ids.same(disk["managedBy"], vm_id):
            return error_response(409, "OperationNotAllowed",
                                  f"Disk {_leaf(disk_id)} is already attached to VM {disk['managedBy']}.")
        joining.append(str(disk.get("id") or disk_id))
    luns = [dd.get("lun") for dd in storage.get("dataDisks") or [] if not dd.get("toBeDetached")]
    if len(luns) != len(set(luns)):
        return error_response(409, "OperationNotAllowed", "Two data disks use the same LUN.")
    hardware = props.get("hardwareProfile") or stored["properties"].get("hardwareProfile") or {}
    model = {**body, "zones": body.get("zones", stored.get("zones")), "properties": {**props, "hardwareProfile": hardware}}
    for disk_id in joining:
        refused = arm_skus.attach_refusal(model, disk_id, d.get(disk_id) or {})
        if refused is not None:
            return refused
    os_disk = d.get(new_os or old_os) or {}
    return arm_skus.vm_refusal(vm_id, model, generation=os_disk.get("properties", {}).get("hyperVGeneration"))
