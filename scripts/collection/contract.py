"""The contract every way of getting the dump out honours: a `CollectRequest` in, a `CollectResult` out.

Two strategies implement it (rescue_vm.RescueVmCollector: a run command on the rescue VM;
snapshot_export.SnapshotExportCollector: a server-side copy from the snapshot). Whatever they do
inside, the report, the exit code and the fleet summary are computed from the `CollectResult` alone,
and the status -> exit code mapping exists only here (`STATUS_EXIT`).

A collector returns the result when at least one dump is stored and verified, and raises
`CollectError` (carrying the partial result) for every other outcome.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from scripts.azure import ids
from scripts.azure.identity import vm_key
from scripts.azure.runcommand import DEFAULT_AGENT_WAIT_MINUTES, DEFAULT_POLL_SECONDS
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.stop import StopRequest
from scripts.config.model import Config
from scripts.config.stackoutputs import RepairOutputs
from scripts.evidence.verify import VerifiedBlob

OUT_DIR = Path("crashcart-out")
DEFAULT_TIMEOUT_MINUTES = 120
STRATEGIES = ("rescue-vm", "snapshot-export")

# The one mapping from a collection's status to the verb's exit code (README "Exit codes").
STATUS_EXIT: dict[str, ExitCode] = {
    "collected": ExitCode.OK,
    "no_dump": ExitCode.NO_DUMP,
    "disk_not_found": ExitCode.DISK_NOT_FOUND,
    "upload_failed": ExitCode.COLLECT_FAILED,
    "error": ExitCode.COLLECT_FAILED,
    "timed_out": ExitCode.TIMED_OUT,
    "agent_not_ready": ExitCode.AGENT_NOT_READY,
    "verify_failed": ExitCode.VERIFY_FAILED,
    "cleanup_failed": ExitCode.TEARDOWN_FAILED,
    "interrupted": ExitCode.INTERRUPTED,
    "usage": ExitCode.USAGE,
    "azure_auth": ExitCode.AZURE_AUTH,
    "azure_not_found": ExitCode.AZURE_NOT_FOUND,
    "azure_failed": ExitCode.AZURE_FAILED,
    "bug": ExitCode.BUG,
}
_EXIT_STATUS = {code: status for status, code in STATUS_EXIT.items() if status not in ("upload_failed",)}


def status_for(code: ExitCode | int) -> str:
    """The status an error's exit code stands for (the reverse of STATUS_EXIT)."""
    return _EXIT_STATUS.get(ExitCode(code), "error")


def failure_status(err: CrashcartError) -> str:
    """The result's status for the error that ended a run: a name already taken is an upload refused."""
    from scripts.evidence.blobs import BlobExists

    return "upload_failed" if isinstance(err, BlobExists) else status_for(err.exit_code)


def run_stamp(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def source_vm_id(outputs: RepairOutputs | None, config: Config | None) -> str:
    """The broken VM's resource ID: the repair stack's output, else the config's. A VM is its ID (two VMs
    may share a name), so a collection that cannot name it by ID does not start."""
    for candidate in (outputs.source_vm_id if outputs else "", config.source.vm_id if config else ""):
        if ids.try_parse(candidate, "vm"):
            return candidate
    shown = outputs.source_vm_id if outputs else ""
    raise CrashcartError(f"the source VM's resource ID {shown!r} is not a VM resource ID: the evidence prefix is "
                         "derived from it",
                         "redeploy the repair stack (its source_vm_id output), or pass --config with the [source] "
                         "section `pipenv run discover` writes", ExitCode.USAGE)


def run_prefix(vm_id: str, stamp: str) -> str:
    """`<vm key>/<UTC run stamp>`: where one collection of one VM writes in the evidence container (and
    locally under crashcart-out/). The key is scripts.azure.identity.vm_key: readable name + hash of the ID."""
    return f"{vm_key(vm_id)}/{stamp}"


@dataclass(frozen=True)
class CollectRequest:
    """What a collection is asked to do; the same for every strategy."""

    outputs: RepairOutputs | None  # the repair stack's outputs (None: snapshot-export from the config alone)
    config: Config | None
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES
    progress: bool = True
    out_dir: Path = OUT_DIR
    full_hash: bool = False
    sas_days: int | None = None  # read-only links for a support ticket (stdout only)
    agent_wait_minutes: float = DEFAULT_AGENT_WAIT_MINUTES
    poll_seconds: float = DEFAULT_POLL_SECONDS
    now: dt.datetime | None = None  # the run stamp's clock (a caller that wrote under this run's prefix passes its own)
    stop: StopRequest | None = None
    # where rescue-vm keeps the broken VM's boot diagnostics under the run prefix; a caller that captured them
    # there already (prepare-dump --swap) names another folder: nothing is written twice
    symptoms_folder: str = "bootdiag"


@dataclass
class CollectResult:
    """What one collection did and found; `to_dict()` is the verb's JSON on stdout."""

    status: str  # a key of STATUS_EXIT
    exit_code: int
    message: str
    run: str  # <vm key>/<stamp>: the blob prefix of this run (run_prefix)
    source_vm_id: str
    rescue_vm_id: str
    rescue_os: str
    container_url: str
    strategy: str = "rescue-vm"
    blobs: list[VerifiedBlob] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    crash_control: dict[str, Any] | None = None
    volume: dict[str, Any] | None = None
    run_command: dict[str, Any] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    remote_error_tail: str = ""
    hint: str = ""
    report_files: dict[str, str] = field(default_factory=dict)  # local paths
    report_blobs: dict[str, str] = field(default_factory=dict)  # URLs in the container
    sas: dict[str, str] = field(default_factory=dict)  # blob name -> read-only link (stdout only, never a report)
    sas_expiry: str | None = None
    symptoms: dict[str, Any] | None = None  # boot diagnostics of the broken VM (screenshot, serial log)
    triage: dict[str, Any] | None = None  # the verdict on the primary stored dump
    export: dict[str, Any] | None = None  # snapshot-export: what was read, copied, hashed and cleaned up

    @property
    def dumps(self) -> list[VerifiedBlob]:
        return [b for b in self.blobs if b.ok]

    @property
    def ok(self) -> bool:
        return self.status == "collected"

    def conclude(self, status: str, message: str, hint: str = "", cause: CrashcartError | None = None) -> None:
        """Sets the outcome; the exit code follows from the status (STATUS_EXIT), nowhere else. A run that
        failed before the collection itself (an Azure error: a missing role, a name not found) keeps the
        exit code of that `cause`, so the JSON and the process agree on what a pipeline should branch on."""
        self.status, self.message, self.hint = status, message, hint
        self.exit_code = int(cause.exit_code if cause is not None else STATUS_EXIT.get(status, ExitCode.COLLECT_FAILED))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["blobs"] = [b.to_dict() for b in self.blobs]
        return data


class CollectError(CrashcartError):
    """A collection that ended in anything but OK; `result` says how far it got (None before the run)."""

    def __init__(self, message: str, hint: str, exit_code: ExitCode, result: CollectResult | None = None):
        super().__init__(message, hint, exit_code)
        self.result = result

    @classmethod
    def of(cls, result: CollectResult) -> "CollectError":
        return cls(result.message, result.hint, ExitCode(result.exit_code), result)


class Collector(Protocol):
    """A strategy: turns a request into a result (or a CollectError with the partial result)."""

    strategy: str

    def collect(self, request: CollectRequest) -> CollectResult: ...
