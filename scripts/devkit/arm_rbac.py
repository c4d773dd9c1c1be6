"""RBAC in the ARM double: every request is an operation (an action on a scope), served only when the
caller's role assignments grant it, and refused as Azure Resource Manager refuses it.

The operation of a request is derived the way ARM names its operations, from the resource type in the
path and the HTTP method (the names in "Azure resource provider operations"):

- a resource (`.../providers/{ns}/{type}/{name}[/{type}/{name}...]`): GET/HEAD -> `{ns}/{types}/read`,
  PUT/PATCH -> `.../write`, DELETE -> `.../delete`;
- one more segment after a resource: GET -> `{ns}/{types}/{segment}/read` (a child collection such as
  `runCommands`, or a view such as `instanceView`), POST -> `{ns}/{types}/{segment}/action` (powerOff,
  beginGetAccess, retrieveBootDiagnosticsData, ...);
- paths without a provider belong to Microsoft.Resources (`/subscriptions/{s}/resourcegroups/{g}` ->
  `Microsoft.Resources/subscriptions/resourceGroups/read`), an extension resource to the last provider
  in its path (`{vm}/providers/Microsoft.SerialConsole/serialPorts/0/connect` ->
  `Microsoft.SerialConsole/serialPorts/connect/action`);
- `GET /subscriptions/{s}/providers/{ns}` (Providers_Get, no resource type after the namespace) ->
  `Microsoft.Resources/subscriptions/providers/read` on the subscription;
- `POST /providers/Microsoft.ResourceGraph/resources` (a Resource Graph query) ->
  `Microsoft.ResourceGraph/resources/read` at scope "/": granted to any authenticated caller, Resource
  Graph filtering the rows by the caller's read access (see `Rbac.decide`);
- an operation's status URL is read like any resource (`.../locations/{l}/operations/{id}` ->
  `Microsoft.Compute/locations/operations/read`): Azure requires that permission to track an
  asynchronous operation ("Track asynchronous Azure operations": the status URL is not scoped to the
  resource). The double checks it on the status URL itself, under the subscription.

A request that fits none of these has no operation: the double answers it 501 UnmappedOperation, so no
call can reach a route without an RBAC decision. The scope is the resource the action is on (for a
collection, its parent). Names are spelled as the roles data spells them (scripts.azure.roles.canonical).

`Rbac.pipeline()` is the pipeline identity README documents: the operator role on the subscription, the
evidence-side roles on the evidence container, and for every broken VM the world adds (`add_source`) the
source-side roles on its resource group and OS disk. `Rbac.decisions` keeps every decision (action,
scope, the roles that granted it) for tests that ask what a verb needed.

Other principals and propagation. `Rbac.add(principal, role, scope)` records an assignment made long before
(e.g. by the owner, before the run); `Rbac.assign(...)` one created *now* at run time (the repair stack's
`azurerm_role_assignment` of the rescue VM's identity on the evidence container). Azure stores a new
assignment at once but honours it only after it has propagated ("Troubleshoot Azure RBAC": changes can
take up to 10 minutes): until `propagation_s` has passed on `clock`, it grants nothing, so ARM answers
403 AuthorizationFailed and Blob storage 403 AuthorizationPermissionMismatch ("This request is not
authorized to perform this operation using this permission.") - `decide_data` is that data-plane
decision (data actions such as `.../containers/blobs/write`, on a blob's scope: `blob_scope(url)`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from scripts.azure import roles

SUBSCRIPTION = "00000000-0000-0000-0000-000000000001"  # the devkit world's subscription (arm_vm.SUB)
PIPELINE_PRINCIPAL = "7d2f6b1c-0000-0000-0000-00000000c0de"  # the pipeline identity's object ID in the double
EVIDENCE_CONTAINER = (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/crashcart-evidence/providers/Microsoft.Storage/"
                      "storageAccounts/crashcartevidence/blobServices/default/containers/dumps")
STATE_CONTAINER = (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/crashcart-state/providers/Microsoft.Storage/"
                   "storageAccounts/crashcartstate/blobServices/default/containers/tfstate")

EVIDENCE_RESOURCE_GROUP = "crashcart-evidence"  # where blob_scope places a storage account named only by its URL
DEFAULT_PROPAGATION_S = 1.0  # how long a role assignment made at run time grants nothing (Azure: up to minutes)
BLOB_WRITE = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write"  # Put Blob (create an append blob)
BLOB_ADD = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/add/action"  # Append Block
STORAGE_DENIAL_CODE = "AuthorizationPermissionMismatch"
STORAGE_DENIAL_MESSAGE = "This request is not authorized to perform this operation using this permission."

PROVIDER_READ = "Microsoft.Resources/subscriptions/providers/read"  # Providers_Get, on the subscription
GRAPH_ACTION = "Microsoft.ResourceGraph/resources/read"  # a Resource Graph query (POST, tenant level)
GRAPH_SEGMENTS = ["providers", "microsoft.resourcegraph", "resources"]
ANY_CALLER = "(any authenticated caller: Resource Graph filters rows by the caller's read access)"

_VERBS = {"GET": "read", "HEAD": "read", "PUT": "write", "PATCH": "write", "DELETE": "delete"}


@dataclass(frozen=True)
class Operation:
    action: str
    scope: str


def operation(method: str, path: str) -> Operation | None:
    """ARM's operation for `method path` (a URL path, no query), None when ARM would serve no such path."""
    method = method.upper()
    segments = [s for s in path.split("/") if s]
    if method == "POST" and [s.lower() for s in segments] == GRAPH_SEGMENTS:
        return Operation(GRAPH_ACTION, "/")  # a tenant-level query: see Rbac.decide
    if len(segments) < 2 or segments[0].lower() != "subscriptions":
        return None
    providers = [i for i, s in enumerate(segments) if s.lower() == "providers" and i >= 2]
    if providers:
        at = providers[-1]
        if len(segments) == 4 and at == 2 and method in ("GET", "HEAD"):  # Providers_Get
            return Operation(PROVIDER_READ, "/" + "/".join(segments[:2]))
        if len(segments) < at + 3:
            return None  # /providers, or /providers/{ns} other than a subscription's Providers_Get: not served
        namespace, types_from, rest = segments[at + 1], [], segments[at + 2:]
        base = segments[:at + 2]
    else:
        namespace, types_from, rest = "Microsoft.Resources", ["subscriptions"], segments[2:]
        base = segments[:2]
    pairs, extra = (rest, None) if len(rest) % 2 == 0 else (rest[:-1], rest[-1])
    types = types_from + pairs[0::2]
    scope = "/" + "/".join(base + pairs)
    if extra is None:
        verb = _VERBS.get(method)
        if verb is None or not types:
            return None
        action = "/".join([namespace, *types, verb])
    elif method in ("GET", "HEAD"):
        action = "/".join([namespace, *types, extra, "read"])
    elif method == "POST" and pairs:
        action = "/".join([namespace, *types, extra, "action"])
    else:
        return None
    return Operation(roles.canonical(action), scope)


