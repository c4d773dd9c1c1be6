"""Which collector does a strategy name: the one place that knows both implementations of the contract.

The report, the exit code and the fleet summary only know contract.CollectResult, so neither strategy
imports the other, nor does the report import either; callers (the `collect` verb, repair-run) pick a
collector here and hand it a contract.CollectRequest.
"""

from __future__ import annotations

from scripts.base.errors import CrashcartError, ExitCode
from scripts.collection.contract import STRATEGIES, Collector


def collector_for(strategy: str) -> Collector:
    """The collector for `strategy` ("rescue-vm" | "snapshot-export"), imported only when asked for."""
    if strategy == "rescue-vm":
        from scripts.collection.rescue_vm import RescueVmCollector

        return RescueVmCollector()
    if strategy == "snapshot-export":
        from scripts.collection.snapshot_export import SnapshotExportCollector

        return SnapshotExportCollector()
    raise CrashcartError(f"there is no collection strategy {strategy!r}",
                         f"choose one of: {', '.join(STRATEGIES)} (repair.strategy or --strategy)", ExitCode.USAGE)
