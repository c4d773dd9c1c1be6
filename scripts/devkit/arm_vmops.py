"""The source VM's power, updates and boot diagnostics in the ARM double, and a VM that crashes.

Shapes follow azure-rest-api-specs (Microsoft.Compute ComputeRP, virtualMachineExamples):
- PUT .../virtualMachines/{vm} (VirtualMachine_Update_DetachDataDiskUsingToBeDetachedProperty.json):
  200 with provisioningState "Updating" and an Azure-AsyncOperation header; the stored VM is what the
  client sent plus id/name/type. Validated as ARM does (scripts/devkit/arm_vmrules.py): an OS disk may
  change only while the VM is deallocated, to an existing disk not attached elsewhere, of the same Hyper-V
  generation and security type; data disks attach only when unattached; disks obey the zone rule and the
  model must fit its size's capabilities (scripts/devkit/arm_skus.py). Disks' `managedBy` and
  `diskState` follow.
- POST .../deallocate | powerOff | start (VirtualMachine_Deallocate_MaximumSet_Gen.json,
  VirtualMachine_PowerOff_MaximumSet_Gen.json): 202 with Location (and Azure-AsyncOperation) headers;
  the power state changes when the operation completes. `powerOff` honours skipShutdown.
- GET .../instanceView (VirtualMachine_InstanceView): statuses ProvisioningState/* and PowerState/*, and
  `vmAgent` (the guest agent: scripts/devkit/arm_guest.py) unless the VM is deallocated.
- POST .../retrieveBootDiagnosticsData?sasUriExpirationTimeInMinutes=N
  (VirtualMachine_RetrieveBootDiagnosticsData.json): {consoleScreenshotBlobUri, serialConsoleLogBlobUri},
  read-only SAS URIs — here to blobs in Azurite, made with Azurite's well-known key.
- DELETE .../disks/{disk}: 202 + Location; 409 while the disk is attached.

`SimVm` decides what the guest does. A boot crashes when the VM is started on `crash_disk` (a marker), or on a
disk whose content says so (`VmOps.contents`: disk ID -> arm_guest.ImageDisk, e.g. the image's hive still
loads the culprit driver; decided when the boot starts). A crashing boot bugchecks after `crash_after` boot
diagnostics reads (mode "crash"), or hangs until an NMI arrives (mode "hang": through the serial console,
scripts/devkit/arm_serial.py, as `az serial-console send nmi` sends it); its guest agent never reports Ready.
A boot that does not crash reports the agent Ready from the `agent_ready_after`+1-th instance view read on.
A bugcheck appends the EMS stop XML to the serial log, records that a dump was written to the OS disk of the
moment (`dumps_on`) and, when that disk has content, writes the dump its CrashControl asks for onto it
(`ImageDisk.write_dump`; each outcome also in `crashes`). `fail` injects an ARM failure for one operation: an
async operation that ends Failed, as ARM reports AllocationFailed on start; `put-os-disk:<disk name>` refuses
(synchronously, 409 unless the error names a `status`) the next PUT that makes that disk the OS disk.
"""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from scripts.azure import ids
from scripts.devkit.arm_guest import AGENT_VERSION, BLUESCREEN_XML, BOOT_TEXT, agent_view, bmp  # noqa: F401 - re-exported
from scripts.devkit.arm_serial import SerialConsole
from scripts.devkit.arm_skus import is_zone_redundant
from scripts.devkit.arm_vmrules import data_disk_ids, update_refusal
from scripts.devkit.armdouble import ArmDouble, Request, Response, error_response

VM_PATH = r"(?P<vm_id>/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Compute/virtualMachines/(?P<vm>[^/]+))"
DISK_PATH = r"(?P<disk_id>/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Compute/disks/(?P<disk>[^/]+))"

