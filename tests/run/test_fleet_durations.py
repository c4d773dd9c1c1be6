"""A fleet against doubles that take the time Azure takes (scripts/devkit/armdouble.py, Durations): the VMs'
waits (the deploy, the run command, the destroy) overlap - the fleet holds several rescue VMs at once and
ends in far less than the VMs' waits one after the other. Counted from what terraform and ARM recorded,
with one generous wall-time bound (what running the VMs one by one could never beat)."""

from __future__ import annotations

import pytest

from scripts.devkit.armdouble import Durations
from tests.run.fleetkit import make_fleet
from tests.run.repairkit import _arm_double, arm  # noqa: F401
from tests.support.fake_terraform import command_of

pytestmark = pytest.mark.slow


def test_a_fleets_modelled_waits_overlap(project, arm, tmp_path, monkeypatch):
    durations = Durations.azure_like(8.0 / Durations.azure_like(1.0).per_vm())  # 8 s of waits per VM
    monkeypatch.setattr(arm, "durations", durations)
    fleet = make_fleet(project, arm, tmp_path / "kit", 4, "waits-4")
    outcome = fleet.run("--max-parallel", "4", timeout=300)
    assert outcome.code == 0 and outcome.result["counts"]["collected"] == 4, outcome.stderr[-3000:]
    assert fleet.leaked() == []

    spans = []  # each VM's time holding its repair stack: from its apply's start to its destroy's end
    for vm_id in fleet.ids:
        records = fleet.log(vm_id).records()
        apply = next(r for r in records if r["phase"] == "start" and command_of(r["argv"]) == "apply")
        destroy = [r for r in records if r["phase"] == "end" and command_of(r["argv"]) == "destroy"][-1]
        spans.append((apply["t"], destroy["t"]))
        # the modelled waits happened: the apply and the destroy each slept theirs
        assert destroy["t"] - apply["t"] >= durations.of("deploy") + durations.of("destroy")
    # the run commands ran their modelled time, on every VM's rescue VM
    assert len(arm.calls("PUT", "/runCommands/")) == 4
    held_at_once = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert held_at_once >= 3, spans  # one by one, it would be 1
    assert outcome.seconds < 4 * durations.per_vm(), outcome.seconds  # one by one: at least 32 s of waits alone
