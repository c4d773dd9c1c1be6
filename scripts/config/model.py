"""The typed configuration of one repair: a TOML file plus CRASHCART_* environment overrides.

Everything synth needs is here, so synthesizing the stacks never calls Azure: `discover` reads the
broken VM once and writes this file; a person or a pipeline can also write it by hand. The stacks
(stacks/) import this module and nothing else from scripts/.

Every value is checked when the config is loaded. A bad value stops the run with one message naming
the field, the value and the form expected (`ConfigError`), never a traceback.

Environment overrides: `CRASHCART_<SECTION>_<KEY>` (e.g. `CRASHCART_SOURCE_VM_NAME`,
`CRASHCART_RESCUE_OS=linux`); lists are comma-separated; `CRASHCART_TAGS` is `key=value,key=value`.
The file itself is `CRASHCART_CONFIG` or `repair.toml` in the working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.base.errors import ConfigError, CrashcartError, ExitCode
from scripts.config.regions import known_regions, normalize

DEFAULT_PATH = "repair.toml"
EXAMPLE_PATH = "repair.example.toml"
KIT_TAG = "crashcart"

GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
RG_NAME = r"[-\w.()]{0,89}[-\w()]"  # 1-90 chars, letters/digits/underscore/period/hyphen/parens, no trailing period
_ARM_NAME = r"[^/]+"


def _id_pattern(provider_path: str) -> re.Pattern[str]:
    return re.compile(rf"/subscriptions/(?P<sub>{GUID})/resourceGroups/(?P<rg>{RG_NAME})/providers/{provider_path}",
                      re.IGNORECASE)


DISK_ID = _id_pattern(rf"Microsoft\.Compute/disks/(?P<name>{_ARM_NAME})")
VM_ID = _id_pattern(rf"Microsoft\.Compute/virtualMachines/(?P<name>{_ARM_NAME})")
SUBNET_ID = _id_pattern(
    rf"Microsoft\.Network/virtualNetworks/(?P<vnet>{_ARM_NAME})/subnets/(?P<name>{_ARM_NAME})")
STORAGE_ID = _id_pattern(r"Microsoft\.Storage/storageAccounts/(?P<name>[a-z0-9]{3,24})")

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
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
                f"/providers/Microsoft.Compute/virtualMachines/{self.vm_name}")

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


@dataclass(frozen=True)
class Config:
    source: SourceVm
    rescue: RescueVm = field(default_factory=RescueVm)
    network: Network = field(default_factory=Network)
    evidence: Evidence = field(default_factory=Evidence)
    repair: Repair = field(default_factory=Repair)
    backend: Backend = field(default_factory=Backend)
    tags: Mapping[str, str] = field(default_factory=dict)

    # ---- derived values the stacks and the runtime share ----------------------------------------
    @property
    def rescue_image(self) -> ImageRef:
        return self.rescue.image or DEFAULT_IMAGES[(self.rescue.os, self.source.hyper_v_generation)]

    @property
    def repair_resource_group(self) -> str:
        return self.repair.resource_group or f"crashcart-repair-{self.source.vm_name}"[:90].rstrip(".")

    @property
    def evidence_location(self) -> str:
        return self.evidence.location or self.source.location

    @property
    def evidence_account_name(self) -> str:
        if self.evidence.account_id:
            return STORAGE_ID.fullmatch(self.evidence.account_id).group("name")  # type: ignore[union-attr]
        if self.evidence.account_name:
            return self.evidence.account_name
        # Globally unique but stable: the same subscription and region always give the same name.
        digest = hashlib.sha256(f"{self.source.subscription_id}/{self.evidence_location}".encode()).hexdigest()
        return f"crashcart{digest[:12]}"

    @property
    def evidence_account_id(self) -> str:
        return self.evidence.account_id or (
            f"/subscriptions/{self.source.subscription_id}/resourceGroups/{self.evidence.resource_group}"
            f"/providers/Microsoft.Storage/storageAccounts/{self.evidence_account_name}")

    @property
    def storage_service_endpoint(self) -> str:
        """Service endpoints reach accounts in the VNet's own region only; Storage.Global reaches any."""
        same_region = normalize(self.evidence_location) == normalize(self.source.location)
        return "Microsoft.Storage" if same_region else "Microsoft.Storage.Global"

    def kit_tags(self, role: str) -> dict[str, str]:
        return {**self.tags, KIT_TAG: role, "crashcart-source-vm": self.source.vm_id}

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> "Config":
        env = os.environ if env is None else env
        path = Path(path or env.get("CRASHCART_CONFIG") or DEFAULT_PATH)
        if not path.exists():
            raise CrashcartError(
                f"no config file at {path}",
                f"run `pipenv run discover --vm <VM resource ID>` to write it from Azure, or copy "
                f"{EXAMPLE_PATH} to {DEFAULT_PATH} and edit it (CRASHCART_CONFIG names another file)",
                ExitCode.USAGE)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise CrashcartError(f"{path} is not valid TOML: {err}",
                                 "fix the syntax (https://toml.io) and re-run", ExitCode.USAGE) from None
        return cls.from_dict(data, env)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> "Config":
        env = {} if env is None else env
        data = _apply_env(data, env)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(sorted(unknown)[0], "", f"one of the sections {_section_names()}")
        if "source" not in data:
            raise ConfigError("source", None, "a [source] section naming the broken VM (run `pipenv run discover`)")
        config = cls(
            source=_build(SourceVm, "source", data["source"]),
            rescue=_build(RescueVm, "rescue", data.get("rescue", {})),
            network=_build(Network, "network", data.get("network", {})),
            evidence=_build(Evidence, "evidence", data.get("evidence", {})),
            repair=_build(Repair, "repair", data.get("repair", {})),
            backend=_build(Backend, "backend", data.get("backend", {})),
            tags=_tags(data.get("tags", {})),
        )
        validate(config)
        return config

    def to_toml(self) -> str:
        """The config as a commented TOML file (what `discover` writes)."""
        return render_toml(self)


