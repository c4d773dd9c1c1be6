"""`sweep` against the loopback ARM double: real azure-mgmt-resource client, real HTTP, real LRO polling."""

from __future__ import annotations

import argparse
import json

import pytest

from scripts.run import sweep
from scripts.__main__ import main
from scripts.devkit.arm_resources import add_resource_group_routes, group_id
from scripts.devkit.armdouble import ArmDouble

SUB = "00000000-0000-0000-0000-000000000001"
VM = f"/subscriptions/{SUB}/resourceGroups/prod-web/providers/Microsoft.Compute/virtualMachines/web-01"
NOW = "2030-01-01T12:00:00Z"
PAST = "2030-01-01T04:00:00Z"
FUTURE = "2030-01-01T20:00:00Z"


def repair_tags(expires_at: str | None) -> dict[str, str]:
    tags = {"crashcart": "repair", "crashcart-source-vm": VM, "owner": "ops"}
    if expires_at is not None:
        tags["crashcart-expires-at"] = expires_at
    return tags


@pytest.fixture(scope="module")
def _double():
    """One ARM double for the module (starting and stopping one per test costs half a second each)."""
    with ArmDouble() as double:
        yield double, add_resource_group_routes(double, page_size=2)


@pytest.fixture
def arm(_double, monkeypatch):
    double, _ = _double
    double.resources.clear()
    double.requests.clear()
    double.forbidden.clear()
    monkeypatch.setenv("CRASHCART_ARM_ENDPOINT", double.url)
    return double


@pytest.fixture
def groups(arm, _double):
    _, rg = _double
    rg.delete_polls, rg.fail_delete = 0, {}
    rg.add(SUB, "crashcart-repair-web-01", tags=repair_tags(PAST))
    rg.add(SUB, "crashcart-repair-web-02", tags=repair_tags(FUTURE))
    rg.add(SUB, "crashcart-repair-web-03", tags=repair_tags("next tuesday"))
    rg.add(SUB, "crashcart-repair-web-04", tags=repair_tags(None))
    rg.add(SUB, "crashcart-repair-web-05", tags=repair_tags("2030-01-01T11:59:59+00:00"))
    # Expired-looking, but not repair groups: never touched.
    rg.add(SUB, "crashcart-evidence", tags={"crashcart": "evidence", "crashcart-expires-at": PAST})
    rg.add(SUB, "prod-web", tags={"crashcart-expires-at": PAST})
    rg.add(SUB, "lookalike", tags={"crashcart": "Repair", "crashcart-expires-at": PAST})
    # Something inside the expired group, to see the group delete take it along.
    arm.put(group_id(SUB, "crashcart-repair-web-01") + "/providers/Microsoft.Compute/disks/web-01-crashcart-copy",
            {"name": "web-01-crashcart-copy"})
    return rg


def sweep_cli(capsys, *args: str) -> tuple[int, dict, str]:
    code = main(["sweep", "--subscription", SUB, "--now", NOW, *args])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_dry_run_lists_expired_repair_groups_and_deletes_nothing(groups, arm, capsys):
    code, result, err = sweep_cli(capsys)
    assert code == 0
    assert result["dry_run"] is True
    statuses = {g["name"]: g["status"] for g in result["groups"]}
    assert statuses == {
        "crashcart-repair-web-01": "expired",
        "crashcart-repair-web-02": "active",
        "crashcart-repair-web-03": "no-expiry",
        "crashcart-repair-web-04": "no-expiry",
        "crashcart-repair-web-05": "expired",
    }
    assert result["expired"] == ["crashcart-repair-web-01", "crashcart-repair-web-05"]
    assert not arm.calls("DELETE")
    assert "sweep --delete" in err
    assert "never swept" in err  # the groups without a readable expiry are pointed out
    # The server-side filter was asked for, and paging followed nextLink.
    lists = arm.calls("GET", "/resourcegroups")
    assert lists[0].query["$filter"] == "tagName eq 'crashcart' and tagValue eq 'repair'"
    assert any("$skiptoken" in r.query for r in lists)


def test_delete_removes_only_expired_repair_groups(groups, arm, capsys):
    code, result, _ = sweep_cli(capsys, "--delete")
    assert code == 0
    assert sorted(result["deleted"]) == ["crashcart-repair-web-01", "crashcart-repair-web-05"]
    remaining = groups.names(SUB)
    assert "crashcart-repair-web-01" not in remaining and "crashcart-repair-web-05" not in remaining
    for kept in ("crashcart-repair-web-02", "crashcart-repair-web-03", "crashcart-repair-web-04",
                 "crashcart-evidence", "prod-web", "lookalike"):
        assert kept in remaining
    deleted_paths = sorted(r.path.rsplit("/", 1)[-1] for r in arm.calls("DELETE"))
    assert deleted_paths == ["crashcart-repair-web-01", "crashcart-repair-web-05"]
    # The long-running delete was followed to its end, and took the group's content along.
    assert arm.calls("GET", "/operationresults/")
    assert not any("web-01-crashcart-copy" in k for k in arm.resources)


def test_a_group_whose_expiry_was_extended_since_listing_is_left_alone(groups, arm):
    client = sweep.resource_client(SUB)
    listed = {g.name: g for g in sweep.list_repair_groups(client)}
    arm.get(group_id(SUB, "crashcart-repair-web-01"))["tags"]["crashcart-expires-at"] = FUTURE
    assert sweep.start_delete(client, listed["crashcart-repair-web-01"], sweep.resolve_now(NOW)) is None
    assert not arm.calls("DELETE")


