"""Least privilege, shown on the verbs: every ARM call they make runs under exactly the documented roles
(scripts/azure/roles/*.json, enforced by the ARM double), and taking any one action they use out of the
operator role makes the verb fail with the action's name in what it says.

Each scenario sets its world up under the full roles, then (`ctx.revoke`) the role loses the action, as if
the owner had created it without, and the verb runs:

- preflight (GETs only; the repair group exists, so the operator role's permissions are read there),
  discover, sweep --delete, collect (rescue-vm, the remote side scripted: no dump) and rollback as
  `python -m scripts <verb>` runs them in-process; snapshot-export through its collector (the exported
  disk is a URL that answers nothing: everything before and after the read happens); prepare-dump --swap
  through its swapped run (scripts.run.prepare_dump.swap_trigger_restore: preflight, swap, wait for the
  crash, NMI through `az`, roll back).

The exit code is 3 (the identity lacks a role), except where the verb's documented contract says
otherwise: 31 when sweep could not delete a group (it is left); for snapshot-export's revoke and snapshot
delete, the export's own failure (here the missing disk's 4) with "also left behind: ..." naming the
refused action (31 when the dumps were stored); and the verb's usual code when the call only informs
(discover's VM sizes: memory unknown; collect's run command delete: the repair teardown removes it).
Whatever the code, what the verb says names the action.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from scripts.__main__ import main
from scripts.azure import roles
from scripts.base.errors import CrashcartError
from scripts.devkit import arm_compute, arm_snapshot, arm_vm
from scripts.devkit.arm_resources import add_resource_group_routes
from scripts.devkit.arm_vmops import repair_world, write_outputs
from tests.devkit.fakeaz import install_fake_az

OPERATOR = roles.operator().name
SUB = arm_vm.SUB
FAST = ["--poll-seconds", "0.01"]


@dataclass
class Ctx:
    arm: Any
    azurite: Any
    container: Any
    tmp: Path
    monkeypatch: Any
    capsys: Any
    caplog: Any
    action: str | None = None  # taken out of the operator role right before the verb runs
    said: list[str] = field(default_factory=list)

    def revoke(self) -> None:
        if self.action:
            self.arm.rbac.remove_action(self.action)

    def verb(self, *argv: str) -> int:
        self.revoke()
        code = main(list(argv))
        out = self.capsys.readouterr()
        self.said += [out.err, out.out]
        return code

    def text(self) -> str:
        return "\n".join(self.said + [self.caplog.text])


# ---- the scenarios ------------------------------------------------------------------------------------------
def discover(ctx: Ctx) -> int:
    vm = arm_vm.add_broken_vm(ctx.arm)
    return ctx.verb("discover", "--vm", vm.vm_id, "--config", str(ctx.tmp / "repair.toml"))


def sweep(ctx: Ctx) -> int:
    groups = add_resource_group_routes(ctx.arm)
    groups.add(SUB, "crashcart-repair-old", tags={"crashcart": "repair", "crashcart-expires-at": "2024-01-01T00:00:00Z"})
    return ctx.verb("sweep", "--subscription", SUB, "--delete", "--now", "2025-01-01T00:00:00Z")


def collect(ctx: Ctx) -> int:
    world = repair_world(ctx.arm, ctx.azurite, ctx.container.container_name)
    arm_compute.install_run_commands(ctx.arm, arm_compute.Scripted(["Running", "Succeeded"],
                                                                    output=arm_compute.result_line("no_dump")))
    outputs = write_outputs(ctx.tmp / "outputs.json", world)
    return ctx.verb("collect", "--outputs-file", str(outputs), "--agent-wait-minutes", "0.05", *FAST,
                    "--out-dir", str(ctx.tmp / "out"))


def _swapped(ctx: Ctx) -> Any:
    """The state `prepare-dump --swap` left when it stopped half-way: the VM runs on the disk copy."""
    from scripts.azure import ids
    from scripts.azure.clients import AzureClients
    from scripts.config.stackoutputs import RepairOutputs
    from scripts.nodump import rollback, swap

    world = repair_world(ctx.arm, ctx.azurite, ctx.container.container_name)
    compute = AzureClients(SUB).compute
    vm = ids.parse(world.vm_id, "vm")
    manifest = rollback.RollbackManifest.for_swap(RepairOutputs.from_values(world.outputs), power_state_before="running",
                                                  run="web-01/20250517T031245Z", out_dir=ctx.tmp / "out")
    rollback.save(manifest, ctx.container, require_evidence=True)
    swap.stop_and_deallocate(compute, vm, poll_s=0.01)
    swap.detach_data_disk(compute, ids.parse(world.rescue_vm_id, "vm"), world.copy_id, poll_s=0.01)
    swap.swap_os_disk(compute, vm, world.copy_id, expect_current=world.original_disk_id, poll_s=0.01)
    swap.start(compute, vm, poll_s=0.01)
    return manifest


def rollback(ctx: Ctx) -> int:
    manifest = _swapped(ctx)
    return ctx.verb("rollback", "--manifest", manifest.local_path, *FAST)


def rollback_deleting_the_copy(ctx: Ctx) -> int:
    manifest = _swapped(ctx)
    return ctx.verb("rollback", "--manifest", manifest.local_path, "--delete-copy", *FAST)


def _swapped_run(ctx: Ctx, **sim: Any) -> int:
    from scripts.azure.clients import AzureClients
    from scripts.config.stackoutputs import RepairOutputs
    from scripts.nodump import swap
    from scripts.run.prepare_dump import TriggerOptions, swap_trigger_restore

    world = repair_world(ctx.arm, ctx.azurite, ctx.container.container_name, **sim)
    compute = AzureClients(SUB).compute
    outputs = RepairOutputs.from_values(world.outputs)
    options = TriggerOptions(timeout_s=5, nmi_after_s=0.0 if sim.get("mode") == "hang" else None, auto_nmi=True,
                             dump_wait_s=0, poll_s=0.01)
    ctx.revoke()
    try:
        check = swap.preflight(compute, outputs)
        swap_trigger_restore(compute, ctx.container, outputs, prefix="web-01/20250517T031245Z", out_dir=ctx.tmp / "out",
                             check=check, options=options)
    except CrashcartError as err:
        ctx.said.append(err.message)
        return int(err.exit_code)
    return 0


def prepare_swap(ctx: Ctx) -> int:
    return _swapped_run(ctx, crash_after=1)


def prepare_swap_hang(ctx: Ctx) -> int:
    install_fake_az(ctx.tmp, ctx.monkeypatch)
    return _swapped_run(ctx, mode="hang")


def _export(ctx: Ctx, *, stack_snapshot: bool) -> int:
    """snapshot-export of an export URL with no disk behind it (a valid read SAS, no blob: 404): the snapshot,
    the grant, the failed read, the revoke and the delete all happen."""
    from scripts.collection.contract import CollectError, CollectRequest
    from scripts.collection.snapshot_access import ExportTarget
    from scripts.collection.snapshot_export import ExportOptions, SnapshotExportCollector
    from scripts.config.model import Config
    from scripts.config.stackoutputs import RepairOutputs

    from azure.storage.blob import BlobSasPermissions, generate_blob_sas

    vm = arm_vm.add_broken_vm(ctx.arm)
    name = ctx.container.container_name
    token = generate_blob_sas(ctx.azurite.account, name, "exported-osdisk.vhd", account_key=ctx.azurite.key,
                              permission=BlobSasPermissions(read=True), expiry=dt.datetime.now(dt.timezone.utc)
                              + dt.timedelta(hours=1))
    missing = f"{ctx.azurite.blob_endpoint}/{name}/exported-osdisk.vhd?{token}"  # a valid SAS, no blob: 404
    arm_snapshot.install_snapshot_routes(ctx.arm, lambda snapshot_id, body: missing)
    add_resource_group_routes(ctx.arm)  # the kit's snapshot goes in the repair group, made when absent
    config = Config.from_dict({
        "source": {"subscription_id": SUB, "resource_group": "prod-web", "vm_name": "web-01", "location": "westeurope",
                   "os_disk_id": vm.disk_id, "os_disk_size_gb": 127},
        "evidence": {"container": ctx.container.container_name}, "repair": {"strategy": "snapshot-export"}})
    if stack_snapshot:
        snapshot_id = arm_snapshot.add_snapshot(ctx.arm, vm.disk_id)
        world_outputs = RepairOutputs(
            subscription_id=SUB, resource_group_name="crashcart-repair-web-01", rescue_vm_id="", rescue_vm_name="",
            rescue_vm_principal_id="", rescue_os="windows", disk_copy_id="", disk_copy_lun=0, snapshot_id=snapshot_id,
            source_vm_id=vm.vm_id, source_os_disk_id=vm.disk_id, evidence_account_name=ctx.azurite.account,
            evidence_blob_endpoint=ctx.azurite.blob_endpoint, evidence_container=ctx.container.container_name)
        target = ExportTarget.from_outputs(world_outputs, config)
    else:
        target = ExportTarget.from_config(config, ctx.azurite.blob_endpoint, ctx.container.container_name)
    ctx.revoke()
    request = CollectRequest(None, config, progress=False, out_dir=ctx.tmp / "out", poll_seconds=0.01)
    try:
        result = SnapshotExportCollector(ExportOptions(target=target)).collect(request)
    except CollectError as err:
        ctx.said += [err.message, json.dumps(err.result.to_dict() if hasattr(err.result, "to_dict") else str(err.result))]
        return int(err.exit_code)
    return int(result.exit_code)


def preflight(ctx: Ctx) -> int:
    """`preflight` on a broken VM whose repair group exists (its permissions are read there): GETs only."""
    import tomllib

    from scripts.config.model import Config
    from scripts.devkit import arm_authz, arm_usage
    from scripts.devkit.arm_rbac import EVIDENCE_CONTAINER
    from scripts.run.discover import discover_config

    arm_authz.install(ctx.arm)
    arm_usage.install(ctx.arm)
    vm = arm_vm.add_broken_vm(ctx.arm)
    account_id = EVIDENCE_CONTAINER.split("/blobServices/")[0]
    ctx.arm.put(account_id, {"name": "crashcartevidence", "type": "Microsoft.Storage/storageAccounts",
                             "location": "westeurope"})
    data = tomllib.loads(discover_config(vm.vm_id).to_toml())
    container = EVIDENCE_CONTAINER.rsplit("/", 1)[1]  # the container the evidence roles are assigned on
    try:
        ctx.azurite.service_client().create_container(container)
    except Exception:  # noqa: BLE001 - another test made it: preflight only reads its properties
        pass
    data["evidence"].update(account_id=account_id, container=container)
    config = Config.from_dict(data, {})
    assert config.repair.strategy == "auto"  # left to preflight
    path = ctx.tmp / "repair.toml"
    path.write_text(config.to_toml(), encoding="utf-8")
    group = config.repair_resource_group
    ctx.arm.put(f"/subscriptions/{SUB}/resourceGroups/{group}", {"name": group, "location": "westeurope",
                                                                 "tags": {"crashcart": "repair"}})
    ctx.monkeypatch.delenv("CRASHCART_REPAIR_STRATEGY", raising=False)
    return ctx.verb("preflight", "--config", str(path))


def export_made_snapshot(ctx: Ctx) -> int:
    return _export(ctx, stack_snapshot=False)


def export_stack_snapshot(ctx: Ctx) -> int:
    return _export(ctx, stack_snapshot=True)


SCENARIOS: dict[str, Callable[[Ctx], int]] = {
    "discover": discover, "sweep": sweep, "collect": collect, "rollback": rollback,
    "rollback --delete-copy": rollback_deleting_the_copy, "prepare-dump --swap": prepare_swap,
    "prepare-dump --swap (hang, NMI)": prepare_swap_hang, "export (snapshot made)": export_made_snapshot,
    "export (stack's snapshot)": export_stack_snapshot, "preflight": preflight,
}

# How each scenario ends with every role in place: collect finds no dump (scripted), an export of a missing
# blob fails its read (and cleans up).
HAPPY = {name: (0,) for name in SCENARIOS} | {"collect": (10,), "export (snapshot made)": (4, 11),
                                             "export (stack's snapshot)": (4, 11)}

# Each operator action the verbs use: the scenario that shows it, and the exit code without it.
NEEDED: dict[str, tuple[str, int]] = {
    "Microsoft.Resources/subscriptions/resourceGroups/read": ("sweep", 3),
    "Microsoft.Resources/subscriptions/resourceGroups/write": ("export (snapshot made)", 3),
    "Microsoft.Resources/subscriptions/resourceGroups/delete": ("sweep", 31),
    "Microsoft.Resources/subscriptions/operationresults/read": ("sweep", 31),
    "Microsoft.Compute/locations/vmSizes/read": ("discover", 0),
    "Microsoft.Compute/locations/operations/read": ("collect", 3),
    "Microsoft.Compute/locations/DiskOperations/read": ("export (snapshot made)", 3),
    "Microsoft.Compute/snapshots/read": ("export (stack's snapshot)", 3),
    "Microsoft.Compute/snapshots/write": ("export (snapshot made)", 3),
    "Microsoft.Compute/snapshots/delete": ("export (snapshot made)", 4),
    "Microsoft.Compute/snapshots/beginGetAccess/action": ("export (snapshot made)", 3),
    "Microsoft.Compute/snapshots/endGetAccess/action": ("export (snapshot made)", 4),
    "Microsoft.Compute/disks/read": ("prepare-dump --swap", 3),
    "Microsoft.Compute/disks/delete": ("rollback --delete-copy", 3),
    "Microsoft.Compute/virtualMachines/read": ("collect", 3),
    "Microsoft.Compute/virtualMachines/write": ("rollback", 3),
    "Microsoft.Compute/virtualMachines/instanceView/read": ("collect", 3),
    "Microsoft.Compute/virtualMachines/powerOff/action": ("rollback", 3),
    "Microsoft.Compute/virtualMachines/deallocate/action": ("rollback", 3),
    "Microsoft.Compute/virtualMachines/start/action": ("rollback", 3),
    "Microsoft.Compute/virtualMachines/retrieveBootDiagnosticsData/action": ("prepare-dump --swap", 3),
    "Microsoft.Compute/virtualMachines/runCommands/read": ("collect", 3),
    "Microsoft.Compute/virtualMachines/runCommands/write": ("collect", 3),
    "Microsoft.Compute/virtualMachines/runCommands/delete": ("collect", 10),
    "Microsoft.SerialConsole/serialPorts/connect/action": ("prepare-dump --swap (hang, NMI)", 3),
    # preflight's own reads (README "Exit codes": a read it cannot make is a blocker naming the action)
    "Microsoft.Resources/subscriptions/providers/read": ("preflight", 3),
    "Microsoft.Authorization/permissions/read": ("preflight", 3),
    "Microsoft.Compute/locations/usages/read": ("preflight", 3),
    "Microsoft.Compute/skus/read": ("preflight", 3),
}
# What only Terraform uses (the repair stack's create and destroy): the ARM double does not serve Terraform.
TERRAFORM_ONLY = {
    "Microsoft.Resources/subscriptions/resourceGroups/resources/read",
    "Microsoft.Compute/disks/write",
    "Microsoft.Compute/virtualMachines/delete",
} | {a for a in roles.operator().actions if a.startswith("Microsoft.Network/")}


@pytest.fixture
def ctx(arm, azurite, evidence_container, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.chdir(tmp_path)
    return Ctx(arm, azurite, evidence_container, tmp_path, monkeypatch, capsys, caplog)


def test_every_action_of_the_operator_role_is_used_or_terraforms():
    assert set(NEEDED) | TERRAFORM_ONLY == set(roles.operator().actions)
    assert not set(NEEDED) & TERRAFORM_ONLY


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_verbs_run_under_exactly_the_documented_roles(name, ctx):
    """The happy path: nothing refused, every call named, and the operator actions the verb needed (those no
    source-side role grants) are the ones NEEDED says it shows."""
    code = SCENARIOS[name](ctx)
    assert code in HAPPY[name], ctx.text()
    decisions = ctx.arm.rbac.decisions
    assert ctx.arm.unmapped == [] and all(d.allowed for d in decisions), \
        [(d.method, d.path) for d in decisions if not d.allowed]
    only_operator = {d.operation.action for d in decisions if d.granted_by == (OPERATOR,)}
    shown_here = {action for action, (scenario, _) in NEEDED.items() if scenario == name}
    assert shown_here <= only_operator, f"{name} no longer needs {shown_here - only_operator}"
    assert only_operator <= set(NEEDED), f"{name} uses {only_operator - set(NEEDED)}: add them to NEEDED"


@pytest.mark.parametrize("action", list(NEEDED))
def test_without_one_action_the_verb_fails_naming_it(action, ctx):
    scenario, expected = NEEDED[action]
    ctx.action = action
    code = SCENARIOS[scenario](ctx)
    assert code == expected, ctx.text()
    assert action in ctx.text()
    if scenario.startswith("export") and expected != 3:
        assert f"also left behind: " in ctx.text()
    assert any(not d.allowed and d.operation.action == action for d in ctx.arm.rbac.decisions)
