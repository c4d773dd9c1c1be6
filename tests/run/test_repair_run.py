"""repair-run end to end, as a real subprocess, with faults injected at every step.

What is real: the CLI, the orchestrator, synth (main.py, run once per session by repair-run itself;
"synth fails" is a config value main.py rejects), python-terraform, the output-reading path, collect
against the loopback ARM double (rescue VM + Run Command, scripts/devkit/arm_compute.py) and Azurite,
and the signals (sent to the process, or to its process group as a terminal's Ctrl-C is).
What stands in: `terraform`, a recording fake on PATH (tests/support/fake_terraform.py) that keeps a
state file where the stack's backend says, so "what is deployed" is observable. The evidence container
(where the VM lock lives) is Azurite.

Every fault must end with the repair stack destroyed, the evidence stack untouched, and an exit code and
message that say what happened.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import shutil
import time
from typing import Any

import pytest

from scripts.devkit import arm_compute
from scripts.devkit.arm_vm import add_broken_vm
from tests.run.repairkit import (SOURCE_VM, Project, _arm_double, arm, assert_evidence_untouched,  # noqa: F401
                                 assert_torn_down, repair_outputs, secret_was_passed_to_apply_and_destroy, wait_for)
from tests.support.fake_terraform import command_of

pytestmark = pytest.mark.slow  # every test here starts repair-run (and terraform) as processes


# ---- the faults ----------------------------------------------------------------------------------------
def test_synth_runs_main_py_and_a_failed_backend_init_deploys_nothing(synthesized):
    project, outcome = synthesized
    assert outcome.code == 30, outcome.stderr
    assert "terraform init failed" in outcome.stderr and "state backend" in outcome.stderr
    # The evidence stack comes first (the VM lock lives in it), then the leftovers are looked at.
    assert [s["name"] for s in outcome.result["steps"]] == ["config", "synth", "load config", "deploy evidence"]
    assert outcome.result["repair_stack"]["touched"] is False
    assert project.log.commands() == ["init"]  # nothing applied, so nothing to destroy
    assert "nothing was deployed for the repair" in outcome.stderr


def test_synth_fails_on_a_config_main_py_rejects(project):
    outcome = project.run(env={"CRASHCART_RESCUE_OS": "beos"}, skip_synth=False)
    assert outcome.code == 2, outcome.stderr
    assert "synth rejected the config" in outcome.stderr and "rescue.os" in outcome.stderr
    assert outcome.result["status"] == "failed"
    assert project.log.calls() == []  # terraform never ran
    assert project.resources("repair") is None
    assert_evidence_untouched(project)


def test_deploy_fails_half_way(project):
    outcome = project.run(env={"FAKE_TF_FAIL": "apply:repair"})
    assert outcome.code == 30
    assert "terraform apply failed for the repair stack: Error: creating Windows Virtual Machine" in outcome.stderr
    assert "quota exceeded" in outcome.stderr and "next:" in outcome.stderr
    assert project.log.calls("repair", "apply")[0]["resources_before"] == []
    assert_torn_down(project, outcome)
    assert secret_was_passed_to_apply_and_destroy(project)
    assert outcome.result["status"] == "failed" and outcome.result["exit_code"] == 30
    assert (project.root / "crashcart-out" / "repair-run.json").exists()
    assert project.lock_metadata()["crashcart_state"] == "released"  # the VM lock was given back


def test_collect_fails_when_the_rescue_vm_agent_never_gets_ready(project, arm, azurite_container):
    azurite, container = azurite_container
    arm_compute.install_rescue_vm(arm, agent=["Not Ready"])
    project.set_outputs({**repair_outputs(azurite.blob_endpoint), "evidence_container": container})
    outcome = project.run(env={"CRASHCART_ARM_ENDPOINT": arm.url, "CRASHCART_AGENT_WAIT_MINUTES": "0.01",
                               "CRASHCART_STORAGE_CONNECTION_STRING": azurite.connection_string})
    assert outcome.code == 14, outcome.stderr
    assert "agent of crashcart-rescue did not report Ready" in outcome.stderr  # 70a1589: names the VM
    assert outcome.result["collect"]["status"] == "agent_not_ready"
    assert arm.calls("GET", "/instanceView")
    assert_torn_down(project, outcome)


def test_happy_path_collects_the_dump_and_tears_down(project, arm, azurite_container, tmp_path):
    from scripts.devkit.dumpbuilder import build_triage_dump

    azurite, container_name = azurite_container
    container = azurite.service_client().get_container_client(container_name)
    dump = build_triage_dump(tmp_path / "crash.dmp")
    data = dump.path.read_bytes()

    def uploads_the_dump(parameters: dict[str, str]) -> dict[str, Any]:
        name = f"{parameters['Prefix']}/Minidump/crash.dmp"
        container.upload_blob(name, data)
        manifest = {"blob": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                    "header": {"bugcheck_code": hex(dump.bugcheck_code)}}
        container.upload_blob(f"{name}.manifest.json", json.dumps(manifest))
        files = [{"blob": name, "kind": "minidump", "source_path": r"F:\Windows\Minidump\crash.dmp",
                  "size": len(data), "uploaded": True}]
        return {"output": arm_compute.result_line("collected", files=files)}

    arm_compute.install_rescue_vm(arm, agent=["Not Ready", "Ready"])
    commands = arm_compute.install_run_commands(
        arm, arm_compute.Scripted(["Pending", "Running", "Succeeded"], effect=uploads_the_dump))
    project.set_outputs({**repair_outputs(azurite.blob_endpoint), "evidence_container": container_name})
    outcome = project.run(env={"CRASHCART_ARM_ENDPOINT": arm.url,
                               "CRASHCART_STORAGE_CONNECTION_STRING": azurite.connection_string}, timeout=30)
    assert outcome.code == 0, outcome.stderr
    assert outcome.result["status"] == "succeeded"
    assert outcome.result["collect"]["status"] == "collected"
    assert [b["ok"] for b in outcome.result["collect"]["blobs"]] == [True]
    assert outcome.result["outputs"]["rescue_vm_name"] == arm_compute.RESCUE_VM  # read via terraform output
    assert commands.deleted  # collect removed its run command before the teardown
    assert [command_of(c["argv"]) for c in project.log.calls("repair")] == [
        "init", "state list", "apply", "output", "destroy", "state list"]
    assert_torn_down(project, outcome)
    reports = list((project.root / "crashcart-out").rglob("report.json"))
    assert reports, "collect's report is in the output folder the pipeline publishes"


def _start_deploy_that_hangs(project: Project, *args: str) -> subprocess.Popen:
    proc = project.start(*args, env={"FAKE_TF_SLEEP": "apply:repair=30"})
    wait_for(lambda: project.log.calls("repair", "apply"), what="the repair apply to start")
    time.sleep(0.3)
    return proc


def test_sigterm_during_deploy(project):
    proc = _start_deploy_that_hangs(project)
    started = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)  # to repair-run alone: terraform does not see it
    outcome = Project.finish(proc)
    assert outcome.code == 130, outcome.stderr
    assert "stopped: SIGTERM during deploy repair" in outcome.stderr
    assert time.monotonic() - started < 15  # the 30 s apply was stopped, not waited for
    assert outcome.result["status"] == "interrupted"
    assert_torn_down(project, outcome)


def terraform_records(project: Project, command: str, phase: str) -> list[dict[str, Any]]:
    return [r for r in project.log.records() if r.get("phase") == phase and r.get("stack") == "repair"
            and command_of(r["argv"]) == command]


def test_ctrl_c_on_a_terminal_reaches_terraform_once_through_the_kit(project):
    """A terminal's Ctrl-C goes to the whole foreground process group. Terraform runs in its own session, so
    only the kit gets it, and the kit forwards exactly one interrupt (a second would make terraform exit
    without saving its state: test_ctrl_c_during_the_destroy_never_stops_it sends one)."""
    proc = _start_deploy_that_hangs(project)
    os.killpg(proc.pid, signal.SIGINT)
    outcome = Project.finish(proc)
    assert outcome.code == 130, outcome.stderr
    assert "stopped: SIGINT" in outcome.stderr
    [apply] = terraform_records(project, "apply", "start")
    assert apply["sid"] != proc.pid and apply["pgid"] != proc.pid  # not in the kit's group or session
    assert terraform_records(project, "apply", "end")[-1]["interrupts"] == 1
    assert_torn_down(project, outcome)


def test_ctrl_c_during_the_destroy_never_stops_it(project):
    """Ctrl-C (twice) while the teardown destroys: terraform never sees it, the teardown finishes, the run's
    outcome (a failed deploy) is told - and the stack is gone."""
    proc = project.start(env={"FAKE_TF_FAIL": "apply:repair", "FAKE_TF_SLEEP": "destroy:repair=3"})
    wait_for(lambda: project.log.calls("repair", "destroy"), what="the teardown's destroy")
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    outcome = Project.finish(proc)
    assert outcome.code == 30, outcome.stderr  # the deploy's failure; no 31: nothing is left
    [destroy] = terraform_records(project, "destroy", "end")
    assert destroy["exit"] == 0 and destroy["interrupts"] == 0
    assert "SIGINT received: finishing the teardown first" in outcome.stderr
    assert_torn_down(project, outcome)


def test_timeout_during_deploy(project):
    started = time.monotonic()
    outcome = project.run("--timeout", "3s", env={"FAKE_TF_SLEEP": "apply:repair=30"})
    assert outcome.code == 13, outcome.stderr
    assert "--timeout of 3s reached during deploy repair" in outcome.stderr
    assert time.monotonic() - started < 20
    assert outcome.result["status"] == "timed_out"
    assert_torn_down(project, outcome)


def test_sigint_during_collect(project, arm, azurite_container):
    azurite, container = azurite_container
    rescue = arm_compute.install_rescue_vm(arm, agent=["Not Ready"])
    project.set_outputs({**repair_outputs(azurite.blob_endpoint), "evidence_container": container})
    proc = project.start(env={"CRASHCART_ARM_ENDPOINT": arm.url, "CRASHCART_AGENT_WAIT_MINUTES": "5",
                              "CRASHCART_STORAGE_CONNECTION_STRING": azurite.connection_string})
    wait_for(lambda: rescue.instance_view_reads >= 2, what="collect to poll the rescue VM's agent")
    os.kill(proc.pid, signal.SIGINT)
    outcome = Project.finish(proc)
    assert outcome.code == 130, outcome.stderr
    assert "stopped: SIGINT during collect" in outcome.stderr
    assert_torn_down(project, outcome)


def test_a_bug_after_deploy_still_tears_down(project):
    """Outputs that break crashcart's own reading (a LUN that is not a number) are a bug, not an operator
    error: the traceback is shown and the exit code is 70 - after the teardown."""
    project.set_outputs({**repair_outputs(), "disk_copy_lun": "zero"})
    outcome = project.run()
    assert outcome.code == 70, outcome.stderr
    assert "unexpected error" in outcome.stderr and "Traceback" in outcome.stderr
    assert outcome.result["status"] == "bug"
    assert project.repair_destroyed() and outcome.result["repair_stack"]["destroyed"] is True
    assert_evidence_untouched(project)


def test_teardown_is_retried(project):
    outcome = project.run(env={"FAKE_TF_FAIL": "apply:repair,destroy:repair:1"})
    assert outcome.code == 30, outcome.stderr
    assert len(project.log.calls("repair", "destroy")) == 2
    assert "destroy attempt 1/3 failed" in outcome.stderr
    assert_torn_down(project, outcome)


def test_teardown_that_keeps_failing_says_what_is_left_and_how_to_remove_it(project):
    outcome = project.run(env={"FAKE_TF_FAIL": "apply:repair,destroy:repair"})
    assert outcome.code == 31, outcome.stderr
    assert outcome.result["status"] == "teardown_failed"
    assert "the repair stack could not be destroyed" in outcome.stderr and "NicInUse" in outcome.stderr
    assert "terraform apply failed for the repair stack" in outcome.stderr  # the first failure is kept
    assert "repair-run --cleanup" in outcome.stderr
    assert outcome.result["repair_stack"]["remaining"] == project.resources("repair") != []
    assert len(project.log.calls("repair", "destroy")) == 3
    assert_evidence_untouched(project)
    # The lock says so, and the next run names this one.
    assert project.lock_metadata()["crashcart_state"] == "teardown_failed"
    again = project.run("--cleanup")
    assert again.code == 0, again.stderr
    assert f"the last run (run {outcome.result['run_id']}" in again.stderr
    assert "could not destroy the repair stack" in again.stderr


def test_keep_leaves_the_stack_and_cleanup_removes_it_later(project):
    kept = project.run("--keep", env={"FAKE_TF_FAIL": "apply:repair"})
    assert kept.code == 30
    assert project.log.calls("repair", "destroy") == []
    assert project.resources("repair")
    assert "--keep" in kept.stderr and "repair-run --cleanup" in kept.stderr and "apply -destroy" in kept.stderr
    assert kept.result["repair_stack"]["kept"] is True

    cleaned = project.run("--cleanup")
    assert cleaned.code == 0, cleaned.stderr
    assert cleaned.result["status"] == "cleaned_up"
    assert project.log.commands("repair")[-3:] == ["state list", "destroy", "state list"]
    assert len(project.log.calls("repair", "apply")) == 1  # cleanup never deploys
    assert_torn_down(project, cleaned)


def test_a_rerun_after_a_crash_resumes_by_default(project):
    left = project.leave_repair_leftovers()
    outcome = project.run(env={"FAKE_TF_FAIL": "output:repair"})  # stop after the apply: a read failure
    assert outcome.code == 30, outcome.stderr
    assert outcome.result["repair_stack"]["leftovers_found"] == left
    assert "left" in outcome.stderr and "resume" in outcome.stderr
    assert project.log.commands("repair")[:3] == ["init", "state list", "apply"]  # applied over the leftovers
    assert project.log.calls("repair", "apply")[0]["resources_before"] == left
    assert_torn_down(project, outcome)


def test_a_rerun_after_a_crash_can_destroy_the_leftovers_first(project):
    project.leave_repair_leftovers()
    outcome = project.run("--on-leftovers", "destroy", env={"FAKE_TF_FAIL": "apply:repair"})
    assert outcome.code == 30
    assert project.log.commands("repair")[:4] == ["init", "state list", "destroy", "state list"]
    assert project.log.calls("repair", "apply")[0]["resources_before"] == []
    assert_torn_down(project, outcome)


def test_cleanup_with_nothing_left_does_nothing(project):
    outcome = project.run("--cleanup")
    assert outcome.code == 0
    assert project.log.commands("repair") == ["init", "state list"]
    assert "nothing was left" in outcome.stderr


def test_an_absent_evidence_stack_is_deployed_through_a_checked_plan(tmp_path, tf_bin, synthesized, azurite):
    p = Project(tmp_path / "fresh", tf_bin, azurite)
    shutil.copytree(synthesized[0].root / "cdktf.out", p.root / "cdktf.out")
    outcome = p.run(env={"FAKE_TF_FAIL": "apply:repair"})
    assert outcome.code == 30
    # then its outputs are read once more: the VM lock lives in its container
    assert p.log.commands("evidence") == ["init", "output", "plan", "show", "apply", "output"]
    assert outcome.result["evidence_stack"]["deployed_by_this_run"] is True
    assert p.resources("evidence") and p.repair_destroyed()
    assert not p.log.calls("evidence", "destroy")


def test_an_evidence_plan_that_would_delete_is_refused(tmp_path, tf_bin, synthesized, azurite):
    p = Project(tmp_path / "fresh", tf_bin, azurite)
    shutil.copytree(synthesized[0].root / "cdktf.out", p.root / "cdktf.out")
    outcome = p.run(env={"FAKE_TF_PLAN_DELETES": "evidence"})
    assert outcome.code == 30
    assert "would delete or replace" in outcome.stderr and "never deletes evidence" in outcome.stderr
    assert "apply" not in p.log.commands("evidence")
    assert p.log.calls("repair", "apply") == [] and outcome.result["repair_stack"]["touched"] is False


def test_no_config_and_no_vm_to_discover(project):
    (project.root / "repair.toml").unlink()
    outcome = project.run()
    assert outcome.code == 2
    assert "no config file" in outcome.stderr and "--vm" in outcome.stderr
    assert project.log.calls() == []


def test_discovers_the_vm_when_there_is_no_config(project, arm):
    add_broken_vm(arm)
    (project.root / "repair.toml").unlink()
    outcome = project.run("--vm", SOURCE_VM, env={"CRASHCART_ARM_ENDPOINT": arm.url, "FAKE_TF_FAIL": "init:repair"})
    assert outcome.code == 30, outcome.stderr
    written = (project.root / "repair.toml").read_text()
    assert 'vm_name = "web-01"' in written
    assert arm.calls("GET", "/virtualMachines/web-01")


def test_a_config_for_another_vm_is_refused(project):
    other = SOURCE_VM.replace("web-01", "web-02")
    outcome = project.run("--vm", other)
    assert outcome.code == 2
    assert "is for" in outcome.stderr and "web-02" in outcome.stderr
    assert project.log.calls() == []


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_is_alive(project):
    """Runs in one folder share cdktf.out: the folder lock (an OS lock, gone with its process) keeps a second
    one out, naming the first."""
    import fcntl

    folder = project.root / "cdktf.out"
    with open(folder / "repair-run.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(json.dumps({"run": "other", "pid": os.getpid(), "started": "2026-01-01T00:00:00+00:00"}))
        held.flush()
        outcome = project.run()
    assert outcome.code == 2 and "another repair-run is working in this project folder" in outcome.stderr
    assert "run other" in outcome.stderr and "--project-dir" in outcome.stderr
    assert project.log.calls() == []
    assert project.run(env={"FAKE_TF_FAIL": "apply:repair"}).code == 30  # released with its holder


def test_stacks_synthesized_for_another_rescue_os_are_refused(project):
    outcome = project.run(env={"CRASHCART_RESCUE_OS": "linux"})
    assert outcome.code == 2
    assert "rescue_admin_ssh_public_key" in outcome.stderr and "without --skip-synth" in outcome.stderr
    assert project.log.calls("repair", "apply") == []


# ---- the teardown of a swapped source VM ------------------------------------------------------------------
def _kept_run_on_the_copy(project, arm, azurite_container, *, state):
    """A run kept after its repair apply failed, whose source VM boots from the stack's disk copy (detached from
    the rescue VM), with the local rollback manifest in `state`: the world and the manifest's path."""
    from scripts.nodump import rollback
    from scripts.devkit.arm_vmops import repair_world

    kept = project.run("--keep", env={"FAKE_TF_FAIL": "apply:repair"})
    assert kept.code == 30 and project.resources("repair")
    azurite, container = azurite_container
    world = repair_world(arm, azurite, container)
    arm.get(world.vm_id)["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"] = world.copy_id
    arm.get(world.rescue_vm_id)["properties"]["storageProfile"]["dataDisks"] = []
    manifest = rollback.RollbackManifest(
        source_vm_id=world.vm_id, original_os_disk_id=world.original_disk_id,
        original_os_disk_name=world.original_disk_id.rsplit("/", 1)[-1], prepared_disk_id=world.copy_id,
        rescue_vm_id=world.rescue_vm_id, rescue_lun=0, power_state_before="running", run="web-01/20261123T000000Z",
        evidence_blob_endpoint=azurite.blob_endpoint, evidence_container=container, state=state)
    path = project.root / "crashcart-out" / "web-01" / "20261123T000000Z" / rollback.MANIFEST_NAME
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest.to_dict()))
    return world, path