@dataclass
class SimVm:
    """What the guest of one VM does, and what the tests can inspect afterwards."""

    vm_id: str
    power: str = "running"
    crash_disk: str | None = None  # started with this OS disk, Windows bugchecks and writes a dump (a marker)
    mode: str = "crash"  # crash | hang (bugchecks only on NMI)
    crash_after: int = 1  # boot diagnostics reads after start before the stop shows
    boot_diagnostics: bool = True
    serial: str = ""
    screenshot: bytes = field(default_factory=bmp)
    dumps_on: list[str] = field(default_factory=list)
    reads_since_start: int = 0
    running_on: str | None = None  # OS disk of the current boot
    crashed: bool = False
    nmis: int = 0
    skip_shutdown: list[bool] = field(default_factory=list)
    fail: dict[str, dict[str, str]] = field(default_factory=dict)  # op -> ARM error, used once
    history: list[str] = field(default_factory=list)
    agent: bool = True  # the guest agent is installed (vmAgent in the instance view)
    agent_version: str = AGENT_VERSION
    agent_ready_after: int = 1  # instance view reads after a good boot starts before the agent is Ready
    views_since_start: int = 0
    contents: dict[str, Any] = field(default_factory=dict)  # lower-cased disk ID -> ImageDisk (VmOps.contents)
    boot_problem: str | None = None  # why the current boot crashes, from its disk's content (None: it boots)
    crashes: list[dict[str, Any]] = field(default_factory=list)  # every bugcheck: disk, why, the dump written

    def boot(self, disk_id: str | None) -> None:
        """A new boot from `disk_id`: the guest reads the disk's content to know whether it will crash."""
        self.running_on, self.crashed, self.reads_since_start, self.views_since_start = disk_id, False, 0, 0
        content = self.contents.get((disk_id or "").lower())
        self.boot_problem = content.boot_problem() if content is not None else None

    def crashing(self) -> bool:
        """This boot crashes (or hangs, in mode "hang"): the marker, or the disk's content."""
        return ids.same(self.running_on, self.crash_disk) or self.boot_problem is not None

    def agent_ready(self) -> bool:
        return (self.power == "running" and not self.crashed and not self.crashing()
                and self.views_since_start > self.agent_ready_after)

    def bugcheck(self, double: ArmDouble, why: str) -> None:
        if self.crashed or self.power != "running":
            return
        self.crashed = True
        self.serial += BLUESCREEN_XML
        content = self.contents.get((self.running_on or "").lower())
        crash: dict[str, Any] = {"disk": self.running_on, "why": self.boot_problem or why, "dump": None}
        if content is not None:
            crash["dump"] = content.write_dump(seed=len(self.crashes) + 101)
        if ids.same(self.running_on, self.crash_disk) or (crash["dump"] or {}).get("path"):
            self.dumps_on.append(self.running_on)
        self.crashes.append(crash)
        self.history.append(f"bugcheck ({why}) on {_leaf(self.running_on)}")


def _leaf(resource_id: str | None) -> str:
    return (resource_id or "").rstrip("/").rsplit("/", 1)[-1]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f0+00:00")


