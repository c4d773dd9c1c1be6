"""The fleet's pieces alone: the VM list, the fleet id, the shards, how a child's end is read, and the
manifest shared by several runners (Azurite)."""

from __future__ import annotations

import concurrent.futures as futures

import pytest

from scripts.azure.identity import vm_key
from scripts.base.errors import CrashcartError
from scripts.run import fleet, fleetplan
from scripts.run.fleetjob import VmJob
from scripts.run.fleetmanifest import COLLECTED, FAILED, RERUN, FleetManifest
from tests.run.fleetkit import vm_ids


def test_the_vm_list_skips_comments_and_duplicates_and_names_a_bad_line(tmp_path):
    ids = vm_ids(3)
    text = f"# fleet\n\n{ids[0]}\n{ids[1]}  # web\n{ids[0].upper().replace('/SUBSCRIPTIONS', '/subscriptions')}\n{ids[2]}\n"
    path = tmp_path / "vms.txt"
    path.write_text(text)
    assert fleet.read_vm_file(path) == tuple(ids)
    path.write_text(f"{ids[0]}\nweb-02\x1b[31m\n")
    with pytest.raises(CrashcartError) as err:
        fleet.read_vm_file(path)
    assert err.value.exit_code == 2 and "line 2" in err.value.message and "\x1b" not in err.value.message
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(CrashcartError) as err:
        fleet.read_vm_file(path)
    assert err.value.exit_code == 2
    path.write_text("# nothing\n")
    with pytest.raises(CrashcartError, match="lists no VM"):
        fleet.read_vm_file(path)


def test_the_same_list_in_any_order_is_the_same_fleet():
    ids = vm_ids(5)
    assert fleet.default_fleet_id(ids) == fleet.default_fleet_id(list(reversed(ids)))
    assert fleet.default_fleet_id(ids) != fleet.default_fleet_id(ids[:4])
    with pytest.raises(CrashcartError):
        fleet.check_fleet_id("../etc")


@pytest.mark.parametrize("count,shards", [(50, 8), (5, 2), (3, 3), (7, 1)])
def test_shards_cover_every_vm_once_in_near_equal_parts(count, shards):
    ids = tuple(vm_ids(count))
    parts = [fleetplan.shard_of(ids, (i, shards)) for i in range(1, shards + 1)]
    assert sorted(v for p in parts for v in p) == sorted(ids)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("text", ["0/2", "3/2", "a/b", "1/300", ""])
def test_a_bad_shard_is_a_usage_error(text):
    with pytest.raises(CrashcartError) as err:
        fleetplan.parse_shard(text)
    assert err.value.exit_code == 2


def test_plan_writes_both_matrices(tmp_path):
    ids = tuple(vm_ids(5))
    planned = fleetplan.plan(ids, 8, "fleet-x", "vms.txt", tmp_path)
    assert planned["shards"] == 5  # never more jobs than VMs
    assert [j["shard"] for j in planned["github_matrix"]["include"]] == [f"{i}/5" for i in range(1, 6)]
    assert planned["azure_matrix"]["shard_2_of_5"] == {"SHARD": "2/5"}
    assert (tmp_path / "shard-3-of-5.txt").read_text().count("\n") == 1


def blob(name: str, ok: bool = True) -> dict:
    return {"name": name, "url": f"https://a.blob.core.windows.net/c/{name}", "size": 10, "sha256": "ab",
            "kind": "minidump", "ok": ok, "header": {"bugcheck_code": "0x7e"}}


def test_how_a_childs_end_is_read():
    collected = VmJob.classify(0, {"collect": {"status": "collected", "run": "k/s", "blobs": [blob("k/s/a.dmp")],
                                                "report_blobs": {"json": "u"}, "triage": None}}, "")
    assert collected["state"] == COLLECTED and collected["report_blob"] == "k/s/report.json"
    assert collected["stop_code"] == "0x0000007E" and collected["stop_name"] == "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED"
    deploy = VmJob.classify(30, {"error": {"message": "terraform apply failed"}}, "error: x")
    assert deploy["state"] == FAILED and deploy["reason"] == "terraform apply failed"
    held = VmJob.classify(2, {}, "error: another repair-run is working on /subscriptions/..: run r\n")
    assert held["state"] == RERUN and held["reason"].startswith("another repair-run is working on")
    assert VmJob.classify(130, {}, "")["state"] == RERUN
    assert VmJob.classify(5, {}, "error: throttled\n")["state"] == RERUN
    killed = VmJob.classify(-9, {}, "")
    assert killed["state"] == RERUN and "signal 9" in killed["reason"]
    # exit 0 without a verified dump is not "collected"
    assert VmJob.classify(0, {"collect": {"status": "collected", "blobs": [blob("x", ok=False)]}}, "")["state"] == FAILED


def test_the_fleet_exit_code():
    ok = {"a": {"state": COLLECTED, "exit_code": 0}}
    assert fleet.fleet_exit_code(ok, None) == 0
    assert fleet.fleet_exit_code({**ok, "b": {"state": FAILED, "exit_code": 10}}, None) == 12
    assert fleet.fleet_exit_code({**ok, "b": {"state": RERUN, "exit_code": None}}, "SIGTERM") == 130
    assert fleet.fleet_exit_code({**ok, "b": {"state": FAILED, "exit_code": 31}}, "SIGTERM") == 31


def test_runners_sharing_a_manifest_lose_no_update(azurite_container):
    azurite, name = azurite_container
    container = azurite.service_client().get_container_client(name)
    ids = vm_ids(12)
    first, second = FleetManifest(container, "shared"), FleetManifest(container, "shared")
    first.open(ids[:6], created_by="runner-1")
    second.open(ids[6:], created_by="runner-2")  # joins, adds its VMs
    assert set(second.entries()) == {vm_key(v) for v in ids}

    def mark(pair):
        manifest, vm_id = pair
        manifest.update(vm_key(vm_id), state=COLLECTED, reason=None, attempts=1)

    with futures.ThreadPoolExecutor(8) as pool:  # two "processes", each with its own ETag conversation
        list(pool.map(mark, [(first if i % 2 else second, v) for i, v in enumerate(ids)]))
    document, _ = first.read()
    assert {e["state"] for e in document["vms"].values()} == {COLLECTED}
    assert document["created_by"] == "runner-1"


def test_a_blob_that_is_not_a_manifest_is_refused_and_kept(azurite_container):
    azurite, name = azurite_container
    container = azurite.service_client().get_container_client(name)
    container.upload_blob("fleets/other/fleet.json", b"{\"dump\": 1}")
    with pytest.raises(CrashcartError) as err:
        FleetManifest(container, "other").open(vm_ids(1))
    assert err.value.exit_code == 2 and "not a crashcart fleet manifest" in err.value.message
    assert container.download_blob("fleets/other/fleet.json").readall() == b"{\"dump\": 1}"