def test_teardown_puts_a_swapped_source_vm_back_on_its_original_disk_first(project, arm, azurite_container):
    """prepare-dump --swap interrupted: the source VM boots from the disk copy the repair stack owns.
    The teardown must give the VM its original disk back before destroying that copy."""
    world, path = _kept_run_on_the_copy(project, arm, azurite_container, state="swapped")

    cleaned = project.run("--cleanup", env={"CRASHCART_ARM_ENDPOINT": arm.url})
    assert cleaned.code == 0, cleaned.stderr
    assert world.os_disk() == world.original_disk_id
    assert json.loads(path.read_text())["state"] == "restored"
    assert "original OS disk back first" in cleaned.stderr
    assert_torn_down(project, cleaned)


def test_teardown_never_undoes_a_verified_fix(project, arm, azurite_container):
    """`fix --verify` kept the fixed copy as the source VM's OS disk (rollback manifest state "kept"): the
    teardown must neither put the broken original back nor destroy the stack that owns the fixed disk."""
    world, path = _kept_run_on_the_copy(project, arm, azurite_container, state="kept")

    cleaned = project.run("--cleanup", env={"CRASHCART_ARM_ENDPOINT": arm.url})
    assert cleaned.code == 31
    assert "verified fix" in cleaned.stderr and "pipenv run rollback --manifest" in cleaned.stderr
    assert arm.get(world.vm_id)["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"] == world.copy_id
    assert json.loads(path.read_text())["state"] == "kept"
    assert project.log.calls("repair", "destroy") == []
    assert project.resources("repair")


def test_teardown_keeps_the_stack_when_the_source_vm_cannot_be_restored(project, arm):
    kept = project.run("--keep", env={"FAKE_TF_FAIL": "apply:repair"})
    assert kept.code == 30
    path = project.root / "crashcart-out" / "web-01" / "20261123T000000Z" / "rollback-manifest.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    cleaned = project.run("--cleanup", env={"CRASHCART_ARM_ENDPOINT": arm.url})
    assert cleaned.code == 31
    assert "NOT destroyed" in cleaned.stderr and "pipenv run rollback --manifest" in cleaned.stderr
    assert project.log.calls("repair", "destroy") == []
    assert project.resources("repair")
