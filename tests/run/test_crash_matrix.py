"""Crash consistency (issue #13, deliver 3): the kit is killed with SIGKILL in each step - synth, deploy,
collect, destroy - and a new repair-run for the same VM then ends with that VM's repair stack resumed and
destroyed, another VM's kept stack untouched and the evidence intact (the evidence stack's state, and every
blob an earlier collection stored).

The kill is a real SIGKILL of the repair-run process: sent by the test when the kit's log shows the step
(synth, collect), or by the fake terraform half-way through its apply / destroy (FAKE_TF_KILL), after it
wrote the partial state a real one would. The killed run holds the VM lock without renewing it: the
re-run waits for its lease to expire (LEASE_SECONDS), names it, and takes over.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from typing import Any

import pytest

from scripts.azure.identity import vm_key
from scripts.devkit import arm_compute
from tests.run.repairkit import (SOURCE_VM, Outcome, Project, _arm_double, arm, assert_torn_down,  # noqa: F401
                                 repair_outputs, wait_for)

pytestmark = pytest.mark.slow

WEB_02_STATE = {"version": 4, "serial": 3, "lineage": "web-02", "outputs": {},
                "resources": [{"mode": "managed", "type": "azurerm_resource_group", "name": "repair_group",
                               "instances": [{"attributes": {"id": "/fake/web-02-group"}}]}]}


class World:
    """One project with: web-02's repair stack kept beside web-01's (a state file of its own), an earlier
    dump of web-01 in evidence, the ARM double's rescue VM and a run command that uploads a dump."""

    def __init__(self, project: Project, arm: Any, azurite: Any, container_name: str, tmp_path):
        from scripts.devkit.dumpbuilder import build_triage_dump

        self.project, self.arm, self.azurite = project, arm, azurite
        self.container = azurite.service_client().get_container_client(container_name)
        self.other_state = project.root / f"terraform.repair.{vm_key(SOURCE_VM.replace('web-01', 'web-02'))}.tfstate"
        self.other_state.write_text(json.dumps(WEB_02_STATE))
        self.other_before = self.other_state.read_bytes()
        dump = build_triage_dump(tmp_path / "crash.dmp")
        self.data, self.bugcheck = dump.path.read_bytes(), dump.bugcheck_code
        self.container.upload_blob(f"{vm_key(SOURCE_VM)}/20260101T000000Z/MEMORY.DMP", b"an earlier dump")
        project.set_outputs({**repair_outputs(azurite.blob_endpoint), "evidence_container": container_name})
        self.env = {"CRASHCART_ARM_ENDPOINT": arm.url, "CRASHCART_AGENT_WAIT_MINUTES": "5",
                    "CRASHCART_STORAGE_CONNECTION_STRING": azurite.connection_string}

    def blobs(self) -> dict[str, str]:
        return {b.name: hashlib.sha256(self.container.download_blob(b.name).readall()).hexdigest()
                for b in self.container.list_blobs()}

    def rescue_vm_collects(self) -> None:
        """The rescue VM gets ready and the collection uploads the dump under the run's prefix."""
        def uploads_the_dump(parameters: dict[str, str]) -> dict[str, Any]:
            name = f"{parameters['Prefix']}/Minidump/crash.dmp"
            self.container.upload_blob(name, self.data)
            manifest = {"blob": name, "size": len(self.data), "sha256": hashlib.sha256(self.data).hexdigest(),
                        "header": {"bugcheck_code": hex(self.bugcheck)}}
            self.container.upload_blob(f"{name}.manifest.json", json.dumps(manifest))
            files = [{"blob": name, "kind": "minidump", "source_path": r"F:\Windows\Minidump\crash.dmp",
                      "size": len(self.data), "uploaded": True}]
            return {"output": arm_compute.result_line("collected", files=files)}

        arm_compute.install_rescue_vm(self.arm, agent=["Ready"])
        arm_compute.install_run_commands(
            self.arm, arm_compute.Scripted(["Pending", "Running", "Succeeded"], effect=uploads_the_dump))

    def killed(self, proc: subprocess.Popen) -> Outcome:
        outcome = Project.finish(proc)
        assert outcome.code == -signal.SIGKILL, outcome.stderr
        return outcome

    def rerun_ends_well(self, blobs_before: dict[str, str]) -> Outcome:
        """A new repair-run for the same VM: resumes what the killed one left, collects, destroys."""
        self.rescue_vm_collects()
        outcome = self.project.run(env=self.env, timeout=120)
        assert outcome.code == 0, outcome.stderr
        assert outcome.result["collect"]["status"] == "collected"
        assert_torn_down(self.project, outcome)
        assert self.other_state.read_bytes() == self.other_before, "another VM's stack was touched"
        after = self.blobs()
        assert all(after.get(name) == digest for name, digest in blobs_before.items()), "evidence changed"
        return outcome


