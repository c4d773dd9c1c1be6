"""repair-run end to end, as a real subprocess, with faults injected at every step.

What is real: the CLI, the orchestrator, synth (main.py, run once per session by repair-run itself;
"synth fails" is a config value main.py rejects), python-terraform, the output-reading path, collect
against the loopback ARM double (rescue VM + Run Command, scripts/devkit/arm_compute.py) and Azurite,
and the signals (sent to the process, or to its process group as a terminal's Ctrl-C is).
What stands in: `terraform`, a recording fake on PATH (tests/support/fake_terraform.py) that keeps a
state file where the stack's backend says, so "what is deployed" is observable.

Every fault must end with the repair stack destroyed, the evidence stack untouched, and an exit code and
message that say what happened.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scripts.devkit import arm_compute
from scripts.devkit.arm_vm import add_broken_vm
from scripts.devkit.armdouble import ArmDouble
from tests.support.fake_terraform import TerraformLog, command_of, write_shim

pytestmark = pytest.mark.slow  # every test here starts repair-run (and terraform) as processes

REPO = Path(__file__).resolve().parents[2]
SUB = "00000000-0000-0000-0000-000000000001"
SOURCE_VM = f"/subscriptions/{SUB}/resourceGroups/prod-web/providers/Microsoft.Compute/virtualMachines/web-01"
SOURCE_DISK = f"/subscriptions/{SUB}/resourceGroups/prod-web/providers/Microsoft.Compute/disks/web-01_OsDisk_1"
REPAIR_RG = f"/subscriptions/{SUB}/resourceGroups/{arm_compute.RESCUE_RG}"
CONTAINER = "dumps"


def repair_outputs(blob_endpoint: str = "https://crashcartevidence.blob.core.windows.net/") -> dict[str, Any]:
    """What the fake terraform's `output -json` prints for the repair stack (names: scripts/config/stackoutputs.py)."""
    return {
        "subscription_id": SUB,
        "resource_group_name": arm_compute.RESCUE_RG,
        "rescue_vm_id": arm_compute.vm_id(),
        "rescue_vm_name": arm_compute.RESCUE_VM,
        "rescue_vm_principal_id": "5b0e4c3a-0000-0000-0000-0000000000aa",
        "rescue_os": "windows",
        "disk_copy_id": f"{REPAIR_RG}/providers/Microsoft.Compute/disks/web-01-crashcart-copy",
        "disk_copy_lun": 0,
        "snapshot_id": f"{REPAIR_RG}/providers/Microsoft.Compute/snapshots/web-01-crashcart-snapshot",
        "source_vm_id": SOURCE_VM,
        "source_os_disk_id": SOURCE_DISK,
        "evidence_account_name": "devstoreaccount1",
        "evidence_blob_endpoint": blob_endpoint,
        "evidence_container": CONTAINER,
    }


# ---- a project folder and a way to run repair-run in it -------------------------------------------------
@dataclass
class Outcome:
    code: int
    result: dict[str, Any]
    stdout: str
    stderr: str


