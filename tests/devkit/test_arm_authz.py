"""The ARM double's permissions API and Providers_Get, through the real azure-mgmt clients: permissions are
the caller's role assignments in effect at the scope (there or above, never below), matched by preflight as
Azure matches them; reading either is refused 403 AuthorizationFailed without its RBAC action."""

from __future__ import annotations

import pytest

from scripts.azure.clients import AzureClients
from scripts.devkit import arm_authz, arm_vm
from scripts.devkit.arm_rbac import EVIDENCE_CONTAINER
from scripts.run.preflight_checks import allowed

SUB = arm_vm.SUB


@pytest.fixture
def world(arm):
    arm_authz.install(arm)
    vm = arm_vm.add_broken_vm(arm)
    return arm, vm


def _as_dicts(found):
    return [{"actions": p.actions, "notActions": p.not_actions, "dataActions": p.data_actions,
             "notDataActions": p.not_data_actions} for p in found]


def test_permissions_are_the_assignments_in_effect_at_the_scope_and_above(world):
    arm, vm = world
    authz = AzureClients(SUB).authorization
    group = _as_dicts(authz.permissions.list_for_resource_group("prod-web"))
    # the operator role (subscription) and Reader (the group); Disk Snapshot Contributor sits below, on the disk
    assert len(group) == 2
    assert allowed(group, "Microsoft.Compute/virtualMachines/runCommands/write")  # operator, inherited
    assert not allowed(group, "Microsoft.Compute/disks/beginGetAccess/action")
    disk = _as_dicts(authz.permissions.list_for_resource("prod-web", "Microsoft.Compute", "", "disks",
                                                         vm.disk_id.rsplit("/", 1)[1]))
    assert len(disk) == 3 and allowed(disk, "Microsoft.Compute/disks/beginGetAccess/action")
    account = EVIDENCE_CONTAINER.split("/blobServices/")[0]
    arm.put(account, {"name": "crashcartevidence", "location": "westeurope"})
    container = _as_dicts(authz.permissions.list_for_resource(
        "crashcart-evidence", "Microsoft.Storage", "storageAccounts/crashcartevidence/blobServices/default",
        "containers", "dumps"))
    assert allowed(container, "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write", data=True)
    assert not allowed(container, "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write")


def test_a_missing_group_is_404_and_reading_permissions_needs_its_action(world):
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    arm, _ = world
    authz = AzureClients(SUB).authorization
    with pytest.raises(ResourceNotFoundError) as caught:
        list(authz.permissions.list_for_resource_group("no-such-group"))
    assert "ResourceGroupNotFound" in str(caught.value)
    arm.put(f"/subscriptions/{SUB}/resourceGroups/crashcart-repair-x", {"name": "crashcart-repair-x",
                                                                        "location": "westeurope"})
    assert list(authz.permissions.list_for_resource_group("crashcart-repair-x"))
    arm.rbac.remove_action("Microsoft.Authorization/permissions/read")
    with pytest.raises(HttpResponseError) as caught:
        list(authz.permissions.list_for_resource_group("crashcart-repair-x"))
    assert caught.value.status_code == 403 and "Microsoft.Authorization/permissions/read" in str(caught.value)


def test_not_actions_take_away_within_the_same_assignment_only():
    perms = [{"actions": ["Microsoft.Compute/*"], "notActions": ["Microsoft.Compute/virtualMachines/delete"]}]
    assert allowed(perms, "microsoft.compute/virtualmachines/read")  # case-insensitive, * spans slashes
    assert not allowed(perms, "Microsoft.Compute/virtualMachines/delete")
    assert allowed(perms + [{"actions": ["*/delete"], "notActions": []}], "Microsoft.Compute/virtualMachines/delete")
    assert not allowed(perms, "Microsoft.Compute/snapshots/download/action", data=True)


def test_providers_report_their_registration_and_need_the_read_action(world):
    arm, _ = world
    resource = AzureClients(SUB).resource
    assert str(resource.providers.get("Microsoft.Compute").registration_state) == "Registered"
    arm_authz.register(arm, "Microsoft.Storage", "NotRegistered")
    assert str(resource.providers.get("Microsoft.Storage").registration_state) == "NotRegistered"
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    with pytest.raises(ResourceNotFoundError):
        resource.providers.get("Microsoft.Nothing")
    arm.rbac.remove_action(arm_authz.PROVIDER_READ)
    with pytest.raises(HttpResponseError) as caught:
        resource.providers.get("Microsoft.Compute")
    assert caught.value.status_code == 403 and arm_authz.PROVIDER_READ in str(caught.value)
    assert arm.unmapped == []
