"""A loopback HTTP server that answers like Azure Resource Manager, for driving the real azure-mgmt-* clients.

What it implements is ARM's REST contract, not our code's expectations:
- every request must carry an `api-version` the resource provider publishes, else 400
  `InvalidApiVersionParameter` / `MissingApiVersionParameter`, as ARM answers;
- every request is authorized as ARM authorizes it (scripts/devkit/arm_rbac.py): its operation name and
  scope are derived from the method and path, and anything the caller's role assignments (`rbac`, by
  default the pipeline identity README documents: scripts/azure/roles/*.json) do not grant is refused
  with 403 `AuthorizationFailed` and ARM's message naming the client, the action and the scope. A path
  with no ARM operation is refused 501 `UnmappedOperation` (a new call cannot slip past RBAC); paths
  under `/_` are the devkit's stand-ins for services that are not ARM (the serial console's host);
- every request body the kit sends (VM, run command, snapshot and resource group PUT, beginGetAccess) is validated
  against the Azure REST API spec of its api-version (scripts/devkit/arm_schema.py, specs vendored in
  scripts/devkit/specs/): an unknown member, a wrong type, a value outside an enum or a missing required
  member is refused 400 with the code and message ARM or the Compute provider answers;
- resources live in a store keyed by their (case-insensitive) resource ID; GET of a missing one is 404
  `ResourceNotFound` (or `ResourceGroupNotFound`); scopes listed in `forbidden` answer 403 as if no role
  granted anything there; errors have ARM's body `{"error": {"code", "message"}}`;
- long-running operations (PUT/POST/DELETE routes that say so) answer 201/202 with
  `Azure-AsyncOperation` and `Location` headers pointing at ARM's status URL for the resource's region
  (`/subscriptions/{s}/providers/Microsoft.Compute/locations/{l}/operations/{id}`, or `DiskOperations`
  for disks); the status reports `InProgress` for `lro_polls` polls, and for as long as the operation's
  kind takes in the double's duration profile (`Durations`, below), then `Succeeded` (or the failure the
  route chose); while it runs, `Retry-After` says the whole seconds left, as ARM's does.

Routes are added per test need with `route(method, pattern, handler)`; `requests` records every call
(method, path, query, body) so a test can assert what was, and was not, called.
Response shapes follow the examples in azure-rest-api-specs (specification/compute/...).

How long things take (`Durations`): by default nothing takes time (scale 0: tests stay fast). With
`Durations.azure_like(scale)` an operation of a modelled kind stays InProgress (a resource it creates in
provisioningState Creating, a run command's execution Running) for its Azure duration times `scale` -
e.g. 1/20 plays a 3-minute deploy in 9 s - so a fleet of doubled VMs waits, as it would on Azure, instead
of spending every second on CPU. The figures (AZURE_SECONDS) are typical, for a Windows Server 2022
rescue VM of size D4s_v5 in one region, from documented limits and commonly observed timings:
  deploy                 180 s  the repair stack (resource group, snapshot, disk copy, network, the Windows
                                rescue VM until its agent is Ready): a Windows VM's create returns once OS
                                provisioning ends (azurerm waits for it), commonly 2-4 minutes
  run_command.create      30 s  a managed Run Command's PUT until provisioningState Succeeded (the Run
                                Command handler extension installed and started), commonly 20-60 s
  run_command.execution   90 s  the collect script: mounting the copy and reading the dump at the disk's
                                documented throughput (Premium SSD P10: 100 MB/s, Standard SSD E10: 60 MB/s,
                                "Azure managed disk types") - a 2-8 GiB kernel dump - and its upload
  run_command.delete      10 s  removing the run command (the handler's cleanup)
  vm.start                60 s  start or restart of a Windows VM until Running, commonly 40-90 s (for
                                scripts/devkit/arm_vmops.py: `long_running(..., kind="vm.start")`)
  vm.deallocate           60 s  deallocate (stop) of a Windows VM, commonly 30-90 s (kind="vm.deallocate")
  destroy                240 s  the repair stack's deletion (the VM first, then disks and network; azurerm
                                deletes the resource group last), commonly 3-5 minutes
Whoever plays the operation asks `durations.of(kind)`: this module for its long-running operations,
scripts/devkit/arm_compute.py for a run command's execution, tests/run/fleetkit.py for terraform's apply and
destroy (the fake terraform's FAKE_TF_SLEEP: the VM is created by terraform, not through this double).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from scripts.devkit import arm_schema
from scripts.devkit.arm_rbac import Rbac, denial_message

# api-versions the double accepts per provider family (the SDK pins one of each; ARM accepts any published).
# Fixed for the life of the process: a route module must not add to it (a version one test needs would then
# be accepted for every later test and every resource type).
API_VERSIONS: dict[str, frozenset[str]] = {
    # 2021-07-01: ResourceSkus_List as azure-mgmt-compute sends it (a published Microsoft.Compute version).
    "compute": frozenset({"2021-07-01", "2023-03-01", "2023-07-01", "2023-09-01", "2024-03-01", "2024-07-01",
                          "2024-11-01", "2025-04-01", "2026-04-01"}),
    "disks": frozenset({"2023-04-02", "2023-10-02", "2024-03-02", "2025-01-02", "2026-03-02"}),
    "resources": frozenset({"2021-04-01", "2022-09-01", "2024-03-01", "2024-11-01", "2025-04-01"}),
    "serialconsole": frozenset({"2018-05-01"}),
    # azure-mgmt-authorization 4.0's default profile (DEFAULT_API_VERSION; Permissions_List*).
    "authorization": frozenset({"2022-04-01"}),
    # azure-mgmt-resourcegraph's client default (Resources, the stable resourcegraph.json).
    "resourcegraph": frozenset({"2021-03-01"}),
}
DEFAULT_LOCATION = "westeurope"
_FAMILIES = {"microsoft.serialconsole": "serialconsole", "microsoft.authorization": "authorization",
             "microsoft.resourcegraph": "resourcegraph", "microsoft.compute": "compute"}
_DISK_TYPES = ("disks", "snapshots", "diskaccesses")


def api_family(path: str) -> str:
    """The provider family whose api-versions a request to `path` must use. ARM routes by the LAST provider
    namespace in the path: an extension resource (`{disk}/providers/Microsoft.Authorization/permissions`)
    belongs to its own provider, not the resource it extends; `/subscriptions/{s}/providers/{ns}` with no
    resource type after the namespace is Microsoft.Resources (Providers_Get); a path without a provider too."""
    segments = [s.lower() for s in path.split("/") if s]
    at = max((i for i, s in enumerate(segments) if s == "providers"), default=-1)
    if at < 0 or len(segments) < at + 3:
        return "resources"
    family = _FAMILIES.get(segments[at + 1], "resources")
    types = segments[at + 2:]
    # Disks, snapshots and their async operations belong to the disk resource provider's own versions.
    if family == "compute" and (types[0] in _DISK_TYPES
                                or (types[0] == "locations" and len(types) > 2 and types[2] == "diskoperations")):
        return "disks"
    return family


AZURE_SECONDS: dict[str, float] = {  # see the module's docstring for where each figure comes from
    "deploy": 180.0, "run_command.create": 30.0, "run_command.execution": 90.0, "run_command.delete": 10.0,
    "vm.start": 60.0, "vm.deallocate": 60.0, "destroy": 240.0,
}


@dataclass(frozen=True)
class Durations:
    """How long each kind of operation takes in the doubles: its Azure seconds times `scale` (0: at once)."""

    seconds: Mapping[str, float] = field(default_factory=dict)
    scale: float = 0.0

    @classmethod
    def azure_like(cls, scale: float) -> "Durations":
        return cls(dict(AZURE_SECONDS), scale)

    def of(self, kind: str | None) -> float:
        return float(self.seconds.get(kind, 0.0)) * self.scale if kind else 0.0

    def per_vm(self) -> float:
        """What one VM's collection waits in all (deploy, run command, destroy), at this scale."""
        return sum(self.of(k) for k in ("deploy", "run_command.create", "run_command.execution",
                                        "run_command.delete", "destroy"))


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]


