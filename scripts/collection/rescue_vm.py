"""`collect`: run the collection on the rescue VM and prove the dump reached evidence storage whole.

This is the step that replaces "RDP into the repair VM, open F:\\Windows, find MEMORY.DMP" in
Microsoft's procedure for stop 0x7E. After `cdktf deploy repair`:

1. read the repair stack's outputs (rescue VM, disk copy LUN, evidence endpoint and container);
2. wait for the rescue VM's agent to report Ready (no Run Command can run before);
3. render the remote script for the rescue OS (scripts/remote/*.j2: code only) and start it as a
   managed Run Command, every value passed as a parameter, stdout/stderr streamed to append blobs
   `<prefix>/runcommand/output.log` and `error.log` with the VM's managed identity;
4. poll its instance view until it ends (or the timeout), showing progress; delete it afterwards;
5. read the script's one-line JSON result, verify every stored blob (scripts.verify), write the
   report (scripts.report), optionally mint read-only SAS links, and exit with the outcome's code.

Blobs: `<source VM>/<UTC run stamp>/MEMORY.DMP`, `.../Minidump/<name>.dmp`, `.../PAGEFILE.DMP`, each
with `<blob>.manifest.json`; `.../runcommand/{output,error}.log`; `.../report.{json,md}`.

Exit codes (scripts.errors.ExitCode): 0 OK, 10 NO_DUMP, 11 DISK_NOT_FOUND, 12 COLLECT_FAILED,
13 TIMED_OUT, 14 AGENT_NOT_READY, 15 VERIFY_FAILED (and 2-5 for usage and Azure errors).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scripts import remote
from scripts.evidence import blobs as evidence
from scripts.collection import report
from scripts.azure import runcommand
from scripts.evidence import verify
from scripts.azure.clients import AzureClients
from scripts.base.console import NullProgress, Progress, emit_json, report_error, step
from scripts.config.model import DEFAULT_PATH, VM_ID, Config
from scripts.base.errors import CrashcartError, ExitCode
from scripts.config.stackoutputs import RepairOutputs, load_repair_outputs

log = logging.getLogger("crashcart.collect")

DEFAULT_TIMEOUT_MINUTES = 120
DEFAULT_AGENT_WAIT_MINUTES = 15.0
DEFAULT_POLL_SECONDS = 10.0
OUT_DIR = Path("crashcart-out")
LOG_TAIL_BYTES = 1024 * 1024

STATUS_EXIT = {
    "collected": ExitCode.OK,
    "no_dump": ExitCode.NO_DUMP,
    "disk_not_found": ExitCode.DISK_NOT_FOUND,
    "upload_failed": ExitCode.COLLECT_FAILED,
    "error": ExitCode.COLLECT_FAILED,
}


@dataclass
class CollectResult:
    """What one collection did and found; `to_dict()` is the verb's JSON on stdout."""

    status: str  # collected | no_dump | disk_not_found | upload_failed | error | timed_out | agent_not_ready | verify_failed
    exit_code: int
    message: str
    run: str  # <source vm>/<stamp>: the blob prefix of this run
    source_vm_id: str
    rescue_vm_id: str
    rescue_os: str
    container_url: str
    blobs: list[verify.VerifiedBlob] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    crash_control: dict[str, Any] | None = None
    volume: dict[str, Any] | None = None
    run_command: dict[str, Any] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    remote_error_tail: str = ""
    report_files: dict[str, str] = field(default_factory=dict)  # local paths
    report_blobs: dict[str, str] = field(default_factory=dict)  # URLs in the container
    sas: dict[str, str] = field(default_factory=dict)  # blob name -> read-only link (stdout only, never a report)
    sas_expiry: str | None = None
    symptoms: dict[str, Any] | None = None  # boot diagnostics of the broken VM (screenshot, serial log)

    @property
    def dumps(self) -> list[verify.VerifiedBlob]:
        return [b for b in self.blobs if b.ok]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["blobs"] = [b.to_dict() for b in self.blobs]
        return data


