"""`repair-run --fix disable-driver:auto` (#16 item 4): collect -> triage -> fix -> verify in one unattended
command, as a real subprocess against the ARM double and Azurite (tests/run/repairkit.py's project, the
fake terraform), with the guest of tests/run/test_fix.py (the double's model of the copy's content, arm_guest.ImageDisk): started
on the copy, it bugchecks while the copy's hive still starts CSAgent and boots once it is disabled.

The collection is the rescue-vm one (scripted: it uploads a small dump whose culprit is csagent.sys, and does
not triage); the fix's Run Commands really run the bash fix script against a real NTFS image (LocalScript).

- booted: exit 0, status "fixed", the VM on the fixed copy, the repair stack kept on purpose (no destroy),
  the report saying so and what to do next;
- crashed again: the original disk is back, the run fails with the fix's exit code (16, CRASHED_AGAIN), the
  fix report says what became of the dump that crash wrote, and the stack is destroyed as usual.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from scripts.devkit import arm_compute
from scripts.devkit.arm_compute import LocalScript
from scripts.devkit.arm_guest import ImageDisk
from scripts.devkit.arm_vmops import repair_world
from scripts.devkit.dumpbuilder import DEFAULT_MODULES, build_triage_dump
from tests.run.repairkit import _arm_double, arm, assert_torn_down  # noqa: F401
from tests.run.test_fix import csagent_start, image, pristine_image  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.root]


def _csagent_dump(path: Path) -> bytes:
    modules = tuple(dataclasses.replace(m, name="csagent.sys", path="\\SystemRoot\\system32\\drivers\\CrowdStrike\\"
                                        "csagent.sys") if m.name == "contosoflt.sys" else m for m in DEFAULT_MODULES)
    return build_triage_dump(path, modules=modules, faulting_module="csagent.sys").path.read_bytes()


def _world(project, arm, azurite_container, image, tmp_path, **sim) -> Any:
    """The repair world, a collection that stores a csagent.sys dump, then the fix scripts on the image."""
    azurite, name = azurite_container
    container = azurite.service_client().get_container_client(name)
    world = repair_world(arm, azurite, name, copy_content=ImageDisk(image), **sim)
    data = _csagent_dump(tmp_path / "crash.dmp")

    def uploads_the_dump(parameters: dict[str, str]) -> dict[str, Any]:
        blob = f"{parameters['Prefix']}/Minidump/crash.dmp"
        container.upload_blob(blob, data)
        container.upload_blob(f"{blob}.manifest.json", json.dumps(
            {"blob": blob, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
        files = [{"blob": blob, "kind": "minidump", "source_path": r"F:\Windows\Minidump\crash.dmp",
                  "size": len(data), "uploaded": True}]
        return {"output": arm_compute.result_line("collected", files=files)}

    made: list[Any] = []

    def outcome() -> Any:  # the first run command is the collection, the others the fix's
        made.append(arm_compute.Scripted(["Running", "Succeeded"], effect=uploads_the_dump) if not made
                    else LocalScript(env={"Device": str(image)}))
        return made[-1]

    arm_compute.install_run_commands(arm, outcome)
    project.set_outputs({**world.outputs, "evidence_blob_endpoint": azurite.blob_endpoint,
                         "evidence_container": name})
    return world


def _run(project, arm, *args: str):
    return project.run("--strategy", "rescue-vm", "--fix", "disable-driver:auto", *args, timeout=240, env={
        "CRASHCART_ARM_ENDPOINT": arm.url, "CRASHCART_POLL_SECONDS": "0.05", "CRASHCART_AGENT_WAIT_MINUTES": "0.2",
        "CRASHCART_FIX_SETTLE_SECONDS": "0.1", "CRASHCART_FIX_BOOT_TIMEOUT_SECONDS": "30"})


def test_a_fix_that_boots_keeps_the_fixed_disk_and_the_stack_on_purpose(project, arm, azurite_container, image,
                                                                        tmp_path):
    world = _world(project, arm, azurite_container, image, tmp_path)
    assert csagent_start(image) == [1, 1]
    outcome = _run(project, arm)
    assert outcome.code == 0, outcome.stderr
    result = outcome.result
    assert result["status"] == "fixed"
    assert [s["name"] for s in result["steps"]][-2:] == ["collect", "fix"]
    # triage of the stored dump (rescue-vm does not triage) named the culprit; exactly that driver is disabled
    assert result["collect"]["triage"]["culprit"]["module"] == "csagent.sys"
    assert result["fix"]["status"] == "booted" and result["fix"]["recipes"][0]["driver"] == "csagent"
    assert csagent_start(image) == [4, 4]
    assert world.os_disk() == world.copy_id  # the VM boots from the fixed copy
    stack = result["repair_stack"]
    assert stack["kept"] and stack["kept_for_fix"] and not stack["destroyed"]
    assert "verified fix" in stack["kept_reason"]
    assert project.log.calls("repair", "destroy") == [] and project.resources("repair")
    assert "pipenv run rollback --manifest" in result["next"] and "repair-run --cleanup" in result["next"]
    assert "stays on purpose" in outcome.stderr and "teardown failed" not in outcome.stderr.lower()
    assert "the VM is fixed and booted" in outcome.stderr
    assert result["error"] is None
    assert project.lock_metadata()["crashcart_state"] == "kept"


def test_a_fix_that_crashes_again_rolls_back_and_tears_down(project, arm, azurite_container, image, tmp_path):
    world = _world(project, arm, azurite_container, image, tmp_path, crash_after=1)
    world.sim.crash_disk = world.copy_id  # the marker: a boot from the copy crashes whatever the fix did
    outcome = _run(project, arm)
    assert outcome.code == 16, outcome.stderr
    result = outcome.result
    assert result["status"] == "failed" and result["fix"]["status"] == "not_booted"
    assert "crashed again" in outcome.stderr and world.sim.crashes[0]["dump"]["path"] == "Windows/MEMORY.DMP"
    assert result["fix"]["new_dump"]["strategy"] == "rescue-vm" and result["fix"]["new_dump"]["message"]
    assert world.os_disk() == world.original_disk_id  # back on its original disk
    assert not result["repair_stack"].get("kept_for_fix")
    assert_torn_down(project, outcome)


def test_a_fix_spec_that_cannot_work_stops_before_anything_is_deployed(project):
    for spec, said in (("reboot", "there is no recipe 'reboot'"), ("safe-mode:auto", "only disable-driver")):
        outcome = project.run("--fix", spec)
        assert outcome.code == 2 and said in outcome.stderr, outcome.stderr
        assert project.log.calls() == []
    outcome = project.run("--cleanup", "--fix", "disable-driver:auto")
    assert outcome.code == 2 and "--fix goes with a run that collects" in outcome.stderr
