"""`prepare-dump --live` and `rollback --live` as an operator runs them (`python -m scripts ...` in-process),
against the strict ARM double (every call RBAC-checked, as the documented roles allow) and Azurite.

The source VM runs: its agent reports Ready, its CrashControl is the stand-in of scripts/devkit/arm_live.py,
which answers every Run Command the way scripts/remote/prepare_live.ps1.j2 does (that script is held to
PowerShell 5.1 in tests/remote/test_remote_prepare_live.py). A fresh Azure image: automatic dump
(CrashDumpEnabled 7), AutoReboot 1, the page file on the temporary disk D:, 16 GiB of RAM.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.__main__ import main
from scripts.config.model import Config, render_toml
from scripts.devkit import arm_compute, arm_live, arm_vm
from scripts.devkit.arm_live import AZURE_DEFAULT

FAST = ["--poll-seconds", "0.01", "--agent-wait-minutes", "0.05"]
RUN_COMMAND_WRITE = "Microsoft.Compute/virtualMachines/runCommands/write"


@pytest.fixture
def world(arm, evidence_container, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return World(arm, evidence_container, tmp_path)


class World:
    def __init__(self, arm, container, tmp: Path, os_type: str = "Windows"):
        self.arm, self.container, self.tmp = arm, container, tmp
        self.out = tmp / "out"
        self.broken = arm_vm.add_broken_vm(arm, os_type=os_type)
        self.vm = arm_live.install_live_vm(arm, self.broken.vm_id)
        self.commands = arm_compute.install_run_commands(arm, self.vm.outcome)
        self.config = tmp / "repair.toml"
        self.config.write_text(render_toml(Config.from_dict({
            "source": {"subscription_id": arm_vm.SUB, "resource_group": "prod-web", "vm_name": "web-01",
                       "location": "westeurope", "os_disk_id": self.broken.disk_id, "os_disk_size_gb": 127,
                       "memory_gb": 16},
            "evidence": {"container": container.container_name}})))

    def verb(self, capsys, *argv: str) -> tuple[int, dict, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, (json.loads(out.out) if out.out.strip() else {}), out.err

    def prepare(self, capsys, *extra: str) -> tuple[int, dict, str]:
        return self.verb(capsys, "prepare-dump", "--live", "--type", "complete", "--config", str(self.config),
                         "--out-dir", str(self.out), *FAST, *extra)

    def modes(self) -> list[str]:
        return [p["value"] for body in self.commands.created for p in body["properties"]["parameters"]
                if p["name"] == "Mode"]

    def blobs(self) -> list[str]:
        return sorted(b.name for b in self.container.list_blobs())


ORIGINAL = json.loads(json.dumps(AZURE_DEFAULT))
COMPLETE_16G = {"CrashDumpEnabled": 1, "NMICrashDump": 1, "AutoReboot": 0, "Overwrite": 1,
                "DedicatedDumpFile": r"C:\DedicatedDump.sys", "DumpFileSize": 16384 + 257, "AlwaysKeepMemoryDump": 1}


def values(vm: arm_live.LiveVm) -> dict:
    return {name: record["value"] for name, record in vm.values.items()}


def test_dry_run_shows_every_change_old_to_new_and_writes_nothing(world, capsys):
    code, doc, err = world.prepare(capsys, "--dry-run")
    assert code == 0, doc
    assert doc["status"] == "planned" and doc["reboot_needed"] is True
    shown = {c["name"]: (c["old"] and c["old"]["value"], c["new"]["value"]) for c in doc["plan"]["changes"] if c["changed"]}
    assert shown == {"CrashDumpEnabled": (7, 1), "NMICrashDump": (None, 1), "AutoReboot": (1, 0),
                     "DedicatedDumpFile": (None, r"C:\DedicatedDump.sys"), "DumpFileSize": (None, 16641),
                     "AlwaysKeepMemoryDump": (None, 1)}
    assert doc["plan"]["page_file"]["dedicated"] is True  # the page file is on D:, not the system volume
    assert r"CrashControl\CrashDumpEnabled: 7 -> 1" in err
    assert r"CrashControl\DumpFileSize: (absent) -> 16641" in err
    # one read-only run command; nothing on the VM, in evidence or on disk
    assert world.modes() == ["read"]
    assert world.vm.values == ORIGINAL and world.vm.writes == 0
    assert world.blobs() == [] and not list(world.tmp.rglob("live-manifest*.json"))


def test_without_allow_source_write_nothing_runs_on_the_vm(world, capsys):
    code, _, err = world.prepare(capsys)
    assert code == 2
    assert "--allow-source-write" in err
    assert world.commands.created == [] and world.vm.values == ORIGINAL
    code, _, err = world.verb(capsys, "prepare-dump", "--allow-source-write", "--config", str(world.config))
    assert code == 2 and "goes with --live" in err
    code, _, err = world.prepare(capsys, "--allow-source-write", "--swap")
    assert code == 2 and "exclude each other" in err


def test_the_manifest_is_stored_before_the_apply_then_the_values_and_the_reboot_need(world, capsys):
    seen = {}

    def at_apply(vm):  # the moment the VM is written to: both copies of the manifest must exist already
        local = sorted(world.out.rglob("live-manifest.json"))
        seen["local"] = json.loads(local[0].read_text()) if local else None
        seen["blobs"] = world.blobs()
        seen["values_then"] = json.loads(json.dumps(vm.values))

    world.vm.on_apply = at_apply
    code, doc, err = world.prepare(capsys, "--allow-source-write")
    assert code == 0, err
    assert seen["local"]["state"] == "ready"
    assert seen["local"]["old"]["CrashDumpEnabled"] == {"type": "REG_DWORD", "value": 7}
    assert seen["local"]["old"]["DedicatedDumpFile"] is None  # absent before: rollback removes it
    assert [b.rsplit("/", 1)[1] for b in seen["blobs"]] == ["live-manifest.json"]
    assert seen["values_then"] == ORIGINAL
    assert world.modes() == ["read", "prepare"]
    assert {k: v for k, v in values(world.vm).items() if k in COMPLETE_16G} == COMPLETE_16G
    assert doc["status"] == "applied" and doc["reboot_needed"] is True and "restart web-01" in doc["next"]
    assert "needs a restart" in err
    names = [b.rsplit("/", 1)[1] for b in world.blobs()]
    assert names == ["live-manifest.01-applied.json", "live-manifest.json"]
    first = json.loads(world.container.download_blob(world.blobs()[1]).readall())
    assert first["state"] == "ready"  # the first state is never replaced
    # the Expect of the apply is what was read: the script writes only if nothing changed meanwhile
    apply = world.vm.calls[1]
    assert json.loads(apply["Expect"])["CrashDumpEnabled"] == {"type": "REG_DWORD", "value": 7}


def test_rollback_live_puts_the_old_values_back_and_is_idempotent(world, capsys):
    assert world.prepare(capsys, "--allow-source-write")[0] == 0
    (manifest,) = world.out.rglob("live-manifest.json")
    code, doc, err = world.verb(capsys, "rollback", "--live", "--manifest", str(manifest), *FAST)
    assert code == 0, err
    assert world.vm.values == ORIGINAL  # values absent before are removed again
    assert doc["state"] == "restored" and doc["rollback"]["reboot_needed"] is True
    assert len(doc["rollback"]["restored"]) == 6  # Overwrite was 1 already: not changed, not restored
    assert json.loads(manifest.read_text())["state"] == "restored"
    # again, from evidence: nothing left to do, nothing written
    calls = len(world.vm.calls)
    code, doc, err = world.verb(capsys, "rollback", "--live", "--evidence-blob", world.blobs()[-1], "--config",
                                str(world.config), "--out-dir", str(world.out), *FAST)
    assert code == 0, err
    assert doc["rollback"]["restored"] == [] and doc["rollback"]["reboot_needed"] is False
    assert [c["Mode"] for c in world.vm.calls[calls:]] == ["read"]


def test_rollback_refuses_a_value_someone_else_changed(world, capsys):
    assert world.prepare(capsys, "--allow-source-write")[0] == 0
    world.vm.values["CrashDumpEnabled"] = {"type": "REG_DWORD", "value": 2}  # an admin, meanwhile
    before = json.loads(json.dumps(world.vm.values))
    code, _, err = world.verb(capsys, "rollback", "--live", "--config", str(world.config), "--out-dir",
                              str(world.out), *FAST)
    assert code == 2
    assert "CrashDumpEnabled is 2" in err and "nothing was restored" in err
    assert world.vm.values == before and world.vm.calls[-1]["Mode"] == "read"


def test_a_write_failing_midway_is_put_back_by_the_script(world, capsys):
    world.vm.fail_after = 2
    code, doc, err = world.prepare(capsys, "--allow-source-write")
    assert code == 12
    assert "failed midway" in err
    assert world.vm.values == ORIGINAL
    assert doc["state"] == "not_applied" and world.modes() == ["read", "prepare"]
    assert [b.rsplit("/", 1)[1] for b in world.blobs()] == ["live-manifest.01-not_applied.json", "live-manifest.json"]


def test_when_the_script_cannot_put_back_the_kit_restores(world, capsys):
    world.vm.fail_after, world.vm.restore_fails = 2, True
    code, doc, err = world.prepare(capsys, "--allow-source-write")
    assert code == 12
    assert world.vm.values == ORIGINAL  # the kit's undo: read, then the old values back
    assert doc["state"] == "restored" and len(doc["restore"]["restored"]) == 2
    assert world.modes() == ["read", "prepare", "read", "prepare"]
    assert [b.rsplit("/", 1)[1] for b in world.blobs()] == ["live-manifest.01-restored.json", "live-manifest.json"]


def test_a_value_changed_between_the_read_and_the_apply_stops_the_apply(world, capsys):
    def admin(vm):
        vm.values["CrashDumpEnabled"] = {"type": "REG_DWORD", "value": 2}
        vm.meanwhile = None

    world.vm.meanwhile = admin
    code, doc, err = world.prepare(capsys, "--allow-source-write")
    assert code == 12 and "CrashDumpEnabled changed since crashcart read it" in err
    assert world.vm.values == {**ORIGINAL, "CrashDumpEnabled": {"type": "REG_DWORD", "value": 2}}
    assert world.vm.writes == 0 and doc["state"] == "not_applied"


def test_a_vm_already_set_up_gets_no_manifest_and_no_write(world, capsys):
    world.vm.values.update({k: {"type": "REG_SZ" if k == "DedicatedDumpFile" else "REG_DWORD", "value": v}
                            for k, v in COMPLETE_16G.items()})
    code, doc, _ = world.prepare(capsys, "--allow-source-write")
    assert code == 0 and doc["status"] == "unchanged" and doc["reboot_needed"] is False
    assert world.modes() == ["read"] and world.blobs() == []


def test_without_the_run_command_role_the_verb_fails_naming_it(world, capsys):
    world.arm.rbac.remove_action(RUN_COMMAND_WRITE)
    code, _, err = world.prepare(capsys, "--allow-source-write")
    assert code == 3
    assert RUN_COMMAND_WRITE in err
    assert world.vm.values == ORIGINAL and world.blobs() == []
    assert any(not d.allowed and d.operation.action == RUN_COMMAND_WRITE for d in world.arm.rbac.decisions)


def test_every_call_runs_under_the_documented_roles(world, capsys):
    assert world.prepare(capsys, "--allow-source-write")[0] == 0
    decisions = world.arm.rbac.decisions
    assert world.arm.unmapped == [] and all(d.allowed for d in decisions)
    used = {d.operation.action for d in decisions}
    assert {RUN_COMMAND_WRITE, "Microsoft.Compute/virtualMachines/runCommands/read",
            "Microsoft.Compute/virtualMachines/runCommands/delete"} <= used
    # nothing but run commands changes the source VM: no VM write, no power action
    writes = [r for r in world.arm.requests if r.method in ("PUT", "POST", "PATCH", "DELETE")]
    assert writes and all("/runCommands/" in r.path or "/operations/" in r.path.lower() for r in writes)


def test_a_linux_source_is_refused(arm, evidence_container, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    world = World(arm, evidence_container, tmp_path, os_type="Linux")
    code, _, err = world.prepare(capsys, "--dry-run")
    assert code == 2 and "runs Linux" in err and world.commands.created == []
