"""`fleet run --selector` (scripts/run/fleetselect.py): the selector's terms, the KQL built only from
validated, quoted parts, and the VMs Resource Graph returns (the ARG double, through the real SDK client):
Windows only, every page, only what the identity can read, the kit's rescue VMs left out."""

from __future__ import annotations

import pytest

from scripts.azure import roles
from scripts.base.errors import CrashcartError
from scripts.devkit import arm_graph
from scripts.devkit.arm_rbac import Grant, Rbac
from scripts.devkit.arm_vm import SUB, add_broken_vm
from scripts.devkit.armdouble import ArmDouble
from scripts.run import fleetselect
from scripts.run.fleetselect import parse_selector, select

OTHER_SUB = "11111111-2222-3333-4444-555555555555"


def test_terms_parse_into_subscriptions_groups_regions_and_tags():
    s = parse_selector(f"subscription={SUB},{OTHER_SUB.upper()} rg=prod-web resourceGroup=Prod-API location=westeurope "
                       "tag:env=prod 'tag:owner=web team'")
    assert s.subscriptions == (SUB, OTHER_SUB)
    assert s.groups == ("prod-web", "Prod-API") and s.locations == ("westeurope",)
    assert s.tags == (("env", "prod"), ("owner", "web team"))


@pytest.mark.parametrize("text,said", [
    ("resourceGroup=prod-web", "names no subscription"),
    ("subscription=not-a-guid", "is not a subscription ID"),
    (f"subscription={SUB} resourceGroup=bad/name", "is not a resource group name"),
    (f"subscription={SUB} resourceGroup=ends.", "is not a resource group name"),
    (f"subscription={SUB} location=West Europe", "is not key=value"),
    (f"subscription={SUB} owner=me", "key 'owner' is not known"),
    (f"subscription={SUB} tag:a/b=c", "not a valid Azure tag name"),
    (f"subscription={SUB} tag:env=a\x1bb", "control character"),
    (f"subscription={SUB} 'tag:env=prod", "cannot be read"),
])
def test_a_bad_selector_is_a_usage_error_naming_the_term(text, said):
    with pytest.raises(CrashcartError) as err:
        parse_selector(text)
    assert err.value.exit_code == 2 and said in err.value.message and "\x1b" not in err.value.message


def test_user_text_reaches_the_query_only_as_escaped_literals():
    query = parse_selector(f"subscription={SUB} \"tag:it's=a\\\\b' or 1==1\"").query()
    assert r"tags['it\'s'] == 'a\\b\' or 1==1'" in query
    assert SUB not in query  # subscriptions go in the request, not the query
    assert fleetselect.kql_string("x'y") == r"'x\'y'"


@pytest.fixture
def graph(arm):
    arm_graph.install(arm)
    return arm


def test_only_windows_vms_of_the_selector_are_selected_and_power_states_counted(graph):
    a = add_broken_vm(graph, name="a-01", resource_group="prod-web")
    b = add_broken_vm(graph, name="b-01", resource_group="prod-web")
    add_broken_vm(graph, name="lin-01", resource_group="prod-web", os_type="Linux")
    add_broken_vm(graph, name="c-01", resource_group="prod-api")
    rescue = add_broken_vm(graph, name="crashcart-rescue", resource_group="crashcart-repair-x")
    graph.get(rescue.vm_id)["tags"] = {"crashcart": "repair"}
    arm_graph.set_power_state(graph, b.vm_id, "PowerState/deallocated")
    chosen = select(f"subscription={SUB} resourceGroup=prod-web")
    assert chosen.vm_ids == (a.vm_id, b.vm_id)
    assert chosen.power_states == {"deallocated": 1, "running": 1}
    everything = select(f"subscription={SUB}")
    assert rescue.vm_id not in everything.vm_ids and everything.skipped_kit_vms == 1
    assert len(everything.vm_ids) == 3


def test_a_tag_value_with_a_quote_matches_exactly_and_injection_matches_nothing(graph):
    """Built by splicing the value into the query unescaped, the first would be a broken query (400) and the
    second would select every prod VM."""
    quoted = add_broken_vm(graph, name="q-01", resource_group="prod-web")
    graph.get(quoted.vm_id)["tags"] = {"owner": "o'brien"}
    prod = add_broken_vm(graph, name="p-01", resource_group="prod-web")
    graph.get(prod.vm_id)["tags"] = {"env": "prod"}
    assert select(f"subscription={SUB} \"tag:owner=o'brien\"").vm_ids == (quoted.vm_id,)
    with pytest.raises(CrashcartError, match="matches no Windows VM"):
        select(f"subscription={SUB} \"tag:env=prod' and name != 'zzz\"")


def test_every_page_is_read(graph, monkeypatch):
    monkeypatch.setattr(fleetselect, "PAGE", 3)  # the page size, not behaviour: 7 VMs in 3 pages
    made = [add_broken_vm(graph, name=f"w-{i:02d}", resource_group="prod-web").vm_id for i in range(7)]
    chosen = select(f"subscription={SUB}")
    assert chosen.vm_ids == tuple(made) and chosen.pages == 3


