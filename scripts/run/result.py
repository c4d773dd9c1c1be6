"""What a repair-run reports: one JSON document (stdout and <out-dir>/repair-run.json), and the exit code.

The fields are a contract with pipelines that publish the file; `repair_stack` says what the run did
to the repair stack (touched, destroyed, kept, what is left), `steps` what ran and how it ended.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.base.errors import CrashcartError, ExitCode
from scripts.run.lock import now

RESULT_FILE = "repair-run.json"


@dataclass
class RunResult:
    run_id: str
    started_at: str
    mode: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    repair_stack: dict[str, Any] = field(default_factory=lambda: {
        "touched": False, "leftovers_found": [], "destroyed": False, "kept": False, "remaining": []})
    evidence_stack: dict[str, Any] = field(default_factory=lambda: {"deployed_by_this_run": False})
    vm: dict[str, str] = field(default_factory=dict)  # id, key (scripts.azure.identity.vm_key)
    lock: dict[str, Any] | None = None  # the VM lock: blob, previous holder
    outputs: dict[str, Any] | None = None
    collect: Any = None
    fix: dict[str, Any] | None = None  # --fix: the fix report (scripts.run.repair_fix)
    next: str = ""  # what the operator does next when the run leaves something on purpose (a verified fix)
    status: str = "running"
    exit_code: int = 0
    error: dict[str, str] | None = None
    finished_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def conclude(self, *, error: CrashcartError | None, teardown_error: CrashcartError | None,
                 bug: Exception | None, stopped: str | None, is_deadline: bool,
                 cleanup_only: bool) -> CrashcartError | None:
        """Sets status, exit code and error from how the run ended; returns the error to tell the operator
        (None: nothing to tell, or a bug, whose traceback is shown instead). A teardown failure outranks
        a stop, which outranks a bug, which outranks the step's own error."""
        if teardown_error is not None:
            code, status = ExitCode.TEARDOWN_FAILED, "teardown_failed"
            if error is not None:
                teardown_error = CrashcartError(f"{error.message}; then {teardown_error.message}",
                                                teardown_error.hint, ExitCode.TEARDOWN_FAILED)
            shown: CrashcartError | None = teardown_error
        elif stopped is not None:
            code = ExitCode.TIMED_OUT if is_deadline else ExitCode.INTERRUPTED
            status = "timed_out" if is_deadline else "interrupted"
            shown = CrashcartError(f"stopped: {stopped}{self._during()}", self._aftermath_hint(), code)
        elif bug is not None:
            code, status, shown = ExitCode.BUG, "bug", None
        elif error is not None:
            code, status, shown = error.exit_code, "failed", error
        else:
            status = "cleaned_up" if cleanup_only else "fixed" if self.repair_stack.get("kept_for_fix") else "succeeded"
            code, shown = ExitCode.OK, None
        self.status = status
        self.exit_code = int(code)
        self.finished_at = now()
        if shown is None:
            return None
        told = CrashcartError(shown.message + self.aftermath(), shown.hint, code)
        self.error = {"message": told.message, "hint": told.hint}
        return told

    def aftermath(self) -> str:
        """What became of the repair stack, as the end of a sentence."""
        repair = self.repair_stack
        if repair.get("kept_for_fix"):
            return (" (the VM boots from the fixed disk copy, so the repair stack stays on purpose: it owns that disk; "
                    "see `next` in the report)")
        if repair["kept"]:
            return " (the repair stack was kept: --keep)"
        if repair["destroyed"]:
            return " (the repair stack was destroyed; the evidence stack was not touched)"
        if not repair["touched"]:
            return " (nothing was deployed for the repair; the evidence stack was not touched)"
        return ""

    def _aftermath_hint(self) -> str:
        clean = self.repair_stack["destroyed"] or not self.repair_stack["touched"]
        return "re-run when ready: a new run starts from a clean repair stack" if clean else \
            "see the teardown message above"

    def _during(self) -> str:
        running = [s["name"] for s in self.steps if s["status"] == "stopped"]
        return f" during {running[-1]}" if running else ""

    def write(self, out_dir: Path) -> list[Path]:
        """<out-dir>/repair-run.json (the last run in this folder: what a pipeline publishes) and, once the VM is
        known, <out-dir>/<vm key>/repair-run.json (this VM's last run)."""
        text = json.dumps(self.to_dict(), indent=2, default=str) + "\n"
        folders = [out_dir] + ([out_dir / self.vm["key"]] if self.vm.get("key") else [])
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / RESULT_FILE).write_text(text, encoding="utf-8")
        return [folder / RESULT_FILE for folder in folders]


@dataclass(frozen=True)
class RunOutcome:
    """What the verb prints and returns: the report, the exit code, and a bug to re-raise after printing."""

    exit_code: int
    report: dict[str, Any]
    bug: Exception | None = None


def jsonable(value: Any) -> Any:
    """A collection result (or a partial one) as plain data for the report."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "__dict__"):
        return {k: v for k, v in vars(value).items() if not k.startswith("_")}
    return value
