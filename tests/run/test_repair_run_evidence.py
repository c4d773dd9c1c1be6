"""The evidence stack's outputs in repair-run: read once per run from the state (standalone), or taken from the
file `fleet run` hands down (`--evidence-outputs`, scripts.run.outputs.HandedEvidence), which is refused when it
cannot be read or is for another evidence state, and checked against what the repair stack read.
What terraform ran is counted from the fake terraform's log (tests/support/fake_terraform.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.base.errors import CrashcartError
from scripts.config.stackoutputs import EvidenceOutputs
from scripts.run.outputs import HandedEvidence, state_identity
from scripts.run.terraform import EvidenceStackDir
from tests.run.repairkit import Project, assert_torn_down

EVIDENCE = {"account_id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/ev",
            "account_name": "ev", "blob_endpoint": "https://ev.blob.core.windows.net/", "container_name": "dumps",
            "container_scope_id": "/subscriptions/s/.../containers/dumps", "resource_group_name": "rg"}


def _stacks(project: Project) -> Path:
    return project.root / "cdktf.out" / "stacks"


def _handed(project: Project, **changes: str) -> Path:
    """What the fleet writes for this project: its evidence outputs and the state they come from."""
    outputs = EvidenceOutputs.from_values({**EVIDENCE, **project.evidence_outputs(), **changes})
    path = project.root / "evidence-outputs.json"
    HandedEvidence(outputs, state_identity(EvidenceStackDir(_stacks(project)))).write(path)
    return path


@pytest.mark.slow
def test_a_standalone_run_reads_the_evidence_state_once(project):
    outcome = project.run(env={"FAKE_TF_FAIL": "apply:repair"})
    assert outcome.code == 30, outcome.stderr
    assert project.log.commands("evidence") == ["init", "output"]  # before: init, output, output
    assert outcome.result["lock"]["blob"].startswith("locks/")  # in the container the evidence state names
    assert project.lock_metadata()["crashcart_state"] == "released"
    assert "outputs_from" not in outcome.result["evidence_stack"]


@pytest.mark.slow
def test_cleanup_reads_the_evidence_state_once(project):
    outcome = project.run("--cleanup")
    assert outcome.code == 0, outcome.stderr
    assert project.log.commands("evidence") == ["init", "output"]  # before: init, output, output
    assert project.lock_metadata()["crashcart_state"] == "released"


@pytest.mark.slow
def test_handed_down_outputs_replace_the_evidence_reads_and_are_checked_against_the_repair_stacks(project):
    """The repair stack read the evidence state itself: when it names another container than the handed-down
    file (the fake's repair outputs say `dumps`, the project's evidence container is another), the run stops
    before collecting, and tears down."""
    handed = _handed(project)
    outcome = project.run("--evidence-outputs", str(handed))
    assert outcome.code == 2, outcome.stderr
    assert project.log.commands("evidence") == []  # before: init, output, output
    assert outcome.result["evidence_stack"]["outputs_from"] == str(handed)
    assert [s["name"] for s in outcome.result["steps"]][:4] == ["config", "load config", "evidence outputs", "lock"]
    assert project.lock_metadata()["crashcart_state"] == "released"  # the lock: in the handed container
    assert "changed after the fleet read it" in outcome.stderr and "re-run the fleet" in outcome.stderr
    assert outcome.result["collect"] is None
    assert_torn_down(project, outcome)


def _refused(project: Project, handed: Path, says: str) -> None:
    outcome = project.run("--evidence-outputs", str(handed))
    assert outcome.code == 2, outcome.stderr
    assert says in outcome.stderr and "without --evidence-outputs" in outcome.stderr, outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert project.log.calls() == []  # nothing read, nothing deployed
    assert outcome.result["lock"] is None and outcome.result["repair_stack"]["touched"] is False


@pytest.mark.slow
def test_a_missing_handed_down_file_is_refused(project):
    _refused(project, project.root / "gone.json", "cannot read the evidence outputs")


@pytest.mark.slow
def test_a_corrupt_handed_down_file_is_refused(project):
    handed = _handed(project)
    handed.write_bytes(handed.read_bytes()[:40])
    _refused(project, handed, "cannot read the evidence outputs")


@pytest.mark.slow
def test_a_handed_down_file_of_another_project_is_refused(project, tmp_path):
    other = Project(tmp_path / "other", project.bin_dir)
    other_stacks = _stacks(other)
    (other_stacks / "evidence").mkdir(parents=True)
    stack = (_stacks(project) / "evidence" / "cdk.tf.json").read_bytes()  # the same stack, another folder
    (other_stacks / "evidence" / "cdk.tf.json").write_bytes(stack)
    handed = _handed(other)
    (project.root / "evidence-outputs.json").write_bytes(handed.read_bytes())
    _refused(project, project.root / "evidence-outputs.json", "holds the outputs of another evidence state")


# ---- the file alone ----------------------------------------------------------------------------------------
def _stack(folder: Path, backend: dict) -> EvidenceStackDir:
    (folder / "evidence").mkdir(parents=True)
    (folder / "evidence" / "cdk.tf.json").write_text(json.dumps({"terraform": {"backend": backend}}))
    return EvidenceStackDir(folder)


def test_a_remote_state_is_named_by_account_container_and_key(tmp_path):
    azurerm = {"storage_account_name": "tfstate1", "container_name": "tfstate", "key": "crashcart/evidence.tfstate"}
    here = _stack(tmp_path / "a", {"azurerm": azurerm})
    elsewhere = _stack(tmp_path / "b", {"azurerm": {**azurerm, "key": "other/evidence.tfstate"}})
    path = tmp_path / "handed.json"
    HandedEvidence(EvidenceOutputs.from_values(EVIDENCE), state_identity(here)).write(path)
    assert HandedEvidence.load(path, _stack(tmp_path / "c", {"azurerm": azurerm})).outputs.container_name == "dumps"
    with pytest.raises(CrashcartError, match="another evidence state") as refused:
        HandedEvidence.load(path, elsewhere)
    assert refused.value.exit_code == 2


def test_a_local_state_is_named_by_its_real_path_through_a_fleets_link(tmp_path):
    """A fleet VM's folder links the project's evidence state: the same state, so the file is accepted."""
    backend = {"local": {"path": "../../../terraform.evidence.tfstate"}}
    project = _stack(tmp_path / "project" / "cdktf.out" / "stacks", backend)
    vm = _stack(tmp_path / "work" / "vm-1" / "cdktf.out" / "stacks", backend)
    (tmp_path / "work" / "vm-1" / "terraform.evidence.tfstate").symlink_to(tmp_path / "project" /
                                                                            "terraform.evidence.tfstate")
    other = _stack(tmp_path / "work" / "vm-2" / "cdktf.out" / "stacks", backend)  # no link: its own state
    path = tmp_path / "handed.json"
    HandedEvidence(EvidenceOutputs.from_values(EVIDENCE), state_identity(project)).write(path)
    assert HandedEvidence.load(path, vm).state == state_identity(project)
    with pytest.raises(CrashcartError, match="another evidence state"):
        HandedEvidence.load(path, other)


@pytest.mark.parametrize("document", ['{"format": "crashcart.evidence-outputs.v1", "state": "x"}', "[]",
                                      '{"state": "x", "evidence": {}}', '\xff',
                                      json.dumps({"format": "crashcart.evidence-outputs.v1", "state": "a\nb",
                                                  "evidence": EVIDENCE})])
def test_a_file_that_is_not_one_the_fleet_writes_is_refused_in_one_line(tmp_path, document):
    path = tmp_path / "handed.json"
    path.write_text(document, encoding="latin-1")
    with pytest.raises(CrashcartError) as refused:
        HandedEvidence.load(path, _stack(tmp_path / "s", {"local": {}}))
    assert refused.value.exit_code == 2 and "\n" not in refused.value.message


def test_the_file_holds_the_evidence_outputs_only(tmp_path):
    path = tmp_path / "handed.json"
    HandedEvidence(EvidenceOutputs.from_values({**EVIDENCE, "extra_secret": "s3cr3t"}), "local:/x").write(path)
    document = json.loads(path.read_text())
    assert set(document["evidence"]) == set(EVIDENCE) and "s3cr3t" not in path.read_text()
    assert not list(tmp_path.glob(".*draft"))
