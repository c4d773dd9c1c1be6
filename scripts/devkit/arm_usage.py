"""Compute quota and a VM's extensions in the ARM double: what preflight reads before anything is created.

Usages (azure-rest-api-specs specification/compute/.../Microsoft.Compute/ComputeRP/stable/.../computeRPCommon.json,
Usage_List; example ListUsages.json): `GET /subscriptions/{s}/providers/Microsoft.Compute/locations/{l}/usages`
answers `{"value": [{"unit": "Count", "currentValue", "limit", "name": {"value", "localizedValue"}}]}`: one
entry per VM family of the region (`name.value` is the family as ResourceSkus_List spells it, e.g.
`standardDSv5Family`) and `cores`, "Total Regional vCPUs". RBAC: `Microsoft.Compute/locations/usages/read` on
the subscription. Every family has DEFAULT_LIMIT vCPUs and none used unless a test says otherwise
(`set_usage`).

Extensions (VirtualMachineExtensions_List): `GET {vm}/extensions` answers `{"value": [extension...]}` with each
extension's {name, id, type, location, properties{publisher, type, typeHandlerVersion, provisioningState}}; a
VM that does not exist is 404. RBAC: `Microsoft.Compute/virtualMachines/extensions/read` (Reader's `*/read`).
`add_extension` puts one on a VM (e.g. Azure Disk Encryption: publisher Microsoft.Azure.Security, type
AzureDiskEncryption on Windows, AzureDiskEncryptionForLinux on Linux).
"""

from __future__ import annotations

import re
from typing import Any

from scripts.devkit import arm_skus
from scripts.devkit.armdouble import ArmDouble, Request, Response, error_response

DEFAULT_LIMIT = 100  # vCPUs per family and region (a pay-as-you-go subscription's usual default is 10-100)
DEFAULT_REGIONAL_LIMIT = 350
_USAGES = r"/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.Compute/locations/(?P<loc>[^/]+)/usages"
_EXTENSIONS = (r"(?P<vm>/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Compute/virtualMachines/"
               r"[^/]+)/extensions")
_STATE_KEY = "_crashcart_usages"


def install(double: ArmDouble) -> None:
    """Serves Usage_List and VirtualMachineExtensions_List on `double` (both on api-versions it knows)."""
    double.route("GET", _USAGES, list_usages)
    double.route("GET", _EXTENSIONS, list_extensions)


def set_usage(double: ArmDouble, region: str, name: str, current: int, limit: int | None = None) -> None:
    """The usage Usage_List reports for `name` (a family such as standardDSv5Family, or `cores`) in `region`."""
    table: dict[tuple[str, str], tuple[int, int | None]] = double.__dict__.setdefault(_STATE_KEY, {})
    table[(_region(region), name.lower())] = (current, limit)


def _region(region: str) -> str:
    return region.replace(" ", "").lower()


def list_usages(d: ArmDouble, req: Request, m: re.Match) -> Response:
    region = _region(m.group("loc"))
    table: dict[tuple[str, str], tuple[int, int | None]] = d.__dict__.get(_STATE_KEY, {})
    families = sorted({sku.family for sku in arm_skus.sizes_in(region)})
    if not families:
        return error_response(404, "NoRegisteredProviderFound",
                              f"No registered resource provider found for location '{region}'.")
    value: list[dict[str, Any]] = []
    for name, label, default in ([("cores", "Total Regional vCPUs", DEFAULT_REGIONAL_LIMIT)]
                                 + [(f, f"{f} vCPUs", DEFAULT_LIMIT) for f in families]):
        current, limit = table.get((region, name.lower()), (0, None))
        value.append({"unit": "Count", "currentValue": current, "limit": default if limit is None else limit,
                      "name": {"value": name, "localizedValue": label}})
    return Response(200, {"value": value})


# ---- extensions -------------------------------------------------------------------------------------------
def add_extension(double: ArmDouble, vm_id: str, name: str, publisher: str, kind: str,
                  version: str = "2.2") -> dict[str, Any]:
    vm = double.get(vm_id) or {}
    return double.put(f"{vm_id}/extensions/{name}", {
        "name": name, "id": f"{vm_id}/extensions/{name}", "type": "Microsoft.Compute/virtualMachines/extensions",
        "location": vm.get("location", "westeurope"),
        "properties": {"publisher": publisher, "type": kind, "typeHandlerVersion": version,
                       "autoUpgradeMinorVersion": True, "provisioningState": "Succeeded"}})


def add_disk_encryption(double: ArmDouble, vm_id: str, *, linux: bool = False) -> dict[str, Any]:
    """Azure Disk Encryption on the VM, as `az vm encryption enable` leaves it: the extension."""
    kind = "AzureDiskEncryptionForLinux" if linux else "AzureDiskEncryption"
    return add_extension(double, vm_id, kind, "Microsoft.Azure.Security", kind, "1.1" if linux else "2.2")


def list_extensions(d: ArmDouble, req: Request, m: re.Match) -> Response:
    vm_id = m.group("vm")
    if d.get(vm_id) is None:
        return d.not_found(vm_id)
    return Response(200, {"value": d.children(vm_id, "extensions")})