@pytest.fixture
def world(project, arm, azurite_container, tmp_path) -> World:
    azurite, name = azurite_container
    return World(project, arm, azurite, name, tmp_path)


def wait_for_line(proc: subprocess.Popen, text: str) -> None:
    """Reads the kit's log until `text` shows (the rest stays in the pipe for Project.finish)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if text in line:
            return
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"the kit never logged {text!r}")


def test_killed_during_synth(world):
    project = world.project
    (project.root / "main.py").unlink()
    (project.root / "main.py").write_text("import time\ntime.sleep(5)\n")  # a synth that takes its time
    proc = project.start(env=world.env, skip_synth=False)
    wait_for_line(proc, "==> synth")
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    world.killed(proc)
    assert project.log.calls("repair") == []
    before = world.blobs()
    outcome = world.rerun_ends_well(before)
    assert outcome.result["repair_stack"]["leftovers_found"] == []
    assert outcome.result["lock"]["previous"] is None  # the lock comes after synth: nothing was held


def test_killed_during_deploy(world):
    project = world.project
    killed = world.killed(project.start(env={**world.env, "FAKE_TF_KILL": "apply:repair"}))
    left = project.resources("repair")
    assert left, killed.stderr  # half the stack exists
    before = world.blobs()
    outcome = world.rerun_ends_well(before)
    assert outcome.result["repair_stack"]["leftovers_found"] == left
    assert outcome.result["lock"]["previous"]["phase"] == "deploy repair"
    assert "stopped without finishing" in outcome.stderr
    assert project.log.calls("repair", "apply")[-1]["resources_before"] == left  # resumed


def test_killed_during_collect(world):
    project = world.project
    rescue = arm_compute.install_rescue_vm(world.arm, agent=["Not Ready"])
    proc = project.start(env=world.env)
    wait_for(lambda: rescue.instance_view_reads >= 2, what="the collection to poll the rescue VM's agent")
    os.kill(proc.pid, signal.SIGKILL)
    world.killed(proc)
    left = project.resources("repair")
    assert left  # the whole stack
    before = world.blobs()
    outcome = world.rerun_ends_well(before)
    assert outcome.result["repair_stack"]["leftovers_found"] == left
    assert outcome.result["lock"]["previous"]["phase"] == "collect"


def test_killed_during_destroy(world):
    project = world.project
    world.rescue_vm_collects()
    proc = project.start(env={**world.env, "FAKE_TF_KILL": "destroy:repair"})
    killed = world.killed(proc)
    left = project.resources("repair")
    assert left, killed.stderr  # half destroyed
    before = world.blobs()
    assert any(name.endswith("/Minidump/crash.dmp") for name in before)  # the killed run had collected
    outcome = world.rerun_ends_well(before)
    assert outcome.result["repair_stack"]["leftovers_found"] == left
    assert outcome.result["lock"]["previous"]["phase"] == "teardown"
