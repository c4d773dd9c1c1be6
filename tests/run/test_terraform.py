"""scripts/run/terraform.py: python-terraform driving a recording stand-in terraform on PATH."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from python_terraform import Terraform

from scripts.base.errors import CrashcartError
from scripts.run.child import spawn, supervise
from scripts.run.terraform import (AUTOMATION_ENV, EvidenceStackDir, RepairStackDir, StackDir,
                                   _refuse_destroy_outside_repair)
from tests.support.fake_terraform import TerraformLog, write_shim

SECRET = "s3cret-Value-that-must-not-leak_42"


def stack_json(name: str, with_variable: bool) -> dict:
    doc = {
        "terraform": {"backend": {"local": {"path": f"../../../terraform.{name}.tfstate"}}},
        "resource": {"azurerm_resource_group": {f"{name}_group": {}}, "azurerm_thing": {"a": {}, "b": {}}},
        "output": {"first": {"value": "x"}, "second": {"value": "y"}},
    }
    if with_variable:
        doc["variable"] = {"rescue_admin_password": {"type": "string", "sensitive": True}}
    return doc


@pytest.fixture
def stacks(tmp_path, monkeypatch) -> Path:
    """A project with two small synthesized stacks and the fake terraform first on PATH."""
    bin_dir = tmp_path / "bin"
    write_shim(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_TF_LOG", str(tmp_path / "tf.jsonl"))
    monkeypatch.delenv("CRASHCART_TERRAFORM", raising=False)
    for key in AUTOMATION_ENV:
        monkeypatch.delenv(key, raising=False)
    root = tmp_path / "project" / "cdktf.out" / "stacks"
    for name, with_variable in (("evidence", False), ("repair", True)):
        (root / name).mkdir(parents=True)
        (root / name / "cdk.tf.json").write_text(json.dumps(stack_json(name, with_variable)))
    return root


def tf_log(stacks: Path) -> TerraformLog:
    return TerraformLog(Path(os.environ["FAKE_TF_LOG"]))


def test_python_terraform_destroy_passes_the_force_flag_modern_terraform_rejects(stacks):
    """Why RepairStackDir.destroy does not call python-terraform's destroy()."""
    tf = Terraform(working_dir=str(stacks / "repair"))
    tf.init()
    code, _, err = tf.destroy()
    assert code != 0 and "-force" in err


def test_repair_lifecycle_uses_apply_and_apply_destroy_with_secrets_only_in_the_environment(stacks):
    repair = RepairStackDir(stacks)
    repair.init()
    assert repair.resources() == []  # "No state file was found!" means nothing deployed
    assert repair.deploy({"TF_VAR_rescue_admin_password": SECRET}).ok
    assert len(repair.resources()) == 3
    assert repair.outputs() == {"first": "fake-first", "second": "fake-second"}
    result = repair.destroy({"TF_VAR_rescue_admin_password": SECRET})
    assert result.ok, result.stderr
    assert repair.resources() == []
    assert result.argv[1] == "apply" and "-destroy" in result.argv and "-auto-approve=true" in result.argv

    log = tf_log(stacks)
    for call in log.calls():
        argv = call["argv"]
        assert not any(a.startswith(("-synchronous", "-var-file", "-var=", "-force")) for a in argv), argv
        assert call["env"]["TF_IN_AUTOMATION"] and call["env"]["TF_INPUT"]
    for call in log.calls("repair", "apply") + log.calls("repair", "destroy"):
        assert "-input=false" in call["argv"]
        facts = call["secrets"]["TF_VAR_rescue_admin_password"]
        assert facts["len"] == len(SECRET) and not facts["in_argv"] and not facts["in_files"]
    # Only the commands that need the secret get it, and this process does not keep it.
    assert not any(c["env"]["TF_VAR_rescue_admin_password"] for c in log.calls(command="init") + log.calls(
        command="state list") + log.calls(command="output"))
    assert "TF_VAR_rescue_admin_password" not in os.environ
    assert all(key not in os.environ for key in AUTOMATION_ENV)


