"""`fleet run` end to end: a repair-run child per VM against the ARM double and Azurite, the manifest in
evidence, faults per VM (tests/run/fleetkit.py), resuming, and nothing left behind."""

from __future__ import annotations

import json

import pytest

from scripts.azure.identity import vm_key
from tests.run.fleetkit import make_fleet
from tests.run.repairkit import _arm_double, arm  # noqa: F401

pytestmark = pytest.mark.slow  # every test starts the fleet and a repair-run per VM as processes


def states(manifest: dict) -> dict[str, str]:
    return {key: entry["state"] for key, entry in manifest["vms"].items()}


def test_a_small_fleet_with_faults_ends_every_vm_collected_failed_or_left(project, arm, tmp_path):
    fleet = make_fleet(project, arm, tmp_path / "kit", 5, "faults-5")
    app = fleet.ids
    fleet.no_dump.add(app[1])
    fleet.deploy_fails.add(app[2])
    fleet.throttled.add(app[3])
    fleet.build()  # the deploy fault is a cue: written again
    outcome = fleet.run("--max-parallel", "3")
    assert outcome.code == 12, outcome.stderr[-3000:]
    manifest = fleet.manifest()
    assert states(manifest) == {vm_key(app[0]): "collected", vm_key(app[1]): "failed", vm_key(app[2]): "failed",
                                vm_key(app[3]): "collected", vm_key(app[4]): "collected"}
    no_dump, deploy = manifest["vms"][vm_key(app[1])], manifest["vms"][vm_key(app[2])]
    assert no_dump["exit_code"] == 10 and "no memory dump" in no_dump["reason"]
    assert deploy["exit_code"] == 30 and "terraform apply failed for the repair stack" in deploy["reason"]
    # ARM's 429s were waited out as Retry-After said (1 s), inside the VM's own repair-run
    throttles = [t for v, t in fleet.throttle_log if v == app[3]]
    assert len(throttles) == 2 and throttles[1] - throttles[0] >= 0.9
    collected = manifest["vms"][vm_key(app[0])]
    assert collected["stop_code"] == "0x0000007E" and collected["culprit"] == "contosoflt.sys"
    assert collected["report_blob"].startswith(vm_key(app[0]) + "/") and collected["dumps"][0]["size"] > 0
    assert fleet.container.get_blob_client(collected["report_blob"]).exists()
    assert fleet.leaked() == []
    for vm_id in app:
        assert fleet.log(vm_id).calls("repair"), f"{vm_id} had its own repair stack"
    # the report: counts from the manifest, the common culprit called out
    report = json.loads((fleet.work_dir / "fleet-report.json").read_text())
    assert report["counts"]["collected"] == 3 and report["counts"]["failed"] == 2
    assert report["culprits"] == [{"driver": "contosoflt.sys", "count": 3}]
    assert report["common_culprit"]["driver"] == "contosoflt.sys"
    assert outcome.result["counts"] == report["counts"]

    # Re-run: the collected VMs are verified and skipped; the failed ones run again (and fail again).
    again = fleet.run("--max-parallel", "3")
    assert again.code == 12, again.stderr[-3000:]
    assert again.result["skipped"] == 3 and again.result["ran"] == 2
    assert [fleet.repair_runs(v) for v in app] == [1, 2, 2, 1, 1]
    assert fleet.manifest()["vms"][vm_key(app[1])]["attempts"] == 2
    assert fleet.leaked() == []


def _wait_for(condition, timeout: float, what: str):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _collected(fleet) -> list[str]:
    try:
        return [k for k, s in states(fleet.manifest()).items() if s == "collected"]
    except Exception:  # noqa: BLE001 - not created yet
        return []