class Project:
    evidence_before: bytes = b""  # the evidence state file as deployed before the run

    def __init__(self, root: Path, bin_dir: Path):
        self.root = root
        self.bin_dir = bin_dir
        self.log = TerraformLog(root.parent / f"{root.name}-terraform.jsonl")
        self.outputs_file = root.parent / f"{root.name}-outputs.json"
        root.mkdir(parents=True, exist_ok=True)
        (root / "main.py").symlink_to(REPO / "main.py")
        shutil.copy(REPO / "repair.example.toml", root / "repair.toml")
        self.set_outputs(repair_outputs())
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("CRASHCART_", "FAKE_TF_", "TF_", "ARM_", "AZURE_"))}
        self.env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO), CI="1",
                        FAKE_TF_LOG=str(self.log.path), FAKE_TF_OUTPUTS=str(self.outputs_file),
                        CRASHCART_TEARDOWN_RETRY_SECONDS="0", CRASHCART_POLL_SECONDS="0.2",
                        JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION="20")

    def set_outputs(self, repair: dict[str, Any]) -> None:
        self.outputs_file.write_text(json.dumps({"repair": repair}))

    def command(self, *args: str, skip_synth: bool = True) -> list[str]:
        return [sys.executable, "-m", "scripts", "repair-run", *(["--skip-synth"] if skip_synth else []), *args]

    def run(self, *args: str, env: dict[str, str] | None = None, skip_synth: bool = True,
            timeout: float = 60) -> Outcome:
        proc = subprocess.Popen(self.command(*args, skip_synth=skip_synth), cwd=self.root,
                                env={**self.env, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        return self.finish(proc, timeout)

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args), cwd=self.root, env={**self.env, **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float = 60) -> Outcome:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"repair-run did not finish within {timeout}s; its log:\n{err}") from None
        return Outcome(proc.returncode, json.loads(out or "{}"), out, err)

    # -- state, as the fake terraform keeps it
    def state_file(self, stack: str) -> Path:
        return self.root / f"terraform.{stack}.tfstate"

    def resources(self, stack: str) -> list[str] | None:
        path = self.state_file(stack)
        if not path.exists():
            return None
        return [f"{r['type']}.{r['name']}" for r in json.loads(path.read_text())["resources"]]

    def terraform(self, stack: str, *argv: str, env: dict[str, str] | None = None) -> None:
        """Runs the fake terraform directly, as a person would (setting the scene; logged elsewhere)."""
        setup_env = {**self.env, "FAKE_TF_LOG": str(self.root.parent / f"{self.root.name}-setup.jsonl"),
                     "TF_VAR_rescue_admin_password": "setup-password-123456", **(env or {})}
        subprocess.run(["terraform", *argv], cwd=self.root / "cdktf.out" / "stacks" / stack, env=setup_env,
                       capture_output=True, check=False, timeout=30)

    def deploy_evidence(self) -> bytes:
        self.terraform("evidence", "init")
        self.terraform("evidence", "apply", "-auto-approve")
        return self.state_file("evidence").read_bytes()

    def leave_repair_leftovers(self) -> list[str]:
        """What a run killed with SIGKILL half-way through the repair apply leaves."""
        self.terraform("repair", "init")
        self.terraform("repair", "apply", "-auto-approve", env={"FAKE_TF_FAIL": "apply:repair"})
        left = self.resources("repair")
        assert left
        return left


