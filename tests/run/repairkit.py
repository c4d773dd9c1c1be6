"""repair-run as a person or a pipeline runs it, in a project folder of its own: the helpers the tests of
tests/run share (the fixtures are in tests/run/conftest.py).

What is real: the CLI, the orchestrator, synth (main.py), python-terraform, the output-reading path,
collect against the loopback ARM double and Azurite (also the evidence container, where the VM lock
lives), and the signals. What stands in: `terraform`, a recording fake on PATH
(tests/support/fake_terraform.py) that keeps a state file where the stack's backend says.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scripts.devkit import arm_compute
from scripts.devkit.armdouble import ArmDouble
from tests.support.fake_terraform import TerraformLog, command_of

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


LEASE_SECONDS = 15  # the VM lock's lease in these tests (Azure's shortest): a crashed run's expires quickly


class Project:
    evidence_before: bytes = b""  # the evidence state file as deployed before the run

    def __init__(self, root: Path, bin_dir: Path, azurite: Any = None, lock_container: str | None = None):
        self.root = root
        self.bin_dir = bin_dir
        self.log = TerraformLog(root.parent / f"{root.name}-terraform.jsonl")
        self.outputs_file = root.parent / f"{root.name}-outputs.json"
        root.mkdir(parents=True, exist_ok=True)
        (root / "main.py").symlink_to(REPO / "main.py")
        shutil.copy(REPO / "repair.example.toml", root / "repair.toml")
        self.azurite = azurite
        # the evidence stack's container, where the VM lock lives (another project's: the same evidence)
        self.lock_container = lock_container or f"evidence{uuid.uuid4().hex[:10]}"
        if azurite is not None and lock_container is None:
            azurite.service_client().create_container(self.lock_container)
        self.set_outputs(repair_outputs())
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("CRASHCART_", "FAKE_TF_", "TF_", "ARM_", "AZURE_"))}
        self.env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO), CI="1",
                        FAKE_TF_LOG=str(self.log.path), FAKE_TF_OUTPUTS=str(self.outputs_file),
                        CRASHCART_TEARDOWN_RETRY_SECONDS="0", CRASHCART_POLL_SECONDS="0.2",
                        CRASHCART_LOCK_LEASE_SECONDS=str(LEASE_SECONDS),
                        # repair.example.toml says strategy = "auto" (#18): these runs test deploy/collect/
                        # teardown with the rescue VM, not preflight (tests/run/test_preflight.py does)
                        CRASHCART_REPAIR_STRATEGY="rescue-vm",
                        JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION="20")
        if azurite is not None:
            self.env["CRASHCART_STORAGE_CONNECTION_STRING"] = azurite.connection_string

    def evidence_outputs(self) -> dict[str, str]:
        endpoint = self.azurite.blob_endpoint if self.azurite is not None else "https://x.blob.core.windows.net/"
        return {"blob_endpoint": endpoint, "container_name": self.lock_container}

    def set_outputs(self, repair: dict[str, Any]) -> None:
        self.outputs_file.write_text(json.dumps({"repair": repair, "evidence": self.evidence_outputs()}))

    def use_evidence_state(self, state: bytes) -> None:
        """The session's deployed evidence state, with this project's container in its outputs."""
        document = json.loads(state)
        for name, value in self.evidence_outputs().items():
            document["outputs"][name] = {"value": value, "type": "string"}
        self.evidence_before = json.dumps(document, indent=2).encode()
        self.state_file("evidence").write_bytes(self.evidence_before)

    def lock_metadata(self) -> dict[str, str]:
        container = self.azurite.service_client().get_container_client(self.lock_container)
        [name] = [b.name for b in container.list_blobs(name_starts_with="locks/")]
        return container.get_blob_client(name).get_blob_properties().metadata

    def command(self, *args: str, skip_synth: bool = True) -> list[str]:
        return [sys.executable, "-m", "scripts", "repair-run", *(["--skip-synth"] if skip_synth else []), *args]

    def run(self, *args: str, env: dict[str, str] | None = None, skip_synth: bool = True,
            timeout: float = 60) -> Outcome:
        proc = subprocess.Popen(self.command(*args, skip_synth=skip_synth), cwd=self.root,
                                env={**self.env, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        return self.finish(proc, timeout)

    def start(self, *args: str, env: dict[str, str] | None = None, skip_synth: bool = True) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args, skip_synth=skip_synth), cwd=self.root,
                                env={**self.env, **(env or {})},
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

    # -- state, as the fake terraform keeps it: where the synthesized stack's backend says
    def state_file(self, stack: str) -> Path:
        backend = json.loads((self.root / "cdktf.out" / "stacks" / stack / "cdk.tf.json").read_text())
        path = backend["terraform"]["backend"]["local"]["path"]
        return Path(os.path.normpath(self.root / "cdktf.out" / "stacks" / stack / path))

    def resources(self, stack: str) -> list[str] | None:
        path = self.state_file(stack)
        if not path.exists():
            return None
        return [f"{r['type']}.{r['name']}" for r in json.loads(path.read_text())["resources"]]

    def repair_destroyed(self) -> bool:
        """The last destroy left nothing, and its local state file (and .backup), which held the rescue VM's
        admin password, is gone."""
        ends = [r for r in self.log.records() if r.get("phase") == "end" and r.get("stack") == "repair"
                and command_of(r["argv"]) == "destroy"]
        state = self.state_file("repair")
        return (bool(ends) and ends[-1]["resources_after"] == [] and not state.exists()
                and not state.with_name(state.name + ".backup").exists())

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


# ---- what every fault must leave behind ----------------------------------------------------------------
def assert_torn_down(project: Project, outcome: Outcome) -> None:
    """The repair stack destroyed (by apply -destroy), the evidence stack untouched, no secret leaked,
    terraform never killed mid-operation, and the result saying so."""
    assert project.repair_destroyed(), outcome.stderr
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
