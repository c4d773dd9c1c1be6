"""`fleet run` reads the evidence stack's outputs once and hands them down: each VM's repair-run takes them from
the file the fleet writes into its folder (`--evidence-outputs`) instead of `terraform init` + `output` of the
evidence state (a backend read over the network each, with an azurerm backend). Counted from the fake
terraform's log: the parent's calls land in the project's log, each child's in its VM's log
(tests/run/fleetkit.py)."""

from __future__ import annotations

import json

import pytest

from scripts.azure.identity import vm_key
from tests.run.fleetkit import make_fleet
from tests.run.repairkit import _arm_double, arm  # noqa: F401

pytestmark = pytest.mark.slow


def test_a_fleet_reads_the_evidence_state_once_and_its_children_not_at_all(project, arm, tmp_path):
    fleet = make_fleet(project, arm, tmp_path / "kit", 2, "evidence-2")
    outcome = fleet.run("--max-parallel", "2")
    assert outcome.code == 0 and outcome.result["counts"]["collected"] == 2, outcome.stderr[-3000:]
    # before: the fleet ran init, output, output; each child init, output, output (3 per VM)
    assert project.log.commands("evidence") == ["init", "output"]
    for vm_id in fleet.ids:
        assert fleet.log(vm_id).commands("evidence") == [], vm_id
        assert fleet.log(vm_id).calls("repair"), f"{vm_id} had its own repair stack"
        handed = json.loads((fleet.folder(vm_id) / "evidence-outputs.json").read_text())
        assert handed["evidence"]["container_name"] == project.lock_container
        report = json.loads((fleet.folder(vm_id) / "crashcart-out" / "repair-run.json").read_text())
        assert report["evidence_stack"]["outputs_from"].endswith("evidence-outputs.json")
        assert report["evidence_stack"]["deployed_by_this_run"] is False
        assert report["lock"]["blob"] == f"locks/{vm_key(vm_id)}"
        # the VM lock still lives in the evidence container (released at the end)
        assert fleet.container.get_blob_client(f"locks/{vm_key(vm_id)}").exists()
    assert fleet.leaked() == []