class CollectError(CrashcartError):
    """A collection that ended in anything but OK; `result` says how far it got (None before the run)."""

    def __init__(self, message: str, hint: str, exit_code: ExitCode, result: CollectResult | None = None):
        super().__init__(message, hint, exit_code)
        self.result = result


# ---- small pure helpers ---------------------------------------------------------------------------------
def run_stamp(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def _vm_parts(vm_id: str) -> tuple[str, str] | None:
    m = VM_ID.fullmatch(vm_id or "")
    return (m.group("rg"), m.group("name")) if m else None


def rescue_vm(outputs: RepairOutputs) -> tuple[str, str]:
    """(resource group, name) of the rescue VM."""
    return _vm_parts(outputs.rescue_vm_id) or (outputs.resource_group_name, outputs.rescue_vm_name)


def source_vm_name(outputs: RepairOutputs, config: Config | None) -> str:
    parts = _vm_parts(outputs.source_vm_id)
    if parts:
        return parts[1]
    return config.source.vm_name if config else "source-vm"


def remote_parameters(outputs: RepairOutputs, prefix: str, settings: remote.UploadSettings | None = None) -> dict[str, str]:
    """Every value the remote script needs, as Run Command parameters (never spliced into its code)."""
    params = {
        "BlobEndpoint": outputs.evidence_blob_endpoint.rstrip("/"),
        "Container": outputs.evidence_container,
        "Prefix": prefix,
        "DiskLun": str(outputs.disk_copy_lun),
        "DiskCopyId": outputs.disk_copy_id,
        "SourceDiskId": outputs.source_os_disk_id,
        "SnapshotId": outputs.snapshot_id,
    }
    if settings is not None:
        params.update(BlockSize=str(settings.block_size), Parallel=str(settings.parallel),
                      MaxAttempts=str(settings.max_attempts), AuthWaitSeconds=str(settings.auth_wait_seconds))
    return {k: v for k, v in params.items() if v != ""}


def blob_uri(outputs: RepairOutputs, name: str) -> str:
    return (f"{outputs.evidence_blob_endpoint.rstrip('/')}/{urllib.parse.quote(outputs.evidence_container)}/"
            f"{urllib.parse.quote(name)}")


def parse_marked(text: str, marker: str) -> dict[str, Any] | None:
    """The JSON of the last `<marker> {...}` line in a script's output."""
    for line in reversed((text or "").splitlines()):
        line = line.strip()
        if line.startswith(marker + " "):
            try:
                value = json.loads(line[len(marker) + 1:])
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


# ---- the steps --------------------------------------------------------------------------------------------
class _Run:
    """One collection: the clients, names and options shared by its steps."""

    def __init__(self, outputs: RepairOutputs, config: Config | None, *, timeout_minutes: float, progress: bool,
                 agent_wait_minutes: float, poll_seconds: float, out_dir: Path, full_hash: bool,
                 sas_days: int | None, settings: remote.UploadSettings | None, now: dt.datetime | None):
        if outputs.rescue_os not in remote.TEMPLATES:
            raise CrashcartError(f"the repair stack's rescue_os is {outputs.rescue_os!r}",
                                 "expected windows or linux: redeploy the repair stack", ExitCode.USAGE)
        if timeout_minutes <= 0:
            raise CrashcartError(f"timeout {timeout_minutes} min is not positive", "pass --timeout-minutes > 0",
                                 ExitCode.USAGE)
        self.outputs, self.config = outputs, config
        self.timeout_s = max(1, math.ceil(timeout_minutes * 60))
        self.progress, self.poll_s = progress, poll_seconds
        self.agent_wait_s = agent_wait_minutes * 60
        self.full_hash, self.sas_days, self.settings = full_hash, sas_days, settings
        self.rg, self.vm = rescue_vm(outputs)
        self.stamp = run_stamp(now)
        self.prefix = f"{source_vm_name(outputs, config)}/{self.stamp}"
        self.name = f"crashcart-collect-{self.stamp.lower()}"
        self.out_dir = out_dir / self.prefix
        self.output_blob = f"{self.prefix}/runcommand/output.log"
        self.error_blob = f"{self.prefix}/runcommand/error.log"
        self.compute = AzureClients(outputs.subscription_id).compute
        self.container = evidence.container_client(outputs.evidence_blob_endpoint, outputs.evidence_container)
        self.result = CollectResult(
            status="running", exit_code=int(ExitCode.OK), message="", run=self.prefix,
            source_vm_id=outputs.source_vm_id, rescue_vm_id=outputs.rescue_vm_id, rescue_os=outputs.rescue_os,
            container_url=blob_uri(outputs, "").rstrip("/"),
            logs={"output": blob_uri(outputs, self.output_blob), "error": blob_uri(outputs, self.error_blob)},
            run_command={"name": self.name, "timeout_seconds": self.timeout_s})

    def _bar(self, description: str) -> Any:
        return Progress(description, every=30) if self.progress else NullProgress()

    # -- 2. agent
    def capture_symptoms(self) -> None:
        """The article's starting point, kept with the evidence: the broken VM's screenshot and serial log.
        Never fails the run (boot diagnostics may be off, or the source VM unreadable)."""
        source = _vm_parts(self.outputs.source_vm_id)
        if source:
            from scripts.evidence import bootdiag

            self.result.symptoms = bootdiag.capture_symptoms(self.compute, self.container, source[0], source[1],
                                                             self.prefix, out_dir=self.out_dir).to_dict()

    def wait_for_agent(self) -> None:
        with step(f"wait for the agent of rescue VM {self.vm}"), self._bar(f"agent of {self.vm}") as bar:
            text = runcommand.wait_for_agent(self.compute, self.rg, self.vm, timeout_s=self.agent_wait_s,
                                             poll_s=self.poll_s, on_poll=lambda t: bar.update(status=t))
            log.info("    %s", text)

    # -- 3 + 4. run
    def run_remote(self) -> runcommand.Execution:
        location = runcommand.vm_location(self.compute, self.rg, self.vm)
        script = remote.render(self.outputs.rescue_os, self.settings)
        parameters = remote_parameters(self.outputs, self.prefix, self.settings)
        with step(f"run the {self.outputs.rescue_os} collect script on {self.vm} (run command {self.name})"):
            started = time.monotonic()
            try:
                self._start(location, script, parameters)
                execution = self._wait(started)
            finally:
                deleted = runcommand.delete(self.compute, self.rg, self.vm, self.name, poll_s=self.poll_s)
                self.result.run_command["deleted"] = deleted
            self.result.run_command.update(
                state=execution.state, exit_code=execution.exit_code, message=execution.message,
                start_time=execution.start_time, end_time=execution.end_time,
                seconds=round(time.monotonic() - started, 1))
        return execution

    def _start(self, location: str, script: str, parameters: dict[str, str]) -> None:
        from azure.core.exceptions import HttpResponseError

        from scripts.azure.errors import translate_azure_error

        try:
            runcommand.start(self.compute, self.rg, self.vm, self.name, location=location, script=script,
                             parameters=parameters, timeout_s=self.timeout_s,
                             output_blob_uri=self.result.logs["output"], error_blob_uri=self.result.logs["error"],
                             poll_s=self.poll_s)
        except HttpResponseError as err:
            if err.status_code in (401, 403, 404):
                raise translate_azure_error(err, f"run command on rescue VM {self.vm}") from None
            detail = getattr(getattr(err, "error", None), "message", None) or str(err).splitlines()[0]
            raise CrashcartError(f"the run command could not be created on {self.vm}: {detail}",
                                 "check the rescue VM in the portal (Extensions + applications) and re-run collect",
                                 ExitCode.COLLECT_FAILED) from None

    def _wait(self, started: float) -> runcommand.Execution:
        # The handler enforces timeoutInSeconds itself (state TimedOut); this deadline only covers a
        # command that never gets picked up or never reports back.
        grace = min(300.0, max(1.0, self.timeout_s * 0.25))
        deadline = started + self.timeout_s + grace
        failures = 0
        with self._bar(f"collect on {self.vm}") as bar:
            while True:
                try:
                    execution = runcommand.execution(self.compute, self.rg, self.vm, self.name)
                    failures = 0
                except Exception as err:  # noqa: BLE001 - a blip in a long wait must not orphan the command
                    failures += 1
                    if failures >= 5:
                        raise _azure_error(err, f"run command {self.name}") from None
                    log.warning("reading run command %s failed (%s), retrying", self.name, str(err).splitlines()[0])
                    time.sleep(self.poll_s)
                    continue
                bar.update(status=self._status_text(execution))
                if execution.finished:
                    return execution
                if time.monotonic() >= deadline:
                    execution.message = (f"no result after {self.timeout_s + grace:.0f}s "
                                         f"(the run command was still {execution.state})")
                    execution.state = "TimedOut"
                    return execution
                time.sleep(self.poll_s)

    def _status_text(self, execution: runcommand.Execution) -> str:
        text = execution.state
        line = parse_marked(execution.output, remote.PROGRESS_MARKER)
        if line is None and execution.state == "Running":
            try:
                line = parse_marked(evidence.read_tail(self.container, self.output_blob, 8192) or "",
                                    remote.PROGRESS_MARKER)
            except CrashcartError:
                line = None
        if line and line.get("total"):
            name = str(line.get("blob", "")).rsplit("/", 1)[-1]
            done, total = float(line.get("done", 0)), float(line["total"])
            text += f" - {name} {100 * done / total:.0f}% of {_size(total)}"
        return text

    # -- 5. result
    def remote_result(self, execution: runcommand.Execution) -> dict[str, Any] | None:
        found = parse_marked(execution.output, remote.RESULT_MARKER)
        if found is None:
            try:
                found = parse_marked(evidence.read_tail(self.container, self.output_blob, LOG_TAIL_BYTES) or "",
                                     remote.RESULT_MARKER)
            except CrashcartError as err:
                log.warning("could not read %s: %s", self.output_blob, err.message)
        error_text = execution.error
        if not error_text.strip():
            try:
                error_text = evidence.read_tail(self.container, self.error_blob, 4096) or ""
            except CrashcartError:
                error_text = ""
        self.result.remote_error_tail = error_text[-4096:]
        return found

    def outcome(self, execution: runcommand.Execution, found: dict[str, Any] | None) -> None:
        r = self.result
        if found is not None:
            r.notes = [str(n) for n in found.get("notes") or []]
            r.crash_control = found.get("crash_control")
            r.volume = found.get("volume")
        if execution.state == "TimedOut":
            self._fail("timed_out", ExitCode.TIMED_OUT,
                       f"the collection did not finish within {self.timeout_s / 60:.0f} min ({execution.message or 'TimedOut'})",
                       "raise repair.collect_timeout_minutes (or --timeout-minutes): a complete dump of a large VM "
                       "takes long to upload; the partial run's logs are in "
                       f"{self.error_blob}")
            return
        if found is None:
            # No result line (lost output, or the script died): the exit code still says what happened.
            status = remote.REMOTE_EXIT.get(execution.exit_code if execution.exit_code is not None else -1, "error")
            if execution.state == "Succeeded" and status == "collected":
                status = "error"  # a success that did not say what it stored cannot be verified
            tail = " | ".join(r.remote_error_tail.strip().splitlines()[-3:])
            self._fail(status, STATUS_EXIT.get(status, ExitCode.COLLECT_FAILED),
                       f"the run command ended {execution.state} (exit {execution.exit_code}) without a result"
                       + (f": {tail}" if tail else ""),
                       _HINTS.get(status, _HINTS["error"]).format(run=self))
            return
        status = str(found.get("status", "error"))
        code = STATUS_EXIT.get(status, ExitCode.COLLECT_FAILED)
        r.status, r.exit_code, r.message = status, int(code), str(found.get("message", ""))
        r.blobs = verify.verify_files(self.container, list(found.get("files") or []), full_hash=self.full_hash)
        if code != ExitCode.OK:
            self._fail(status, code, r.message, _HINTS.get(status, "").format(run=self))
            return
        problems = [p for b in r.blobs for p in b.problems]
        if not r.blobs or problems:
            self._fail("verify_failed", ExitCode.VERIFY_FAILED,
                       "verification failed: " + ("; ".join(problems) if problems else "no blob was reported"),
                       "the stored blobs are incomplete or not dumps: re-run collect (a new run uploads afresh)")

    def _fail(self, status: str, code: ExitCode, message: str, hint: str) -> None:
        self.result.status, self.result.exit_code, self.result.message = status, int(code), message
        self.result.run_command["hint"] = hint

    def sas_links(self) -> None:
        """Read-only links for a support ticket: best effort, a collected dump stays collected."""
        if not self.sas_days or not self.result.dumps:
            return
        if evidence.uses_emulator_key():
            self.result.notes.append("no SAS links: they are signed with an Azure AD user delegation key, and "
                                     f"storage is reached with {evidence.CONNECTION_STRING_ENV} (emulator key)")
            return
        try:
            for blob in self.result.dumps:
                url, expiry = evidence.user_delegation_sas(self.container, blob.name, self.sas_days)
                self.result.sas[blob.name] = url
                self.result.sas_expiry = expiry.isoformat()
        except CrashcartError as err:
            self.result.sas.clear()
            self.result.notes.append(f"no SAS links: {err.message} ({err.hint})")
            log.warning("SAS links could not be made: %s", err.message)

    def write_report(self) -> None:
        report.store(self.result, self.outputs, self.out_dir, self.container, self.prefix)


def _azure_error(err: Exception, what: str) -> CrashcartError:
    from azure.core.exceptions import AzureError

    from scripts.azure.errors import translate_azure_error

    if isinstance(err, CrashcartError):
        return err
    if isinstance(err, AzureError):
        return translate_azure_error(err, what)
    raise err


_HINTS = {
    "no_dump": ("the broken VM left no memory dump on its OS disk (see notes: CrashControl, page file). Configure a "
                "dump and reproduce the crash: `pipenv run prepare-dump --swap` (prepares the disk copy, swaps it in, "
                "triggers the crash, collects the dump, rolls back)"),
    "disk_not_found": ("check that the disk copy is attached to the rescue VM at LUN {run.outputs.disk_copy_lun} "
                       "(az vm show -g {run.rg} -n {run.vm} --query storageProfile.dataDisks); an encrypted OS disk "
                       "(BitLocker/ADE) must be unlocked before it can be read"),
    "upload_failed": ("see {run.error_blob} in the evidence container; the rescue VM's identity needs 'Storage Blob "
                      "Data Contributor' on the container (the repair stack assigns it). Re-run collect: a new run "
                      "uploads afresh"),
    "error": "see {run.error_blob} in the evidence container and re-run collect",
}


def collect_dump(outputs: RepairOutputs, config: Config | None, *, timeout_minutes: float, progress: bool = True,
                 agent_wait_minutes: float = DEFAULT_AGENT_WAIT_MINUTES, poll_seconds: float = DEFAULT_POLL_SECONDS,
                 out_dir: Path = OUT_DIR, full_hash: bool = False, sas_days: int | None = None,
                 settings: remote.UploadSettings | None = None, now: dt.datetime | None = None) -> CollectResult:
    """Runs the collection on the rescue VM and verifies it. Returns the result when at least one dump
    is stored and verified; otherwise raises CollectError (a CrashcartError with the outcome's exit
    code and the partial `result`)."""
    if sas_days is not None:
        evidence.check_sas_days(sas_days)  # a usage error before anything runs, not after the upload
    run = _Run(outputs, config, timeout_minutes=timeout_minutes, progress=progress,
               agent_wait_minutes=agent_wait_minutes, poll_seconds=poll_seconds, out_dir=out_dir,
               full_hash=full_hash, sas_days=sas_days, settings=settings, now=now)
    run.capture_symptoms()
    try:
        run.wait_for_agent()
        execution = run.run_remote()
    except Exception as err:  # noqa: BLE001 - Azure and crashcart errors become a CollectError with the partial result
        failure = _azure_error(err, f"rescue VM {run.vm}")
        status = "agent_not_ready" if failure.exit_code == ExitCode.AGENT_NOT_READY else "error"
        run._fail(status, failure.exit_code, failure.message, failure.hint)
        run.write_report()
        raise CollectError(failure.message, failure.hint, failure.exit_code, run.result) from None
    found = run.remote_result(execution)
    with step("verify the stored dumps"):
        run.outcome(execution, found)
    if run.result.exit_code == ExitCode.OK:
        run.sas_links()
    run.write_report()
    r = run.result
    for blob in r.blobs:
        log.info("    %s %s (%s)%s", "ok " if blob.ok else "BAD", blob.name, _size(blob.size or 0),
                 "" if blob.ok else ": " + "; ".join(blob.problems))
    if r.report_files:
        log.info("report: %s%s", r.report_files.get("markdown"),
                 f" and {r.report_blobs['markdown']}" if r.report_blobs else "")
    if r.exit_code != ExitCode.OK:
        raise CollectError(r.message, r.run_command.get("hint", ""), ExitCode(r.exit_code), r)
    log.info("collected %d dump(s) under %s/%s/", len(r.dumps), r.container_url, r.run)
    return r


# ---- the verb ---------------------------------------------------------------------------------------------
STRATEGIES = ("rescue-vm", "snapshot-export")


def collector_for(strategy: str) -> Callable[..., Any]:
    """The collection for a strategy; both share collect_dump's contract (result, or CollectError)."""
    if strategy == "snapshot-export":
        from scripts.collection.snapshot_export import collect_from_snapshot

        return collect_from_snapshot
    return collect_dump


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="rescue-vm (Run Command on the rescue VM) or snapshot-export (server-side copy from "
                             "the snapshot, no VM involved); default: repair.strategy, else rescue-vm")
    parser.add_argument("--outputs-file", type=Path,
                        help="outputs written by `cdktf deploy repair --outputs-file` (default: terraform output "
                             "in cdktf.out/stacks/repair)")
    parser.add_argument("--config", help="config file (default: CRASHCART_CONFIG or repair.toml; optional)")
    parser.add_argument("--timeout-minutes", type=float,
                        help=f"how long the remote collection may run (default: repair.collect_timeout_minutes, "
                             f"{DEFAULT_TIMEOUT_MINUTES})")
    parser.add_argument("--agent-wait-minutes", type=float, default=DEFAULT_AGENT_WAIT_MINUTES,
                        help="how long to wait for the rescue VM's agent to be Ready (default: %(default)s)")
    parser.add_argument("--poll-seconds", type=float, default=DEFAULT_POLL_SECONDS,
                        help="how often to poll Azure (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="local folder for the report (default: %(default)s)")
    parser.add_argument("--full-hash", action="store_true",
                        help="re-hash every blob by downloading it (default: only blobs up to 256 MiB)")
    parser.add_argument("--sas", action="store_true",
                        help="print read-only user-delegation SAS links to the dumps (for a support ticket)")
    parser.add_argument("--sas-days", type=int, default=7,
                        help=f"validity of the SAS links, 1-{evidence.SAS_MAX_DAYS} days (default: %(default)s)")


def _load_config(path: str | None) -> Config | None:
    """The config when there is one: collect works from the stack outputs alone."""
    if path is None and not os.environ.get("CRASHCART_CONFIG") and not Path(DEFAULT_PATH).exists():
        return None
    return Config.load(path)


def run(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    outputs = load_repair_outputs(args.outputs_file)
    timeout = args.timeout_minutes or (config.repair.collect_timeout_minutes if config else DEFAULT_TIMEOUT_MINUTES)
    collector = collector_for(args.strategy or (config.repair.strategy if config else "rescue-vm"))
    try:
        result = collector(outputs, config, timeout_minutes=timeout, agent_wait_minutes=args.agent_wait_minutes,
                              poll_seconds=args.poll_seconds, out_dir=args.out_dir, full_hash=args.full_hash,
                              sas_days=args.sas_days if args.sas else None)
    except CollectError as err:
        if err.result is not None:
            emit_json({**err.result.to_dict(), "error": err.message, "hint": err.hint})
        report_error(err)
        return int(err.exit_code)
    emit_json(result.to_dict())
    return int(ExitCode.OK)
