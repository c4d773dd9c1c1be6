"""`discover`: read the broken VM and its OS disk from Azure once, and write the config synth needs.

After this, synth never calls Azure. Only GETs are made: the VM, its OS disk and the region's VM
sizes (for the RAM, which is how large a complete dump can be). A config file that already exists
keeps its other sections; only [source] is refreshed.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any

from scripts.base.console import emit_json, log
from scripts.config.model import DEFAULT_PATH, VM_ID, Config, render_toml
from scripts.base.errors import ConfigError, CrashcartError, ExitCode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vm", required=True, metavar="RESOURCE_ID",
                        help="the broken VM: /subscriptions/<sub>/resourceGroups/<rg>/providers/"
                             "Microsoft.Compute/virtualMachines/<name>")
    parser.add_argument("--config", default=None,
                        help=f"config file to write (default: CRASHCART_CONFIG or {DEFAULT_PATH})")
    parser.add_argument("--rescue-os", choices=("windows", "linux"), default=None,
                        help="rescue VM operating system (default: keep the file's, else windows)")


def run(args: argparse.Namespace) -> int:
    path = Path(args.config or os.environ.get("CRASHCART_CONFIG") or DEFAULT_PATH)
    base = read_existing(path)
    if args.rescue_os:
        base.setdefault("rescue", {})["os"] = args.rescue_os
    config = discover_config(args.vm, base)
    write_config(config, path)
    source = config.source
    log.info("wrote %s for %s (%s, zone %s, %s %s GiB, %s, %s, %s)", path, source.vm_name, source.location,
             source.zone or "none", source.os_disk_sku, source.os_disk_size_gb, source.hyper_v_generation,
             source.security_type, source.disk_controller)
    log.info("next: review %s, then `npx cdktf deploy evidence repair` or `pipenv run repair-run`", path)
    emit_json({"config": str(path), "source": dict(vars(source)), "rescue_os": config.rescue.os})
    return ExitCode.OK


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
    match = VM_ID.fullmatch(vm_id.strip())
    if match is None:
        raise ConfigError("--vm", vm_id, "a VM resource ID: /subscriptions/<guid>/resourceGroups/<rg>/providers/"
                                         "Microsoft.Compute/virtualMachines/<name>",
                          "copy it from `az vm show -g <rg> -n <name> --query id -o tsv`")
    from scripts.azure.clients import AzureClients

    compute = AzureClients(match.group("sub")).compute
    vm = _get(lambda: compute.virtual_machines.get(match.group("rg"), match.group("name")), f"VM {vm_id}")
    source = source_section(match.group("sub"), match.group("rg"), vm)
    disk_match = _disk_parts(source["os_disk_id"])
    disk = _get(lambda: compute.disks.get(disk_match[0], disk_match[1]), f"OS disk {source['os_disk_id']}")
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


def _disk_parts(disk_id: str) -> tuple[str, str]:
    parts = disk_id.strip("/").split("/")
    if len(parts) < 8 or parts[-2].lower() != "disks":
        raise ConfigError("source.os_disk_id", disk_id, "a managed disk resource ID",
                          "the VM uses an unmanaged (VHD blob) disk, which crashcart does not support: convert it "
                          "with `az vm convert` (after a backup) or copy the VHD by hand")
    return parts[3], parts[-1]


def _get(call: Any, what: str) -> Any:
    from azure.core.exceptions import AzureError

    from scripts.azure.errors import translate_azure_error

    try:
        return call()
    except AzureError as err:
        raise translate_azure_error(err, what) from None
