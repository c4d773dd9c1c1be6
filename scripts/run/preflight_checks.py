"""Preflight's verdict: each finding, which strategies it rules out, the strategy chosen, the exit code, and
the checklist a person reads. Pure: the Azure reads are scripts.run.preflight_azure's.

A finding rules out the strategies it makes impossible (`rules_out`): a missing role rules out both, a
disk that forbids export only snapshot-export. Once the strategy is chosen (scripts.collection.strategies:
snapshot-export when nothing rules it out, else rescue-vm; a forced one stays), a finding that rules out
the chosen strategy is a blocker ("fail"), one that only rules out the other is a "warn", and so is a
finding that rules out nothing but deserves a look (a disk encryption set). Only blockers set the exit
code: the first blocker's, in checklist order (README "Exit codes"; the codes per check are in
`EXIT_CODES`).

Permissions are matched as Azure RBAC matches them (scripts.azure.roles.action_matches): an action is
allowed when one role assignment's Actions (DataActions for a data action) match it and the same
assignment's NotActions (NotDataActions) do not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from scripts.azure import roles
from scripts.base.console import is_interactive, log
from scripts.base.errors import ExitCode, printable
from scripts.collection.contract import STRATEGIES
from scripts.collection.strategies import StrategyChoice, choose_strategy

ALL = STRATEGIES
EXPORT = ("snapshot-export",)
RESCUE = ("rescue-vm",)

# The exit code of each check's blocker (README "Exit codes").
EXIT_CODES: dict[str, ExitCode] = {
    "permissions": ExitCode.AZURE_AUTH,  # 3: the identity lacks a role
    "providers": ExitCode.USAGE,  # 2: a subscription set-up step README names (register once)
    "source disk": ExitCode.USAGE,  # 2: as snapshot-export's own refusal of a DenyAll disk
    "encryption": ExitCode.DISK_NOT_FOUND,  # 11: as the collection's refusal of an ADE/BitLocker volume
    "quota": ExitCode.DEPLOY_FAILED,  # 30: Terraform could not create the rescue VM
    "rescue size": ExitCode.USAGE,  # 2: rescue.size names a size the zone does not offer
    "evidence": ExitCode.AZURE_AUTH,  # 3: the firewall refuses this machine (4: no such account)
}

# Operator actions only some verbs or strategies use (the rest: every repair-run).
SWAP_ONLY = ("Microsoft.Compute/virtualMachines/powerOff/action", "Microsoft.Compute/virtualMachines/deallocate/action",
             "Microsoft.Compute/virtualMachines/start/action", "Microsoft.SerialConsole/serialPorts/connect/action")
EXPORT_ONLY = ("Microsoft.Compute/snapshots/beginGetAccess/action", "Microsoft.Compute/snapshots/endGetAccess/action")
RESCUE_ONLY = ("Microsoft.Compute/virtualMachines/runCommands/read", "Microsoft.Compute/virtualMachines/runCommands/write",
               "Microsoft.Compute/virtualMachines/runCommands/delete")
MAX_LISTED = 4  # missing actions named in one line; the JSON has all


@dataclass
class Finding:
    check: str  # the group: permissions, providers, source disk, encryption, quota, rescue size, evidence, run
    subject: str  # what was looked at
    ok: bool
    detail: str  # what was found
    fix: str = ""  # what to do (every finding that is not ok has one)
    exit_code: int = int(ExitCode.OK)  # when it blocks
    rules_out: tuple[str, ...] = ()  # the strategies it makes impossible
    data: dict[str, Any] = field(default_factory=dict)
    status: str = ""  # ok | warn | fail | info, set by `conclude`


@dataclass
class Verdict:
    findings: list[Finding]
    choice: StrategyChoice
    exit_code: int

    @property
    def blockers(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        counts = {s: sum(1 for f in self.findings if f.status == s) for s in ("ok", "info", "warn", "fail")}
        return {"strategy": asdict(self.choice), "exit_code": self.exit_code, "counts": counts,
                "checks": [asdict(f) for f in self.findings],
                "ruled_out": {s: self.ruled_out().get(s, []) for s in STRATEGIES}}

    def ruled_out(self) -> dict[str, list[str]]:
        return ruled_out(self.findings)


def ruled_out(findings: Iterable[Finding]) -> dict[str, list[str]]:
    """strategy -> why it cannot work (one line per finding)."""
    out: dict[str, list[str]] = {}
    for f in findings:
        for strategy in f.rules_out:
            out.setdefault(strategy, []).append(f"{f.check} ({f.subject}): {f.detail}")
    return out


def conclude(findings: list[Finding], requested: str, forced_by: str = "") -> Verdict:
    """The strategy for `requested` ("auto" or a strategy), each finding's status, and the exit code."""
    choice = choose_strategy(requested, ruled_out(findings), forced_by=forced_by)
    code = int(ExitCode.OK)
    for f in findings:
        if f.ok:
            f.status = f.status or "ok"
        elif choice.strategy in f.rules_out:
            f.status = "fail"
            code = code or int(f.exit_code or ExitCode.BUG)
        else:
            f.status = "warn"
    return Verdict(findings, choice, code)


