"""The sections of the config file, one frozen dataclass each, and the names and defaults they share.

These are plain values: reading them from TOML and the environment is scripts.config.load, checking
them scripts.config.validate, and the whole repair's Config (with the values derived from them) is
scripts.config.model, which sits above all three.
"""

from __future__ import annotations

from dataclasses import dataclass

from scripts.azure import ids

DEFAULT_PATH = "repair.toml"
EXAMPLE_PATH = "repair.example.toml"
KIT_TAG = "crashcart"

# Naming rules are config's: azure.ids reads the shape of a resource ID, these say what its parts may be.
GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
RG_NAME = r"[-\w.()]{0,89}[-\w()]"  # 1-90 chars, letters/digits/underscore/period/hyphen/parens, no trailing period
STORAGE_ACCOUNT_NAME = r"[a-z0-9]{3,24}"

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


# Rescue images per (os, Hyper-V generation). Gen2 images are the ones that support Trusted Launch and NVMe.
DEFAULT_IMAGES: dict[tuple[str, str], ImageRef] = {
    ("windows", "V1"): ImageRef("MicrosoftWindowsServer", "WindowsServer", "2022-datacenter"),
    ("windows", "V2"): ImageRef("MicrosoftWindowsServer", "WindowsServer", "2022-datacenter-g2"),
    ("linux", "V1"): ImageRef("Canonical", "ubuntu-24_04-lts", "server-gen1"),
    ("linux", "V2"): ImageRef("Canonical", "ubuntu-24_04-lts", "server"),
}


@dataclass(frozen=True)
class SourceVm:
    """The broken VM and its OS disk: only ever read."""

    subscription_id: str
    resource_group: str
    vm_name: str
    location: str
    os_disk_id: str
    os_disk_size_gb: int
    zone: str = ""
    os_type: str = "Windows"
    os_disk_sku: str = "Premium_LRS"
    hyper_v_generation: str = "V2"
    security_type: str = "Standard"
    disk_controller: str = "SCSI"
    vm_size: str = ""
    memory_gb: float = 0.0  # the VM size's RAM: a complete dump is this large

    @property
    def vm_id(self) -> str:
        return ids.build("vm", self.subscription_id, self.resource_group, self.vm_name)

    @property
    def os_disk_name(self) -> str:
        return self.os_disk_id.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class RescueVm:
    os: str = "windows"
    size: str = "Standard_D4s_v5"
    image: ImageRef | None = None  # None: DEFAULT_IMAGES for the os and the source's generation
    admin_username: str = "crashcart"
    name: str = "crashcart-rescue"


@dataclass(frozen=True)
class Network:
    subnet_id: str = ""  # empty: the repair stack creates a vnet/subnet/NSG of its own
    address_space: str = "10.250.0.0/24"

    @property
    def create(self) -> bool:
        return not self.subnet_id


@dataclass(frozen=True)
class Evidence:
    """The long-lived storage the dumps land in (the `evidence` stack)."""

    account_id: str = ""  # an existing account's resource ID; empty: the evidence stack creates one
    account_name: str = ""  # for a created account; derived from the subscription when empty
    resource_group: str = "crashcart-evidence"
    location: str = ""  # defaults to the source VM's region
    container: str = "dumps"
    replication: str = "ZRS"
    soft_delete_days: int = 30
    immutability_days: int = 0  # >0: time-based retention on the container (unlocked policy)
    firewall: bool = False  # default-deny firewall: only allowed_subnet_ids and allowed_ip_ranges reach it
    allowed_subnet_ids: tuple[str, ...] = ()
    allowed_ip_ranges: tuple[str, ...] = ()

    @property
    def create_account(self) -> bool:
        return not self.account_id


@dataclass(frozen=True)
class Repair:
    resource_group: str = ""  # default: crashcart-repair-<vm name>
    ttl_hours: int = 8
    strategy: str = "rescue-vm"
    collect_timeout_minutes: int = 120


@dataclass(frozen=True)
class Backend:
    """Where Terraform keeps the stacks' state: local files by default, or an azurerm blob for pipelines."""

    kind: str = "local"
    resource_group: str = ""
    storage_account: str = ""
    container: str = "tfstate"
    key_prefix: str = "crashcart"


# The file's tables in the order they are written; [tags] (free key = value pairs) comes last.
SECTIONS: dict[str, type] = {
    "source": SourceVm, "rescue": RescueVm, "network": Network, "evidence": Evidence,
    "repair": Repair, "backend": Backend,
}
