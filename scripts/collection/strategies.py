"""Which collector does a strategy name: the one place that knows both implementations of the contract.

The report, the exit code and the fleet summary only know contract.CollectResult, so neither strategy
imports the other, nor does the report import either; callers (the `collect` verb, repair-run) pick a
collector here and hand it a contract.CollectRequest.

"auto" (repair.strategy's default) is resolved in two places only. repair-run's preflight step chooses
(`choose_strategy`: snapshot-export when nothing rules it out, else rescue-vm) and hands the choice on as
CRASHCART_REPAIR_STRATEGY, so synth and the collection read a named strategy. Everywhere else - the `collect`
verb on a stack a person deployed, `cdktf synth` by hand - "auto" means rescue-vm (`resolve`): it works on any
deployed repair stack whatever the disk's export policy, and a stack synthesized with "auto" keeps its
snapshot non-exportable (stacks/disk_copy.py makes it exportable only for "snapshot-export").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scripts.base.errors import CrashcartError, ExitCode
from scripts.collection.contract import STRATEGIES, Collector


AUTO = "auto"  # the strategy preflight picks: snapshot-export when nothing rules it out, else rescue-vm
AUTO_WITHOUT_PREFLIGHT = "rescue-vm"
AUTO_RULE = ('"auto" outside repair-run means rescue-vm (it works on any deployed repair stack whatever the disk\'s '
             "export policy); repair-run's preflight chooses snapshot-export when the disk allows it")


def resolve(strategy: str) -> str:
    """A named strategy as it is; "auto" without preflight's choice -> rescue-vm (AUTO_RULE)."""
    return AUTO_WITHOUT_PREFLIGHT if strategy == AUTO else strategy


def collector_for(strategy: str) -> Collector:
    """The collector for `strategy` ("rescue-vm" | "snapshot-export"; "auto" as `resolve` says), imported only
    when asked for."""
    strategy = resolve(strategy)
    if strategy == "rescue-vm":
        from scripts.collection.rescue_vm import RescueVmCollector

        return RescueVmCollector()
    if strategy == "snapshot-export":
        from scripts.collection.snapshot_export import SnapshotExportCollector

        return SnapshotExportCollector()
    raise CrashcartError(f"there is no collection strategy {strategy!r}",
                         f"choose one of: {', '.join((AUTO, *STRATEGIES))} (repair.strategy or --strategy)",
                         ExitCode.USAGE)


@dataclass(frozen=True)
class StrategyChoice:
    """The strategy a run uses, whether preflight chose it, and why (said in the log and the report)."""

    strategy: str
    automatic: bool
    reason: str
    forced_by: str = ""  # what forced it ("--strategy", "repair.strategy"); "" when chosen


def choose_strategy(requested: str, ruled_out: Mapping[str, Sequence[str]], *, forced_by: str = "") -> StrategyChoice:
    """`requested` "auto": snapshot-export (no VM boots, the dump's bytes stay server-side) when nothing rules it
    out, else rescue-vm, saying why; a named strategy is kept whatever preflight found (its blockers then
    stop the run). `ruled_out` is strategy -> the reasons it cannot work."""
    if requested != AUTO:
        if requested not in STRATEGIES:
            collector_for(requested)  # raises the usage error naming the choices
        why = ruled_out.get(requested)
        said = f"forced by {forced_by or 'repair.strategy'}"
        return StrategyChoice(requested, False, said + (f"; it cannot work here: {why[0]}" if why else ""),
                              forced_by or "repair.strategy")
    export = ruled_out.get("snapshot-export")
    if not export:
        return StrategyChoice("snapshot-export", True, "snapshot-export is allowed for this disk (no VM boots; the dump "
                                                       "is copied server-side)")
    if ruled_out.get("rescue-vm"):
        return StrategyChoice("rescue-vm", True, f"neither strategy can work here: {ruled_out['rescue-vm'][0]}")
    reason = f"snapshot-export is not possible: {export[0]}" + (f" (and {len(export) - 1} more)" if len(export) > 1
                                                                else "")
    return StrategyChoice("rescue-vm", True, f"{reason}; falling back to rescue-vm")
