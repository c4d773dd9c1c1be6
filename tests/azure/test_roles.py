"""Roles as data (scripts/azure/roles/*.json, scripts/azure/roles.py): README shows exactly the files, the
files are well-formed role definitions, and the rescue VM's condition is the one the repair stack sets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from scripts.azure import roles

REPO = Path(__file__).resolve().parents[2]
SECTION = "### Pipeline identity (least privilege)"
GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SHAPE = ["Name", "IsCustom", "Description", "Actions", "NotActions", "DataActions", "NotDataActions"]


def _section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start)
    return text[start:end if end != -1 else len(text)]


def _fences(section: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block in the section, in order."""
    return re.findall(r"^```(\w*)\n(.*?)\n```$", section, re.MULTILINE | re.DOTALL)


def test_readme_role_json_is_rendered_from_the_file():
    (block,) = [body for lang, body in _fences(_section()) if lang == "json"]
    assert block == roles.render_operator(), (
        "README's role JSON drifted from scripts/azure/roles/operator.json: paste roles.render_operator()")
    assert json.loads(block) == json.loads((roles.ROLES_DIR / "operator.json").read_text())


def test_readme_condition_is_the_evidence_files():
    (block,) = [body for lang, body in _fences(_section()) if lang == ""]
    assert block == roles.rbac_admin_condition()


def test_readme_names_every_role_of_the_files():
    section = _section()
    for assignment in roles.source_side() + roles.evidence_side():
        assert f"**{assignment.role.name}**" in section, assignment.role.name
    assert f"**{roles.operator().name}**" in section


def test_the_operator_file_is_a_custom_role_definition():
    body = json.loads((roles.ROLES_DIR / "operator.json").read_text())
    assert list(body) == SHAPE + ["AssignableScopes"]
    assert body["IsCustom"] is True and body["AssignableScopes"] == ["/subscriptions/<subscription id>"]
    assert len(set(a.lower() for a in body["Actions"])) == len(body["Actions"]), "an action is listed twice"
    assert all("*" not in a for a in body["Actions"]), "the custom role names every action it grants"
    assert roles.operator().to_azure() == body


@pytest.mark.parametrize("identity", ["source", "evidence", "vm"])
def test_built_in_roles_are_named_by_id_and_grant_what_crashcart_relies_on(identity):
    for assignment in roles.assignments(identity):
        role = assignment.role
        assert GUID.match(role.id) and not role.is_custom, role.name
        assert list(role.to_azure())[:2] == ["Name", "Id"] and set(SHAPE) <= set(role.to_azure())
        assert assignment.scope in {"source-resource-group", "source-os-disk", "repair-resource-group",
                                    "evidence-container", "evidence-account", "state-container"}
        assert assignment.relied_on and assignment.purpose
        for action in assignment.relied_on:
            assert role.allows(action) or role.allows_data(action), f"{role.name} does not grant {action}"


def test_the_same_built_in_role_has_one_definition_everywhere():
    seen: dict[str, dict] = {}
    for identity in ("source", "evidence", "vm"):
        for assignment in roles.assignments(identity):
            body = assignment.role.to_azure()
            assert seen.setdefault(body["Id"], body) == body, body["Name"]


def test_the_vm_identitys_condition_reads_and_writes_only_its_prefix_and_never_deletes():
    """The repair stack sets exactly this text (stacks/repair.py reads it from roles/vm.json; the synth
    test pins the synthesized condition)."""
    blobs = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs"
    assert roles.vm_condition("web-01-1a2b3c4d/") == (
        f"((!(ActionMatches{{'{blobs}/read'}}) AND !(ActionMatches{{'{blobs}/write'}}) "
        f"AND !(ActionMatches{{'{blobs}/add/action'}})) "
        f"OR (@Resource[{blobs}:path] StringStartsWith 'web-01-1a2b3c4d/')) "
        f"AND (!(ActionMatches{{'{blobs}/delete'}}) AND !(ActionMatches{{'{blobs}/move/action'}}))")
    (assignment,) = roles.vm_identity()
    assert assignment.role.name == "Storage Blob Data Contributor" and assignment.condition_version == "2.0"


@pytest.mark.parametrize("pattern, action, expected", [
    ("*/read", "Microsoft.Compute/disks/read", True),
    ("*/read", "Microsoft.Compute/virtualMachines/instanceView/read", True),
    ("*/read", "Microsoft.Compute/disks/write", False),
    ("*/read", "Microsoft.Compute/virtualMachines/retrieveBootDiagnosticsData/action", False),
    ("Microsoft.Compute/*", "Microsoft.Compute/virtualMachines/powerOff/action", True),
    ("Microsoft.Compute/*", "Microsoft.Network/networkInterfaces/read", False),
    ("Microsoft.Compute/virtualMachines/*/read", "Microsoft.Compute/virtualMachines/runCommands/read", True),
    ("microsoft.compute/VIRTUALMACHINES/start/action", "Microsoft.Compute/virtualMachines/start/action", True),
    ("Microsoft.Compute/virtualMachines/start/action", "Microsoft.Compute/virtualMachines/start/actions", False),
    ("*", "Microsoft.Resources/subscriptions/resourceGroups/delete", True),
])
def test_actions_match_as_azure_rbac_matches_them(pattern, action, expected):
    assert roles.action_matches(pattern, action) is expected


def test_not_actions_take_away_and_without_takes_one_action_out():
    role = roles.RoleDefinition("x", actions=("Microsoft.Compute/*",),
                                not_actions=("Microsoft.Compute/virtualMachines/powerOff/action",))
    assert role.allows("Microsoft.Compute/virtualMachines/deallocate/action")
    assert not role.allows("Microsoft.Compute/virtualMachines/powerOff/action")
    operator = roles.operator()
    smaller = operator.without("Microsoft.Compute/virtualMachines/start/action")
    assert not smaller.allows("Microsoft.Compute/virtualMachines/start/action")
    assert len(smaller.actions) == len(operator.actions) - 1 and smaller.allows("Microsoft.Compute/virtualMachines/read")
    with pytest.raises(ValueError):
        smaller.without("Microsoft.Compute/virtualMachines/start/action")


def test_actions_are_spelled_as_the_data_spells_them():
    assert roles.canonical("microsoft.resources/subscriptions/resourcegroups/read") == \
        "Microsoft.Resources/subscriptions/resourceGroups/read"
    assert roles.canonical("Microsoft.Foo/bars/read") == "Microsoft.Foo/bars/read"