def _section_names() -> str:
    return ", ".join(f"[{f.name}]" for f in dataclasses.fields(Config))


# ---- environment overrides -------------------------------------------------------------------------
_SECTIONS: dict[str, type] = {
    "source": SourceVm, "rescue": RescueVm, "network": Network, "evidence": Evidence,
    "repair": Repair, "backend": Backend,
}


def env_names() -> dict[str, tuple[str, str]]:
    """Every supported override: CRASHCART_SECTION_KEY -> (section, key)."""
    names = {f"CRASHCART_{s.upper()}_{f.name.upper()}": (s, f.name)
             for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
    names["CRASHCART_TAGS"] = ("tags", "")
    return names


def _apply_env(data: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for name, (section, key) in env_names().items():
        if name not in env:
            continue
        value = env[name]
        if section == "tags":
            pairs = [p for p in value.split(",") if p.strip()]
            if any("=" not in p for p in pairs):
                raise ConfigError(name, value, "comma-separated key=value pairs, e.g. owner=ops,ticket=123")
            merged.setdefault("tags", {}).update(dict(p.split("=", 1) for p in pairs))
            continue
        merged.setdefault(section, {})[key] = value
    return merged


# ---- building typed sections ----------------------------------------------------------------------
def _build(cls: type, section: str, raw: Any) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(section, raw, f"a [{section}] table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        key = sorted(unknown)[0]
        close = difflib.get_close_matches(key, fields, n=1)
        raise ConfigError(f"{section}.{key}", raw[key],
                          f"one of the keys of [{section}]" + (f' (did you mean "{close[0]}"?)' if close else ""),
                          f"known keys: {', '.join(fields)}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        values[name] = _coerce(f"{section}.{name}", value, fields[name])
    missing = [n for n, f in fields.items()
               if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{section}.{missing[0]}", None, "a value (this key is required)",
                          "run `pipenv run discover --vm <VM resource ID>` to fill the [source] section from Azure")
    return cls(**values)


def _coerce(name: str, value: Any, f: dataclasses.Field) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "int":
        if isinstance(value, bool):
            raise ConfigError(name, value, "a whole number")
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        if not isinstance(value, int):
            raise ConfigError(name, value, "a whole number")
        return value
    if kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, value, "a number") from None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(name, value, "true or false")
    if kind.startswith("tuple"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(name, value, "a list of strings")
        return tuple(value)
    if kind.startswith("ImageRef"):
        if value in ("", None):
            return None
        parts = str(value).split(":")
        if len(parts) != 4 or not all(parts):
            raise ConfigError(name, value, "an image URN publisher:offer:sku:version, "
                                           "e.g. MicrosoftWindowsServer:WindowsServer:2022-datacenter-g2:latest")
        return ImageRef(*parts)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name.endswith("zone"):
        return str(value)
    if not isinstance(value, str):
        raise ConfigError(name, value, "a string")
    return value.strip()


def _tags(raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise ConfigError("tags", raw, "a [tags] table of key = \"value\" pairs")
    return {str(k): str(v) for k, v in raw.items()}


# ---- validation --------------------------------------------------------------------------------
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
    _check(bool(re.fullmatch(r"[a-z0-9]{3,24}", value)), field_name, value,
           "a storage account name: 3-24 lowercase letters and digits")


def validate(c: Config) -> None:
    """Every check, section by section; the first failure is raised as a ConfigError."""
    _validate_source(c.source)
    _validate_rescue(c.rescue)
    _validate_network(c.network)
    _validate_evidence(c)
    _validate_repair(c.repair)
    _validate_backend(c.backend)
    _validate_tags(c.tags)


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
    m = DISK_ID.fullmatch(s.os_disk_id)
    _check(m is not None, "source.os_disk_id", s.os_disk_id,
           "a managed disk resource ID: /subscriptions/<guid>/resourceGroups/<rg>/providers/"
           "Microsoft.Compute/disks/<name>")
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
        _check(SUBNET_ID.fullmatch(n.subnet_id) is not None, "network.subnet_id", n.subnet_id,
               "a subnet resource ID: /subscriptions/<guid>/resourceGroups/<rg>/providers/"
               "Microsoft.Network/virtualNetworks/<vnet>/subnets/<subnet>")
    try:
        net = ipaddress.ip_network(n.address_space)
        _check(net.version == 4 and 16 <= net.prefixlen <= 28, "network.address_space", n.address_space,
               "an IPv4 CIDR between /16 and /28, e.g. 10.250.0.0/24")
    except ValueError:
        raise ConfigError("network.address_space", n.address_space,
                          "an IPv4 CIDR between /16 and /28, e.g. 10.250.0.0/24") from None


def _validate_evidence(c: Config) -> None:
    e = c.evidence
    if e.account_id:
        _check(STORAGE_ID.fullmatch(e.account_id) is not None, "evidence.account_id", e.account_id,
               "a storage account resource ID: /subscriptions/<guid>/resourceGroups/<rg>/providers/"
               "Microsoft.Storage/storageAccounts/<name>")
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
        _check(SUBNET_ID.fullmatch(subnet) is not None, f"evidence.allowed_subnet_ids[{i}]", subnet,
               "a subnet resource ID")
    for i, cidr in enumerate(e.allowed_ip_ranges):
        _check(bool(re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}(/\d{1,2})?", cidr)), f"evidence.allowed_ip_ranges[{i}]",
               cidr, "a public IPv4 address or CIDR such as 203.0.113.0/24")
    if e.firewall and c.network.create and not e.allowed_subnet_ids:
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


_RESERVED_USERS = {
    "administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1", "1", "123", "a",
    "actuser", "adm", "admin2", "aspnet", "backup", "console", "david", "guest", "john", "owner", "root",
    "server", "sql", "support", "support_388945a0", "sys", "test2", "test3", "user4", "user5",
}


# ---- writing ----------------------------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        return '""'
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_toml(config: Config, header: str = "") -> str:
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for section in _SECTIONS:
        obj = getattr(config, section)
        lines += ["", f"[{section}]"]
        for f in dataclasses.fields(obj):
            lines.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")
    lines += ["", "[tags]"] + [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in config.tags.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def load_or_exit(path: str | None = None) -> Config:
    """For main.py: a config error ends synth with the message and exit code 2, no traceback."""
    import sys

    try:
        return Config.load(path)
    except CrashcartError as err:
        sys.stderr.write(f"error: {err.message}\n" + (f"next:  {err.hint}\n" if err.hint else ""))
        raise SystemExit(int(err.exit_code)) from None