@dataclass
class Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[["ArmDouble", Request, re.Match], Response]


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str) -> Response:
    return Response(status, {"error": {"code": code, "message": message}})


class ArmDouble:
    def __init__(self, lro_polls: int = 1, rbac: Rbac | None = None, durations: Durations | None = None):
        self.durations = durations or Durations()
        self.resources: dict[str, dict] = {}
        self.forbidden: set[str] = set()
        self.requests: list[Request] = []
        self.unmapped: list[str] = []  # "METHOD path" of every request that had no ARM operation
        self.rbac = rbac if rbac is not None else Rbac.pipeline()
        self.lro_polls = lro_polls
        self._routes: list[tuple[str, re.Pattern, Handler]] = []
        self._operations: dict[str, dict] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.route("GET", r"/subscriptions/[^/]+/providers/Microsoft\.Compute/locations/[^/]+/(Disk)?Operations/"
                          r"(?P<op>[0-9a-f]+)", lambda d, req, m: d.operation_status(req, m))

    # ---- store -------------------------------------------------------------------------------
    def put(self, resource_id: str, body: dict) -> dict:
        with self._lock:
            body = dict(body)
            body.setdefault("id", resource_id)
            self.resources[resource_id.lower()] = body
            return body

    def get(self, resource_id: str) -> dict | None:
        return self.resources.get(resource_id.lower())

    def delete(self, resource_id: str) -> dict | None:
        with self._lock:
            return self.resources.pop(resource_id.lower(), None)

    def children(self, parent_id: str, type_segment: str) -> list[dict]:
        prefix = f"{parent_id.lower()}/{type_segment.lower()}/"
        return [r for k, r in self.resources.items() if k.startswith(prefix) and "/" not in k[len(prefix):]]

    def calls(self, method: str | None = None, contains: str = "") -> list[Request]:
        return [r for r in self.requests
                if (method is None or r.method == method) and contains.lower() in r.path.lower()]

    # ---- routing -----------------------------------------------------------------------------
    def route(self, method: str, pattern: str, handler: Handler) -> None:
        """`pattern` is a regex matched (case-insensitively, whole) against the URL path."""
        self._routes.insert(0, (method.upper(), re.compile(pattern, re.IGNORECASE), handler))

    def long_running(self, resource_id: str, status: str = "Succeeded", result: Any = None, error: dict | None = None,
                     polls: int | None = None, on_done: Callable[[], None] | None = None,
                     kind: str | None = None) -> dict[str, str]:
        """Registers an async operation on `resource_id` and returns the headers that announce it
        (Azure-AsyncOperation and Location), as ARM does on 201/202: the compute resource provider's status
        URL in the resource's region (DiskOperations for disks and snapshots). `kind` (AZURE_SECONDS' keys)
        keeps it InProgress for as long as the duration profile says."""
        op_id = uuid.uuid4().hex
        self._operations[op_id] = {"remaining": self.lro_polls if polls is None else polls,
                                   "status": status, "result": result, "error": error, "on_done": on_done,
                                   "until": time.monotonic() + self.durations.of(kind)}
        subscription = resource_id.strip("/").split("/")[1]
        stored = self.get(resource_id) or {}
        parent = self.get(resource_id.rsplit("/", 2)[0]) or {}
        location = str(stored.get("location") or parent.get("location") or DEFAULT_LOCATION).replace(" ", "").lower()
        kind = "DiskOperations" if api_family(resource_id) == "disks" else "operations"
        path = f"/subscriptions/{subscription}/providers/Microsoft.Compute/locations/{location}/{kind}/{op_id}"
        version = max(API_VERSIONS[api_family(path)])
        url = f"{self.url}{path}?api-version={version}"
        return {"Azure-AsyncOperation": url, "Location": url, "Retry-After": "0"}

    def operation_status(self, req: Request, match: re.Match) -> Response:
        """GET of an async operation's status URL (routes that keep their own operations fall back to it)."""
        op = self._operations.get(match.group("op"))
        if op is None:
            return error_response(404, "OperationNotFound", "no such operation")
        left = op["until"] - time.monotonic()
        if op["remaining"] > 0 or left > 0:
            op["remaining"] = max(0, op["remaining"] - 1)
            return Response(200, {"status": "InProgress"}, {"Retry-After": str(max(0, math.floor(left)))})
        if op["on_done"] is not None:
            op["on_done"]()
            op["on_done"] = None
        body: dict[str, Any] = {"status": op["status"]}
        if op["error"]:
            body["error"] = op["error"]
        if op["result"] is not None and op["status"] == "Succeeded":
            # Location polling ends on the final resource; AsyncOperation polling on the status body.
            body.update(properties={"output": op["result"]})
        return Response(200, body)

    # ---- server ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "ArmDouble":
        double = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                double._dispatch(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> "ArmDouble":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        parsed = urllib.parse.urlsplit(h.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw
        req = Request(h.command, urllib.parse.unquote(parsed.path), query, body, dict(h.headers.items()))
        with self._lock:
            self.requests.append(req)
        resp = self._respond(req)
        payload = b"" if resp.body is None else json.dumps(resp.body).encode()
        h.send_response(resp.status)
        h.send_header("Content-Type", "application/json; charset=utf-8")
        h.send_header("Content-Length", str(len(payload)))
        h.send_header("x-ms-request-id", str(uuid.uuid4()))
        for k, v in resp.headers.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)

    def _respond(self, req: Request) -> Response:
        if req.path.startswith("/_"):  # the devkit's stand-ins for hosts that are not ARM
            return self._route(req)
        family = api_family(req.path)
        version = req.query.get("api-version")
        if not version:
            return error_response(400, "MissingApiVersionParameter",
                                  "The api-version query parameter (?api-version=) is required for all requests.")
        if version not in API_VERSIONS[family]:
            return error_response(
                400, "InvalidApiVersionParameter",
                f"The api-version '{version}' is invalid. The supported versions are "
                f"'{','.join(sorted(API_VERSIONS[family]))}'.")
        decision = self.rbac.decide(req.method, req.path)
        if decision.operation is None:
            with self._lock:
                self.unmapped.append(f"{req.method} {req.path}")
            return error_response(
                501, "UnmappedOperation",
                f"The ARM double has no RBAC operation for {req.method} {req.path}: ARM serves no such path, or "
                "scripts/devkit/arm_rbac.py must learn to name it before the double serves it.")
        forbidden = any(req.path.lower().startswith(f.lower()) for f in self.forbidden)
        if forbidden or not decision.allowed:
            return error_response(403, "AuthorizationFailed", denial_message(self.rbac.principal_id, decision.operation))
        refusal = arm_schema.check(req.method, req.path, version, req.body)
        if refusal is not None:
            return Response(refusal.status, refusal.body())
        return self._route(req)

    def _route(self, req: Request) -> Response:
        for method, pattern, handler in self._routes:
            if method != req.method:
                continue
            m = pattern.fullmatch(req.path)
            if m:
                try:
                    return handler(self, req, m)
                except ArmError as err:
                    return error_response(err.status, err.code, err.message)
        if req.method == "GET":
            found = self.get(req.path)
            if found is not None:
                return Response(200, found)
            return self.not_found(req.path)
        return error_response(404, "NotFound", f"no route for {req.method} {req.path}")

    def not_found(self, resource_id: str) -> Response:
        m = re.match(r"(?i)/subscriptions/[^/]+/resourceGroups/([^/]+)", resource_id)
        if m and not any(k.startswith(f"{m.group(0).lower()}") and k != m.group(0).lower()
                         for k in self.resources) and self.get(m.group(0)) is None:
            return error_response(404, "ResourceGroupNotFound", f"Resource group '{m.group(1)}' could not be found.")
        parts = resource_id.strip("/").split("/")
        return error_response(
            404, "ResourceNotFound",
            f"The Resource '{'/'.join(parts[-3:-2] + parts[-2:])}' under resource group "
            f"'{m.group(1) if m else '?'}' was not found. For more details please go to "
            "https://aka.ms/ARMResourceNotFoundFix")