def test_failed_delete_exits_teardown_failed_and_says_which(groups, arm, capsys):
    groups.delete_polls = 1  # one "still running" answer before the outcome
    groups.fail_delete["crashcart-repair-web-05"] = (409, "ScopeLocked", "The scope is locked by 'do-not-delete'.")
    code, result, err = sweep_cli(capsys, "--delete")
    assert code == 31
    assert result["deleted"] == ["crashcart-repair-web-01"]
    assert result["failed"][0]["name"] == "crashcart-repair-web-05"
    assert "ScopeLocked" in err and "crashcart-repair-web-05" in err
    assert "crashcart-repair-web-05" in groups.names(SUB)


def test_no_wait_starts_deletions_and_returns(groups, arm, capsys):
    groups.delete_polls = 50
    code, result, _ = sweep_cli(capsys, "--delete", "--no-wait")
    assert code == 0
    assert sorted(result["deletion_started"]) == ["crashcart-repair-web-01", "crashcart-repair-web-05"]
    assert arm.get(group_id(SUB, "crashcart-repair-web-01"))["properties"]["provisioningState"] == "Deleting"


def test_a_group_already_deleting_is_not_deleted_again(groups, arm, capsys):
    arm.get(group_id(SUB, "crashcart-repair-web-01"))["properties"]["provisioningState"] = "Deleting"
    code, result, _ = sweep_cli(capsys, "--delete")
    assert code == 0
    assert result["deleted"] == ["crashcart-repair-web-05"]


def test_forbidden_listing_says_what_role_is_missing(groups, arm, capsys):
    arm.forbidden.add(f"/subscriptions/{SUB}/resourcegroups")
    code = main(["sweep", "--subscription", SUB])
    err = capsys.readouterr().err
    assert code == 3
    assert "not allowed" in err and "next:" in err


def test_subscription_comes_from_the_environment_or_the_config(tmp_path, monkeypatch):
    args = argparse.Namespace(subscription=None, config=None)
    monkeypatch.delenv("AZURE_SUBSCRIPTION_ID", raising=False)
    monkeypatch.delenv("CRASHCART_SOURCE_SUBSCRIPTION_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(sweep.CrashcartError) as err:
        sweep.resolve_subscription(args, {})
    assert err.value.exit_code == 2 and "--subscription" in err.value.hint
    assert sweep.resolve_subscription(args, {"AZURE_SUBSCRIPTION_ID": SUB}) == SUB
    with pytest.raises(sweep.CrashcartError):
        sweep.resolve_subscription(argparse.Namespace(subscription="prod", config=None), {})


def test_time_parsing_accepts_terraform_timestamps_and_rejects_nonsense():
    assert sweep.parse_time("2030-01-01T04:00:00Z").isoformat() == "2030-01-01T04:00:00+00:00"
    assert sweep.parse_time("2030-01-01T04:00:00").tzinfo is not None  # naive means UTC
    assert sweep.parse_time("soon") is None
    assert sweep.parse_time("") is None
    with pytest.raises(sweep.CrashcartError):
        sweep.resolve_now("yesterday")



def put_disk(arm, group: str, name: str, managed_by: str | None, os_type: str | None = "Windows") -> str:
    """A managed disk in `group`, attached to `managed_by` (a VM ID) or unattached."""
    disk_id = group_id(SUB, group) + f"/providers/Microsoft.Compute/disks/{name}"
    properties: dict = {"diskState": "Attached" if managed_by else "Unattached", "diskSizeGB": 128}
    if os_type:
        properties["osType"] = os_type
    body: dict = {"name": name, "type": "Microsoft.Compute/disks", "location": "westeurope", "properties": properties}
    if managed_by:
        body["managedBy"] = managed_by
    arm.put(disk_id, body)
    return disk_id


def test_a_group_holding_the_disk_the_source_vm_boots_from_is_kept(groups, arm, capsys):
    # repair-run --fix kept crashcart-repair-web-05 on purpose: web-01 (in prod-web) now boots from its disk.
    swapped = put_disk(arm, "crashcart-repair-web-05", "web-01-crashcart-copy", VM)
    # web-01's own group holds the rescue VM's disk: attached to a VM inside the group, it goes with it.
    rescue = group_id(SUB, "crashcart-repair-web-01") + "/providers/Microsoft.Compute/virtualMachines/web-01-rescue"
    put_disk(arm, "crashcart-repair-web-01", "web-01-rescue-os", rescue, os_type="Linux")

    code, result, err = sweep_cli(capsys)  # the dry run says so too
    assert code == 0
    assert {g["name"]: g["status"] for g in result["groups"]}["crashcart-repair-web-05"] == "kept"
    assert result["expired"] == ["crashcart-repair-web-01"]
    assert f"crashcart-repair-web-05 kept: holds {swapped}, the OS disk of {VM}" in err

    code, result, err = sweep_cli(capsys, "--delete")
    assert code == 0
    assert result["deleted"] == ["crashcart-repair-web-01"]
    assert result["kept"] == [{"name": "crashcart-repair-web-05",
                               "reason": f"holds {swapped}, the OS disk of {VM}"}]
    assert [r.path.rsplit("/", 1)[-1] for r in arm.calls("DELETE")] == ["crashcart-repair-web-01"]
    assert arm.get(swapped) is not None and "crashcart-repair-web-05" in groups.names(SUB)
    assert "kept: holds" in err


def test_an_expired_group_whose_disks_cannot_be_read_is_not_deleted(groups, arm, capsys):
    arm.forbidden.add(group_id(SUB, "crashcart-repair-web-05") + "/providers/Microsoft.Compute/disks")
    code = main(["sweep", "--subscription", SUB, "--now", NOW, "--delete"])
    err = capsys.readouterr().err
    assert code == 3
    assert "crashcart-repair-web-05" in err and "next:" in err
    assert not arm.calls("DELETE")
