"""Resource IDs: the one way the kit reads and writes them (over azure.mgmt.core.tools).

A VM is its resource ID, not its name: two VMs may share a name in other resource groups or
subscriptions. Every module that needs the parts of an ID (subscription, group, name) asks here, so
a malformed ID is refused the same way everywhere, with the form expected in the message.

Resource types are case-insensitive in ARM (`microsoft.compute/VirtualMachines` is the same type), so
matching ignores case; the parts keep the spelling they were given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from scripts.base.errors import CrashcartError, ExitCode

GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"

# kind -> (namespace, type path): a child type is "parent/child", e.g. virtualNetworks/subnets
KINDS: dict[str, tuple[str, str]] = {
    "vm": ("Microsoft.Compute", "virtualMachines"),
    "disk": ("Microsoft.Compute", "disks"),
    "snapshot": ("Microsoft.Compute", "snapshots"),
    "subnet": ("Microsoft.Network", "virtualNetworks/subnets"),
    "storage_account": ("Microsoft.Storage", "storageAccounts"),
    "disk_encryption_set": ("Microsoft.Compute", "diskEncryptionSets"),
}

FORMS: dict[str, str] = {
    kind: (f"/subscriptions/<guid>/resourceGroups/<rg>/providers/{ns}/"
           + "/".join(f"{part}/<{'name' if i == len(path.split('/')) - 1 else part[:-1].lower()}>"
                      for i, part in enumerate(path.split("/"))))
    for kind, (ns, path) in KINDS.items()
}

_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f\s]+")
# characters no ARM resource or resource group name holds: URL syntax (a query, a fragment, an escape) and what
# Windows and ARM refuse in names (resource-name-rules: '#' "interferes with URL parsing"; resource groups take
# letters, digits, '_', '-', '.', '(' and ')')
_NOT_IN_NAMES = set('?#%&\\<>*:"|')


@dataclass(frozen=True)
class ResourceId:
    """The parts of one ARM resource ID of a known kind."""

    kind: str
    subscription: str
    resource_group: str
    name: str
    parent: str = ""  # the parent resource's name for a child type (the vnet of a subnet)

    @property
    def id(self) -> str:
        namespace, path = KINDS[self.kind]
        types = path.split("/")
        names = [self.parent, self.name] if len(types) == 2 else [self.name]
        tail = "/".join(f"{t}/{n}" for t, n in zip(types, names))
        return f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}/providers/{namespace}/{tail}"

    @property
    def key(self) -> str:
        """The ID as ARM compares it: case-insensitively."""
        return self.id.lower()

    def __str__(self) -> str:
        return self.id


def try_parse(value: object, kind: str) -> ResourceId | None:
    """The parts of `value` when it is a well-formed ID of `kind`, else None."""
    if not isinstance(value, str) or not _PRINTABLE.fullmatch(value or "-"):
        return None
    from azure.mgmt.core.tools import is_valid_resource_id, parse_resource_id

    if not is_valid_resource_id(value):
        return None
    parts = parse_resource_id(value)
    namespace, path = KINDS[kind]
    types = path.split("/")
    if not re.fullmatch(GUID, parts.get("subscription") or ""):
        return None
    if (parts.get("namespace") or "").lower() != namespace.lower():
        return None
    if (parts.get("type") or "").lower() != types[0].lower():
        return None
    depth = int(parts.get("last_child_num") or 0)
    if depth != len(types) - 1:
        return None
    if depth and (parts.get("child_type_1") or "").lower() != types[1].lower():
        return None
    name = parts.get("child_name_1") if depth else parts.get("name")
    if not name or not parts.get("resource_group"):
        return None
    if _NOT_IN_NAMES & set(name + parts["resource_group"] + (parts["name"] if depth else "")):
        return None
    return ResourceId(kind, parts["subscription"], parts["resource_group"], name, parts["name"] if depth else "")


def parse(value: object, kind: str) -> ResourceId:
    """The parts of an ID of `kind`; ValueError naming the form expected when it is not one."""
    found = try_parse(value, kind)
    if found is None:
        raise ValueError(f"{value!r} is not a {kind.replace('_', ' ')} resource ID: expected {FORMS[kind]}")
    return found


def require(value: object, kind: str, hint: str) -> ResourceId:
    """`parse` for IDs that come from outside the code (stack outputs, a manifest, the command line): a
    malformed one is a usage error naming the form expected, with `hint` saying where the value came from."""
    try:
        return parse(value, kind)
    except ValueError as err:
        raise CrashcartError(str(err), hint, ExitCode.USAGE) from None


def build(kind: str, subscription: str, resource_group: str, name: str, parent: str = "") -> str:
    return ResourceId(kind, subscription, resource_group, name, parent).id


def is_subscription_id(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(GUID, value) is not None


def same(a: str | None, b: str | None) -> bool:
    """Two IDs name the same resource (ARM compares IDs case-insensitively)."""
    return bool(a) and bool(b) and a.rstrip("/").lower() == b.rstrip("/").lower()  # type: ignore[union-attr]