class VmOps:
    """Installs the routes once per double; `add` makes a VM simulated."""

    def __init__(self, double: ArmDouble, azurite: Any, container_name: str = "bootdiagnostics-0f47b100"):
        self.double = double
        self.azurite = azurite
        self.sims: dict[str, SimVm] = {}
        # Called before every accepted change to a simulated VM (PUT or power POST); what it returns is kept
        # in `probed`, e.g. whether the rollback manifest was in evidence at that moment.
        self.write_probe: Any = None
        self.probed: list[Any] = []
        self.contents: dict[str, Any] = {}  # lower-cased disk ID -> arm_guest.ImageDisk: what the disk holds
        self.container = azurite.service_client().get_container_client(container_name)
        if not self.container.exists():
            self.container.create_container()
        double.route("PUT", VM_PATH, self.put_vm)
        for op in ("deallocate", "powerOff", "start"):
            double.route("POST", VM_PATH + "/" + op, self._power(op))
        double.route("DELETE", DISK_PATH, self.delete_disk)
        self.serial = SerialConsole(double, self.sims)

    # ---- setup ------------------------------------------------------------------------------------
    def add(self, vm_id: str, **kwargs: Any) -> SimVm:
        sim = SimVm(vm_id, **kwargs)
        sim.contents = self.contents
        stored = self.double.get(vm_id)
        if stored is not None:
            sim.boot(stored["properties"]["storageProfile"]["osDisk"].get("managedDisk", {}).get("id"))
        if sim.power == "running":
            sim.serial = BOOT_TEXT
        self.sims[vm_id.lower()] = sim
        self.double.route("GET", re.escape(vm_id) + "/instanceView", self.instance_view)
        self.double.route("POST", re.escape(vm_id) + "/retrieveBootDiagnosticsData", self.boot_diagnostics)
        return sim

    def sim(self, vm_id: str) -> SimVm:
        return self.sims[vm_id.lower()]

    def content(self, disk_id: str, disk: Any) -> Any:
        """Gives the disk `disk_id` content (an arm_guest.ImageDisk) the guest reads when it boots from it."""
        self.contents[disk_id.lower()] = disk
        return disk

    # ---- PUT VM ---------------------------------------------------------------------------------
    def put_vm(self, d: ArmDouble, req: Request, m: re.Match) -> Response:
        vm_id = m.group("vm_id")
        body = req.body if isinstance(req.body, dict) else {}
        stored = d.get(vm_id)
        if not body.get("location"):
            return error_response(400, "LocationRequired", "The location property is required for this definition.")
        props = body.get("properties") or {}
        storage = props.get("storageProfile") or {}
        if stored is None:
            return error_response(404, "ResourceNotFound", f"The Resource 'Microsoft.Compute/virtualMachines/{m.group('vm')}' "
                                                           "was not found.")
        sim = self.sims.get(vm_id.lower())
        refused = update_refusal(d, vm_id, body, stored, sim.power if sim else "running")
        if refused is not None:
            return refused
        old_storage = stored["properties"]["storageProfile"]
        old_os = (old_storage.get("osDisk") or {}).get("managedDisk", {}).get("id", "")
        new_os = ((storage.get("osDisk") or {}).get("managedDisk") or {}).get("id", "")
        old_data = data_disk_ids(old_storage)
        new_data = data_disk_ids(storage, skip_detaching=True)
        failure = sim.fail.pop(f"put-os-disk:{_leaf(new_os).lower()}", None) \
            if sim is not None and new_os and not ids.same(new_os, old_os) else None
        if failure is not None:
            return error_response(int(failure.get("status", 409)), failure["code"], failure["message"])
        # accepted: disks follow
        self._probe(sim)
        if new_os and not ids.same(new_os, old_os):
            self._holder(old_os, None)
            self._holder(new_os, vm_id)
        for disk_id in old_data - new_data:
            self._holder(disk_id, None)
        for disk_id in new_data - old_data:
            self._holder(disk_id, vm_id)
        new_props = dict(props)
        new_props["storageProfile"] = {**storage, "dataDisks": [dd for dd in storage.get("dataDisks") or []
                                                                if not dd.get("toBeDetached")]}
        new_props["provisioningState"] = "Updating"
        for key in ("vmId", "timeCreated"):
            if key in stored["properties"]:
                new_props[key] = stored["properties"][key]
        resource = {**{k: v for k, v in body.items() if k != "properties"}, "id": stored["id"], "name": stored["name"],
                    "type": stored["type"], "properties": new_props}
        d.put(vm_id, resource)
        if sim is not None:
            sim.history.append("put")

        def done() -> None:
            current = d.get(vm_id)
            if current is not None:
                current["properties"]["provisioningState"] = "Succeeded"

        headers = d.long_running(vm_id, on_done=done)
        return Response(200, resource, {"Azure-AsyncOperation": headers["Azure-AsyncOperation"], "Retry-After": "0"})

    def _probe(self, sim: SimVm | None) -> None:
        if sim is not None and self.write_probe is not None:
            self.probed.append(self.write_probe())

    def _holder(self, disk_id: str, vm_id: str | None) -> None:
        disk = self.double.get(disk_id)
        if disk is None:
            return
        if vm_id is None:
            disk.pop("managedBy", None)
            disk.setdefault("properties", {})["diskState"] = "Unattached"
        else:
            disk["managedBy"] = vm_id
            disk.setdefault("properties", {})["diskState"] = "Attached"

    # ---- power -----------------------------------------------------------------------------------
    def _power(self, op: str):
        def handler(d: ArmDouble, req: Request, m: re.Match) -> Response:
            vm_id = m.group("vm_id")
            if d.get(vm_id) is None:
                return d.not_found(vm_id)
            sim = self.sims.get(vm_id.lower())
            if sim is None:
                return error_response(409, "OperationNotAllowed", f"{op} is not simulated for {vm_id}")
            sim.history.append(op)
            self._probe(sim)
            failure = sim.fail.pop(op, None)
            if failure is not None:  # 202 with Location, Azure-AsyncOperation and Retry-After, as ARM answers
                return Response(202, None, d.long_running(vm_id, status="Failed", error=failure))
            if op == "powerOff":
                sim.skip_shutdown.append(req.query.get("skipShutdown", "false").lower() == "true")

            def done() -> None:
                if op == "deallocate":
                    sim.power = "deallocated"
                elif op == "powerOff":
                    sim.power = "stopped"
                else:
                    stored = d.get(vm_id) or {}
                    sim.power = "running"
                    sim.boot(stored["properties"]["storageProfile"]["osDisk"].get("managedDisk", {}).get("id"))
                    sim.serial = BOOT_TEXT  # a new boot starts a new serial log

            sim.power = {"deallocate": "deallocating", "powerOff": "stopping", "start": "starting"}[op]
            kind = "vm.start" if op in ("start", "restart") else "vm.deallocate"
            return Response(202, None, d.long_running(vm_id, on_done=done, kind=kind))

        return handler

    def instance_view(self, d: ArmDouble, req: Request, m: re.Match) -> Response:
        vm_id = req.path.rsplit("/instanceView", 1)[0]
        sim = self.sim(vm_id)
        display = {"running": "VM running", "deallocated": "VM deallocated", "stopped": "VM stopped",
                   "starting": "VM starting", "stopping": "VM stopping", "deallocating": "VM deallocating"}
        view = {
            "computerName": _leaf(vm_id), "osName": "Windows Server 2019 Datacenter", "osVersion": "10.0.17763",
            "hyperVGeneration": "V2",
            "statuses": [{"code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Provisioning succeeded",
                          "time": _now()},
                         {"code": f"PowerState/{sim.power}", "level": "Info",
                          "displayStatus": display.get(sim.power, sim.power)}],
        }
        if sim.power == "running":
            sim.views_since_start += 1
        if sim.agent and sim.power not in ("deallocated", "deallocating"):
            view["vmAgent"] = agent_view(sim.agent_ready(), sim.agent_version)
        return Response(200, view)

    # ---- boot diagnostics ----------------------------------------------------------------------
    def boot_diagnostics(self, d: ArmDouble, req: Request, m: re.Match) -> Response:
        vm_id = req.path.rsplit("/retrieveBootDiagnosticsData", 1)[0]
        sim = self.sim(vm_id)
        minutes = req.query.get("sasUriExpirationTimeInMinutes")
        if minutes is not None and not (minutes.isdigit() and 1 <= int(minutes) <= 1440):
            return error_response(400, "InvalidParameter",
                                  "The value of parameter sasUriExpirationTimeInMinutes is invalid.")
        if not sim.boot_diagnostics:
            return error_response(409, "OperationNotAllowed",
                                  f"Boot diagnostics is not enabled for VM '{_leaf(vm_id)}'.")
        if sim.power == "running":
            sim.reads_since_start += 1
            if sim.mode == "crash" and sim.crashing() and sim.reads_since_start > sim.crash_after:
                sim.bugcheck(d, "crash")
        name = _leaf(vm_id).lower()
        shot, log = f"{name}.0f47b100.screenshot.bmp", f"{name}.0f47b100.serialconsole.log"
        self.container.upload_blob(shot, sim.screenshot, overwrite=True)
        self.container.upload_blob(log, sim.serial.encode(), overwrite=True)
        return Response(200, {"consoleScreenshotBlobUri": self._sas(shot, int(minutes or 120)),
                              "serialConsoleLogBlobUri": self._sas(log, int(minutes or 120))})

    def _sas(self, blob: str, minutes: int) -> str:
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        token = generate_blob_sas(self.azurite.account, self.container.container_name, blob,
                                  account_key=self.azurite.key, permission=BlobSasPermissions(read=True),
                                  expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=minutes))
        return f"{self.azurite.blob_endpoint}/{self.container.container_name}/{urllib.parse.quote(blob)}?{token}"

    # ---- disks ---------------------------------------------------------------------------
    def delete_disk(self, d: ArmDouble, req: Request, m: re.Match) -> Response:
        disk = d.get(m.group("disk_id"))
        if disk is None:
            return Response(204)
        if disk.get("managedBy"):
            return error_response(409, "OperationNotAllowed",
                                  f"Disk {m.group('disk')} is attached to VM {disk['managedBy']}.")
        return Response(202, None, d.long_running(m.group("disk_id"), on_done=lambda: d.delete(m.group("disk_id"))))


