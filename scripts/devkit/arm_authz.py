"""What the caller may do, and what the subscription has registered, in the ARM double: the Microsoft.Authorization
permissions API computed from the double's role assignments (scripts/devkit/arm_rbac.py), and resource providers.

Permissions (azure-rest-api-specs specification/authorization/resource-manager/Microsoft.Authorization/stable/
2022-04-01/authorization-RoleBasedAccessControlCalls.json, Permissions_ListForResourceGroup and
Permissions_ListForResource; "Lists all the permissions the caller has at a given scope", RBAC action
`Microsoft.Authorization/permissions/read`):

    GET /subscriptions/{s}/resourcegroups/{g}/providers/Microsoft.Authorization/permissions
    GET /subscriptions/{s}/resourcegroups/{g}/providers/{ns}/{parent path}/{type}/{name}/providers/
        Microsoft.Authorization/permissions

answer `{"value": [Permission...]}`, one Permission {actions, notActions, dataActions, notDataActions} per role
assignment of the caller in effect at that scope: assigned there or above it (inherited), never below. A
resource group that does not exist is 404 ResourceGroupNotFound, as ARM answers for any call under it.

Providers (specification/resources/.../Microsoft.Resources/stable/2025-04-01/resources.json, Providers_Get):
`GET /subscriptions/{s}/providers/{ns}` answers {id, namespace, registrationState, resourceTypes}; an unknown
namespace is 404 InvalidResourceNamespace. Microsoft.Compute, .Network and .Storage are Registered unless a
test says otherwise (`register(double, ns, "NotRegistered")`). Reading it is
`Microsoft.Resources/subscriptions/providers/read` on the subscription (arm_rbac.operation names it).
The api-versions both need are armdouble.API_VERSIONS' "authorization" and "resources" families.
"""

from __future__ import annotations

import re
from typing import Any

from scripts.devkit.arm_rbac import PROVIDER_READ, Rbac, covers
from scripts.devkit.armdouble import ArmDouble, Request, Response, error_response

AUTHZ_API_VERSION = "2022-04-01"  # azure-mgmt-authorization 4.0's Permissions operations (API_VERSIONS["authorization"])
__all__ = ["AUTHZ_API_VERSION", "PROVIDER_READ", "install", "register", "permissions_at"]
KNOWN_PROVIDERS = {"microsoft.compute": "Microsoft.Compute", "microsoft.network": "Microsoft.Network",
                   "microsoft.storage": "Microsoft.Storage", "microsoft.authorization": "Microsoft.Authorization",
                   "microsoft.resources": "Microsoft.Resources", "microsoft.serialconsole": "Microsoft.SerialConsole"}
PROVIDER_TYPES = {"Microsoft.Compute": ["virtualMachines", "disks", "snapshots", "locations/usages", "skus"],
                  "Microsoft.Network": ["virtualNetworks", "networkSecurityGroups", "networkInterfaces"],
                  "Microsoft.Storage": ["storageAccounts"]}
_PERMISSIONS = r"(?P<scope>/subscriptions/[^/]+/resourcegroups/[^/]+(?:/providers/.+)?)/providers/Microsoft\.Authorization/permissions"
_PROVIDER = r"/subscriptions/(?P<sub>[^/]+)/providers/(?P<ns>[^/]+)"
_STATE_KEY = "_crashcart_provider_states"


def install(double: ArmDouble) -> None:
    """Serves the permissions API and Providers_Get on `double` (idempotent)."""
    double.route("GET", _PERMISSIONS, list_permissions)
    double.route("GET", _PROVIDER, get_provider)


def register(double: ArmDouble, namespace: str, state: str = "Registered") -> None:
    """The registration state Providers_Get reports for `namespace` (NotRegistered, Registering, ...)."""
    states: dict[str, str] = double.__dict__.setdefault(_STATE_KEY, {})
    states[namespace.lower()] = state


# ---- permissions ------------------------------------------------------------------------------------------
def permissions_at(rbac: Rbac, scope: str) -> list[dict[str, Any]]:
    """One Permission per role assignment of the caller in effect at `scope` (there or above)."""
    now, caller = rbac.clock(), rbac.principal_id.lower()
    out = []
    for grant in list(rbac.grants):
        if (grant.principal_id or rbac.principal_id).lower() != caller or not grant.effective(now):
            continue
        if not covers(grant.scope, scope):
            continue
        role = grant.role
        out.append({"actions": list(role.actions), "notActions": list(role.not_actions),
                    "dataActions": list(role.data_actions), "notDataActions": list(role.not_data_actions)})
    return out


def list_permissions(d: ArmDouble, req: Request, m: re.Match) -> Response:
    scope = re.sub(r"/{2,}", "/", m.group("scope"))  # an empty parent resource path: ".../Microsoft.Compute//disks/x"
    group = re.match(r"(?i)/subscriptions/[^/]+/resourcegroups/[^/]+", scope)
    assert group is not None
    if not _group_exists(d, group.group(0)):
        name = group.group(0).rsplit("/", 1)[1]
        return error_response(404, "ResourceGroupNotFound", f"Resource group '{name}' could not be found.")
    return Response(200, {"value": permissions_at(d.rbac, scope)})


def _group_exists(d: ArmDouble, group_id: str) -> bool:
    key = group_id.lower()
    return d.get(group_id) is not None or any(k.startswith(key + "/") for k in list(d.resources))


# ---- providers --------------------------------------------------------------------------------------------
def get_provider(d: ArmDouble, req: Request, m: re.Match) -> Response:
    namespace = KNOWN_PROVIDERS.get(m.group("ns").lower())
    if namespace is None:
        return error_response(404, "InvalidResourceNamespace",
                              f"The resource namespace '{m.group('ns')}' is invalid.")
    states: dict[str, str] = d.__dict__.get(_STATE_KEY, {})
    state = states.get(namespace.lower(), "Registered")
    return Response(200, {
        "id": f"/subscriptions/{m.group('sub')}/providers/{namespace}", "namespace": namespace,
        "registrationState": state, "registrationPolicy": "RegistrationRequired",
        "resourceTypes": [{"resourceType": t, "locations": [], "apiVersions": []}
                          for t in PROVIDER_TYPES.get(namespace, [])]})
