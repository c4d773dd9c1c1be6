"""Roles as data: what each identity crashcart uses may do, one JSON file per identity in roles/.

- `operator.json`: the custom role **crashcart repair operator** of the pipeline identity, in the shape
  `az role definition create --role-definition` takes (Name, IsCustom, Description, Actions, NotActions,
  DataActions, NotDataActions, AssignableScopes); assigned on the subscription.
- `source.json`, `evidence.json`: the built-in roles the pipeline identity holds on the broken VM's side
  and on the evidence (and Terraform state) container: each by name and ID, with the actions its
  documented definition has and the ones crashcart relies on (`ReliedOn`), and the ABAC condition of an
  assignment that has one.
- `vm.json`: the rescue VM's system-assigned identity: Storage Blob Data Contributor on the evidence
  container, narrowed by an ABAC condition (`{prefix}` stands for `<source VM name>/`).

An assignment's `Scope` is a kind of scope, not an ID (`subscription`, `source-resource-group`,
`source-os-disk`, `repair-resource-group`, `evidence-container`, `evidence-account`, `state-container`):
the IDs are the operator's. README's role JSON is `render_operator()`; the ARM double
(scripts/devkit/arm_rbac.py) grants exactly these roles and refuses anything else as Azure does.
Matching follows Azure RBAC: case-insensitive, `*` matches any run of characters (also `/`), an action
is allowed by a role when one of its Actions matches and none of its NotActions does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES_DIR = Path(__file__).with_name("roles")
IDENTITIES = ("operator", "source", "evidence", "vm")
README_WIDTH = 116  # the README's role JSON keeps its lines this short


@functools.lru_cache(maxsize=256)
def _pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.IGNORECASE)


def action_matches(pattern: str, action: str) -> bool:
    """Whether a role's action string (wildcards allowed) covers `action`, as Azure RBAC matches them."""
    return _pattern(pattern).fullmatch(action) is not None


@dataclass(frozen=True)
class RoleDefinition:
    name: str
    actions: tuple[str, ...]
    not_actions: tuple[str, ...] = ()
    data_actions: tuple[str, ...] = ()
    not_data_actions: tuple[str, ...] = ()
    description: str = ""
    is_custom: bool = False
    id: str = ""
    assignable_scopes: tuple[str, ...] = ()

    @classmethod
    def from_azure(cls, body: dict[str, Any]) -> "RoleDefinition":
        return cls(name=body["Name"], id=body.get("Id", ""), is_custom=bool(body.get("IsCustom", False)),
                   description=body.get("Description", ""), actions=tuple(body.get("Actions", ())),
                   not_actions=tuple(body.get("NotActions", ())), data_actions=tuple(body.get("DataActions", ())),
                   not_data_actions=tuple(body.get("NotDataActions", ())),
                   assignable_scopes=tuple(body.get("AssignableScopes", ())))

    def to_azure(self) -> dict[str, Any]:
        """The role-definition JSON (as in operator.json; built-in roles also carry their Id)."""
        body: dict[str, Any] = {"Name": self.name}
        if self.id:
            body["Id"] = self.id
        body.update(IsCustom=self.is_custom, Description=self.description, Actions=list(self.actions),
                    NotActions=list(self.not_actions), DataActions=list(self.data_actions),
                    NotDataActions=list(self.not_data_actions))
        if self.assignable_scopes:
            body["AssignableScopes"] = list(self.assignable_scopes)
        return body

    def allows(self, action: str) -> bool:
        """A control-plane action (what ARM checks)."""
        return _allowed(action, self.actions, self.not_actions)

    def allows_data(self, action: str) -> bool:
        """A data action (what the storage service checks, before any condition)."""
        return _allowed(action, self.data_actions, self.not_data_actions)

    def without(self, action: str) -> "RoleDefinition":
        """This role with one of its Actions taken out (as an owner editing the custom role would)."""
        if action not in self.actions:
            raise ValueError(f"{action} is not one of the Actions of {self.name}")
        return dataclasses.replace(self, actions=tuple(a for a in self.actions if a != action))


def _allowed(action: str, granted: tuple[str, ...], excluded: tuple[str, ...]) -> bool:
    return any(action_matches(p, action) for p in granted) and not any(action_matches(p, action) for p in excluded)


