"""Every check of a config, section by section: the first failure is raised as a ConfigError naming the
field, the value and the form expected (and, where it helps, what to do instead).

Synth never calls Azure, so these are offline rules: Azure's naming rules, the regions in
scripts.config.regions, and the shape of resource IDs as scripts.azure.ids reads them.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from scripts.azure import ids
from scripts.base.errors import ConfigError
from scripts.config.regions import known_regions, normalize
from scripts.config.sections import (GUID, KIT_TAG, OS_DISK_SKUS, RG_NAME, SECURITY_TYPES, STORAGE_ACCOUNT_NAME,
                                     Backend, Evidence, Network, RescueVm, Repair, SourceVm)


def validate(*, source: SourceVm, rescue: RescueVm, network: Network, evidence: Evidence, repair: Repair,
             backend: Backend, tags: Mapping[str, str]) -> None:
    """Every check, section by section; the first failure is raised as a ConfigError."""
    _validate_source(source)
    _validate_rescue(rescue)
    _validate_network(network)
    _validate_evidence(evidence, network)
    _validate_repair(repair)
    _validate_backend(backend)
    _validate_tags(tags)


# ---- the rules the sections share ---------------------------------------------------------------------------
def _check(ok: bool, field_name: str, value: Any, expected: str, hint: str = "") -> None:
    if not ok:
        raise ConfigError(field_name, value, expected, hint)


def _one_of(field_name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, field_name, value, "one of " + ", ".join(choices))


def _rg_name(field_name: str, value: str) -> None:
    _check(bool(re.fullmatch(RG_NAME, value)), field_name, value,
           "a resource group name: 1-90 letters, digits, '_', '-', '.', '(' or ')', not ending with '.'")


_VM_NAME_ILLEGAL = re.compile(r"[\s~!@#$%^&*()=+\[\]{}\\|;:'\",<>/?]")


def _vm_name(field_name: str, value: str) -> None:
    _check(0 < len(value) <= 64 and not _VM_NAME_ILLEGAL.search(value) and not value.startswith("_")
           and not value.endswith((".", "-")),
           field_name, value, "a VM name: 1-64 characters, no spaces or ~!@#$%^&*()=+[]{}\\|;:'\",<>/?, "
                              "not starting with '_' nor ending with '.' or '-'")


def _region(field_name: str, value: str) -> int:
    regions = known_regions()
    region = normalize(value)
    if region not in regions:
        close = difflib.get_close_matches(region, regions, n=3)
        raise ConfigError(field_name, value,
                          "an Azure region name such as westeurope or eastus2"
                          + (f" (did you mean {', '.join(close)}?)" if close else ""),
                          "list them with `az account list-locations -o table`; a region newer than this "
                          "release can be added with CRASHCART_EXTRA_REGIONS=name:zones")
    return regions[region]


def _storage_account_name(field_name: str, value: str) -> None:
    _check(bool(re.fullmatch(STORAGE_ACCOUNT_NAME, value)), field_name, value,
           "a storage account name: 3-24 lowercase letters and digits")


def _resource_id(field_name: str, value: str, kind: str, what: str) -> None:
    """`value` is an ID of `kind` (azure.ids) whose resource group (and storage account) names are valid."""
    found = ids.try_parse(value, kind)
    ok = found is not None and re.fullmatch(RG_NAME, found.resource_group) is not None
    if ok and kind == "storage_account":  # ARM matches IDs case-insensitively, so an ID may spell it in capitals
        ok = re.fullmatch(STORAGE_ACCOUNT_NAME, found.name, re.IGNORECASE) is not None  # type: ignore[union-attr]
    _check(ok, field_name, value, f"{what}: {ids.FORMS[kind]}")


# ---- the sections -----------------------------------------------------------------------------------------
def _validate_source(s: SourceVm) -> None:
    _check(bool(re.fullmatch(GUID, s.subscription_id)), "source.subscription_id", s.subscription_id,
           "a subscription ID (a GUID like 00000000-0000-0000-0000-000000000000)")
    _rg_name("source.resource_group", s.resource_group)
    _vm_name("source.vm_name", s.vm_name)
    zones = _region("source.location", s.location)
    _check(s.zone in ("", "1", "2", "3"), "source.zone", s.zone, '"" (no zone) or "1", "2" or "3"')
    if s.zone:
        _check(int(s.zone) <= zones, "source.zone", s.zone,
               f"no zone: region {s.location} has no availability zones" if zones == 0
               else f"a zone region {s.location} has (1-{zones})")
    _check(s.os_type.lower() == "windows", "source.os_type", s.os_type, "Windows",
           "crashcart collects Windows memory dumps; for a Linux VM use `az vm repair` and kdump instead")
    if re.match(r"(?i)https?://", s.os_disk_id):
        raise ConfigError("source.os_disk_id", s.os_disk_id, "a managed disk resource ID",
                          "the VM uses an unmanaged (VHD blob) disk, which crashcart does not support: convert it "
                          "with `az vm convert` (after a backup) or copy the VHD by hand")
    _resource_id("source.os_disk_id", s.os_disk_id, "disk", "a managed disk resource ID")
    _check(1 <= s.os_disk_size_gb <= 4095, "source.os_disk_size_gb", s.os_disk_size_gb,
           "the OS disk size in GiB, 1-4095")
    _one_of("source.os_disk_sku", s.os_disk_sku, OS_DISK_SKUS)
    _one_of("source.hyper_v_generation", s.hyper_v_generation, ("V1", "V2"))
    _one_of("source.security_type", s.security_type, SECURITY_TYPES)
    if s.security_type == "ConfidentialVM":
        raise ConfigError(
            "source.security_type", s.security_type, "Standard or TrustedLaunch",
            "a Confidential VM's OS disk is encrypted to its own vTPM and cannot be attached to a rescue VM as "
            "a data disk; collect the dump from inside the VM (serial console) or open a support case")
    if s.security_type == "TrustedLaunch":
        _check(s.hyper_v_generation == "V2", "source.hyper_v_generation", s.hyper_v_generation,
               "V2 (Trusted Launch VMs are always Generation 2)")
    _one_of("source.disk_controller", s.disk_controller, ("SCSI", "NVMe"))
    if s.disk_controller == "NVMe":
        _check(s.hyper_v_generation == "V2", "source.hyper_v_generation", s.hyper_v_generation,
               "V2 (NVMe disk controllers need Generation 2)")
    _check(s.memory_gb >= 0, "source.memory_gb", s.memory_gb, "a size in GiB, 0 when unknown")


_RESERVED_USERS = {
    "administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1", "1", "123", "a",
    "actuser", "adm", "admin2", "aspnet", "backup", "console", "david", "guest", "john", "owner", "root",
    "server", "sql", "support", "support_388945a0", "sys", "test2", "test3", "user4", "user5",
}


def _validate_rescue(r: RescueVm) -> None:
    _one_of("rescue.os", r.os, ("windows", "linux"))
    _check(bool(re.fullmatch(r"(Standard|Basic)_[A-Za-z0-9_-]+", r.size)), "rescue.size", r.size,
           "a VM size such as Standard_D4s_v5 (az vm list-sizes -l <region>)")
    _check(bool(re.fullmatch(r"[a-z_][a-z0-9_.-]{0,19}", r.admin_username, re.IGNORECASE))
           and r.admin_username.lower() not in _RESERVED_USERS,
           "rescue.admin_username", r.admin_username,
           "1-20 letters, digits, '_', '.', '-', not a reserved name such as admin or administrator")
    _vm_name("rescue.name", r.name)


def _validate_network(n: Network) -> None:
    if n.subnet_id:
        _resource_id("network.subnet_id", n.subnet_id, "subnet", "a subnet resource ID")
    try:
        net = ipaddress.ip_network(n.address_space)
        _check(net.version == 4 and 16 <= net.prefixlen <= 28, "network.address_space", n.address_space,
               "an IPv4 CIDR between /16 and /28, e.g. 10.250.0.0/24")
    except ValueError:
        raise ConfigError("network.address_space", n.address_space,
                          "an IPv4 CIDR between /16 and /28, e.g. 10.250.0.0/24") from None


def _validate_evidence(e: Evidence, network: Network) -> None:
    if e.account_id:
        _resource_id("evidence.account_id", e.account_id, "storage_account", "a storage account resource ID")
    if e.account_name:
        _storage_account_name("evidence.account_name", e.account_name)
    _rg_name("evidence.resource_group", e.resource_group)
    if e.location:
        _region("evidence.location", e.location)
    _check(bool(re.fullmatch(r"[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]", e.container)), "evidence.container",
           e.container, "a container name: 3-63 lowercase letters, digits and single hyphens, "
                        "starting and ending with a letter or digit")
    _one_of("evidence.replication", e.replication, ("LRS", "ZRS", "GRS", "RAGRS", "GZRS", "RAGZRS"))
    _check(1 <= e.soft_delete_days <= 365, "evidence.soft_delete_days", e.soft_delete_days, "1-365 days")
    _check(0 <= e.immutability_days <= 146000, "evidence.immutability_days", e.immutability_days,
           "0 (off) or 1-146000 days")
    for i, subnet in enumerate(e.allowed_subnet_ids):
        _resource_id(f"evidence.allowed_subnet_ids[{i}]", subnet, "subnet", "a subnet resource ID")
    for i, cidr in enumerate(e.allowed_ip_ranges):
        _check(bool(re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}(/\d{1,2})?", cidr)), f"evidence.allowed_ip_ranges[{i}]",
               cidr, "a public IPv4 address or CIDR such as 203.0.113.0/24")
    if e.firewall and network.create and not e.allowed_subnet_ids:
        raise ConfigError(
            "evidence.firewall", True, "false, unless the rescue VM's subnet is allowed through the firewall",
            "a default-deny firewall must let the rescue subnet in: set network.subnet_id to a long-lived subnet "
            "(it is then allowed automatically) or list it in evidence.allowed_subnet_ids")


def _validate_repair(p: Repair) -> None:
    if p.resource_group:
        _rg_name("repair.resource_group", p.resource_group)
    _check(1 <= p.ttl_hours <= 168, "repair.ttl_hours", p.ttl_hours, "1-168 hours")
    _one_of("repair.strategy", p.strategy, ("rescue-vm", "snapshot-export"))
    _check(5 <= p.collect_timeout_minutes <= 1440, "repair.collect_timeout_minutes", p.collect_timeout_minutes,
           "5-1440 minutes")


def _validate_backend(b: Backend) -> None:
    _one_of("backend.kind", b.kind, ("local", "azurerm"))
    if b.kind == "azurerm":
        _rg_name("backend.resource_group", b.resource_group)
        _storage_account_name("backend.storage_account", b.storage_account)


def _validate_tags(tags: Mapping[str, str]) -> None:
    reserved = {KIT_TAG, "crashcart-source-vm", "crashcart-expires-at"}
    _check(len(tags) <= 45, "tags", f"{len(tags)} tags", "at most 45 tags (Azure allows 50; crashcart adds 3)")
    for key, value in tags.items():
        _check(key.lower() not in reserved, f"tags.{key}", value, "a tag name crashcart does not set itself")
        _check(0 < len(key) <= 512 and not re.search(r"[<>%&\\?/]", key), f"tags.{key}", key,
               "a tag name of 1-512 characters without < > % & \\ ? /")
        _check(len(value) <= 256, f"tags.{key}", value, "a tag value of at most 256 characters")