def covers(assigned_scope: str, scope: str) -> bool:
    """An assignment at `assigned_scope` applies at `scope` and below it (IDs compare case-insensitively)."""
    a, s = assigned_scope.rstrip("/").lower(), scope.rstrip("/").lower()
    return a == "" or s == a or s.startswith(a + "/")


def blob_scope(url: str, *, subscription: str = SUBSCRIPTION, resource_group: str = EVIDENCE_RESOURCE_GROUP) -> str:
    """The Azure resource scope of a blob (or container) URL, as storage RBAC sees it:
    `.../storageAccounts/{a}/blobServices/default/containers/{c}[/blobs/{path}]`. The account is the host's
    first label (`{a}.blob.core.windows.net`) or, for an emulator address (an IP or localhost), the first path
    segment, as Azurite serves it."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    segments = [urllib.parse.unquote(s) for s in parts.path.split("/") if s]
    emulator = host in ("localhost", "") or host.replace(".", "").isdigit()
    account = segments.pop(0) if emulator and segments else host.split(".")[0]
    if not segments:
        raise ValueError(f"{url} names no container")
    scope = (f"/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Storage/"
             f"storageAccounts/{account}/blobServices/default/containers/{segments[0]}")
    return scope + (f"/blobs/{'/'.join(segments[1:])}" if len(segments) > 1 else "")


@dataclass(frozen=True)
class Grant:
    role: roles.RoleDefinition
    scope: str
    principal_id: str = ""  # "" = the Rbac's own caller (principal_id of the Rbac)
    effective_at: float = float("-inf")  # the clock time from which it grants (-inf: assigned long before the run)

    def effective(self, now: float) -> bool:
        return now >= self.effective_at


@dataclass(frozen=True)
class Decision:
    method: str
    path: str
    operation: Operation | None
    granted_by: tuple[str, ...]  # the roles that grant it at that scope (empty: refused)

    @property
    def allowed(self) -> bool:
        return self.operation is not None and bool(self.granted_by)


@dataclass(frozen=True)
class DataDecision:
    principal_id: str
    action: str
    scope: str
    granted_by: tuple[str, ...]  # roles in effect that grant the data action at that scope
    propagating: tuple[str, ...]  # roles assigned that would grant it but have not taken effect yet

    @property
    def allowed(self) -> bool:
        return bool(self.granted_by)


def storage_denial(request_id: str = "00000000-0000-0000-0000-000000000000") -> tuple[int, dict[str, str], str]:
    """Blob storage's answer to an Azure AD caller without the data permission (403, the x-ms-error-code
    header and the XML error body), as it answers while a new role assignment is still propagating."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.0000000Z", time.gmtime())
    body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{STORAGE_DENIAL_CODE}</Code><Message>'
            f"{STORAGE_DENIAL_MESSAGE}\nRequestId:{request_id}\nTime:{stamp}</Message></Error>")
    return 403, {"x-ms-error-code": STORAGE_DENIAL_CODE, "Content-Type": "application/xml"}, body


