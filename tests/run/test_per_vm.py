"""A VM is its resource ID (issue #13): repair-run keeps everything per VM - the repair stack's state, the
lock, the report - and never reuses, resumes or destroys another VM's stack, nor one kept under the old
per-folder naming. One run per VM at a time: a lease on `locks/<vm key>` in the evidence container
(Azurite here). The rescue VM's admin password sits in the local state file only while the stack exists,
readable by the owner only."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import threading
import time

import pytest

from scripts.azure.identity import vm_key
from tests.run.repairkit import (LEASE_SECONDS, SOURCE_VM, Project, assert_evidence_untouched, assert_torn_down,
                                 wait_for)
from tests.support.fake_terraform import command_of

pytestmark = pytest.mark.slow

WEB_02 = SOURCE_VM.replace("web-01", "web-02")


def web_02_config(project: Project) -> str:
    text = (project.root / "repair.toml").read_text().replace("web-01", "web-02")
    (project.root / "web-02.toml").write_text(text)
    return "web-02.toml"


def repair_calls(project: Project, command: str | None = None) -> list[dict]:
    return project.log.calls("repair", command)


# ---- two VMs, one project folder -----------------------------------------------------------------------
def test_a_run_for_web_02_never_touches_web_01s_kept_stack(project):
    kept = project.run("--keep", env={"FAKE_TF_FAIL": "apply:repair"})
    assert kept.code == 30, kept.stderr
    web_01_state = project.state_file("repair")
    assert vm_key(SOURCE_VM) in web_01_state.name
    before = web_01_state.read_bytes()
    calls_before = len(repair_calls(project))

    # The same folder, the other config: synth rewrites cdktf.out for web-02, whose state has its own key.
    other = project.run(env={"CRASHCART_CONFIG": web_02_config(project), "FAKE_TF_FAIL": "output:repair"},
                        skip_synth=False, timeout=240)
    assert other.code == 30, other.stderr
    assert vm_key(WEB_02) in project.state_file("repair").name
    assert other.result["repair_stack"]["leftovers_found"] == []  # web-01's leftovers are not web-02's
    assert [command_of(c["argv"]) for c in repair_calls(project)[calls_before:]] == [
        "init", "state list", "apply", "output", "destroy", "state list"]
    assert project.repair_destroyed()  # web-02's stack: deployed, then destroyed
    assert web_01_state.read_bytes() == before  # web-01's: exactly as it was kept
    assert other.result["vm"] == {"id": WEB_02, "key": vm_key(WEB_02)}
    assert (project.root / "crashcart-out" / vm_key(WEB_02) / "repair-run.json").exists()

    # Stacks synthesized for web-02 are refused for web-01 (--skip-synth): they would act on web-02's state.
    refused = project.run("--cleanup")
    assert refused.code == 2, refused.stderr
    assert "synthesized for another VM" in refused.stderr and "without --skip-synth" in refused.stderr
    assert web_01_state.read_bytes() == before


# ---- the old naming ------------------------------------------------------------------------------------
def old_state(owner: str, resources: int = 3) -> dict:
    group = {"mode": "managed", "type": "azurerm_resource_group", "name": "repair_group",
             "instances": [{"attributes": {"id": "/subscriptions/x/resourceGroups/crashcart-repair-web-01",
                                           "name": "crashcart-repair-web-01",
                                           "tags": {"crashcart": "repair", "crashcart-source-vm": owner}}}]}
    others = [{"mode": "managed", "type": "azurerm_thing", "name": f"t{i}", "instances": [{"attributes": {}}]}
              for i in range(resources - 1)]
    return {"version": 4, "serial": 7, "lineage": "old", "outputs": {}, "resources": [group, *others][:resources]}


@pytest.mark.parametrize("owner", [SOURCE_VM, WEB_02], ids=["this-vm", "another-vm"])
def test_a_stack_kept_under_the_old_naming_is_refused_with_the_commands(project, owner):
    old = project.root / "terraform.repair.tfstate"
    old.write_text(json.dumps(old_state(owner)))
    before = old.read_bytes()
    outcome = project.run()
    assert outcome.code == 2, outcome.stderr
    assert "kept under crashcart's old naming is still deployed" in outcome.stderr
    assert f"{old} holds 3 resource(s) of {owner}" in outcome.stderr
    assert f"terraform state list -state={old}" in outcome.stderr
    assert f"mv {old} {project.root / f'terraform.repair.{vm_key(owner)}.tfstate'}" in outcome.stderr
    assert ("(this VM)" in outcome.stderr) == (owner == SOURCE_VM)
    assert repair_calls(project, "apply") == [] and repair_calls(project, "destroy") == []
    assert old.read_bytes() == before  # never reused, moved or destroyed by the kit
    assert_evidence_untouched(project)


def test_an_old_state_file_with_nothing_in_it_is_not_in_the_way(project):
    (project.root / "terraform.repair.tfstate").write_text(json.dumps(old_state(SOURCE_VM, resources=0)))
    outcome = project.run(env={"FAKE_TF_FAIL": "apply:repair"})
    assert outcome.code == 30, outcome.stderr
    assert_torn_down(project, outcome)


def test_an_old_naming_azurerm_key_is_refused_with_the_commands(project, tmp_path):
    """With the azurerm backend the old key was <prefix>/<vm name>/repair.tfstate, shared by every VM of
    that name; it is read with `terraform state pull` through a folder holding only the backend block."""
    remote = tmp_path / "remote-states"
    stack_file = project.root / "cdktf.out" / "stacks" / "repair" / "cdk.tf.json"
    stack = json.loads(stack_file.read_text())
    backend = {"resource_group_name": "tfstate", "storage_account_name": "tfstatecrashcart",
               "container_name": "tfstate", "key": f"crashcart/{vm_key(SOURCE_VM)}/repair.tfstate",
               "use_azuread_auth": True}
    stack["terraform"]["backend"] = {"azurerm": backend}
    stack_file.write_text(json.dumps(stack))
    old = remote / "crashcart" / "web-01" / "repair.tfstate"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps(old_state(SOURCE_VM)))
    outcome = project.run(env={"FAKE_TF_REMOTE_DIR": str(remote), "CRASHCART_BACKEND_KIND": "azurerm",
                               "CRASHCART_BACKEND_RESOURCE_GROUP": "tfstate",
                               "CRASHCART_BACKEND_STORAGE_ACCOUNT": "tfstatecrashcart"})
    assert outcome.code == 2, outcome.stderr
    assert "tfstatecrashcart/tfstate/crashcart/web-01/repair.tfstate holds 3 resource(s)" in outcome.stderr
    assert "-backend-config=key=crashcart/web-01/repair.tfstate" in outcome.stderr
    assert "terraform apply -destroy -auto-approve" in outcome.stderr
    assert [command_of(c["argv"]) for c in project.log.calls(".old-repair-state")] == ["init", "state pull"]
    assert repair_calls(project) == []


# ---- one run per VM ------------------------------------------------------------------------------------
def twin(project: Project, tmp_path, tf_bin, synthesized) -> Project:
    """Another project folder (another runner) for the same VM, with the same evidence."""
    other = Project(tmp_path / "other-runner", tf_bin, project.azurite, lock_container=project.lock_container)
    shutil.copytree(synthesized[0].root / "cdktf.out", other.root / "cdktf.out")
    other.state_file("evidence").write_bytes(project.evidence_before)
    other.evidence_before = project.evidence_before
    return other


def test_a_second_run_for_the_same_vm_is_refused_and_names_the_holder(project, tmp_path, tf_bin, synthesized):
    first = project.start(env={"FAKE_TF_SLEEP": "apply:repair=30"})
    wait_for(lambda: project.log.calls("repair", "apply"), what="the first run's repair apply")
    holder = project.lock_metadata()
    second = twin(project, tmp_path, tf_bin, synthesized)
    outcome = second.run()
    assert outcome.code == 2, outcome.stderr
    assert f"another repair-run is working on {SOURCE_VM}" in outcome.stderr
    assert f"run {holder['crashcart_run']} on {os.uname().nodename} (pid {first.pid})" in outcome.stderr
    assert "in step 'deploy repair'" in outcome.stderr
    assert second.log.calls("repair") == []  # it did not even look at the stack
    os.kill(first.pid, signal.SIGTERM)
    done = Project.finish(first)
    assert done.code == 130 and project.lock_metadata()["crashcart_state"] == "released"
    assert_torn_down(project, done)


def hold_lock(project: Project, *, run: str, renew: bool) -> tuple[threading.Event, threading.Thread | None]:
    """Another runner's lease on the VM's lock (a crashed one never renews it)."""
    from azure.storage.blob import BlobLeaseClient

    container = project.azurite.service_client().get_container_client(project.lock_container)
    blob = container.get_blob_client(f"locks/{vm_key(SOURCE_VM)}")
    blob.upload_blob(b"", overwrite=True)
    lease = BlobLeaseClient(blob)
    lease.acquire(lease_duration=LEASE_SECONDS)
    blob.set_blob_metadata({"crashcart_run": run, "crashcart_host": "runner-elsewhere", "crashcart_pid": "4242",
                            "crashcart_started": "2026-11-30T10:00:00+00:00", "crashcart_phase": "collect",
                            "crashcart_state": "running"}, lease=lease)
    done = threading.Event()
    if not renew:
        return done, None

    def renewing() -> None:
        while not done.wait(3):
            lease.renew()

    thread = threading.Thread(target=renewing, daemon=True)
    thread.start()
    return done, thread


def test_a_crashed_runners_lock_is_taken_once_its_lease_expires(project):
    hold_lock(project, run="crashed-run", renew=False)
    started = time.monotonic()
    outcome = project.run(env={"FAKE_TF_FAIL": "apply:repair"})
    assert outcome.code == 30, outcome.stderr
    assert time.monotonic() - started >= LEASE_SECONDS - 3  # not broken early: it expired
    assert "may have crashed: waiting up to" in outcome.stderr
    assert "an earlier run (run crashed-run on runner-elsewhere (pid 4242)" in outcome.stderr
    assert "in step 'collect') stopped without finishing" in outcome.stderr
    assert outcome.result["lock"]["previous"]["run"] == "crashed-run"
    assert_torn_down(project, outcome)


def test_a_lock_still_renewed_by_another_runner_is_refused(project):
    done, _ = hold_lock(project, run="live-run", renew=True)
    try:
        outcome = project.run(timeout=LEASE_SECONDS + 40)
    finally:
        done.set()
    assert outcome.code == 2, outcome.stderr
    assert "run live-run on runner-elsewhere (pid 4242)" in outcome.stderr
    assert "its lease was still renewed" in outcome.stderr
    assert project.log.calls("repair") == []


# ---- the admin password's file -------------------------------------------------------------------------------
def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_local_state_file_is_private_and_deleted_after_the_destroy(project):
    kept = project.run("--keep", env={"FAKE_TF_FAIL": "apply:repair"})
    assert kept.code == 30, kept.stderr
    state = project.state_file("repair")
    backup = state.with_name(state.name + ".backup")
    assert mode(state) == 0o600  # created under umask 077

    state.chmod(0o644)  # e.g. left by `cdktf deploy` or an older kit: made private before terraform writes
    again = project.run("--keep", env={"FAKE_TF_FAIL": "apply:repair"})
    assert again.code == 30 and mode(state) == 0o600
    assert mode(backup) == 0o600  # Terraform's copy of the previous state (the password too)

    cleaned = project.run("--cleanup")
    assert cleaned.code == 0, cleaned.stderr
    assert not state.exists() and not backup.exists()
    assert cleaned.result["repair_stack"]["state_files_deleted"] == [str(state), str(backup)]
    assert_torn_down(project, cleaned)