def test_a_failed_apply_reports_terraforms_own_error_line(stacks, monkeypatch):
    monkeypatch.setenv("FAKE_TF_FAIL", "apply:repair")
    repair = RepairStackDir(stacks)
    repair.init()
    result = repair.deploy({"TF_VAR_rescue_admin_password": SECRET})
    assert not result.ok
    assert result.error_summary().startswith("Error: creating Windows Virtual Machine")
    assert repair.resources()  # half-way: some resources exist, which is what the teardown is for


def test_a_missing_variable_is_terraforms_error_not_a_prompt(stacks):
    repair = RepairStackDir(stacks)
    repair.init()
    result = repair.deploy({})
    assert not result.ok and "No value for required variable" in result.error_summary()


def test_evidence_is_deployed_through_a_plan_checked_for_deletions(stacks):
    evidence = EvidenceStackDir(stacks)
    evidence.init()
    assert evidence.missing_outputs() == {"first", "second"}
    evidence.deploy()
    assert tf_log(stacks).commands("evidence")[-4:] == ["output", "plan", "show", "apply"]
    assert evidence.missing_outputs() == set()
    assert not list((stacks / "evidence").glob("*.tfplan"))  # the plan file is not left lying around


def test_an_evidence_plan_that_deletes_anything_is_refused_and_not_applied(stacks, monkeypatch):
    monkeypatch.setenv("FAKE_TF_PLAN_DELETES", "evidence")
    evidence = EvidenceStackDir(stacks)
    evidence.init()
    with pytest.raises(CrashcartError) as err:
        evidence.deploy()
    assert err.value.exit_code == 30
    assert "azurerm_resource_group.evidence_group" in err.value.message
    assert "apply" not in tf_log(stacks).commands("evidence")


def test_the_evidence_stack_cannot_be_destroyed():
    assert not hasattr(EvidenceStackDir, "destroy")
    assert not hasattr(StackDir, "destroy")
    evidence = EvidenceStackDir(Path("/nonexistent/stacks"))
    for argv in (["terraform", "destroy", "-auto-approve"], ["terraform", "apply", "-destroy", "-auto-approve"]):
        with pytest.raises(CrashcartError) as err:
            _refuse_destroy_outside_repair(evidence, argv)
        assert err.value.exit_code == 70
    _refuse_destroy_outside_repair(RepairStackDir(Path("/x")), ["terraform", "apply", "-destroy"])


def test_backend_init_failure_says_what_to_check(stacks, monkeypatch):
    monkeypatch.setenv("FAKE_TF_FAIL", "init:repair")
    with pytest.raises(CrashcartError) as err:
        RepairStackDir(stacks).init()
    assert err.value.exit_code == 30 and "state backend" in err.value.hint


# ---- supervise: how a stop request reaches a running child -----------------------------------------------
class Stop:
    def __init__(self, after: float, deadline: bool = False):
        self.at = time.monotonic() + after
        self.is_deadline = deadline

    @property
    def reason(self) -> str | None:
        return "SIGTERM" if time.monotonic() >= self.at else None


CHILD = r"""
import os, signal, sys, time
got = []
signal.signal(signal.SIGINT, lambda *a: got.append("INT"))
print("session:", os.getsid(0), flush=True)
end = time.monotonic() + float(sys.argv[-1])
while time.monotonic() < end and not got:
    time.sleep(0.02)
time.sleep(0.3)  # a second signal would be recorded meanwhile
print("signals:", ",".join(got) or "none", flush=True)
sys.exit(1 if got else 0)
"""


def child(*args: str, seconds: float = 4.0) -> subprocess.Popen:
    return spawn([sys.executable, "-c", CHILD, *args, str(seconds)], cwd=None, env=os.environ)


def test_a_stop_is_forwarded_to_the_child_once_and_at_once():
    """Terraform runs in its own session (a terminal's Ctrl-C never reaches it): the kit forwards the stop
    itself, one SIGINT, at once - however long the stop request stays set."""
    started = time.monotonic()
    code, out, _, stopped = supervise(child(seconds=3), "child", Stop(after=0.2))
    assert stopped and code == 1 and "signals: INT\n" in out + "\n"
    assert time.monotonic() - started < 2.0


