"""Azure Resource Graph in the ARM double (scripts/devkit/arm_graph.py), through the real
azure-mgmt-resourcegraph client: rows as ARG stores them, pages with $skipToken, only what the caller may
read, and a query outside the subset refused with ARG's 400."""

from __future__ import annotations

import pytest
from azure.core.exceptions import HttpResponseError
from azure.mgmt.resourcegraph.models import QueryRequest, QueryRequestOptions

from scripts.azure import roles
from scripts.devkit import arm_graph
from scripts.devkit.arm_rbac import Grant, Rbac
from scripts.devkit.arm_vm import SUB, add_broken_vm
from scripts.devkit.armdouble import ArmDouble
from scripts.run.fleetselect import graph_client

READER = roles.RoleDefinition("Reader", actions=("*/read",))
VMS = "Resources | where type =~ 'microsoft.compute/virtualmachines' | project id, name, resourceGroup | order by id asc"


def ask(query: str, top: int | None = None, token: str | None = None, subscriptions=(SUB,)):
    return graph_client().resources(QueryRequest(subscriptions=list(subscriptions), query=query, options=
                                                 QueryRequestOptions(top=top, skip_token=token)))


def test_rows_are_what_resource_graph_stores_and_pages_follow_the_skip_token(arm):
    arm_graph.install(arm)
    for i in range(5):
        add_broken_vm(arm, name=f"web-{i:02d}", resource_group="Prod-Web")
    first = ask(VMS, top=2)
    assert (first.total_records, first.count, first.result_truncated) == (5, 2, "false")
    assert first.data[0] == {"id": f"/subscriptions/{SUB}/resourceGroups/Prod-Web/providers/Microsoft.Compute/"
                                   "virtualMachines/web-00", "name": "web-00", "resourceGroup": "prod-web"}
    names, token, pages = [r["name"] for r in first.data], first.skip_token, 1
    while token:
        page = ask(VMS, top=2, token=token)
        names += [r["name"] for r in page.data]
        token, pages = page.skip_token, pages + 1
    assert names == [f"web-{i:02d}" for i in range(5)] and pages == 3
    # a token is only good for the query that issued it
    with pytest.raises(HttpResponseError) as err:
        ask(VMS + " | where name =~ 'web-01'", top=2, token=first.skip_token)
    assert err.value.status_code == 400 and "InvalidSkipToken" in str(err.value)
    # the query ran as the operation ARM names, for this caller
    assert [d.operation.action for d in arm.rbac.decisions if "ResourceGraph" in d.path][0] == arm_graph.GRAPH_ACTION


def test_power_state_tags_and_os_type_are_queryable(arm):
    arm_graph.install(arm)
    web = add_broken_vm(arm, name="web-01")
    add_broken_vm(arm, name="lin-01", os_type="Linux")
    arm_graph.set_power_state(arm, web.vm_id, "PowerState/deallocated")
    rows = ask("Resources | where properties.storageProfile.osDisk.osType =~ 'windows' and tags['app'] == 'web' "
               "| project id, state = tostring(properties.extended.instanceView.powerState.code)").data
    assert rows == [{"id": web.vm_id, "state": "PowerState/deallocated"}]
    assert ask("Resources | where tags['app'] == 'WEB' | project id").data == []  # tag values: exact


def test_only_rows_the_caller_may_read_are_returned(monkeypatch):
    """ARG answers every caller but filters: a Reader on one resource group sees that group's VMs only."""
    caller = Rbac([Grant(READER, f"/subscriptions/{SUB}/resourceGroups/team-a")])
    with ArmDouble(rbac=caller) as arm:
        monkeypatch.setenv("CRASHCART_ARM_ENDPOINT", arm.url)
        arm_graph.install(arm)
        a = add_broken_vm(arm, name="a-01", resource_group="team-a")
        add_broken_vm(arm, name="b-01", resource_group="team-b")
        assert [r["id"] for r in ask(VMS).data] == [a.vm_id]
        assert ask(VMS, subscriptions=["00000000-0000-0000-0000-0000000000ff"]).data == []
        # reading rows for the query is not a request to ARM: no decision recorded for the VMs
        assert not [d for d in arm.rbac.decisions if "virtualMachines" in d.path]


@pytest.mark.parametrize("query", [
    "Resources | extend x = 1",                         # a stage outside the subset
    "Resources | where tags['env'] == 'prod' or 1 == 1",  # an operator it does not know
    "ResourceContainers | project id",                  # another table
    "Resources | where name == 'x",                     # an unterminated literal
])
def test_a_query_outside_the_subset_is_refused_as_resource_graph_refuses_it(arm, query):
    arm_graph.install(arm)
    with pytest.raises(HttpResponseError) as err:
        ask(query)
    assert err.value.status_code == 400 and "InvalidQuery" in str(err.value)


def test_kql_string_literals_unescape_like_kql():
    assert arm_graph.tokens(r"""'it\'s' "a\\b" """) == [("str", "it's"), ("str", "a\\b")]