# ---- a repair stack's disk copy and rescue VM wired to a broken VM ------------------------------------------------
def add_disk_copy(double: ArmDouble, original_id: str, *, resource_group: str, rescue_vm_id: str | None,
                  name: str = "crashcart-web-01-osdisk-copy", **overrides: Any) -> str:
    """A copy of `original_id` in the repair group, tagged by the kit, attached to the rescue VM (at LUN 0
    of its stored body) when `rescue_vm_id` is given. `overrides` replace disk properties (e.g.
    hyperVGeneration="V1") to make a mismatching copy."""
    original = double.get(original_id)
    assert original is not None, original_id
    sub = original_id.split("/")[2]
    copy_id = f"/subscriptions/{sub}/resourceGroups/{resource_group}/providers/Microsoft.Compute/disks/{name}"
    props = {k: v for k, v in original["properties"].items() if k not in ("diskState",)}
    props.update(creationData={"createOption": "Copy", "sourceResourceId": original_id}, **overrides)
    props["diskState"] = "Attached" if rescue_vm_id else "Unattached"
    disk = {"name": name, "id": copy_id, "type": "Microsoft.Compute/disks", "location": original["location"],
            "sku": dict(original["sku"]), "properties": props, "tags": {"crashcart": "repair"}}
    if original.get("zones") and not is_zone_redundant(original):  # a ZRS disk has no zone of its own
        disk["zones"] = list(original["zones"])
    if rescue_vm_id:
        disk["managedBy"] = rescue_vm_id
        rescue = double.get(rescue_vm_id)
        assert rescue is not None, rescue_vm_id
        rescue["properties"]["storageProfile"]["dataDisks"] = [
            {"lun": 0, "name": name, "createOption": "Attach", "caching": "None",
             "managedDisk": {"id": copy_id, "storageAccountType": original["sku"]["name"]}}]
    double.put(copy_id, disk)
    return copy_id