def wait_for(condition, timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


@pytest.fixture(scope="session")
def tf_bin(tmp_path_factory) -> Path:
    bin_dir = tmp_path_factory.mktemp("bin")
    write_shim(bin_dir)
    return bin_dir


@pytest.fixture(scope="session")
def synthesized(tmp_path_factory, tf_bin) -> tuple[Project, Outcome]:
    """The session's one real synth, done by repair-run itself (main.py as a subprocess); the run is then
    stopped by a failing `terraform init` of the repair stack, before anything is deployed."""
    project = Project(tmp_path_factory.mktemp("synth") / "project", tf_bin)
    outcome = project.run(env={"FAKE_TF_FAIL": "init:repair"}, skip_synth=False, timeout=240)
    assert (project.root / "cdktf.out" / "stacks" / "repair" / "cdk.tf.json").exists(), outcome.stderr
    return project, outcome


@pytest.fixture(scope="session")
def evidence_state(synthesized, tmp_path_factory, tf_bin) -> bytes:
    """The evidence stack's state after a `terraform apply` of the synthesized stack (done once)."""
    scratch = Project(tmp_path_factory.mktemp("evidence") / "project", tf_bin)
    shutil.copytree(synthesized[0].root / "cdktf.out", scratch.root / "cdktf.out")
    return scratch.deploy_evidence()


@pytest.fixture
def project(tmp_path, tf_bin, synthesized, evidence_state) -> Project:
    """A fresh project folder with the session's synthesized stacks and the evidence stack deployed."""
    p = Project(tmp_path / "project", tf_bin)
    shutil.copytree(synthesized[0].root / "cdktf.out", p.root / "cdktf.out")
    p.state_file("evidence").write_bytes(evidence_state)
    p.evidence_before = evidence_state
    return p


@pytest.fixture(scope="module")
def _arm_double():
    """One ARM double for the module (conftest's starts and stops one per test: half a second each)."""
    with ArmDouble() as double:
        yield double


@pytest.fixture
def arm(_arm_double, monkeypatch):
    """The module's ARM double, emptied; routes added by earlier tests stay but newer ones take precedence."""
    _arm_double.resources.clear()
    _arm_double.requests.clear()
    _arm_double.forbidden.clear()
    monkeypatch.setenv("CRASHCART_ARM_ENDPOINT", _arm_double.url)
    return _arm_double


@pytest.fixture
def azurite_container(azurite):
    """The evidence container in Azurite (a fresh name per test), reached with the emulator's key."""
    import uuid

    name = f"dumps{uuid.uuid4().hex[:8]}"
    azurite.service_client().create_container(name)
    return azurite, name


# ---- what every fault must leave behind ----------------------------------------------------------------
def assert_torn_down(project: Project, outcome: Outcome) -> None:
    """The repair stack destroyed (by apply -destroy), the evidence stack untouched, no secret leaked,
    terraform never killed mid-operation, and the result saying so."""
    assert project.resources("repair") == [], outcome.stderr
    assert project.log.calls("repair", "destroy"), "the teardown ran terraform apply -destroy"
    assert outcome.result["repair_stack"]["destroyed"] is True
    assert "the repair stack was destroyed; the evidence stack was not touched" in outcome.stderr + json.dumps(
        outcome.result)
    assert_evidence_untouched(project)
    assert not project.log.lost_state(), "terraform got a second interrupt and exited without saving state"
    assert_no_secret_leaked(project, outcome)


def assert_evidence_untouched(project: Project) -> None:
    assert project.state_file("evidence").read_bytes() == project.evidence_before
    for call in project.log.calls("evidence"):
        assert command_of(call["argv"]) in ("init", "output"), f"evidence stack touched: {call['argv']}"


def assert_no_secret_leaked(project: Project, outcome: Outcome) -> None:
    facts = [f for call in project.log.calls() for f in (call.get("secrets") or {}).values()]
    for fact in facts:
        assert not fact["in_argv"] and not fact["in_files"], fact
    texts = [outcome.stdout, outcome.stderr]
    for path in project.root.rglob("*"):
        if path.is_file() and path.stat().st_size < 2_000_000:
            texts.append(path.read_text(errors="replace"))
    for fact in {(f["sha256"], f["len"]) for f in facts}:
        digest, length = fact
        for text in texts:
            for i in range(len(text) - length + 1):
                assert hashlib.sha256(text[i:i + length].encode()).hexdigest() != digest, "a secret leaked"


def secret_was_passed_to_apply_and_destroy(project: Project) -> bool:
    calls = project.log.calls("repair", "apply") + project.log.calls("repair", "destroy")
    return bool(calls) and all(c["env"]["TF_VAR_rescue_admin_password"] for c in calls)


# ---- the faults ----------------------------------------------------------------------------------------
def test_synth_runs_main_py_and_a_failed_backend_init_deploys_nothing(synthesized):
    project, outcome = synthesized
    assert outcome.code == 30, outcome.stderr
    assert "terraform init failed" in outcome.stderr and "state backend" in outcome.stderr
    assert [s["name"] for s in outcome.result["steps"]] == ["config", "synth", "load config", "find leftovers"]
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
    assert not (project.root / "crashcart-out" / "repair-run.marker.json").exists()


def test_collect_fails_when_the_rescue_vm_agent_never_gets_ready(project, arm, azurite_container):
    azurite, container = azurite_container
    arm_compute.install_rescue_vm(arm, agent=["Not Ready"])
    project.set_outputs({**repair_outputs(azurite.blob_endpoint), "evidence_container": container})
    outcome = project.run(env={"CRASHCART_ARM_ENDPOINT": arm.url, "CRASHCART_AGENT_WAIT_MINUTES": "0.01",
                               "CRASHCART_STORAGE_CONNECTION_STRING": azurite.connection_string})
    assert outcome.code == 14, outcome.stderr
    assert "agent did not report Ready" in outcome.stderr
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


def test_ctrl_c_on_a_terminal_reaches_terraform_once(project):
    """A terminal's Ctrl-C goes to the whole process group: terraform stops by itself, and repair-run must
    not send it a second interrupt (which would make it exit without saving state)."""
    proc = _start_deploy_that_hangs(project)
    os.killpg(proc.pid, signal.SIGINT)
    outcome = Project.finish(proc)
    assert outcome.code == 130, outcome.stderr
    assert "stopped: SIGINT" in outcome.stderr
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
    assert project.resources("repair") == [] and outcome.result["repair_stack"]["destroyed"] is True
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
    # The marker stays, so the next run names this one.
    assert (project.root / "crashcart-out" / "repair-run.marker.json").exists()


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


def test_an_absent_evidence_stack_is_deployed_through_a_checked_plan(tmp_path, tf_bin, synthesized):
    p = Project(tmp_path / "fresh", tf_bin)
    shutil.copytree(synthesized[0].root / "cdktf.out", p.root / "cdktf.out")
    outcome = p.run(env={"FAKE_TF_FAIL": "apply:repair"})
    assert outcome.code == 30
    assert p.log.commands("evidence") == ["init", "output", "plan", "show", "apply"]
    assert outcome.result["evidence_stack"]["deployed_by_this_run"] is True
    assert p.resources("evidence") and p.resources("repair") == []
    assert not p.log.calls("evidence", "destroy")


def test_an_evidence_plan_that_would_delete_is_refused(tmp_path, tf_bin, synthesized):
    p = Project(tmp_path / "fresh", tf_bin)
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
    out = project.root / "crashcart-out"
    out.mkdir()
    (out / "repair-run.marker.json").write_text(json.dumps(
        {"run_id": "other", "pid": os.getpid(), "host": os.uname().nodename, "phase": "collect"}))
    outcome = project.run()
    assert outcome.code == 2 and "another repair-run" in outcome.stderr
    assert project.log.calls() == []


def test_a_marker_left_by_a_dead_run_is_reported_and_ignored(project):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = project.root / "crashcart-out"
    out.mkdir()
    (out / "repair-run.marker.json").write_text(json.dumps(
        {"run_id": "crashed-run", "pid": int(dead.stdout), "host": os.uname().nodename, "phase": "collect"}))
    outcome = project.run(env={"FAKE_TF_FAIL": "apply:repair"})
    assert outcome.code == 30
    assert "crashed-run" in outcome.stderr and "stopped during 'collect'" in outcome.stderr


def test_stacks_synthesized_for_another_rescue_os_are_refused(project):
    outcome = project.run(env={"CRASHCART_RESCUE_OS": "linux"})
    assert outcome.code == 2
    assert "rescue_admin_ssh_public_key" in outcome.stderr and "without --skip-synth" in outcome.stderr
    assert project.log.calls("repair", "apply") == []


# ---- the teardown of a swapped source VM ------------------------------------------------------------------
def test_teardown_puts_a_swapped_source_vm_back_on_its_original_disk_first(project, arm, azurite_container):
    """prepare-dump --swap interrupted: the source VM boots from the disk copy the repair stack owns.
    The teardown must give the VM its original disk back before destroying that copy."""
    from scripts.nodump import rollback
    from scripts.devkit.arm_vmops import repair_world

    kept = project.run("--keep", env={"FAKE_TF_FAIL": "apply:repair"})
    assert kept.code == 30 and project.resources("repair")
    azurite, container = azurite_container
    world = repair_world(arm, azurite, container)
    vm = arm.get(world.vm_id)
    vm["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"] = world.copy_id  # swapped, then the run died
    arm.get(world.rescue_vm_id)["properties"]["storageProfile"]["dataDisks"] = []
    manifest = rollback.RollbackManifest(
        source_vm_id=world.vm_id, original_os_disk_id=world.original_disk_id,
        original_os_disk_name=world.original_disk_id.rsplit("/", 1)[-1], prepared_disk_id=world.copy_id,
        rescue_vm_id=world.rescue_vm_id, rescue_lun=0, power_state_before="running", run="web-01/20261123T000000Z",
        evidence_blob_endpoint=azurite.blob_endpoint, evidence_container=container, state="swapped")
    path = project.root / "crashcart-out" / "web-01" / "20261123T000000Z" / rollback.MANIFEST_NAME
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest.to_dict()))

    cleaned = project.run("--cleanup", env={"CRASHCART_ARM_ENDPOINT": arm.url})
    assert cleaned.code == 0, cleaned.stderr
    assert world.os_disk() == world.original_disk_id
    assert json.loads(path.read_text())["state"] == "restored"
    assert "original OS disk back first" in cleaned.stderr
    assert_torn_down(project, cleaned)


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