def denial_message(principal_id: str, op: Operation) -> str:
    """The message of ARM's 403 AuthorizationFailed."""
    return (f"The client '{principal_id}' with object id '{principal_id}' does not have authorization to perform "
            f"action '{op.action}' over scope '{op.scope}' or the scope is invalid. If access was recently granted, "
            "please refresh your credentials.")


@dataclass
class Rbac:
    """One caller and its role assignments."""

    grants: list[Grant] = field(default_factory=list)
    principal_id: str = PIPELINE_PRINCIPAL
    # assigned on each broken VM the world adds: (scope kind, role) for the kinds source-resource-group, source-os-disk
    source_roles: Sequence[roles.Assignment] = ()
    decisions: list[Decision] = field(default_factory=list)
    propagation_s: float = DEFAULT_PROPAGATION_S  # how long an assignment made by assign() grants nothing
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def pipeline(cls, *, operator: roles.RoleDefinition | None = None, subscription: str = SUBSCRIPTION,
                 evidence_container: str = EVIDENCE_CONTAINER, state_container: str = STATE_CONTAINER,
                 principal_id: str = PIPELINE_PRINCIPAL) -> "Rbac":
        """The pipeline identity exactly as documented (roles/*.json), `operator` replacing the custom role
        (e.g. `roles.operator().without(action)`)."""
        grants = [Grant(operator or roles.operator(), f"/subscriptions/{subscription}")]
        places = {"evidence-container": evidence_container, "state-container": state_container,
                  "evidence-account": evidence_container.split("/blobServices/")[0]}
        grants += [Grant(a.role, places[a.scope]) for a in roles.evidence_side()]
        source = tuple(a for a in roles.source_side() if a.scope in ("source-resource-group", "source-os-disk"))
        return cls(grants, principal_id, source)

    def add_source(self, resource_group_id: str, os_disk_id: str) -> None:
        """The source-side roles on a broken VM's resource group and OS disk, as the owner grants them before a
        repair (nothing for an Rbac that was not built with source roles)."""
        places = {"source-resource-group": resource_group_id, "source-os-disk": os_disk_id}
        with self._lock:
            for assignment in self.source_roles:
                grant = Grant(assignment.role, places[assignment.scope])
                if grant not in self.grants:
                    self.grants.append(grant)

    def remove_action(self, action: str, role_name: str = "crashcart repair operator") -> None:
        """Takes `action` out of the role `role_name` wherever it is assigned, as an owner editing that custom
        role does (the change applies to the next request)."""
        with self._lock:
            self.grants = [dataclasses.replace(g, role=g.role.without(action)) if g.role.name == role_name else g
                           for g in self.grants]

    def add(self, principal_id: str, role: roles.RoleDefinition, scope: str) -> Grant:
        """An assignment of `role` to `principal_id` at `scope` made long before the run (in effect now)."""
        grant = Grant(role, scope, principal_id)
        with self._lock:
            self.grants.append(grant)
        return grant

    def assign(self, principal_id: str, role: roles.RoleDefinition, scope: str, *,
               delay_s: float | None = None) -> Grant:
        """An assignment created now (as the repair stack creates the rescue VM identity's role on the evidence
        container): stored at once, honoured only `delay_s` (default `propagation_s`) later."""
        delay = self.propagation_s if delay_s is None else delay_s
        grant = Grant(role, scope, principal_id, self.clock() + max(0.0, delay))
        with self._lock:
            self.grants.append(grant)
        return grant

    def knows(self, principal_id: str) -> bool:
        """Whether any assignment (in effect or not) names `principal_id`: the double models that identity."""
        return any(self._principal(g) == principal_id.lower() for g in list(self.grants))

    def _principal(self, grant: Grant) -> str:
        return (grant.principal_id or self.principal_id).lower()

    def decide_data(self, principal_id: str, action: str, scope: str) -> DataDecision:
        """The storage service's decision on a data action (e.g. BLOB_WRITE on blob_scope(url)) by `principal_id`:
        only assignments in effect grant it (ABAC conditions are not evaluated here)."""
        now, who = self.clock(), principal_id.lower()
        fitting = [g for g in list(self.grants)
                   if self._principal(g) == who and covers(g.scope, scope) and g.role.allows_data(action)]
        return DataDecision(principal_id, action, scope,
                            tuple(sorted({g.role.name for g in fitting if g.effective(now)})),
                            tuple(sorted({g.role.name for g in fitting if not g.effective(now)})))

    def decide(self, method: str, path: str) -> Decision:
        """ARM's decision on `method path`: allowed when an assignment of the caller in effect covers the
        operation's scope and its role allows the action. A Resource Graph query (GRAPH_ACTION at scope "/")
        is the exception: ARM grants it to any authenticated caller without a role assignment, and Resource
        Graph itself returns only the rows the caller may read (Microsoft Learn, "Permissions in Azure Resource
        Graph"; scripts/devkit/arm_graph.py filters them), so it is granted by ANY_CALLER."""
        op = operation(method, path)
        granted: tuple[str, ...] = ()
        if op is not None and op.action == GRAPH_ACTION and op.scope == "/":
            granted = (ANY_CALLER,)
        elif op is not None:
            now, caller = self.clock(), self.principal_id.lower()
            granted = tuple(sorted({g.role.name for g in list(self.grants)
                                    if self._principal(g) == caller and g.effective(now)
                                    and covers(g.scope, op.scope) and g.role.allows(op.action)}))
        decision = Decision(method.upper(), path, op, granted)
        with self._lock:
            self.decisions.append(decision)
        return decision

    def used(self) -> list[Decision]:
        """The allowed decisions so far."""
        with self._lock:
            return [d for d in self.decisions if d.allowed]
