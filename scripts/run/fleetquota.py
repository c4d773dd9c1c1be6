"""The default `fleet run --max-parallel`: as many jobs as the regions' vCPU quota leaves room for rescue VMs.

Every running job holds one rescue VM (rescue.size of the config every VM starts from) in its VM's region and
subscription. For each (subscription, region) of the fleet the kit reads the rescue size's vCPUs and family
(resource SKUs, Microsoft.Compute/skus/read) and the compute usages (Microsoft.Compute/locations/usages/read):
free = min(family limit - current, regional `cores` limit - current), jobs = floor(free / vCPUs per rescue VM).
The default is the smallest of those over the fleet's regions (no region is ever asked for more than it has,
however the jobs fall), at most QUOTA_CAP (this machine runs a repair-run and terraform per job) and at most
the VMs to run. The number and the reason are logged and returned. Quota the kit cannot read (no permission, a
region it cannot locate) falls back to DEFAULT_MAX_PARALLEL with the reason; quota too small for even one
rescue VM is an error before anything is created. An explicit --max-parallel is used as given.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.azure import ids
from scripts.azure.errors import azure_call
from scripts.base.console import log
from scripts.base.errors import CrashcartError, ExitCode
from scripts.config.sections import RescueVm

QUOTA_CAP = 32
FALLBACK = 16  # scripts.run.fleet.DEFAULT_MAX_PARALLEL (not imported: fleet imports this module)


@dataclass(frozen=True)
class Room:
    subscription: str
    region: str
    size: str
    vcpus: int
    family: str
    free: int  # vCPUs free for the rescue size: the smaller of its family's and the region's
    limited_by: str  # which usage left the least

    @property
    def jobs(self) -> int:
        return self.free // self.vcpus if self.vcpus else 0

    def describe(self) -> str:
        return (f"{self.region} ({self.subscription[:8]}…): {self.free} vCPUs free ({self.limited_by}) / "
                f"{self.vcpus} per {self.size} = {self.jobs}")


def rescue_size(base_config: Path, env: dict[str, str] | None = None) -> str:
    """rescue.size of the config every VM starts from (CRASHCART_RESCUE_SIZE wins), else the kit's default."""
    env = os.environ if env is None else env
    if env.get("CRASHCART_RESCUE_SIZE"):
        return env["CRASHCART_RESCUE_SIZE"]
    try:
        data = tomllib.loads(Path(base_config).read_text(encoding="utf-8"))
        size = (data.get("rescue") or {}).get("size")
    except (OSError, ValueError, AttributeError):
        size = None
    return str(size) if isinstance(size, str) and size else RescueVm.model_fields["size"].default


def room(compute: Any, subscription: str, region: str, size: str) -> Room:
    skus = azure_call(lambda: list(compute.resource_skus.list(filter=f"location eq '{region}'")),
                      f"the VM sizes of {region}", doing=f"list the resource SKUs of {region}")
    sku = next((s for s in skus if str(getattr(s.resource_type, "value", s.resource_type)) == "virtualMachines"
                and (s.name or "").lower() == size.lower()), None)
    if sku is None:
        raise CrashcartError(f"the rescue size {size} is not offered in {region}",
                             "set rescue.size to a size offered there (`az vm list-skus -l "
                             f"{region} --resource-type virtualMachines -o table`)", ExitCode.USAGE)
    vcpus = int({c.name: c.value for c in sku.capabilities or ()}.get("vCPUs") or 0)
    usages = azure_call(lambda: list(compute.usage.list(region)), f"the compute quota of {region}",
                        doing=f"read the vCPU usage of {region}")
    free: list[tuple[int, str]] = []
    for usage in usages:
        name = (usage.name.value or "").lower()
        if name in ((sku.family or "").lower(), "cores"):
            label = usage.name.localized_value or usage.name.value
            free.append((int(usage.limit) - int(usage.current_value),
                         f"{label}: {usage.current_value}/{usage.limit} used"))
    least = min(free) if free else (0, "no usage reported")
    return Room(subscription, region, sku.name, vcpus, sku.family or "", max(0, least[0]), least[1])


def default_parallel(vm_ids: tuple[str, ...], locations: dict[str, str], size: str, to_run: int,
                     compute_for: Callable[[str], Any] | None = None) -> tuple[int, str]:
    """(jobs at a time, why) for the fleet's VMs; `locations` maps lower-cased VM IDs to regions."""
    if compute_for is None:
        from scripts.azure.clients import AzureClients

        def compute_for(subscription: str) -> Any:
            return AzureClients(subscription).compute

    pairs = sorted({(ref.subscription, locations[v.lower()]) for v in vm_ids
                    if (ref := ids.try_parse(v, "vm")) and locations.get(v.lower())})
    unlocated = sum(1 for v in vm_ids if not locations.get(v.lower()))
    if not pairs:
        return FALLBACK, (f"default {FALLBACK}: the VMs' regions could not be read, so the vCPU quota was not "
                          "consulted; pass --max-parallel")
    try:
        rooms = [room(compute_for(sub), sub, region, size) for sub, region in pairs]
    except CrashcartError as err:
        if err.exit_code == ExitCode.USAGE:
            raise
        log.warning("fleet: could not read the vCPU quota (%s): %d jobs at a time", err.message, FALLBACK)
        return FALLBACK, f"default {FALLBACK}: the vCPU quota could not be read ({err.message})"
    tight = min(rooms, key=lambda r: r.jobs)
    if tight.jobs < 1:
        raise CrashcartError(f"no vCPU quota for one rescue VM: {tight.describe()}",
                             f"free vCPUs in {tight.region} or ask for more quota (`az vm list-usage -l {tight.region} "
                             "-o table`), or set rescue.size to a size of another family", ExitCode.DEPLOY_FAILED)
    jobs = min(tight.jobs, QUOTA_CAP, max(1, to_run))
    caps = [f"at most {QUOTA_CAP} on one machine" if jobs == QUOTA_CAP < tight.jobs else "",
            f"only {to_run} VM(s) to run" if jobs == to_run < min(tight.jobs, QUOTA_CAP) else "",
            f"{unlocated} VM(s) of unknown region not counted" if unlocated else ""]
    why = (f"{jobs} from the vCPU quota: " + "; ".join(r.describe() for r in rooms)
           + "".join(f"; {c}" for c in caps if c))
    log.info("fleet: --max-parallel %d (%s)", jobs, why)
    return jobs, why
