"""`fleet run --fix SPEC --canary N [--max-failure-rate R]` (scripts/run/fleetcanary.py, scripts/run/fleet.py):
the canary VMs are fixed and verified before any other VM starts, and the rollout stops - the VMs not
started left for a re-run with the reason - once the failure rate among fixed VMs exceeds R. The
orchestration is real (the manifest in Azurite); each VM's repair-run --fix is the fleet kit's stand-in
with injected outcomes, its report read by VmJob.classify as a child's would be."""

from __future__ import annotations

import pytest

from scripts.azure.identity import vm_key
from scripts.base.errors import CrashcartError
from scripts.run import fleet
from scripts.run.fleetcanary import parse_rate
from scripts.run.fleetjob import JobSettings, VmJob
from tests.run.fleetkit import ScriptedJobs, vm_ids

SPEC = "disable-driver:auto"


class NoStop:
    reason = None
    is_deadline = False


def run_fleet(container, tmp_path, outcomes, *, count, canary, rate=0.0, parallel=2, fix=SPEC):
    ids = tuple(vm_ids(count))
    jobs = ScriptedJobs({ids[i]: o for i, o in outcomes.items()})
    job = JobSettings(project_dir=tmp_path, work_dir=tmp_path / "work", base_config=tmp_path / "none.toml", fix=fix)
    settings = fleet.FleetSettings(vm_ids=ids, fleet_id=f"canary-{count}-{canary}", job=job, max_parallel=parallel,
                                   fix=fix, canary=canary, max_failure_rate=rate)
    result = fleet.FleetRun(settings, NoStop(), container, job=jobs).execute()
    return ids, jobs, result


@pytest.fixture
def container(azurite_container):
    azurite, name = azurite_container
    return azurite.service_client().get_container_client(name)


def test_the_canary_is_fixed_and_verified_before_the_rest_start(container, tmp_path):
    ids, jobs, result = run_fleet(container, tmp_path, {}, count=6, canary=2, parallel=4)
    canary_ends = [t for v, what, t in jobs.order if what == "end" and v in ids[:2]]
    rest_starts = [t for v, what, t in jobs.order if what == "start" and v in ids[2:]]
    assert sorted(jobs.started()[:2]) == sorted(ids[:2])
    assert max(canary_ends) <= min(rest_starts), "a VM after the canary started before every canary VM ended"
    assert result["counts"]["collected"] == 6 and result["exit_code"] == 0
    assert result["rollout"] == {"fix": SPEC, "canary": 2, "max_failure_rate": 0.0, "fixed": 6, "booted": 6,
                                 "not_booted": 0, "not_reached_fix": 0, "failure_rate": 0.0, "stopped": None}
    entry = result["entries"][vm_key(ids[0])]
    assert entry["fix"]["booted"] is True and entry["fix"]["status"] == f"{SPEC}: booted"


def test_a_failing_canary_stops_the_rollout_and_leaves_the_rest_for_a_rerun(container, tmp_path):
    ids, jobs, result = run_fleet(container, tmp_path, {1: "not-booted"}, count=6, canary=2, rate=0.25)
    assert sorted(jobs.started()) == sorted(ids[:2]), "a VM after a failed canary was started"
    reason = "rollout stopped: canary failure rate 0.50 > 0.25"
    assert result["rollout"]["stopped"].startswith(reason)
    entries = result["entries"]
    assert entries[vm_key(ids[1])]["state"] == "failed" and entries[vm_key(ids[1])]["fix"]["booted"] is False
    for vm_id in ids[2:]:
        assert entries[vm_key(vm_id)]["state"] == "left-for-rerun"
        assert entries[vm_key(vm_id)]["reason"].startswith(f"not run: {reason}")
    assert result["exit_code"] == 12


def test_the_rollout_stops_when_later_vms_push_the_rate_over_the_threshold(container, tmp_path):
    ids, jobs, result = run_fleet(container, tmp_path, {2: "not-booted", 3: "not-booted"}, count=7, canary=2,
                                  rate=0.3, parallel=1)
    # canary 2/2 booted; then ok... the 3rd fixed VM fails: 1/3 = 0.33 > 0.30: nothing after it starts
    assert jobs.started() == list(ids[:3])
    assert result["rollout"]["stopped"].startswith("rollout stopped: fix failure rate 0.33 > 0.30")
    assert [result["entries"][vm_key(v)]["state"] for v in ids] == (
        ["collected", "collected", "failed"] + ["left-for-rerun"] * 4)


def test_vms_that_fail_before_their_fix_do_not_count_but_a_canary_without_any_fix_stops(container, tmp_path):
    ids, jobs, result = run_fleet(container, tmp_path, {0: "no-dump"}, count=4, canary=2, rate=0.0)
    assert result["rollout"]["not_reached_fix"] == 1 and result["rollout"]["stopped"] is None
    assert result["counts"]["collected"] == 3
    ids, jobs, result = run_fleet(container, tmp_path, {0: "no-dump", 1: "no-dump"}, count=3, canary=2)
    assert result["rollout"]["stopped"].startswith("rollout stopped: no canary VM reached its fix")
    assert result["entries"][vm_key(ids[2])]["state"] == "left-for-rerun"


def test_a_rerun_with_fix_runs_again_collected_vms_whose_fix_did_not_boot(container, tmp_path):
    ids, jobs, _ = run_fleet(container, tmp_path, {1: "not-booted"}, count=3, canary=1, rate=1.0)
    assert sorted(jobs.started()) == sorted(ids)
    _, again, result = run_fleet(container, tmp_path, {}, count=3, canary=1, rate=1.0)
    assert again.started() == [ids[1]] and result["skipped"] == 2


def test_classify_reads_the_fix_verdict_of_a_repair_run_report():
    vm_id = vm_ids(1)[0]
    code, report = ScriptedJobs({vm_id: "not-booted"}).report(vm_id, SPEC)
    fields = VmJob.classify(code, report, "", SPEC)
    assert (fields["state"], fields["exit_code"]) == ("failed", 15)
    assert fields["fix"]["attempted"] and fields["fix"]["booted"] is False and "crashed again" in fields["fix"]["reason"]
    assert fields["dumps"], "the dump collected before the fix stays recorded"
    assert VmJob.classify(0, {"collect": report["collect"]}, "", None)["fix"] is None


@pytest.mark.parametrize("text,value", [("0.1", 0.1), ("10%", 0.1), ("0", 0.0), ("1", 1.0)])
def test_the_failure_rate_is_a_fraction_or_a_percentage(text, value):
    assert parse_rate(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["2", "-0.1", "abc", "150%"])
def test_a_bad_failure_rate_is_a_usage_error(text):
    with pytest.raises(CrashcartError) as err:
        parse_rate(text)
    assert err.value.exit_code == 2
