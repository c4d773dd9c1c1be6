"""The sections of the config file, one frozen pydantic model each, and the names and defaults they share.

Every field carries its rule (scripts.config.validate): a value is checked as it is read, and checks
that span fields of one section (a zone the region has, Trusted Launch on Generation 2) are the
section's `after` validators. Reading the file and the environment is scripts.config.load; the whole
repair's Config, with the values derived from it, is scripts.config.model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainSerializer, ValidationInfo, model_validator

from scripts.azure import ids
from scripts.config.regions import known_regions, normalize
from scripts.config.validate import (AddressSpace, AdminUsername, ContainerName, Guid, Invalid, IpRanges,
                                     KeyPrefix, Number, OneOf, OptionalRegion, OptionalRgName,
                                     OptionalStorageAccountName, OptionalVmSize, Region, ResourceId, ResourceIds,
                                     RgName, Switch, VmName, VmSize, Whole, Zone, check, env_of, one_of, resource_id,
                                     rule, text)

DEFAULT_PATH = "repair.toml"
EXAMPLE_PATH = "repair.example.toml"
KIT_TAG = "crashcart"

OS_DISK_SKUS = ("Standard_LRS", "StandardSSD_LRS", "Premium_LRS", "StandardSSD_ZRS", "Premium_ZRS")
SECURITY_TYPES = ("Standard", "TrustedLaunch", "ConfidentialVM")


@dataclass(frozen=True)
class ImageRef:
    """A marketplace image, written in config as the az CLI's URN `publisher:offer:sku:version`."""

    publisher: str
    offer: str
    sku: str
    version: str = "latest"

    def __str__(self) -> str:
        return f"{self.publisher}:{self.offer}:{self.sku}:{self.version}"


# The marketplace's alphabet: a URN part is letters, digits, '.', '_', '-'; a version is latest or a.b.c.
_URN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,99}):([A-Za-z0-9][A-Za-z0-9._-]{0,99}):"
                  r"([A-Za-z0-9][A-Za-z0-9._-]{0,99}):(latest|[0-9]{1,10}\.[0-9]{1,10}\.[0-9]{1,10})", re.ASCII)


def image_urn(value: Any) -> ImageRef | None:
    if value is None or isinstance(value, ImageRef):
        return value
    value = text(value)
    if not value:
        return None
    found = _URN.fullmatch(value)
    check(found is not None, "an image URN publisher:offer:sku:version of letters, digits, '.', '_' and '-' (version: "
                             "latest or a.b.c), e.g. MicrosoftWindowsServer:WindowsServer:2022-datacenter-g2:latest")
    return ImageRef(*found.groups())  # type: ignore[union-attr]


# Rescue images per (os, Hyper-V generation). Gen2 images are the ones that support Trusted Launch and NVMe.
DEFAULT_IMAGES: dict[tuple[str, str], ImageRef] = {
    ("windows", "V1"): ImageRef("MicrosoftWindowsServer", "WindowsServer", "2022-datacenter"),
    ("windows", "V2"): ImageRef("MicrosoftWindowsServer", "WindowsServer", "2022-datacenter-g2"),
    ("linux", "V1"): ImageRef("Canonical", "ubuntu-24_04-lts", "server-gen1"),
    ("linux", "V2"): ImageRef("Canonical", "ubuntu-24_04-lts", "server"),
}

UNMANAGED_HINT = ("the VM uses an unmanaged (VHD blob) disk, which crashcart does not support: convert it with "
                  "`az vm convert` (after a backup) or copy the VHD by hand")
_disk_id = resource_id("disk", "a managed disk resource ID")
_windows = one_of("Windows", fold=True)


def managed_disk_id(value: Any) -> str:
    if isinstance(value, str) and re.match(r"(?i)https?://", value.strip(" ")):
        raise Invalid("a managed disk resource ID", UNMANAGED_HINT)
    return _disk_id(value)


_des_id = resource_id("disk_encryption_set", "a disk encryption set resource ID")


def optional_des_id(value: Any) -> str:
    return "" if not text(value) else _des_id(value)


def windows_only(value: Any) -> str:
    try:
        return _windows(value)
    except Invalid as err:
        raise Invalid(err.expected, "crashcart collects Windows memory dumps; for a Linux VM use `az vm repair` and "
                                    "kdump instead") from None


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=False)


