"""Preflight's capacity and reachability reads: the rescue size in the zone (resource SKUs), the vCPU quota of
its family in the region (compute usages), and the evidence container from this machine (a storage 403
AuthorizationFailure is its firewall refusing this runner). GETs only; scripts.run.preflight_azure calls them.
"""

from __future__ import annotations

from typing import Any

from scripts.azure.errors import azure_call
from scripts.base.errors import CrashcartError, ExitCode
from scripts.config.model import Config
from scripts.run.preflight_checks import ALL, EXIT_CODES, Finding


def _text(value: Any) -> str:
    return str(getattr(value, "value", value) or "")


def rescue_size(compute: Any, config: Config) -> list[Finding]:
    """The rescue size in the source's region and zone (resource SKUs), then its family's vCPU quota."""
    size, region = config.rescue.size, config.source.location
    zone = "" if config.source.os_disk_sku.upper().endswith("_ZRS") else config.source.zone
    skus = azure_call(lambda: list(compute.resource_skus.list(filter=f"location eq '{region}'")),
                      f"the VM sizes of {region}", doing=f"list the resource SKUs of {region} "
                                                          "(Microsoft.Compute/skus/read)")
    sku = next((s for s in skus if _text(s.resource_type) == "virtualMachines" and (s.name or "").lower()
                == size.lower()), None)
    subject = f"{size} in {region}" + (f" zone {zone}" if zone else "")
    other = (f"set rescue.size to a size offered there (`az vm list-skus -l {region}"
             + (f" --zone" if zone else "") + " --resource-type virtualMachines -o table`)")
    if sku is None:
        return [Finding("rescue size", subject, False, f"{size} is not offered in {region}", other,
                        EXIT_CODES["rescue size"], ALL)]
    blocked = [f"{_text(r.reason_code) or 'restricted'} in {region}" for r in sku.restrictions or ()
               if _text(r.type) == "Location" and region.lower() in [v.lower() for v in r.values or ()]]
    zones_offered = {z for info in sku.location_info or () for z in info.zones or ()}
    if zone:
        blocked += [f"{_text(r.reason_code) or 'restricted'} in zone {zone}" for r in sku.restrictions or ()
                    if _text(r.type) == "Zone" and zone in (getattr(r.restriction_info, "zones", None) or ())]
        if zone not in zones_offered:
            blocked.append(f"not offered in zone {zone}")
    caps = {c.name: c.value for c in sku.capabilities or ()}
    vcpus = int(caps.get("vCPUs", "0") or 0)
    family = sku.family or ""
    out = [Finding("rescue size", subject, not blocked, "; ".join(blocked) if blocked else
                   f"available ({vcpus} vCPUs, family {family})", other if blocked else "",
                   EXIT_CODES["rescue size"] if blocked else 0, ALL if blocked else (),
                   {"size": size, "zone": zone, "family": family, "vcpus": vcpus})]
    return out + quota(compute, config, region, family, vcpus)

def quota(compute: Any, config: Config, region: str, family: str, vcpus: int) -> list[Finding]:
    usages = azure_call(lambda: list(compute.usage.list(region)), f"the compute quota of {region}",
                        doing=f"read the vCPU usage of {region} (Microsoft.Compute/locations/usages/read)")
    by_name = {(u.name.value or "").lower(): u for u in usages}
    short, seen = [], []
    for name in (family, "cores"):
        usage = by_name.get(name.lower())
        if usage is None:
            continue
        free = int(usage.limit) - int(usage.current_value)
        label = usage.name.localized_value or name
        seen.append(f"{label}: {usage.current_value}/{usage.limit} used")
        if free < vcpus:
            short.append(f"{label}: {free} free, the rescue VM needs {vcpus}")
    subject = f"vCPUs for {config.rescue.size} in {region}"
    if not short:
        return [Finding("quota", subject, True, "; ".join(seen) or "no usage reported", data={"usage": seen})]
    return [Finding("quota", subject, False, "; ".join(short),
                    f"free vCPUs in {region}, ask for more quota (Portal: Quotas; `az vm list-usage -l {region} -o "
                    "table`), or set rescue.size to a size of another family", EXIT_CODES["quota"], ALL,
                    {"usage": seen})]

# ---- evidence -------------------------------------------------------------------------------------------
def evidence(config: Config, endpoint: str) -> list[Finding]:
    """A cheap authenticated read of the evidence container from this machine: its firewall answers here."""
    from scripts.evidence import blobs

    container = config.evidence.container
    subject = f"container {container} at {endpoint}"
    client = blobs.container_client(endpoint, container)
    try:
        azure_call(lambda: client.get_container_properties(), f"evidence container {container}",
                   doing=f"read the evidence container {container} from this machine",
                   hints={"auth": blobs.STORAGE_HINTS["auth"]})
    except CrashcartError as err:
        if config.evidence.create_account and err.exit_code in (ExitCode.AZURE_NOT_FOUND, ExitCode.AZURE_FAILED):
            return [Finding("evidence", subject, False, f"not reachable yet ({err.message})",
                            "repair-run deploys the evidence stack first; if it exists, check this machine's "
                            "network and DNS for the account")]
        code = EXIT_CODES["evidence"] if err.exit_code == ExitCode.AZURE_AUTH else err.exit_code
        return [Finding("evidence", subject, False, err.message, err.hint, int(code), ALL)]
    firewall = ("default-deny firewall, allowed: " + (", ".join(config.evidence.allowed_ip_ranges) or "no IP ranges")
                if config.evidence.firewall else "no firewall in the config")
    return [Finding("evidence", subject, True, f"reachable from this machine ({firewall})")]

