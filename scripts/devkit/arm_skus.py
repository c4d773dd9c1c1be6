"""Resource SKUs in the ARM double: what each VM size can host, and a VM refused when its size cannot.

`GET /subscriptions/{s}/providers/Microsoft.Compute/skus` (ResourceSkus_List, api-version 2021-07-01, the
one azure-mgmt-compute uses; shape from azure-rest-api-specs specification/compute/.../Skus/stable/2021-07-01/
examples/skus/ListAvailableResourceSkus.json): one entry per size and region with resourceType, name, tier,
size, family, locations, locationInfo[{location, zones, zoneDetails}], capabilities[{name, value}] (every
value a string) and restrictions[{type, values, restrictionInfo{locations, zones}, reasonCode}]. `$filter`
"location eq '<region>'" is honoured. The catalogue is scripts/devkit/skus.json.

Capability names and spellings are the service's, as tools that read them spell them (e.g. openshift
installer's Azure validation, Azure/SAP-on-Azure-Scripts-and-Utilities' NVMe conversion, LISA):
`HyperVGenerations` "V1" | "V2" | "V1,V2"; `DiskControllerTypes` "SCSI" | "NVMe" | "SCSI, NVMe", absent on
sizes that only have SCSI; `TrustedLaunchDisabled` "True" on sizes without Trusted Launch (absent or
"False" otherwise); `ConfidentialComputingType` on confidential sizes; `PremiumIO`, `vCPUs`, `MemoryGB`,
`MaxDataDiskCount`. A VM that does not declare `storageProfile.diskControllerType` gets the size's default
controller ("If the customer doesn't specify a DiskControllerType value then the platform will
automatically choose the default controller based on the VM size configuration", Microsoft Learn, "Enable
NVMe interface"): SCSI where the size has it, else NVMe.

`vm_refusal` refuses a VM model as Azure refuses it, with Azure's codes and messages (as Azure has
returned them to users: the issue threads cited per check):
- a size not offered in the region, or not in the VM's zone (a zone restriction NotAvailableForSubscription
  included): 409 SkuNotAvailable (microsoft/PartsUnlimitedMRP#133);
- the OS disk's Hyper-V generation not among HyperVGenerations: 400 BadRequest "The selected VM size '...'
  cannot boot Hypervisor Generation '2'..." (microsoft/ga4gh-tes#43, loft-sh/devpod#731);
- a declared disk controller not among DiskControllerTypes: 400 InvalidParameter, target
  storageProfile.diskControllerType, "The VM size '...' cannot boot with DiskControllerType 'NVMe'..."
  (Azure/FederalAVD#20);
- securityType TrustedLaunch on a size with TrustedLaunchDisabled (or without Generation 2): 400
  BadRequest "The VM size '...' is not supported for creation of VMs and Virtual Machine Scale Set with
  'TrustedLaunch' security type..." (Azure/azure-cli#28005, the service's message table).
`attach_refusal` is the zone rule for a disk joining a VM: a zone-redundant disk (*_ZRS: it has no zone,
"A disk with sku 'Premium_ZRS' cannot be created in an availability zone") attaches to a VM in any zone of
the region ("a ZRS disk can be attached to a VM in a different zone", Microsoft Learn "Redundancy options
for managed disks"); a zonal disk only to a VM in its zone, 400 BadRequest "... is not in the same zone as
the VM. VM zone: '1'. Disk zone: '2'." (jenkins-infra/azure#1406); a regional disk not to a zonal VM, 400
BadRequest "... is not in zone '1'." (jrudlin/Azure#7); a zonal disk not to a regional VM (same shape,
the message modelled on those two).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.devkit.armdouble import ArmDouble, Request, Response, error_response

SKUS_API_VERSION = "2021-07-01"  # ResourceSkus_List in azure-mgmt-compute (in armdouble.API_VERSIONS["compute"])
DATA = Path(__file__).with_name("skus.json")
SKUS_PATH = r"/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.Compute/skus"


@dataclass(frozen=True)
class Sku:
    name: str
    family: str
    capabilities: dict[str, str]
    zones: dict[str, tuple[str, ...]]  # region -> zones the size is offered in
    restricted_zones: dict[str, tuple[str, ...]] = field(default_factory=dict)  # NotAvailableForSubscription

    def capability(self, name: str, default: str = "") -> str:
        return self.capabilities.get(name, default)

    @property
    def generations(self) -> tuple[str, ...]:
        return _split(self.capability("HyperVGenerations", "V1"))

    @property
    def controllers(self) -> tuple[str, ...]:
        return _split(self.capability("DiskControllerTypes")) or ("SCSI",)

    @property
    def default_controller(self) -> str:
        return "SCSI" if "SCSI" in self.controllers else self.controllers[0]

    @property
    def trusted_launch(self) -> bool:
        return "V2" in self.generations and self.capability("TrustedLaunchDisabled", "False").lower() != "true"

    def offered(self, region: str, zone: str | None = None) -> bool:
        region = _region(region)
        if region not in self.zones:
            return False
        return zone is None or (zone in self.zones[region] and zone not in self.restricted_zones.get(region, ()))

    def resource(self, region: str) -> dict[str, Any]:
        """The ResourceSkus_List entry for `region` (the API's shape)."""
        region = _region(region)
        entry: dict[str, Any] = {
            "resourceType": "virtualMachines", "name": self.name, "tier": self.name.split("_", 1)[0],
            "size": self.name.split("_", 1)[1], "family": self.family, "locations": [region],
            "locationInfo": [{"location": region, "zones": list(self.zones[region]), "zoneDetails": []}],
            "capabilities": [{"name": k, "value": v} for k, v in self.capabilities.items()],
            "restrictions": [],
        }
        if self.restricted_zones.get(region):
            entry["restrictions"].append({
                "type": "Zone", "values": [region], "reasonCode": "NotAvailableForSubscription",
                "restrictionInfo": {"locations": [region], "zones": list(self.restricted_zones[region])}})
        return entry

    def vm_size(self) -> dict[str, Any]:
        """The VirtualMachineSizes_List entry (GET .../locations/{l}/vmSizes) for this size."""
        return {"name": self.name, "numberOfCores": int(self.capability("vCPUs", "0")),
                "osDiskSizeInMB": int(self.capability("OSVhdSizeMB", "1047552")),
                "resourceDiskSizeInMB": int(self.capability("MaxResourceVolumeMB", "0")),
                "memoryInMB": int(float(self.capability("MemoryGB", "0")) * 1024),
                "maxDataDiskCount": int(self.capability("MaxDataDiskCount", "0"))}


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _region(region: str) -> str:
    return region.replace(" ", "").lower()


@functools.lru_cache(maxsize=1)
def catalogue() -> dict[str, Sku]:
    """Every size of skus.json, by lower-cased name."""
    data = json.loads(DATA.read_text(encoding="utf-8"))
    regions = {r: tuple(z) for r, z in data["regions"].items()}
    out: dict[str, Sku] = {}
    for item in data["sizes"]:
        sku = Sku(item["name"], item["family"], dict(item["capabilities"]),
                  {r: regions[r] for r in item.get("regions", regions)},
                  {r: tuple(z) for r, z in item.get("restricted_zones", {}).items()})
        out[sku.name.lower()] = sku
    return out


def find(name: str) -> Sku | None:
    return catalogue().get((name or "").lower())


def sizes_in(region: str) -> list[Sku]:
    return [s for s in catalogue().values() if s.offered(region)]


# ---- the route ------------------------------------------------------------------------------------------
def install(double: ArmDouble) -> None:
    """Serves ResourceSkus_List on `double` (RBAC: Microsoft.Compute/skus/read on the subscription)."""
    double.route("GET", SKUS_PATH, list_skus)


def list_skus(d: ArmDouble, req: Request, m: re.Match) -> Response:
    wanted = None
    raw = req.query.get("$filter", "")
    if raw:
        found = re.fullmatch(r"\s*location\s+eq\s+'([^']+)'\s*", raw, re.IGNORECASE)
        if found is None:
            return error_response(400, "InvalidFilter", f"The filter '{raw}' is not supported: only "
                                                        "location eq '<location>' is.")
        wanted = _region(found.group(1))
    value = [sku.resource(region) for sku in catalogue().values() for region in sku.zones
             if wanted is None or region == wanted]
    return Response(200, {"value": value})


# ---- what Azure refuses -------------------------------------------------------------------------------------
def _refuse(status: int, code: str, message: str, target: str | None = None) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if target:
        error["target"] = target
    return Response(status, {"error": error})


def vm_refusal(vm_id: str, vm: dict[str, Any], *, generation: str | None) -> Response | None:
    """Azure's answer to a VM model its size cannot host (None: the size can). `vm` is the VM's body as PUT
    (location, zones, properties); `generation` the OS disk's Hyper-V generation when known."""
    props = vm.get("properties") or {}
    size = ((props.get("hardwareProfile") or {}).get("vmSize")) or ""
    region = str(vm.get("location") or "")
    zones = [str(z) for z in vm.get("zones") or []]
    subscription = vm_id.strip("/").split("/")[1] if vm_id.count("/") > 2 else ""
    sku = find(size)
    if sku is None or not sku.offered(region) or any(not sku.offered(region, z) for z in zones):
        return _refuse(409, "SkuNotAvailable", (
            f"The requested size for resource '{vm_id}' is currently not available in location '{_region(region)}' "
            f"zones '{','.join(zones)}' for subscription '{subscription}'. Please try another size or deploy to a "
            "different location or zones. See https://aka.ms/azureskunotavailable for details."))
    if generation and generation not in sku.generations:
        number = generation[-1]
        return _refuse(400, "BadRequest", (
            f"The selected VM size '{sku.name}' cannot boot Hypervisor Generation '{number}'. If this was a Create "
            "operation please check that the Hypervisor Generation of the Image matches the Hypervisor Generation "
            f"of the selected VM Size. If this was an Update operation please select a Hypervisor Generation "
            f"'{number}' VM Size. For more information, see https://aka.ms/azuregen2vm"))
    controller = (props.get("storageProfile") or {}).get("diskControllerType")
    if controller and controller.lower() not in {c.lower() for c in sku.controllers}:
        return _refuse(400, "InvalidParameter", (
            f"The VM size '{sku.name}' cannot boot with DiskControllerType '{controller}'. Please check that the "
            "disk controller type provided is one of the supported disk controller types for the VM size "
            f"'{sku.name}'. Please query sku api at https://aka.ms/azure-compute-skus  to determine supported disk "
            "controller types for the VM size."), target="storageProfile.diskControllerType")
    security = (props.get("securityProfile") or {}).get("securityType")
    if security == "TrustedLaunch" and not sku.trusted_launch:
        return _refuse(400, "BadRequest", (
            f"The VM size '{sku.name}' is not supported for creation of VMs and Virtual Machine Scale Set with "
            "'TrustedLaunch' security type. For more information, see https://aka.ms/TrustedLaunch-FAQ"))
    return None


def is_zone_redundant(disk: dict[str, Any]) -> bool:
    return str((disk.get("sku") or {}).get("name") or "").upper().endswith("_ZRS")


def attach_refusal(vm: dict[str, Any], disk_id: str, disk: dict[str, Any]) -> Response | None:
    """Azure's answer to attaching `disk` (as OS or data disk) to `vm` across zones (None: allowed)."""
    if is_zone_redundant(disk):
        return None  # no zone of its own: any zone of the region
    vm_zone = next(iter(vm.get("zones") or []), None)
    disk_zone = next(iter(disk.get("zones") or []), None)
    if vm_zone and disk_zone and str(vm_zone) != str(disk_zone):
        message = (f"Disk {disk_id} cannot be attached to the VM because it is not in the same zone as the VM. "
                   f"VM zone: '{vm_zone}'. Disk zone: '{disk_zone}'.")
    elif vm_zone and not disk_zone:
        message = f"Disk {disk_id} cannot be attached to the VM because it is not in zone '{vm_zone}'."
    elif disk_zone and not vm_zone:
        message = (f"Disk {disk_id} cannot be attached to the VM because it is in zone '{disk_zone}' and the VM "
                   "is not in an availability zone.")
    else:
        return None
    return _refuse(400, "BadRequest", message)
