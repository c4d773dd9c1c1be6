"""The ARM double refuses request bodies Azure refuses (scripts/devkit/arm_schema.py, specs vendored in
scripts/devkit/specs/): an unknown member, a wrong type, a value outside an enum and a missing required member
each get the 400 ARM or the Compute provider answers, through the real azure-mgmt clients and raw HTTP, and
the refused request never reaches the resource. The bodies crashcart itself sends pass."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import urllib.error
import urllib.request

import pytest
from azure.core.exceptions import HttpResponseError

from scripts.azure import ids, runcommand
from scripts.azure.clients import AzureClients
from scripts.devkit import arm_schema
from scripts.devkit.arm_compute import RESCUE_RG, RESCUE_VM, Scripted, install_rescue_vm, install_run_commands
from scripts.devkit.arm_snapshot import add_snapshot, install_snapshot_routes
from scripts.devkit.arm_vm import SUB, add_broken_vm

FAST = {"polling_interval": 0.01}
SPECS = arm_schema.SPECS


@pytest.fixture
def world(arm):
    vm = add_broken_vm(arm)
    routes = install_snapshot_routes(arm, lambda snapshot_id, snapshot: "https://md-x.blob.storage.azure.net/a?sig=x")
    install_rescue_vm(arm)
    commands = install_run_commands(arm, Scripted(("Succeeded",)))
    return vm, routes, commands, AzureClients(SUB).compute


def refused(call) -> tuple[int, str, str, str | None]:
    with pytest.raises(HttpResponseError) as err:
        call()
    error = err.value.error
    return err.value.status_code, error.code, error.message, error.target


def raw(arm, method: str, path: str, version: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{arm.url}{path}?api-version={version}", data=body, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# ---- what Azure refuses, through the real clients ----------------------------------------------------------------
def test_an_unknown_member_is_refused_as_compute_refuses_it(world):
    vm, routes, _, compute = world
    creation = {"createOption": "Copy", "sourceResourceId": vm.disk_id}
    body = {"location": "westeurope", "properties": {"creationData": creation, "exportable": True}}
    status, code, message, target = refused(
        lambda: compute.snapshots.begin_create_or_update("crashcart-repair-web-01", "snap", body, **FAST).result())
    assert (status, code, target) == (400, "BadRequest", "snapshot.properties.exportable")
    assert message.startswith("Could not find member 'exportable' on object of type 'SnapshotProperties'")
    assert routes.creates == []  # Azure made nothing


def test_a_wrong_type_is_refused_and_the_command_never_runs(world):
    _, _, commands, compute = world
    body = {"location": "westeurope",
            "properties": {"source": {"script": "echo hi"}, "timeoutInSeconds": "ten minutes"}}
    status, code, message, target = refused(lambda: compute.virtual_machine_run_commands.begin_create_or_update(
        RESCUE_RG, RESCUE_VM, "crashcart-collect", body, **FAST).result())
    assert (status, code, target) == (400, "BadRequest", "runCommand.properties.timeoutInSeconds")
    assert message == "Error converting value \"ten minutes\" to type 'int32'. Path 'properties.timeoutInSeconds'."
    assert commands.created == []


def test_a_value_outside_the_enum_is_refused_and_nothing_is_granted(world, arm):
    vm, routes, _, compute = world
    snapshot = ids.parse(add_snapshot(arm, vm.disk_id), "snapshot")
    status, code, message, target = refused(lambda: compute.snapshots.begin_grant_access(
        snapshot.resource_group, snapshot.name, {"access": "Download", "durationInSeconds": 3600}, **FAST).result())
    assert (status, code, target) == (400, "BadRequest", "grantAccessData.access")
    assert "Error converting value \"Download\" to type 'AccessLevel'" in message
    assert routes.grants == []
    # enum values match case-insensitively, as the service's deserializer does
    assert arm_schema.check("POST", f"{snapshot.id}/beginGetAccess", "2026-03-02",
                            {"access": "read", "durationInSeconds": 60}) is None


def test_a_missing_required_member_is_refused_as_invalid_parameter(world):
    vm, routes, _, compute = world
    body = {"location": "westeurope", "sku": {"name": "Standard_LRS"}, "properties": {"incremental": False}}
    status, code, message, target = refused(
        lambda: compute.snapshots.begin_create_or_update("crashcart-repair-web-01", "snap", body, **FAST).result())
    assert (status, code, message, target) == (400, "InvalidParameter",
                                               "Required parameter 'creationData' is missing (null).", "creationData")
    assert routes.creates == []


def test_a_vm_body_azure_cannot_read_changes_nothing(world, arm):
    vm, _, _, compute = world
    before = json.dumps(arm.get(vm.vm_id), sort_keys=True)
    body = json.loads(before)
    body["properties"]["storageProfile"]["osDisk"]["managedDisk"]["storageAccountType"] = "PremiumLRS"
    status, code, message, target = refused(lambda: compute.virtual_machines.begin_create_or_update(
        vm.resource_group, vm.name, body, **FAST).result())
    assert (status, code) == (400, "BadRequest")
    assert target == "vm.properties.storageProfile.osDisk.managedDisk.storageAccountType"
    assert "to type 'StorageAccountTypes'" in message
    assert json.dumps(arm.get(vm.vm_id), sort_keys=True) == before


# ---- what ARM itself refuses, over raw HTTP -------------------------------------------------------------------
def test_arm_refuses_the_envelope_before_the_provider_sees_it(world, arm):
    vm, routes, _, _ = world
    snap = f"/subscriptions/{SUB}/resourceGroups/crashcart-repair-web-01/providers/Microsoft.Compute/snapshots/s"
    creation = {"createOption": "Copy", "sourceResourceId": vm.disk_id}
    good = {"location": "westeurope", "properties": {"creationData": creation}}

    status, body = raw(arm, "PUT", snap, "2026-03-02", json.dumps({**good, "resources": []}).encode())
    assert status == 400 and body["error"]["code"] == "InvalidRequestContent"
    assert "Could not find member 'resources' on object of type 'ResourceDefinition'" in body["error"]["message"]

    status, body = raw(arm, "PUT", snap, "2026-03-02", json.dumps({"properties": good["properties"]}).encode())
    assert (status, body["error"]["code"]) == (400, "LocationRequired")

    status, body = raw(arm, "PUT", snap, "2026-03-02", b"location=westeurope")
    assert (status, body["error"]["code"]) == (400, "InvalidRequestContent")

    group = f"/subscriptions/{SUB}/resourcegroups/crashcart-repair-web-01"
    bad_tags = json.dumps({"location": "westeurope", "tags": {"a": ["b"]}}).encode()
    status, body = raw(arm, "PUT", group, "2025-04-01", bad_tags)
    assert (status, body["error"]["code"]) == (400, "InvalidRequestContent")
    assert "Path 'tags.a'" in body["error"]["message"]
    assert routes.creates == []


def test_read_only_members_are_ignored_and_open_enums_stay_open(world, arm):
    """What a client read and sends back (id, provisioningState, instanceView...) is accepted, and any VM size
    is (the spec's own size list is deprecated and misses most sizes)."""
    vm, _, _, _ = world
    body = json.loads(json.dumps(arm.get(vm.vm_id)))
    body["properties"]["instanceView"] = {"whatever": ["the service returned"]}
    body["properties"]["hardwareProfile"]["vmSize"] = "Standard_D96ads_v6"
    assert arm_schema.check("PUT", vm.vm_id, "2026-04-01", body) is None


def test_other_api_versions_are_not_validated_and_say_so():
    """Only the vendored api-versions are checked: a body at another accepted version passes unvalidated."""
    path = f"/subscriptions/{SUB}/resourceGroups/g/providers/Microsoft.Compute/snapshots/s"
    assert arm_schema.operation_for("PUT", path, "2026-03-02") is not None
    assert arm_schema.check("PUT", path, "2025-01-02", {"nonsense": True}) is None


# ---- crashcart's own bodies pass --------------------------------------------------------------------------------
def validated(arm) -> list[str]:
    """The operations whose request bodies the double validated, in the order they were sent."""
    seen = []
    for request in arm.requests:
        op = arm_schema.operation_for(request.method, request.path, request.query.get("api-version"))
        if op is not None:
            seen.append(op.name)
    return seen


def test_the_kits_run_command_and_vm_bodies_pass(arm, azurite, evidence_container):
    from scripts.devkit.arm_vmops import repair_world
    from scripts.nodump import swap

    world = repair_world(arm, azurite, evidence_container.container_name)
    install_run_commands(arm, Scripted(("Succeeded",)))
    compute = AzureClients(SUB).compute
    runcommand.start(compute, RESCUE_RG, RESCUE_VM, "crashcart-collect", location="westeurope", script="echo hi",
                     parameters={"Lun": "0", "Device": "/dev/sdc"}, timeout_s=600,
                     output_blob_uri="https://e.blob.core.windows.net/dumps/o.log",
                     error_blob_uri="https://e.blob.core.windows.net/dumps/e.log", poll_s=0.01)
    vm, rescue = ids.parse(world.vm_id, "vm"), ids.parse(world.rescue_vm_id, "vm")
    swap.stop_and_deallocate(compute, vm, poll_s=0.01)
    assert swap.detach_data_disk(compute, rescue, world.copy_id, poll_s=0.01) == 0
    swap.swap_os_disk(compute, vm, world.copy_id, expect_current=world.original_disk_id, poll_s=0.01)
    swap.swap_os_disk(compute, vm, world.original_disk_id, expect_current=world.copy_id, poll_s=0.01)
    swap.attach_data_disk(compute, rescue, world.copy_id, 0, poll_s=0.01)
    assert world.os_disk() == world.original_disk_id and world.rescue_data_disks() == [world.copy_id]
    assert validated(arm) == ["VirtualMachineRunCommands_CreateOrUpdate"] + ["VirtualMachines_CreateOrUpdate"] * 4


def test_the_kits_group_snapshot_and_grant_bodies_pass(world, arm):
    from scripts.collection import snapshot_access
    from scripts.config.stackoutputs import RepairOutputs
    from scripts.devkit.arm_resources import add_resource_group_routes

    vm, routes, _, _ = world
    add_resource_group_routes(arm)  # the repair group does not exist yet: the kit creates it (and deletes it)
    outputs = RepairOutputs(
        subscription_id=SUB, resource_group_name="crashcart-repair-web-01", rescue_vm_id="", rescue_vm_name="",
        rescue_vm_principal_id="", rescue_os="windows", disk_copy_id="", disk_copy_lun=0, snapshot_id="",
        source_vm_id=vm.vm_id, source_os_disk_id=vm.disk_id, evidence_account_name="devstoreaccount1",
        evidence_blob_endpoint="http://127.0.0.1:10000/devstoreaccount1", evidence_container="dumps")
    target = snapshot_access.ExportTarget(outputs, vm.vm_id, "", vm.disk_id, snapshot_group="crashcart-repair-web-01",
                                          tags={"crashcart": "export-snapshot"})
    with contextlib.ExitStack() as undo:
        access = snapshot_access.SnapshotAccess(target, undo, {}, [], [], credential=lambda: None, poll_seconds=0.01,
                                                stamp="20261201T000000Z", now=dt.datetime.now(dt.timezone.utc))
        access.prepare()
        assert access.grant(3600).startswith("https://")
    assert len(routes.creates) == 1 and len(routes.grants) == 1 and routes.deletes == routes.creates
    assert validated(arm) == ["ResourceGroups_CreateOrUpdate", "Snapshots_CreateOrUpdate", "Snapshots_GrantAccess"]


# ---- the vendored specs ---------------------------------------------------------------------------------------
def test_the_vendored_specs_name_their_source_commit_and_licence():
    readme = (SPECS / "README.md").read_text()
    licence = (SPECS / "LICENSE").read_text()
    assert "Azure/azure-rest-api-specs" in readme and "MIT" in readme
    assert "MIT License" in licence and "Microsoft Corporation" in licence
    for op in arm_schema.OPERATIONS:
        source = json.loads((SPECS / op.spec).read_text())["x-crashcart-source"]
        assert source["repository"] == "Azure/azure-rest-api-specs"
        for path, commit in source["files"].items():
            assert re.fullmatch(r"[0-9a-f]{40}", commit), (op.spec, path)
            assert path in readme and commit in readme, (op.spec, path)  # README and file agree
        assert op.spec in readme and op.version in readme and op.name in readme


def test_only_read_only_subtrees_were_trimmed():
    by_spec: dict[str, list[str]] = {}
    for op in arm_schema.OPERATIONS:
        by_spec.setdefault(op.spec, []).append(op.definition)
    for spec, roots in by_spec.items():
        assert arm_schema.unresolved_writable_refs(spec, tuple(roots)) == [], spec


def test_the_validated_versions_are_the_ones_the_pinned_sdk_sends():
    """The SDK clients crashcart pins send these api-versions; validating any other would check nothing real."""
    from azure.mgmt.compute.operations import _operations as compute_ops
    from azure.mgmt.resource.resources import _configuration as resource_config

    source = open(compute_ops.__file__).read()
    for builder, version in (("build_virtual_machines_create_or_update_request", "2026-04-01"),
                             ("build_virtual_machine_run_commands_create_or_update_request", "2026-04-01"),
                             ("build_snapshots_create_or_update_request", "2026-03-02"),
                             ("build_snapshots_grant_access_request", "2026-03-02")):
        body = source.split(f"def {builder}(", 1)[1][:1500]
        assert f'_params.pop("api-version", "{version}")' in body, builder
    assert '"2025-04-01"' in open(resource_config.__file__).read()
    assert {op.version for op in arm_schema.OPERATIONS} == {"2026-04-01", "2026-03-02", "2025-04-01"}
