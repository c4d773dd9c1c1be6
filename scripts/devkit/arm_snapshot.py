"""Snapshots in the ARM double: create, get, delete, and the export SAS (grant / revoke access).

Shapes follow azure-rest-api-specs, Microsoft.Compute DiskRP (stable/2024-03-02 examples,
snapshotExamples/Snapshot_BeginGetAccess.json, Snapshot_EndGetAccess.json, Snapshot_Create_ByImportingAnUnmanagedBlob...):

- `POST .../snapshots/{name}/beginGetAccess` with `{"access": "Read", "durationInSeconds": N}` answers
  202 with `Azure-AsyncOperation` and `Location` (a `DiskOperations/{id}` URL, `monitor=true` on the
  Location one). The operation status is `InProgress` for `polls` polls, then `Succeeded` with
  `properties.output = {"accessSAS": ...}`; the Location URL answers 202 until then and finally 200 with
  the AccessUri body `{"accessSAS": "https://md-....blob.storage.azure.net/.../abcd?sv=...&sig=..."}`,
  which is where azure-mgmt-compute's poller reads the result (final-state-via location for a POST);
- `POST .../endGetAccess` answers 202 with a Location, then 200 with no body;
- `PUT .../snapshots/{name}` (createOption Copy from a disk in the store) answers 202 with the body and an
  Azure-AsyncOperation; `DELETE` answers 202 with a Location, or 204 when there is nothing to delete;
- what ARM refuses: a grant on a snapshot whose networkAccessPolicy is DenyAll (409
  OperationNotAllowed), a delete while an export SAS is active (409), a body without access or with a
  non-positive duration (400 InvalidParameter).

The SAS handed out is whatever `exporter(snapshot_id, snapshot)` returns: in tests and the demo, a read
SAS URL of an Azurite page blob holding the disk image as a fixed VHD. `SnapshotRoutes` records every
grant, revoke, create and delete so a test can assert that access was always revoked.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scripts.devkit.armdouble import API_VERSIONS, ArmDouble, Request, Response, api_family, error_response

_SNAPSHOT = (r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Compute"
             r"/snapshots/(?P<name>[^/]+)")
_OPERATION = r"/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.Compute/locations/(?P<loc>[^/]+)/DiskOperations/(?P<op>[0-9a-f]+)"

Exporter = Callable[[str, dict], str]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f0+00:00")


@dataclass
class _Operation:
    remaining: int
    output: Any = None  # the AccessUri body for a grant
    error: dict | None = None
    on_done: Callable[[], None] | None = None
    done: bool = False


@dataclass
class SnapshotRoutes:
    double: ArmDouble
    exporter: Exporter
    polls: int = 1
    grants: list[dict] = field(default_factory=list)  # {"snapshot", "access", "duration", "sas"}
    revokes: list[str] = field(default_factory=list)  # snapshot IDs, in order
    creates: list[str] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    active: set[str] = field(default_factory=set)  # snapshot IDs (lower case) with an export SAS out
    fail_grant: dict | None = None  # {"code", "message"}: the grant operation ends Failed with this error
    fail_revoke: tuple[int, str] | None = None  # (status, code): endGetAccess is refused
    _ops: dict[str, _Operation] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- operations (Azure-AsyncOperation status and Location monitor) ------------------------------------
    def _start(self, req: Request, sub: str, location: str, **kwargs: Any) -> dict[str, str]:
        op_id = uuid.uuid4().hex
        self._ops[op_id] = _Operation(remaining=self.polls, **kwargs)
        path = f"/subscriptions/{sub}/providers/Microsoft.Compute/locations/{location}/DiskOperations/{op_id}"
        family = API_VERSIONS.get(api_family(path)) or {req.query.get("api-version", "")}
        version = req.query.get("api-version") if req.query.get("api-version") in family else sorted(family)[-1]
        base = f"{self.double.url}{path}?p={uuid.uuid4()}&api-version={version}"
        return {"Azure-AsyncOperation": base, "Location": base + "&monitor=true", "Retry-After": "0"}

    def _advance(self, op: _Operation) -> None:
        if op.remaining > 0:
            op.remaining -= 1
            return
        if not op.done:
            op.done = True
            if op.on_done is not None and op.error is None:
                op.on_done()

    def operation(self, d: ArmDouble, req: Request, m: re.Match) -> Response:
        op = self._ops.get(m.group("op"))
        if op is None:  # one of the double's own (a disk delete)
            return d.operation_status(req, m)
        with self._lock:
            self._advance(op)
        monitor = req.query.get("monitor") == "true"
        if not op.done:
            if monitor:
                return Response(202, None, {"Location": f"{d.url}{req.path}?{_query(req)}", "Retry-After": "0"})
            return Response(200, {"startTime": _now(), "status": "InProgress", "name": m.group("op")}, {"Retry-After": "0"})
        if op.error is not None:
            body = {"startTime": _now(), "endTime": _now(), "status": "Failed", "name": m.group("op"), "error": op.error}
            return Response(200, body)
        if monitor:
            return Response(200, op.output) if op.output is not None else Response(200, None)
        body = {"startTime": _now(), "endTime": _now(), "status": "Succeeded", "name": m.group("op")}
        if op.output is not None:
            body["properties"] = {"output": op.output}
        return Response(200, body)

    # ---- snapshots ------------------------------------------------------------------------------------------
    @staticmethod
    def _id(m: re.Match) -> str:
        return (f"/subscriptions/{m.group('sub')}/resourceGroups/{m.group('rg')}/providers/Microsoft.Compute"
                f"/snapshots/{m.group('name')}")

    def create(self, d: ArmDouble, req: Request, m: re.Match) -> Response:
        body = req.body if isinstance(req.body, dict) else {}
        props = body.get("properties") or {}
        creation = props.get("creationData") or {}
        if not body.get("location"):
            return error_response(400, "LocationRequired", "The location property is required for this definition.")
        if creation.get("createOption") not in ("Copy", "CopyStart"):
            return error_response(400, "InvalidParameter", "creationData.createOption must be Copy for a snapshot of a disk.")
        source = d.get(str(creation.get("sourceResourceId", "")))
        if source is None:
            return error_response(404, "NotFound", f"Resource {creation.get('sourceResourceId')} is not found.")
        snapshot_id = self._id(m)
        src = source.get("properties") or {}
        resource = {
            "name": m.group("name"), "id": snapshot_id, "type": "Microsoft.Compute/snapshots",
            "location": body["location"], "tags": body.get("tags") or {},
            "sku": body.get("sku") or {"name": "Standard_LRS", "tier": "Standard"},
            "properties": {
                "osType": src.get("osType"), "hyperVGeneration": src.get("hyperVGeneration"),
                "creationData": {"createOption": creation["createOption"], "sourceResourceId": creation["sourceResourceId"],
                                 "sourceUniqueId": str(uuid.uuid4())},
                "diskSizeGB": src.get("diskSizeGB"), "diskSizeBytes": src.get("diskSizeBytes"),
                "incremental": bool(props.get("incremental", False)), "timeCreated": _now(),
                "networkAccessPolicy": props.get("networkAccessPolicy", "AllowAll"),
                "publicNetworkAccess": props.get("publicNetworkAccess", "Enabled"),
                "diskState": "Unattached", "provisioningState": "Creating",
                # what the body asks for; without it the double keeps a platform key (Azure's default for a
                # snapshot of a platform-key disk; for a CMK source crashcart always names the source's set)
                "encryption": props.get("encryption") or {"type": "EncryptionAtRestWithPlatformKey"},
            },
        }
        for key in ("dataAccessAuthMode", "diskAccessId", "securityProfile"):
            if props.get(key) is not None:
                resource["properties"][key] = props[key]
        if src.get("securityProfile") and "securityProfile" not in resource["properties"]:
            resource["properties"]["securityProfile"] = src["securityProfile"]
        d.put(snapshot_id, resource)
        self.creates.append(snapshot_id)

        def provisioned() -> None:
            resource["properties"]["provisioningState"] = "Succeeded"

        headers = self._start(req, m.group("sub"), body["location"], on_done=provisioned)
        headers.pop("Location")
        return Response(202, resource, headers)

    def delete(self, d: ArmDouble, req: Request, m: re.Match) -> Response:
        snapshot_id = self._id(m)
        found = d.get(snapshot_id)
        if found is None:
            return Response(204)
        if snapshot_id.lower() in self.active:
            return error_response(409, "OperationNotAllowed",
                                  f"Snapshot {m.group('name')} is currently being exported (it has an active SAS). "
                                  "Revoke access before deleting it.")
        self.deletes.append(snapshot_id)
        headers = self._start(req, m.group("sub"), found.get("location", "westeurope"),
                              on_done=lambda: d.delete(snapshot_id))
        headers.pop("Azure-AsyncOperation")
        return Response(202, None, headers)

    def grant(self, d: ArmDouble, req: Request, m: re.Match) -> Response:
        snapshot_id = self._id(m)
        found = d.get(snapshot_id)
        if found is None:
            return d.not_found(snapshot_id)
        body = req.body if isinstance(req.body, dict) else {}
        access, duration = body.get("access"), body.get("durationInSeconds")
        if access not in ("Read", "Write"):
            return error_response(400, "InvalidParameter", "The value of parameter grantAccessData.access is invalid.")
        if not isinstance(duration, int) or duration <= 0:
            return error_response(400, "InvalidParameter",
                                  "The value of parameter grantAccessData.durationInSeconds is invalid.")
        props = found.setdefault("properties", {})
        if props.get("networkAccessPolicy") == "DenyAll":
            return error_response(409, "OperationNotAllowed",
                                  f"Operation 'beginGetAccess' is not allowed on snapshot {m.group('name')} because its "
                                  "network access policy is DenyAll.")
        sas = self.exporter(snapshot_id, found)
        with self._lock:
            self.grants.append({"snapshot": snapshot_id, "access": access, "duration": duration, "sas": sas})
            self.active.add(snapshot_id.lower())

        def granted() -> None:
            props["diskState"] = "ActiveSAS"

        headers = self._start(req, m.group("sub"), found.get("location", "westeurope"), output={"accessSAS": sas},
                              error=self.fail_grant, on_done=granted)
        return Response(202, None, headers)

    def revoke(self, d: ArmDouble, req: Request, m: re.Match) -> Response:
        snapshot_id = self._id(m)
        found = d.get(snapshot_id)
        if found is None:
            return d.not_found(snapshot_id)
        if self.fail_revoke is not None:
            return error_response(self.fail_revoke[0], self.fail_revoke[1], "injected failure")
        with self._lock:
            self.revokes.append(snapshot_id)

        def revoked() -> None:
            self.active.discard(snapshot_id.lower())
            found.setdefault("properties", {})["diskState"] = "Unattached"

        headers = self._start(req, m.group("sub"), found.get("location", "westeurope"), on_done=revoked)
        headers.pop("Azure-AsyncOperation")
        return Response(202, None, headers)

    def revoked(self, snapshot_id: str) -> bool:
        return snapshot_id.lower() in (s.lower() for s in self.revokes) and snapshot_id.lower() not in self.active


def _query(req: Request) -> str:
    return "&".join(f"{k}={v}" for k, v in req.query.items())


def install_snapshot_routes(double: ArmDouble, exporter: Exporter, *, polls: int = 1) -> SnapshotRoutes:
    routes = SnapshotRoutes(double, exporter, polls)
    double.route("GET", _OPERATION, routes.operation)
    double.route("PUT", _SNAPSHOT, routes.create)
    double.route("DELETE", _SNAPSHOT, routes.delete)
    double.route("POST", _SNAPSHOT + "/beginGetAccess", routes.grant)
    double.route("POST", _SNAPSHOT + "/endGetAccess", routes.revoke)
    return routes


def add_snapshot(double: ArmDouble, disk_id: str, name: str = "web-01-crashcart-snapshot",
                 resource_group: str = "crashcart-repair-web-01", *, network_access_policy: str = "AllowAll",
                 data_access_auth_mode: str | None = None) -> str:
    """A snapshot as the repair stack leaves it (for tests that reuse `snapshot_id`)."""
    disk = double.get(disk_id) or {}
    sub = disk_id.split("/")[2]
    snapshot_id = f"/subscriptions/{sub}/resourceGroups/{resource_group}/providers/Microsoft.Compute/snapshots/{name}"
    props = disk.get("properties") or {}
    body: dict[str, Any] = {
        "name": name, "id": snapshot_id, "type": "Microsoft.Compute/snapshots", "location": disk.get("location", "westeurope"),
        "sku": {"name": "Standard_LRS", "tier": "Standard"}, "tags": {"crashcart": "repair"},
        "properties": {"creationData": {"createOption": "Copy", "sourceResourceId": disk_id},
                       "diskSizeGB": props.get("diskSizeGB", 127), "diskSizeBytes": props.get("diskSizeBytes", 127 << 30),
                       "osType": props.get("osType", "Windows"), "hyperVGeneration": props.get("hyperVGeneration", "V2"),
                       "incremental": False, "networkAccessPolicy": network_access_policy,
                       "publicNetworkAccess": "Enabled", "diskState": "Unattached", "provisioningState": "Succeeded",
                       "timeCreated": _now()},
    }
    if data_access_auth_mode:
        body["properties"]["dataAccessAuthMode"] = data_access_auth_mode
    double.put(snapshot_id, body)
    return snapshot_id


# ---- the disk behind the SAS ------------------------------------------------------------------------------
def export_page_blob(azurite: Any, image: Any, *, container: str = "disk-exports", name: str | None = None,
                     footer: bytes | None = None, hours: int = 4) -> str:
    """Uploads a raw disk image as a page blob in the fixed-VHD form Azure exports (the raw disk, then the
    512-byte footer) and returns a read SAS URL for it: what `accessSAS` points at. Only non-zero 4 MiB
    ranges are written (an unwritten page reads as zeros), so a mostly empty disk uploads fast."""
    from pathlib import Path

    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobSasPermissions, generate_blob_sas

    from scripts.devkit.gptdisk import fixed_vhd_footer

    path = Path(getattr(image, "path", image))
    size = path.stat().st_size
    if size % 512:
        raise ValueError("a disk image is a whole number of 512-byte sectors")
    service = azurite.service_client()
    try:
        service.create_container(container)
    except ResourceExistsError:
        pass
    name = name or f"{path.stem}-{uuid.uuid4().hex[:8]}.vhd"
    blob = service.get_blob_client(container, name)
    blob.create_page_blob(size=size + 512)
    chunk = 4 << 20
    zero = bytes(chunk)
    with open(path, "rb") as f:
        at = 0
        while data := f.read(chunk):
            if data != zero[:len(data)]:
                blob.upload_page(data, offset=at, length=len(data))
            at += len(data)
    blob.upload_page(footer or fixed_vhd_footer(size), offset=size, length=512)
    token = generate_blob_sas(azurite.account, container, name, account_key=azurite.key,
                              permission=BlobSasPermissions(read=True),
                              expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=hours))
    return f"{blob.url}?{token}"