@dataclass(frozen=True)
class Assignment:
    """A role on a kind of scope, what crashcart relies on from it and why."""

    scope: str
    role: RoleDefinition
    relied_on: tuple[str, ...]
    purpose: str = ""
    when: str = ""  # "" = always; else the feature that needs it
    condition: str = ""
    condition_version: str = ""

    def condition_for(self, **parameters: str) -> str:
        """The ABAC condition with its parameters (e.g. prefix="web-01/") filled in."""
        text = self.condition
        for key, value in parameters.items():
            text = text.replace("{" + key + "}", value)
        return text


@functools.lru_cache(maxsize=None)
def _load(identity: str) -> dict[str, Any]:
    if identity not in IDENTITIES:
        raise ValueError(f"no roles file for {identity!r}: one of {', '.join(IDENTITIES)}")
    return json.loads((ROLES_DIR / f"{identity}.json").read_text(encoding="utf-8"))


def document(identity: str) -> dict[str, Any]:
    """The parsed file roles/<identity>.json (a copy: callers may change it)."""
    return json.loads(json.dumps(_load(identity)))


def operator() -> RoleDefinition:
    """The pipeline identity's custom role, as documented."""
    return RoleDefinition.from_azure(_load("operator"))


def assignments(identity: str) -> tuple[Assignment, ...]:
    """The built-in role assignments of `source`, `evidence` or `vm`."""
    return tuple(Assignment(scope=a["Scope"], role=RoleDefinition.from_azure(a["Role"]),
                            relied_on=tuple(a.get("ReliedOn", ())), purpose=a.get("For", ""), when=a.get("When", ""),
                            condition=a.get("Condition", ""), condition_version=a.get("ConditionVersion", ""))
                 for a in _load(identity)["Assignments"])


def source_side() -> tuple[Assignment, ...]:
    return assignments("source")


def evidence_side() -> tuple[Assignment, ...]:
    return assignments("evidence")


def vm_identity() -> tuple[Assignment, ...]:
    return assignments("vm")


def vm_condition(prefix: str) -> str:
    """The ABAC condition of the rescue VM's Storage Blob Data Contributor assignment for `prefix`."""
    (assignment,) = [a for a in vm_identity() if a.condition]
    return assignment.condition_for(prefix=prefix)


def rbac_admin_condition() -> str:
    """The condition of the pipeline's Role Based Access Control Administrator assignment."""
    (assignment,) = [a for a in evidence_side() if a.condition]
    return assignment.condition


@functools.lru_cache(maxsize=1)
def _catalogue() -> dict[str, str]:
    names: set[str] = set(operator().actions)
    for identity in ("source", "evidence", "vm"):
        for assignment in assignments(identity):
            names.update(assignment.role.actions + assignment.relied_on)
    return {name.lower(): name for name in names if "*" not in name}


def canonical(action: str) -> str:
    """`action` spelled as the roles data spells it (ARM compares actions case-insensitively)."""
    return _catalogue().get(action.lower(), action)


# ---- README -------------------------------------------------------------------------------------------------
def render_operator(role: RoleDefinition | None = None) -> str:
    """The custom role as README shows it: valid JSON, its Actions grouped by resource type on lines of at
    most README_WIDTH characters (json.loads of it equals the file's content)."""
    body = (role or operator()).to_azure()
    lines = ["{"]
    keys = list(body)
    for index, key in enumerate(keys):
        comma = "," if index < len(keys) - 1 else ""
        if key == "Actions" and body[key]:
            lines.append('  "Actions": [')
            rows = _rows(body[key])
            lines += [f"    {row}{',' if i < len(rows) - 1 else ''}" for i, row in enumerate(rows)]
            lines.append(f"  ]{comma}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(body[key])}{comma}")
    lines.append("}")
    return "\n".join(lines)


def _rows(actions: list[str]) -> list[str]:
    rows: list[str] = []
    group, row = "", ""
    for action in actions:
        item = json.dumps(action)
        key = "/".join(action.split("/")[:2])
        if row and key == group and len(row) + 2 + len(item) + 5 <= README_WIDTH:
            row += ", " + item
            continue
        if row:
            rows.append(row)
        group, row = key, item
    if row:
        rows.append(row)
    return rows
