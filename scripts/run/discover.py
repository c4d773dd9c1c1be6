"""`discover`: read the broken VM and its OS disk from Azure once, and write the config synth needs.

After this, synth never calls Azure. Only GETs are made: the VM, its OS disk and the region's VM
sizes (for the RAM, which is how large a complete dump can be). A config file that already exists
keeps its other sections; only [source] is refreshed.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from scripts.azure import ids
from scripts.azure.errors import azure_call
from scripts.base.console import log
from scripts.base.errors import ConfigError, CrashcartError, ExitCode, printable
from scripts.config.model import Config, render_toml

# What reading the VM needs; said when the identity lacks it.
READ_HINTS = {"auth": "the signed-in identity needs at least the Reader role on the VM's resource group "
                      "(and Disk Snapshot Contributor to snapshot it); ask the subscription owner"}


def discover(vm_id: str, path: Path, rescue_os: str | None = None) -> Config:
    """Discovers `vm_id` and writes its config to `path`, keeping the file's other sections."""
    base = read_existing(path)
    if rescue_os:
        base.setdefault("rescue", {})["os"] = rescue_os
    config = discover_config(vm_id, base)
    write_config(config, path)
    return config


def read_existing(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise CrashcartError(f"{path} exists but is not valid TOML: {err}",
                             "fix or remove it, then re-run discover", ExitCode.USAGE) from None


def discover_config(vm_id: str, base: dict[str, Any] | None = None) -> Config:
    """The config for `vm_id`: [source] read from Azure, the other sections from `base` (or defaults)."""
    vm_ref = ids.try_parse(vm_id.strip().rstrip("/"), "vm")  # a trailing '/' as settings.checked_vm_id
    if vm_ref is None:  # a command-line option, not a config field: no "config:" prefix
        raise CrashcartError(f'--vm "{printable(vm_id)[:300]}" is not a VM resource ID: expected {ids.FORMS["vm"]}',
                             "copy it from `az vm show -g <rg> -n <name> --query id -o tsv`", ExitCode.USAGE)
    from scripts.azure.clients import AzureClients

    compute = AzureClients(vm_ref.subscription).compute
    vm = azure_call(lambda: compute.virtual_machines.get(vm_ref.resource_group, vm_ref.name), f"VM {vm_id}",
                    hints=READ_HINTS)
    source = source_section(vm_ref.subscription, vm_ref.resource_group, vm)
    disk_ref = _managed_disk(source["os_disk_id"])
    disk = azure_call(lambda: compute.disks.get(disk_ref.resource_group, disk_ref.name),
                      f"OS disk {source['os_disk_id']}", hints=READ_HINTS)
    source.update(disk_section(disk))
    source["memory_gb"] = _memory_gb(compute, vm.location, source["vm_size"])
    data = dict(base or {})
    data["source"] = source
    return Config.from_dict(data)


def write_config(config: Config, path: Path) -> None:
    header = (f"crashcart config for {config.source.vm_name}, written by `pipenv run discover`.\n"
              "Edit freely; re-running discover refreshes [source] only. See README.md for every key.")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_toml(config, header), encoding="utf-8")
    tmp.replace(path)


def source_section(subscription_id: str, resource_group: str, vm: Any) -> dict[str, Any]:
    os_disk = vm.storage_profile.os_disk
    managed_id = os_disk.managed_disk.id if os_disk.managed_disk else ""
    vhd_uri = os_disk.vhd.uri if os_disk.vhd else ""
    return {
        **_base_source(subscription_id, resource_group, vm),
        # A VHD URI here is refused by validation with the unmanaged-disk message.
        "os_disk_id": managed_id or vhd_uri or "",
        "os_disk_size_gb": int(os_disk.disk_size_gb or 0) or 1,
    }


def _base_source(subscription_id: str, resource_group: str, vm: Any) -> dict[str, Any]:
    security = getattr(vm, "security_profile", None)
    security_type = _text(getattr(security, "security_type", None)) or "Standard"
    controller = _text(getattr(vm.storage_profile, "disk_controller_type", None)) or "SCSI"
    return {
        "subscription_id": subscription_id,
        "resource_group": resource_group,
        "vm_name": vm.name,
        "location": vm.location,
        "zone": (vm.zones or [""])[0],
        "os_type": _text(vm.storage_profile.os_disk.os_type) or "Windows",
        "security_type": security_type,
        "disk_controller": controller,
        "vm_size": _text(vm.hardware_profile.vm_size),
    }


def disk_section(disk: Any) -> dict[str, Any]:
    security = _text(getattr(getattr(disk, "security_profile", None), "security_type", None))
    values: dict[str, Any] = {
        "os_disk_size_gb": int(disk.disk_size_gb),
        "os_disk_sku": _text(disk.sku.name) if disk.sku else "Premium_LRS",
        "hyper_v_generation": _text(disk.hyper_v_generation) or "V1",
    }
    if security.startswith("ConfidentialVM"):
        values["security_type"] = "ConfidentialVM"
    encryption = getattr(disk, "encryption", None)
    if _text(getattr(encryption, "type", None)) in ("EncryptionAtRestWithCustomerKey",
                                                    "EncryptionAtRestWithPlatformAndCustomerKeys"):
        # a customer-managed key: the disk copy is encrypted with the same disk encryption set
        values["os_disk_encryption_set_id"] = _text(getattr(encryption, "disk_encryption_set_id", None))
    return values


def _text(value: Any) -> str:
    """SDK enums (OperatingSystemTypes.WINDOWS) as the wire value ARM sent ("Windows")."""
    return "" if value is None else str(getattr(value, "value", value))


def _memory_gb(compute: Any, location: str, size: str) -> float:
    """The size's RAM. A region that does not list the size (retired sizes) is not fatal: 0 means unknown."""
    if not size:
        return 0.0
    try:
        for item in compute.virtual_machine_sizes.list(location):
            if item.name.lower() == size.lower():
                return round(item.memory_in_mb / 1024, 2)
    except Exception as err:  # noqa: BLE001 - informative only; discovery stands without it
        log.warning("could not list VM sizes in %s (%s): dump size estimates will be missing", location, err)
    return 0.0


def _managed_disk(disk_id: str) -> ids.ResourceId:
    found = ids.try_parse(disk_id, "disk")
    if found is None:
        raise ConfigError("source.os_disk_id", disk_id, "a managed disk resource ID",
                          "the VM uses an unmanaged (VHD blob) disk, which crashcart does not support: convert it "
                          "with `az vm convert` (after a backup) or copy the VHD by hand")
    return found
