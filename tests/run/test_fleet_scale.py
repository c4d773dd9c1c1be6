"""Issue 17's scale test: 50 VMs against the strict ARM double and Azurite in one fleet run, with faults
injected (tests/run/fleetkit.py): every VM ends collected, failed with its reason, or left for a re-run;
nothing is left behind; the fleet report's counts equal the per-VM reports in evidence; a re-run after
the fault is gone completes only the VMs left."""

from __future__ import annotations

import collections
import json

import pytest

from scripts.azure.identity import vm_key
from tests.run.fleetkit import make_fleet
from tests.run.repairkit import _arm_double, arm  # noqa: F401

pytestmark = pytest.mark.slow


def test_fifty_vms_with_faults(project, arm, tmp_path):
    fleet = make_fleet(project, arm, tmp_path / "kit", 50, "scale-50")
    ids = fleet.ids
    fleet.no_dump |= set(ids[1:5])
    fleet.throttled |= set(ids[5:9])
    fleet.throttled_forever |= set(ids[9:11])
    fleet.deploy_fails.add(ids[11])
    fleet.culprits.update({v: "netvsc.sys" for v in ids[12:15]})
    fleet.build()
    outcome = fleet.run(timeout=900)
    assert outcome.code == 12, outcome.stderr[-3000:]
    manifest = fleet.manifest()["vms"]
    by_state = collections.Counter(e["state"] for e in manifest.values())
    assert by_state == {"collected": 50 - 4 - 2 - 1, "failed": 5, "left-for-rerun": 2}, by_state
    for vm_id in fleet.no_dump:
        assert manifest[vm_key(vm_id)]["exit_code"] == 10 and "no memory dump" in manifest[vm_key(vm_id)]["reason"]
    assert manifest[vm_key(ids[11])]["exit_code"] == 30
    for vm_id in fleet.throttled_forever:
        entry = manifest[vm_key(vm_id)]
        assert entry["state"] == "left-for-rerun" and entry["exit_code"] == 5, entry
        assert "429" in entry["reason"] or "throttl" in entry["reason"].lower(), entry["reason"]
    assert {v for v, _ in fleet.throttle_log} == fleet.throttled | fleet.throttled_forever
    assert fleet.leaked() == []

    # The report's counts are the per-VM reports' (read back from evidence).
    report = json.loads((fleet.work_dir / "fleet-report.json").read_text())
    stop_codes, culprits = collections.Counter(), collections.Counter()
    for entry in manifest.values():
        if entry["state"] != "collected":
            continue
        per_vm = json.loads(fleet.container.download_blob(entry["report_blob"]).readall())
        assert per_vm["source"]["vm_id"] == entry["vm_id"] and per_vm["status"] == "collected"
        stop_codes[int(per_vm["bugcheck"]["code"], 0)] += 1
        culprits[entry["culprit"]] += 1
    assert {int(s["code"], 0): s["count"] for s in report["stop_codes"]} == dict(stop_codes)
    assert {c["driver"]: c["count"] for c in report["culprits"]} == dict(culprits)
    assert culprits["netvsc.sys"] == 3 and report["common_culprit"]["driver"] == "contosoflt.sys"

    # The throttling is over: a re-run runs the failed and the left VMs only, and collects the throttled ones.
    fleet.throttled_forever.clear()
    again = fleet.run(timeout=600)
    assert again.result["skipped"] == 43 and again.result["ran"] == 7, again.stderr[-3000:]
    after = fleet.manifest()["vms"]
    assert all(after[vm_key(v)]["state"] == "collected" for v in ids[9:11])
    assert fleet.leaked() == []