# ---- permissions ------------------------------------------------------------------------------------------
def allowed(permissions: Sequence[Mapping[str, Any]], action: str, *, data: bool = False) -> bool:
    """Whether the caller's permissions at a scope (the permissions API's list) allow `action`."""
    key, not_key = ("dataActions", "notDataActions") if data else ("actions", "notActions")
    return any(any(roles.action_matches(p, action) for p in perm.get(key) or ())
               and not any(roles.action_matches(p, action) for p in perm.get(not_key) or ())
               for perm in permissions)


@dataclass(frozen=True)
class Need:
    action: str
    data: bool = False
    rules_out: tuple[str, ...] = ALL  # () = only a warning (a verb other than repair-run needs it)
    role: str = ""  # the documented role that grants it


def operator_needs() -> list[Need]:
    role = roles.operator()
    out = []
    for action in role.actions:
        scope = (() if action in SWAP_ONLY else EXPORT if action in EXPORT_ONLY else RESCUE if action in RESCUE_ONLY
                 else ALL)
        out.append(Need(action, False, scope, role.name))
    return out


def assignment_needs(identity: str, scope_kind: str) -> list[Need]:
    """What crashcart relies on from the documented built-in roles at `scope_kind` (roles/<identity>.json)."""
    out = []
    for a in roles.assignments(identity):
        if a.scope != scope_kind or (a.when and "snapshot-export" in a.when):
            continue  # Data Operator for Managed Disks is the source disk check's (dataAccessAuthMode)
        for action in a.relied_on:
            data = any(roles.action_matches(p, action) for p in a.role.data_actions)
            out.append(Need(action, data, () if a.when else ALL, a.role.name))
    return out


def permission_finding(subject: str, scope_id: str, needs: Sequence[Need],
                       permissions: Sequence[Mapping[str, Any]], *, where: str = "", custom_role: bool = False
                       ) -> Finding:
    """One scope's permissions against what crashcart needs there."""
    missing = [n for n in needs if not allowed(permissions, n.action, data=n.data)]
    read_at = f" (read at {where})" if where else ""
    data = {"scope": scope_id, "missing": [n.action for n in missing], "checked": len(needs), "read_at": where}
    if not missing:
        return Finding("permissions", subject, True, f"all {len(needs)} actions crashcart uses here{read_at}",
                       data=data)
    named = ", ".join(n.action for n in missing[:MAX_LISTED]) + (
        f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else "")
    blocking = tuple(s for s in STRATEGIES if any(s in n.rules_out for n in missing))
    if custom_role:
        fix = (f"add them to the custom role '{missing[0].role}' (scripts/azure/roles/operator.json, README 'Pipeline "
               "identity'): `az role definition update --role-definition @operator.json`, assigned on the "
               "subscription; a change takes up to 10 minutes to apply")
    else:
        granting = sorted({n.role for n in missing if n.role})
        fix = (f"assign {' and '.join(repr(r) for r in granting)} to this identity on {scope_id} (README 'Pipeline "
               "identity'); a new assignment takes up to 10 minutes to apply")
    if not blocking:
        fix += " (only some verbs need them: " + ", ".join(sorted({_verbs(n) for n in missing})) + ")"
    return Finding("permissions", subject, False, f"missing {named}{read_at}", fix, EXIT_CODES["permissions"],
                   blocking, data)


def _verbs(need: Need) -> str:
    return "prepare-dump --swap, rollback" if need.action in SWAP_ONLY else "collect --sas"


# ---- the checklist --------------------------------------------------------------------------------------
def render(verdict: Verdict) -> None:
    """The checklist on stderr: a rich table on a terminal, one plain line per finding in CI."""
    choice = verdict.choice
    if is_interactive():
        from rich.console import Console
        from rich.table import Table

        marks = {"ok": "[green]ok[/]", "info": "[cyan]info[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
        table = Table(title="crashcart preflight", show_lines=False)
        for column in ("", "check", "what was found", "what to do"):
            table.add_column(column, overflow="fold")
        for f in verdict.findings:
            table.add_row(marks.get(f.status, f.status), f"{f.check}: {_safe(f.subject)}", _safe(f.detail),
                          _safe(f.fix))
        console = Console(stderr=True, markup=True, highlight=False)
        console.print(table)
        console.print(f"strategy: [bold]{choice.strategy}[/] - {_safe(choice.reason)}")
    else:
        for f in verdict.findings:
            log.info("  [%-4s] %s: %s - %s", f.status, f.check, printable(f.subject), printable(f.detail))
            if f.fix and f.status in ("warn", "fail"):
                log.info("         fix: %s", printable(f.fix))
        log.info("strategy: %s - %s", choice.strategy, printable(choice.reason))
    blockers = verdict.blockers
    if blockers:
        log.info("preflight: %d blocker(s); nothing was created (exit %d)", len(blockers), verdict.exit_code)
    else:
        log.info("preflight: no blockers; nothing was created")


def _safe(text: str) -> str:
    from rich.markup import escape

    return escape(printable(text))