class SourceVm(Section):
    """The broken VM and its OS disk: only ever read."""

    subscription_id: Guid
    resource_group: RgName
    vm_name: VmName
    location: Region
    os_disk_id: Annotated[str, rule(managed_disk_id)]
    os_disk_size_gb: Whole(1, 4095, "GiB", "the OS disk size in GiB, 1-4095")
    zone: Zone = ""
    os_type: Annotated[str, rule(windows_only)] = "Windows"
    os_disk_sku: OneOf(*OS_DISK_SKUS) = "Premium_LRS"
    hyper_v_generation: OneOf("V1", "V2") = "V2"
    security_type: OneOf(*SECURITY_TYPES) = "Standard"
    disk_controller: OneOf("SCSI", "NVMe") = "SCSI"
    vm_size: OptionalVmSize = ""
    # the VM size's RAM: a complete dump is this large
    memory_gb: Number(0, 65536, "the VM size's RAM in GiB, 0-65536 (0 when unknown)") = 0.0
    # the OS disk's disk encryption set when it is encrypted with a customer-managed key: the copy uses it too
    os_disk_encryption_set_id: Annotated[str, rule(optional_des_id)] = ""

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "SourceVm":
        if self.zone:
            zones = known_regions(env_of(info)).get(normalize(self.location), 0)
            check(int(self.zone) <= zones,
                  f"no zone: region {self.location} has no availability zones" if zones == 0
                  else f"a zone region {self.location} has (1-{zones})", at=".zone", value=self.zone)
        if self.security_type == "ConfidentialVM":
            raise Invalid("Standard or TrustedLaunch",
                          "a Confidential VM's OS disk is encrypted to its own vTPM and cannot be attached to a rescue "
                          "VM as a data disk; collect the dump from inside the VM (serial console) or open a support "
                          "case", at=".security_type", value=self.security_type)
        if self.security_type == "TrustedLaunch":
            check(self.hyper_v_generation == "V2", "V2 (Trusted Launch VMs are always Generation 2)",
                  at=".hyper_v_generation", value=self.hyper_v_generation)
        if self.disk_controller == "NVMe":
            check(self.hyper_v_generation == "V2", "V2 (NVMe disk controllers need Generation 2)",
                  at=".hyper_v_generation", value=self.hyper_v_generation)
        return self

    @property
    def vm_id(self) -> str:
        return ids.build("vm", self.subscription_id, self.resource_group, self.vm_name)

    @property
    def os_disk_name(self) -> str:
        return self.os_disk_id.rstrip("/").rsplit("/", 1)[-1]


class RescueVm(Section):
    os: OneOf("windows", "linux") = "windows"
    size: VmSize = "Standard_D4s_v5"
    # a URN in the file; None: DEFAULT_IMAGES for the os and the source's generation
    image: Annotated[ImageRef | None, rule(image_urn), PlainSerializer(lambda v: str(v) if v else "")] = None
    admin_username: AdminUsername = "crashcart"
    name: VmName = "crashcart-rescue"


class Network(Section):
    subnet_id: ResourceId("subnet", "a subnet resource ID", optional=True) = ""  # "": the stack makes its own
    address_space: AddressSpace = "10.250.0.0/24"

    @property
    def create(self) -> bool:
        return not self.subnet_id


class Evidence(Section):
    """The long-lived storage the dumps land in (the `evidence` stack)."""

    # an existing account's resource ID; empty: the evidence stack creates one
    account_id: ResourceId("storage_account", "a storage account resource ID", optional=True) = ""
    account_name: OptionalStorageAccountName = ""  # for a created account; derived from the subscription when empty
    resource_group: RgName = "crashcart-evidence"
    location: OptionalRegion = ""  # defaults to the source VM's region
    container: ContainerName = "dumps"
    replication: OneOf("LRS", "ZRS", "GRS", "RAGRS", "GZRS", "RAGZRS") = "ZRS"
    soft_delete_days: Whole(1, 365, "days") = 30
    # >0: time-based retention on the container (unlocked policy)
    immutability_days: Whole(0, 146000, "days", "0 (off) or 1-146000 days") = 0
    firewall: Switch = False  # default-deny firewall: only allowed_subnet_ids and allowed_ip_ranges reach it
    allowed_subnet_ids: ResourceIds("subnet", "a subnet resource ID") = ()
    allowed_ip_ranges: IpRanges = ()

    @property
    def create_account(self) -> bool:
        return not self.account_id


class Repair(Section):
    resource_group: OptionalRgName = ""  # default: crashcart-repair-<vm key> (scripts.azure.identity.vm_key)
    ttl_hours: Whole(1, 168, "hours") = 8
    # "auto": repair-run's preflight picks snapshot-export when the disk allows it, else rescue-vm; elsewhere
    # (collect on a deployed stack, synth by hand) it means rescue-vm (scripts.collection.strategies.resolve)
    strategy: OneOf("auto", "rescue-vm", "snapshot-export") = "auto"
    collect_timeout_minutes: Whole(5, 1440, "minutes") = 120


class Backend(Section):
    """Where Terraform keeps the stacks' state: local files by default, or an azurerm blob for pipelines."""

    kind: OneOf("local", "azurerm") = "local"
    resource_group: OptionalRgName = ""
    storage_account: OptionalStorageAccountName = ""
    container: ContainerName = "tfstate"
    key_prefix: KeyPrefix = "crashcart"

    @model_validator(mode="after")
    def _azurerm_needs_an_account(self) -> "Backend":
        if self.kind == "azurerm":
            check(bool(self.resource_group), "a resource group name (backend.kind is azurerm)",
                  at=".resource_group", value=self.resource_group)
            check(bool(self.storage_account), "a storage account name (backend.kind is azurerm)",
                  at=".storage_account", value=self.storage_account)
        return self


# The file's tables in the order they are written; [tags] (free key = value pairs) comes last.
SECTIONS: dict[str, type[Section]] = {
    "source": SourceVm, "rescue": RescueVm, "network": Network, "evidence": Evidence,
    "repair": Repair, "backend": Backend,
}