@dataclass
class World:
    """A broken VM, a deployed repair stack (rescue VM + disk copy at LUN 0) and the evidence container,
    all in the ARM double and Azurite; `outputs` is what `cdktf deploy repair --outputs-file` would hold."""

    ops: VmOps
    sim: SimVm
    vm_id: str
    original_disk_id: str
    copy_id: str
    rescue_vm_id: str
    outputs: dict[str, Any]

    def vm(self) -> dict:
        return self.ops.double.get(self.vm_id)

    def os_disk(self) -> str:
        return self.vm()["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"]

    def rescue_data_disks(self) -> list[str]:
        rescue = self.ops.double.get(self.rescue_vm_id)
        return [(d.get("managedDisk") or {}).get("id", "") for d in rescue["properties"]["storageProfile"]["dataDisks"]]

    def source_writes(self) -> list[Request]:
        """Every request that changed the source VM (PUT or POST other than reading boot diagnostics)."""
        return [r for r in self.ops.double.requests
                if r.path.lower().startswith(self.vm_id.lower()) and r.method in ("PUT", "POST", "PATCH", "DELETE")
                and not r.path.endswith("/retrieveBootDiagnosticsData")]


def repair_world(double: ArmDouble, azurite: Any, container: str, *, rescue_os: str = "linux",
                 copy_overrides: dict[str, Any] | None = None, controller: str = "SCSI",
                 sku: str = "Premium_LRS", copy_content: Any = None, **sim: Any) -> World:
    """`copy_content` (an arm_guest.ImageDisk): what the disk copy holds; the guest then decides from it whether a
    boot from the copy crashes (else the copy is marked to crash, `crash_disk`)."""
    from scripts.devkit.arm_compute import install_rescue_vm
    from scripts.devkit.arm_vm import add_broken_vm

    broken = add_broken_vm(double, controller=controller, sku=sku)
    rescue = install_rescue_vm(double, os_type="Linux" if rescue_os == "linux" else "Windows")
    stored_rescue, zones = double.get(rescue.id), (double.get(broken.vm_id) or {}).get("zones")
    if zones:  # the repair stack puts the rescue VM in the source's zone (stacks/rescue_vm.py)
        stored_rescue["zones"] = list(zones)
    # as the stack creates it (an image's OS disk): the double validates every PUT of it against the spec
    stored_rescue["properties"]["storageProfile"]["osDisk"].setdefault("createOption", "FromImage")
    ops = VmOps(double, azurite)
    copy_id = add_disk_copy(double, broken.disk_id, resource_group=rescue.resource_group, rescue_vm_id=rescue.id,
                            **(copy_overrides or {}))
    if copy_content is not None:
        ops.content(copy_id, copy_content)
    sim_vm = ops.add(broken.vm_id, **{"crash_disk": None if copy_content is not None else copy_id, **sim})
    sub = broken.subscription_id
    outputs = {
        "subscription_id": sub, "resource_group_name": rescue.resource_group, "rescue_vm_id": rescue.id,
        "rescue_vm_name": rescue.name, "rescue_vm_principal_id": "5b0e4c3a-0000-0000-0000-0000000000aa",
        "rescue_os": rescue_os, "disk_copy_id": copy_id, "disk_copy_lun": 0,
        "snapshot_id": f"/subscriptions/{sub}/resourceGroups/{rescue.resource_group}/providers/Microsoft.Compute/"
                       "snapshots/crashcart-web-01-snapshot",
        "source_vm_id": broken.vm_id, "source_os_disk_id": broken.disk_id,
        "evidence_account_name": azurite.account, "evidence_blob_endpoint": azurite.blob_endpoint,
        "evidence_container": container,
    }
    return World(ops, sim_vm, broken.vm_id, broken.disk_id, copy_id, rescue.id, outputs)


def write_config(path: Any, world: World, *, memory_gb: float = 16.0, **source: Any) -> Any:
    """A repair.toml for the world's broken VM (what `discover` would write), evidence in the test container."""
    from scripts.config.model import Config, render_toml

    o = world.outputs
    data = {
        "source": {"subscription_id": o["subscription_id"], "resource_group": "prod-web", "vm_name": "web-01",
                   "location": "westeurope", "zone": "1", "os_disk_id": o["source_os_disk_id"], "os_disk_size_gb": 127,
                   "hyper_v_generation": "V2", "security_type": "TrustedLaunch", "disk_controller": "SCSI",
                   "vm_size": "Standard_D4s_v5", "memory_gb": memory_gb, **source},
        "rescue": {"os": o["rescue_os"]},
        "evidence": {"container": o["evidence_container"]},
        "repair": {"resource_group": o["resource_group_name"], "collect_timeout_minutes": 5},
    }
    path.write_text(render_toml(Config.from_dict(data)))
    return path


def write_outputs(path: Any, world: World) -> Any:
    """The file `cdktf deploy repair --outputs-file` writes."""
    import json

    path.write_text(json.dumps({"repair": world.outputs}))
    return path