def _folder_busy(folder) -> bool:
    """A repair-run holds the VM folder's lock (scripts.run.lock.FolderLock)."""
    import fcntl
    import os

    path = folder / "cdktf.out" / "repair-run.lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_a_killed_fleet_rerun_completes_only_the_remaining_vms(project, arm, tmp_path):
    import os
    import signal

    fleet = make_fleet(project, arm, tmp_path / "kit", 6, "killed-6")
    proc = fleet.start("--max-parallel", "2")
    _wait_for(lambda: len(_collected(fleet)) >= 2, 240, "two VMs collected")
    os.kill(proc.pid, signal.SIGKILL)  # the fleet dies; its running children finish on their own
    proc.communicate()
    done_before = set(_collected(fleet))
    in_flight = [k for k, s in states(fleet.manifest()).items() if s == "running"]
    assert in_flight, "the kill left VMs running"

    # At once: the orphaned repair-runs may still hold their VMs (folder, lock): those are left for a re-run.
    again = fleet.run("--max-parallel", "2")
    assert again.code in (0, 12), again.stderr[-3000:]
    assert again.result["skipped"] == len(done_before) and again.result["ran"] == 6 - len(done_before)
    assert set(states(fleet.manifest()).values()) <= {"collected", "left-for-rerun"}
    for key, entry in fleet.manifest()["vms"].items():
        if entry["state"] == "left-for-rerun":
            assert key in in_flight and "another repair-run is working" in entry["reason"]

    _wait_for(lambda: not any(_folder_busy(fleet.work_dir / k) for k in in_flight), 120, "the orphans to end")
    last = fleet.run("--max-parallel", "2")
    assert last.code == 0, last.stderr[-3000:]
    assert set(states(fleet.manifest()).values()) == {"collected"}
    for vm_id in fleet.ids:
        if vm_key(vm_id) in done_before:
            assert fleet.repair_runs(vm_id) == 1, "a VM collected before the kill ran again"
    assert fleet.leaked() == []


def test_sigterm_stops_the_fleet_cleanly_and_leaves_the_rest_for_a_rerun(project, arm, tmp_path):
    import os
    import signal

    fleet = make_fleet(project, arm, tmp_path / "kit", 4, "stopped-4")
    proc = fleet.start("--max-parallel", "1")
    _wait_for(lambda: any(s == "running" for s in states(fleet.manifest()).values()) if _manifest_exists(fleet)
              else False, 120, "the first VM to start")
    os.kill(proc.pid, signal.SIGTERM)
    from tests.run.fleetkit import finish

    outcome = finish(proc, 180)
    assert outcome.code == 130, outcome.stderr[-3000:]
    found = states(fleet.manifest())
    assert "running" not in found.values() and "pending" not in found.values()
    left = [k for k, s in found.items() if s == "left-for-rerun"]
    assert len(left) >= 3
    reasons = [fleet.manifest()["vms"][k]["reason"] for k in left]
    assert any("not run: the fleet stopped (SIGTERM)" in r for r in reasons)
    assert fleet.leaked() == []  # the running child tore its stack down and released its lock
    again = fleet.run("--max-parallel", "2")
    assert again.code == 0, again.stderr[-3000:]
    assert set(states(fleet.manifest()).values()) == {"collected"}


def _manifest_exists(fleet) -> bool:
    return fleet.container.get_blob_client(f"fleets/{fleet.fleet_id}/fleet.json").exists()


def test_a_fleet_selected_through_resource_graph_runs_its_windows_vms_at_the_quota_default(project, arm, tmp_path):
    """`fleet run --selector`: the VMs come from Resource Graph (the ARG double, by the real SDK client): the
    resource group's Windows VMs, not its Linux VM nor another group's VM; --max-parallel defaults from the
    region's vCPU quota, and the run says both."""
    from scripts.devkit import arm_usage
    from scripts.devkit.arm_vm import add_broken_vm

    fleet = make_fleet(project, arm, tmp_path / "kit", 3, "selected-3")
    assert fleet.in_graph() == fleet.ids
    add_broken_vm(arm, name="lin-01", resource_group="prod-app", os_type="Linux")
    add_broken_vm(arm, name="other-01", resource_group="prod-other")
    arm_usage.set_usage(arm, "westeurope", "standardDSv5Family", current=92, limit=100)  # 8 free: 2 rescue VMs
    sub = fleet.ids[0].split("/")[2]
    outcome = fleet.run(selector=f"subscription={sub} resourceGroup=prod-app")
    assert outcome.code == 0, outcome.stderr[-3000:]
    assert set(states(fleet.manifest())) == {vm_key(v) for v in fleet.ids}
    assert set(states(fleet.manifest()).values()) == {"collected"}
    assert outcome.result["selection"]["matched"] == 3 and outcome.result["selection"]["power_states"] == {"running": 3}
    assert outcome.result["max_parallel"]["jobs"] == 2
    assert "8 vCPUs free" in outcome.result["max_parallel"]["why"]
    assert "--max-parallel 2" in outcome.stderr and "3 Windows VM(s) matched" in outcome.stderr
    assert fleet.leaked() == []