def test_vms_the_identity_cannot_read_are_not_selected(monkeypatch):
    reader = roles.RoleDefinition("Reader", actions=("*/read",))
    with ArmDouble(rbac=Rbac([Grant(reader, f"/subscriptions/{SUB}/resourceGroups/team-a")])) as arm:
        monkeypatch.setenv("CRASHCART_ARM_ENDPOINT", arm.url)
        arm_graph.install(arm)
        a = add_broken_vm(arm, name="a-01", resource_group="team-a")
        add_broken_vm(arm, name="b-01", resource_group="team-b")
        assert select(f"subscription={SUB}").vm_ids == (a.vm_id,)
        with pytest.raises(CrashcartError) as err:
            select(f"subscription={SUB} resourceGroup=team-b")
        assert err.value.exit_code == 2 and "can read" in err.value.message


def fleet_cli(arm, tmp_path, *args):
    import json
    import os
    import subprocess
    import sys

    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "CRASHCART_ARM_ENDPOINT": arm.url,
           "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "scripts", "fleet", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else {}), proc.stderr


def test_plan_with_a_selector_writes_the_selected_list_every_shard_runs(graph, tmp_path):
    made = [add_broken_vm(graph, name=f"w-{i:02d}", resource_group="prod-web").vm_id for i in range(3)]
    add_broken_vm(graph, name="lin-01", resource_group="prod-web", os_type="Linux")
    code, out, err = fleet_cli(graph, tmp_path, "plan", "--selector", f"subscription={SUB}", "--shards", "2",
                               "--out", "plan")
    assert code == 0, err
    listed = (tmp_path / "plan" / "vms.txt").read_text().split("\n")
    assert [line for line in listed if line and not line.startswith("#")] == made
    assert out["selection"]["matched"] == 3 and out["shards"] == 2
    assert f"--vms {tmp_path / 'plan' / 'vms.txt'}" in out["shard_command"]


@pytest.mark.parametrize("args,said", [
    (["run"], "either --vms FILE or --selector TERMS"),
    (["run", "--vms", "x.txt", "--selector", f"subscription={SUB}"], "either --vms FILE or --selector TERMS"),
    (["run", "--selector", f"subscription={SUB}", "--canary", "2"], "go with --fix"),
    (["run", "--selector", f"subscription={SUB}", "--fix", "safe-mode", "--max-failure-rate", "2"], "is not a rate"),
    (["run", "--selector", f"subscription={SUB}", "--max-parallel", "0"], "out of range"),
    (["run", "--selector", "\"subscription=x';drop\""], "is not a subscription ID"),
])
def test_fleet_refuses_bad_selection_and_rollout_options_before_anything_runs(graph, tmp_path, args, said):
    code, _, err = fleet_cli(graph, tmp_path, *args)
    assert code == 2 and said in err and "Traceback" not in err
    assert not graph.calls("POST"), "nothing was asked of Azure"


def test_run_settings_take_the_quota_default_and_pass_the_fix_to_every_vm(graph, tmp_path):
    """The options as `fleet run` reads them: no --max-parallel -> the quota default (and why); --fix reaches
    each VM's repair-run command; --canary and the rate reach the rollout."""
    import argparse

    from scripts.cli import fleet as cli
    from scripts.devkit import arm_skus, arm_usage
    from scripts.run.fleetjob import VmJob

    arm_skus.install(graph)
    arm_usage.install(graph)
    arm_usage.set_usage(graph, "westeurope", "standardDSv5Family", current=88, limit=100)  # 12 free / 4 = 3
    made = [add_broken_vm(graph, name=f"w-{i:02d}", resource_group="prod-web").vm_id for i in range(5)]
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["run", "--selector", f"subscription={SUB}", "--fix", "safe-mode", "--canary", "2",
                              "--max-failure-rate", "20%"])
    cli._check_rollout(args)
    selection = select(args.selector)
    why, settings = cli._settings(args, tmp_path, tmp_path / "work", selection.vm_ids, "f-1", selection)
    assert settings.max_parallel == 3 and "12 vCPUs free" in why
    assert (settings.fix, settings.canary, settings.max_failure_rate) == ("safe-mode", 2, 0.2)
    command = VmJob(made[0], settings.job, None).command()
    assert command[command.index("--fix") + 1] == "safe-mode"
    args = parser.parse_args(["run", "--selector", f"subscription={SUB}", "--max-parallel", "7"])
    cli._check_rollout(args)
    why, settings = cli._settings(args, tmp_path, tmp_path / "work", selection.vm_ids, "f-1", selection)
    assert (settings.max_parallel, why, settings.fix) == (7, "--max-parallel as given", None)
    assert "--fix" not in VmJob(made[0], settings.job, None).command()
