"""`fleet run` without --skip-synth: the fleet synthesizes every VM's stacks in one process (one jsii load,
scripts.run.fleetsynth), not one synth per VM; each VM's repair-run then skips its own, and its stacks
are the ones its own synth would write (its state key, names and tags; repair-run checks they are its)."""

from __future__ import annotations

import json
import time

import pytest

from scripts.azure.identity import vm_key
from tests.run.fleetkit import make_fleet
from tests.run.repairkit import _arm_double, arm  # noqa: F401

pytestmark = pytest.mark.slow


def test_one_synth_for_the_whole_fleet(project, arm, tmp_path):
    fleet = make_fleet(project, arm, tmp_path / "kit", 3, "synth-3")
    fleet.no_dump.add(fleet.ids[2])  # a VM that fails later still had its stacks from the one synth
    fleet.build()
    started = time.time()
    outcome = fleet.run(synth=True, timeout=600)
    assert outcome.code == 12, outcome.stderr[-3000:]
    assert [e["state"] for e in sorted(fleet.manifest()["vms"].values(), key=lambda e: e["vm_id"])] == \
        ["collected", "collected", "failed"]
    assert "synthesized the stacks of 3 of 3 VM(s) in one process" in outcome.stderr
    for vm_id in fleet.ids:
        folder = fleet.folder(vm_id)
        child_log = (folder / "repair-run.log").read_text()
        assert "==> synth" not in child_log and "==> deploy repair" in child_log, child_log[-2000:]
        stack = folder / "cdktf.out" / "stacks" / "repair" / "cdk.tf.json"
        assert stack.stat().st_mtime >= started  # written by this fleet's synth, not the kit
        backend = json.loads(stack.read_text())["terraform"]["backend"]["local"]["path"]
        assert vm_key(vm_id) in backend
    assert fleet.leaked() == []
