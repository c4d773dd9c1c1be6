"""The ARM double's RBAC (scripts/devkit/arm_rbac.py): each REST call it serves is named as ARM names the
operation, a call outside the caller's roles gets Azure's 403 body, and a call with no name fails loudly."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest

from scripts.azure import roles
from scripts.devkit.arm_rbac import PIPELINE_PRINCIPAL, SUBSCRIPTION, Grant, Rbac, covers, operation
from scripts.devkit.armdouble import ArmDouble

SUB = f"/subscriptions/{SUBSCRIPTION}"
GROUP = f"{SUB}/resourceGroups/prod-web"
VM = f"{GROUP}/providers/Microsoft.Compute/virtualMachines/web-01"
DISK = f"{SUB}/resourceGroups/crashcart-repair-web-01/providers/Microsoft.Compute/disks/copy"
SNAPSHOT = f"{SUB}/resourceGroups/crashcart-repair-web-01/providers/Microsoft.Compute/snapshots/snap"
LOCATION = f"{SUB}/providers/Microsoft.Compute/locations/westeurope"

# Every REST call the double serves (scripts/devkit/arm_*.py), with the operation ARM checks for it.
SERVED = [
    ("GET", f"{SUB}/resourcegroups", "Microsoft.Resources/subscriptions/resourceGroups/read", SUB),
    ("GET", f"{SUB}/resourcegroups/crashcart-repair-web-01", "Microsoft.Resources/subscriptions/resourceGroups/read",
     f"{SUB}/resourcegroups/crashcart-repair-web-01"),
    ("DELETE", f"{SUB}/resourcegroups/crashcart-repair-web-01",
     "Microsoft.Resources/subscriptions/resourceGroups/delete", f"{SUB}/resourcegroups/crashcart-repair-web-01"),
    ("GET", f"{SUB}/operationresults/abc123", "Microsoft.Resources/subscriptions/operationresults/read",
     f"{SUB}/operationresults/abc123"),
    ("GET", VM, "Microsoft.Compute/virtualMachines/read", VM),
    ("PUT", VM, "Microsoft.Compute/virtualMachines/write", VM),
    ("GET", f"{VM}/instanceView", "Microsoft.Compute/virtualMachines/instanceView/read", VM),
    ("POST", f"{VM}/powerOff", "Microsoft.Compute/virtualMachines/powerOff/action", VM),
    ("POST", f"{VM}/deallocate", "Microsoft.Compute/virtualMachines/deallocate/action", VM),
    ("POST", f"{VM}/start", "Microsoft.Compute/virtualMachines/start/action", VM),
    ("POST", f"{VM}/retrieveBootDiagnosticsData", "Microsoft.Compute/virtualMachines/retrieveBootDiagnosticsData/action",
     VM),
    ("PUT", f"{VM}/runCommands/collect", "Microsoft.Compute/virtualMachines/runCommands/write", f"{VM}/runCommands/collect"),
    ("GET", f"{VM}/runCommands/collect", "Microsoft.Compute/virtualMachines/runCommands/read", f"{VM}/runCommands/collect"),
    ("DELETE", f"{VM}/runCommands/collect", "Microsoft.Compute/virtualMachines/runCommands/delete",
     f"{VM}/runCommands/collect"),
    ("POST", f"{VM}/providers/Microsoft.SerialConsole/serialPorts/0/connect",
     "Microsoft.SerialConsole/serialPorts/connect/action", f"{VM}/providers/Microsoft.SerialConsole/serialPorts/0"),
    ("GET", DISK, "Microsoft.Compute/disks/read", DISK),
    ("DELETE", DISK, "Microsoft.Compute/disks/delete", DISK),
    ("GET", SNAPSHOT, "Microsoft.Compute/snapshots/read", SNAPSHOT),
    ("PUT", SNAPSHOT, "Microsoft.Compute/snapshots/write", SNAPSHOT),
    ("DELETE", SNAPSHOT, "Microsoft.Compute/snapshots/delete", SNAPSHOT),
    ("POST", f"{SNAPSHOT}/beginGetAccess", "Microsoft.Compute/snapshots/beginGetAccess/action", SNAPSHOT),
    ("POST", f"{SNAPSHOT}/endGetAccess", "Microsoft.Compute/snapshots/endGetAccess/action", SNAPSHOT),
    ("GET", f"{LOCATION}/vmSizes", "Microsoft.Compute/locations/vmSizes/read", LOCATION),
    ("GET", f"{LOCATION}/operations/0a1b", "Microsoft.Compute/locations/operations/read", f"{LOCATION}/operations/0a1b"),
    ("GET", f"{LOCATION}/DiskOperations/0a1b", "Microsoft.Compute/locations/DiskOperations/read",
     f"{LOCATION}/DiskOperations/0a1b"),
    ("GET", f"{SUB}/providers/Microsoft.Compute", "Microsoft.Resources/subscriptions/providers/read", SUB),
    ("POST", "/providers/Microsoft.ResourceGraph/resources", "Microsoft.ResourceGraph/resources/read", "/"),
]


@pytest.mark.parametrize("method, path, action, scope", SERVED, ids=[f"{m} {a}" for m, _, a, _ in SERVED])
def test_every_served_call_has_its_arm_operation(method, path, action, scope):
    assert operation(method, path).action == action
    assert operation(method, path).scope == scope


@pytest.mark.parametrize("method, path", [
    ("POST", VM),  # an action needs its name
    ("PUT", f"{VM}/instanceView"),  # a view is not written
    ("POST", f"{SUB}/resourcegroups"),
    ("PUT", f"{SUB}/providers/Microsoft.Compute"),  # a provider is registered by POST .../register, never PUT
    ("GET", "/providers/Microsoft.ResourceGraph/resources"),  # a Resource Graph query is a POST
    ("GET", "/tenants/abc"),
    ("GET", "/_ops/operations/0a1b"),
])
def test_paths_arm_would_not_serve_have_no_operation(method, path):
    assert operation(method, path) is None


def _call(double: ArmDouble, method: str, path: str, version: str = "2024-11-01") -> tuple[int, dict]:
    request = urllib.request.Request(f"{double.url}{path}?api-version={version}", method=method,
                                     data=b"{}" if method in ("PUT", "POST") else None,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            body = response.read()
            return response.status, json.loads(body) if body else {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def double():
    with ArmDouble() as instance:
        yield instance


def test_a_call_outside_the_roles_gets_azures_403_body(double):
    double.rbac = Rbac([Grant(roles.operator().without("Microsoft.Compute/virtualMachines/powerOff/action"), SUB)])
    status, body = _call(double, "POST", f"{VM}/powerOff")
    assert status == 403
    assert body == {"error": {"code": "AuthorizationFailed", "message": (
        f"The client '{PIPELINE_PRINCIPAL}' with object id '{PIPELINE_PRINCIPAL}' does not have authorization to "
        f"perform action 'Microsoft.Compute/virtualMachines/powerOff/action' over scope '{VM}' or the scope is "
        "invalid. If access was recently granted, please refresh your credentials.")}}
    assert _call(double, "GET", VM)[0] == 404  # allowed, and simply not there


def test_an_unmapped_route_fails_loudly_even_when_the_double_serves_it(double):
    double.rbac = Rbac([Grant(roles.RoleDefinition("Owner", actions=("*",)), "/")])
    called = []
    double.route("POST", re.escape(VM), lambda d, req, m: called.append(req))
    status, body = _call(double, "POST", VM)
    assert status == 501 and body["error"]["code"] == "UnmappedOperation"
    assert f"POST {VM}" in body["error"]["message"] and "arm_rbac.py" in body["error"]["message"]
    assert called == [] and double.unmapped[-1] == f"POST {VM}"


def test_the_default_caller_is_the_documented_pipeline_identity(double):
    double.rbac = Rbac.pipeline()
    names = {g.role.name for g in double.rbac.grants}
    assert names == {"crashcart repair operator", "Storage Blob Data Contributor",
                     "Role Based Access Control Administrator", "Storage Blob Delegator"}
    assert _call(double, "GET", f"{SUB}/resourcegroups", "2025-04-01")[0] != 403
    # outside the documented roles: an action nobody granted, and a subscription the operator role is not on
    assert _call(double, "POST", f"{VM}/restart")[0] == 403
    assert _call(double, "GET", VM.replace(SUBSCRIPTION, "00000000-0000-0000-0000-0000000000ff"))[0] == 403


def test_source_side_roles_follow_the_broken_vm_and_stay_on_its_scope():
    from scripts.devkit.arm_vm import add_broken_vm

    reader_only = Rbac.pipeline(operator=roles.RoleDefinition("nothing", actions=()))
    with ArmDouble(rbac=reader_only) as double:
        vm = add_broken_vm(double, resource_group="rg-app")
        assert _call(double, "GET", vm.vm_id)[0] == 200  # Reader on rg-app
        assert _call(double, "GET", vm.disk_id, "2024-03-02")[0] == 200
        assert _call(double, "PUT", vm.vm_id)[0] == 403  # Reader does not write
        assert _call(double, "GET", VM)[0] == 403  # prod-web is not the source's group
        assert _call(double, "GET", f"{SUB}/providers/Microsoft.Compute/locations/westeurope/vmSizes")[0] == 403


@pytest.mark.parametrize("granted, requested, expected", [
    ("/", VM, True),
    (SUB, VM, True),
    (GROUP.upper(), VM, True),
    (GROUP, GROUP, True),
    (GROUP, f"{SUB}/resourceGroups/prod-web2", False),
    (VM, GROUP, False),
])
def test_an_assignment_covers_its_scope_and_below(granted, requested, expected):
    assert covers(granted, requested) is expected


def test_wildcards_and_not_actions_decide_as_azure_does():
    role = roles.RoleDefinition("ops", actions=("Microsoft.Compute/virtualMachines/*",),
                                not_actions=("Microsoft.Compute/virtualMachines/delete",))
    rbac = Rbac([Grant(role, SUB)])
    assert rbac.decide("POST", f"{VM}/start").allowed
    assert rbac.decide("GET", f"{VM}/instanceView").allowed
    assert not rbac.decide("DELETE", VM).allowed
    assert not rbac.decide("GET", DISK).allowed
    assert rbac.decide("POST", f"{VM}/start").granted_by == ("ops",)


# ---- propagation: an assignment made now grants nothing until it has propagated (#12) --------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_arm_refuses_a_fresh_assignment_until_it_has_propagated(double):
    clock = Clock()
    double.rbac = Rbac([], clock=clock)
    double.rbac.assign(PIPELINE_PRINCIPAL, roles.operator(), SUB, delay_s=30)
    status, body = _call(double, "GET", VM)
    assert status == 403 and body["error"]["code"] == "AuthorizationFailed"
    assert body["error"]["message"].startswith(f"The client '{PIPELINE_PRINCIPAL}'")
    assert body["error"]["message"].endswith("If access was recently granted, please refresh your credentials.")
    clock.now += 29.9
    assert _call(double, "GET", VM)[0] == 403
    clock.now += 0.1
    assert _call(double, "GET", VM)[0] == 404  # granted: allowed, and simply not there


def test_another_principals_assignment_grants_the_caller_nothing(double):
    double.rbac = Rbac([])
    double.rbac.add("5b0e4c3a-0000-0000-0000-0000000000aa", roles.operator(), SUB)
    assert _call(double, "GET", VM)[0] == 403


BLOB = "http://127.0.0.1:10000/devstoreaccount1/dumps/web-01/run/runcommand/output.log"
VM_IDENTITY = "5b0e4c3a-0000-0000-0000-0000000000aa"


def test_blob_storage_refuses_the_vm_identity_while_its_role_propagates():
    from scripts.devkit.arm_rbac import BLOB_ADD, BLOB_WRITE, blob_scope, storage_denial

    clock = Clock()
    rbac = Rbac([], clock=clock, propagation_s=5)
    (vm_role,) = [a.role for a in roles.vm_identity()]
    container = blob_scope(BLOB.rsplit("/", 4)[0])
    rbac.assign(VM_IDENTITY, vm_role, container)  # the repair stack's assignment, created now
    before = rbac.decide_data(VM_IDENTITY, BLOB_WRITE, blob_scope(BLOB))
    assert not before.allowed and before.propagating == ("Storage Blob Data Contributor",)
    status, headers, body = storage_denial("f1e2")
    assert status == 403 and headers["x-ms-error-code"] == "AuthorizationPermissionMismatch"
    assert body.startswith('<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthorizationPermissionMismatch</Code>'
                           "<Message>This request is not authorized to perform this operation using this permission.\n"
                           "RequestId:f1e2\nTime:")
    clock.now += 5
    after = rbac.decide_data(VM_IDENTITY, BLOB_WRITE, blob_scope(BLOB))
    assert after.allowed and after.granted_by == ("Storage Blob Data Contributor",)
    assert rbac.decide_data(VM_IDENTITY, BLOB_ADD, blob_scope(BLOB)).allowed
    # only there, only for that identity, only data actions the role has
    assert not rbac.decide_data(VM_IDENTITY, BLOB_WRITE, blob_scope(BLOB.replace("/dumps/", "/other/"))).allowed
    assert not rbac.decide_data(PIPELINE_PRINCIPAL, BLOB_WRITE, blob_scope(BLOB)).allowed
    queue_add = "Microsoft.Storage/storageAccounts/queueServices/queues/messages/add/action"
    assert not rbac.decide_data(VM_IDENTITY, queue_add, blob_scope(BLOB)).allowed
    assert rbac.knows(VM_IDENTITY) and not rbac.knows("someone-else")


@pytest.mark.parametrize("url, scope", [
    ("https://crashcartevidence.blob.core.windows.net/dumps/web-01/a.dmp",
     "storageAccounts/crashcartevidence/blobServices/default/containers/dumps/blobs/web-01/a.dmp"),
    ("http://127.0.0.1:10000/devstoreaccount1/dumps",
     "storageAccounts/devstoreaccount1/blobServices/default/containers/dumps"),
    ("https://localhost:10000/devstoreaccount1/dumps/x%20y.log",
     "storageAccounts/devstoreaccount1/blobServices/default/containers/dumps/blobs/x y.log"),
])
def test_a_blob_url_is_a_storage_scope(url, scope):
    from scripts.devkit.arm_rbac import blob_scope

    assert blob_scope(url) == (f"{SUB}/resourceGroups/crashcart-evidence/providers/Microsoft.Storage/{scope}")


def test_removing_an_action_keeps_whose_assignment_it_is_and_when_it_took_effect():
    clock = Clock()
    rbac = Rbac([], clock=clock)
    grant = rbac.assign(PIPELINE_PRINCIPAL, roles.operator(), SUB, delay_s=10)
    rbac.remove_action("Microsoft.Compute/virtualMachines/powerOff/action")
    (changed,) = rbac.grants
    assert (changed.principal_id, changed.effective_at) == (grant.principal_id, grant.effective_at)
    assert not rbac.decide("GET", VM).allowed
