"""The ARM double routes a request as ARM does, by the LAST provider namespace in its path, and accepts only
that provider's api-versions - the same for every test, whatever routes another test installed; the two
operations outside a resource path (Providers_Get, a Resource Graph query) are decided by the double's own
RBAC, whichever Rbac the double holds."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from azure.mgmt.resourcegraph.models import QueryRequest

from scripts.azure import roles
from scripts.azure.clients import AzureClients, resource_graph
from scripts.devkit import arm_authz, arm_graph, arm_skus, arm_vm
from scripts.devkit.arm_rbac import Grant, Rbac
from scripts.devkit.armdouble import API_VERSIONS, ArmDouble, api_family

SUB = f"/subscriptions/{arm_vm.SUB}"
GROUP = f"{SUB}/resourceGroups/prod-web"
DISK = f"{GROUP}/providers/Microsoft.Compute/disks/web-01-osdisk"
VMS = "Resources | where type =~ 'microsoft.compute/virtualmachines' | project id"


@pytest.mark.parametrize("path, family", [
    (f"{DISK}/providers/Microsoft.Authorization/permissions", "authorization"),  # an extension resource
    (f"{GROUP}/providers/Microsoft.Authorization/permissions", "authorization"),
    (f"{SUB}/providers/Microsoft.Compute", "resources"),  # Providers_Get: no resource type after the namespace
    ("/providers/Microsoft.ResourceGraph/resources", "resourcegraph"),
    (f"{SUB}/providers/Microsoft.Compute/skus", "compute"),
    (f"{GROUP}/providers/Microsoft.Compute/virtualMachines/web-01/runCommands/x", "compute"),
    (DISK, "disks"),
    (f"{SUB}/providers/Microsoft.Compute/locations/westeurope/DiskOperations/0a1b", "disks"),
    (f"{GROUP}/providers/Microsoft.Compute/virtualMachines/web-01/providers/Microsoft.SerialConsole/"
     "serialPorts/0/connect", "serialconsole"),
    (GROUP, "resources"),
])
def test_a_path_belongs_to_the_last_provider_it_names(path, family):
    assert api_family(path) == family


def _status(double: ArmDouble, method: str, path: str, version: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"{double.url}{path}?api-version={version}", method=method,
                                     data=b"{}" if method == "POST" else None,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_installing_routes_widens_no_other_providers_api_versions(arm):
    before = {family: set(versions) for family, versions in API_VERSIONS.items()}
    for install in (arm_authz.install, arm_skus.install, arm_graph.install):
        install(arm)
    vm = arm_vm.add_broken_vm(arm)
    assert {family: set(versions) for family, versions in API_VERSIONS.items()} == before
    # Microsoft.Authorization's, Resource Graph's and the SKU list's versions are theirs only
    for version in (arm_authz.AUTHZ_API_VERSION, arm_graph.GRAPH_API_VERSION):
        status, body = _status(arm, "GET", vm.vm_id, version)
        assert (status, body["error"]["code"]) == (400, "InvalidApiVersionParameter")
    status, body = _status(arm, "GET", vm.disk_id, arm_skus.SKUS_API_VERSION)
    assert (status, body["error"]["code"]) == (400, "InvalidApiVersionParameter")
    # an extension resource takes its own provider's version, not the disk's
    status, body = _status(arm, "GET", f"{vm.disk_id}/providers/Microsoft.Authorization/permissions", "2025-01-02")
    assert (status, body["error"]["code"]) == (400, "InvalidApiVersionParameter")
    status, body = _status(arm, "GET", f"{vm.disk_id}/providers/Microsoft.Authorization/permissions",
                           arm_authz.AUTHZ_API_VERSION)
    assert status == 200 and body["value"]


def test_the_sdk_clients_reach_their_routes_without_any_install_time_version(arm):
    arm_authz.install(arm)
    arm_skus.install(arm)
    arm_vm.add_broken_vm(arm)
    clients = AzureClients(arm_vm.SUB)
    assert list(clients.authorization.permissions.list_for_resource_group("prod-web"))
    assert str(clients.resource.providers.get("Microsoft.Compute").registration_state) == "Registered"
    assert any(s.name == "Standard_D4s_v5" for s in clients.compute.resource_skus.list())
    assert arm.unmapped == []


def test_provider_reads_and_graph_queries_are_decided_by_whatever_rbac_the_double_holds(arm):
    arm_authz.install(arm)
    arm_graph.install(arm)
    vm = arm_vm.add_broken_vm(arm)
    arm.rbac = Rbac.pipeline()  # replaced after the routes were installed (as a test does to take a role away)
    assert str(AzureClients(arm_vm.SUB).resource.providers.get("Microsoft.Compute").registration_state) == \
        "Registered"
    rows = resource_graph().resources(QueryRequest(subscriptions=[arm_vm.SUB], query=VMS)).data
    assert rows == [{"id": vm.vm_id}]
    arm.rbac = Rbac.pipeline(operator=roles.operator().without(arm_authz.PROVIDER_READ))
    status, body = _status(arm, "GET", f"{SUB}/providers/Microsoft.Compute", "2025-04-01")
    assert status == 403 and arm_authz.PROVIDER_READ in body["error"]["message"]
    assert arm.unmapped == []


def test_a_graph_query_needs_no_role_assignment_and_shows_only_readable_rows(arm):
    arm_graph.install(arm)
    arm_vm.add_broken_vm(arm)
    arm.rbac = Rbac([Grant(roles.RoleDefinition("Reader", actions=("*/read",)), f"{SUB}/resourceGroups/elsewhere")])
    answer = resource_graph().resources(QueryRequest(subscriptions=[arm_vm.SUB], query=VMS))
    assert answer.data == []  # allowed (200), but nothing the caller may read
    decision = [d for d in arm.rbac.decisions if "ResourceGraph" in d.path][0]
    assert decision.allowed and decision.operation.action == arm_graph.GRAPH_ACTION and decision.operation.scope == "/"
    assert arm.rbac.used() == [decision]