def test_children_run_in_their_own_session():
    proc = child(seconds=0.1)
    code, out, _, _ = supervise(proc, "child", None)
    assert code == 0 and f"session: {proc.pid}" in out  # a session leader: not in the kit's process group


def test_the_deadline_is_forwarded_at_once():
    started = time.monotonic()
    code, out, _, _ = supervise(child(seconds=3), "child", Stop(after=0.1, deadline=True))
    assert "signals: INT" in out and time.monotonic() - started < 2.0


def test_a_shielded_child_is_never_interrupted():
    code, out, _, stopped = supervise(child(seconds=0.8), "child", Stop(after=0.0, deadline=True), shielded=True)
    assert code == 0 and "signals: none" in out and not stopped


# ---- the same command lines against the real Terraform, offline (terraform_data needs no download) ----------
REAL_TERRAFORM = shutil.which("terraform")


def _real_terraform_version() -> tuple[int, ...]:
    if not REAL_TERRAFORM:
        return ()
    out = subprocess.run([REAL_TERRAFORM, "version"], capture_output=True, text=True).stdout
    found = re.search(r"Terraform v(\d+)\.(\d+)", out)
    return tuple(int(n) for n in found.groups()) if found else ()


needs_real_terraform = pytest.mark.skipif(_real_terraform_version() < (1, 4),
                                          reason="Terraform >= 1.4 (terraform_data) is not on PATH")


def offline_stack(root: Path, resources: dict) -> Path:
    folder = root / "cdktf.out" / "stacks" / "repair"
    folder.mkdir(parents=True)
    folder.joinpath("cdk.tf.json").write_text(json.dumps({
        "terraform": {"backend": {"local": {"path": "../../../terraform.repair.tfstate"}}},
        "variable": {"rescue_admin_password": {"type": "string", "sensitive": True, "nullable": False}},
        "resource": {"terraform_data": resources},
        "output": {"first": {"value": "${terraform_data.quick.output}"}},
    }))
    return folder.parent


@needs_real_terraform
def test_real_terraform_accepts_every_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CRASHCART_TERRAFORM", REAL_TERRAFORM)
    stacks = offline_stack(tmp_path, {"quick": {"input": "${length(var.rescue_admin_password)}"}})
    repair = RepairStackDir(stacks)
    repair.init()
    assert repair.resources() == []
    assert repair.deploy({"TF_VAR_rescue_admin_password": SECRET}).ok
    assert repair.resources() == ["terraform_data.quick"]
    assert repair.outputs() == {"first": len(SECRET)}
    assert repair.destroy({"TF_VAR_rescue_admin_password": SECRET}).ok
    assert repair.resources() == []
    assert SECRET not in (tmp_path / "terraform.repair.tfstate").read_text()  # sensitive, never stored


@needs_real_terraform
def test_real_terraform_stops_gracefully_and_keeps_state_for_the_teardown(tmp_path, monkeypatch):
    monkeypatch.setenv("CRASHCART_TERRAFORM", REAL_TERRAFORM)
    stacks = offline_stack(tmp_path, {
        "quick": {"input": "x"},
        "slow": {"depends_on": ["terraform_data.quick"], "provisioner": [{"local-exec": {"command": "sleep 30"}}]},
    })
    repair = RepairStackDir(stacks, Stop(after=1.0, deadline=True))
    repair.init()
    started = time.monotonic()
    result = repair.deploy({"TF_VAR_rescue_admin_password": SECRET})
    assert not result.ok and result.interrupted and time.monotonic() - started < 20
    assert "Interrupt received" in result.stdout  # the acknowledgement supervise() looks for
    assert "terraform_data.quick" in repair.resources()  # saved: the destroy knows what was made
    repair.stop = None
    assert repair.destroy({"TF_VAR_rescue_admin_password": SECRET}).ok
    assert repair.resources() == []
