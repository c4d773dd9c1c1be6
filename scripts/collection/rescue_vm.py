"""The rescue-vm strategy: run the collect script on the rescue VM and prove the dump reached evidence storage whole.

This is the step that replaces "RDP into the repair VM, open F:\\Windows, find MEMORY.DMP" in
Microsoft's procedure for stop 0x7E. After `cdktf deploy repair`, from the repair stack's outputs:

1. keep the broken VM's boot diagnostics (screenshot, serial log) beside the evidence;
2. wait for the rescue VM's agent to report Ready (no Run Command can run before);
3. render the remote script for the rescue OS (scripts/remote/*.j2: code only) and run it as a managed
   Run Command (scripts.azure.runcommand.RunCommandRunner), every value passed as a parameter,
   stdout/stderr streamed to the append blobs `<prefix>/runcommand/output.log` and `error.log` with the
   VM's managed identity; the command is deleted afterwards whatever happened;
4. read the script's one-line JSON result (scripts.remote.parse_marked), verify every stored blob
   (scripts.evidence.verify), optionally mint read-only SAS links, and write the report.

Blobs: `<vm key>/<UTC run stamp>/MEMORY.DMP`, `.../Minidump/<name>.dmp`, `.../PAGEFILE.DMP`, each
with `<blob>.manifest.json`; `.../runcommand/{output,error}.log`; `.../report.{json,md}`. The key is the
VM's name plus a hash of its resource ID (contract.run_prefix): two VMs named alike never share a prefix,
and a run whose prefix already holds a report is refused before it starts (exit 12).
The outcome is a contract.CollectResult; its status gives the exit code (contract.STATUS_EXIT).

Azure Disk Encryption (BitLocker): when the source disk's encryption settings name a key, its .BEK file is read
from the VM's Key Vault here (scripts.collection.ade_key, with the kit's credential) and handed to the script as
the protected Run Command parameter `BitLockerKey` (base64): never a plain parameter, never in the script's code,
not shown by the run command's instance view; the script writes it to a private file, unlocks the copy
(manage-bde on Windows, dislocker on Linux), wipes it, and never logs it.
"""

from __future__ import annotations

import base64
import logging
import math
from typing import Any

from azure.core.exceptions import AzureError

from scripts import remote
from scripts.azure import ids
from scripts.azure.clients import AzureClients
from scripts.azure.errors import translate_azure_error
from scripts.azure.runcommand import Execution, Outcome, RemoteCommand, RunCommandRunner
from scripts.base.console import NullProgress, Progress, step
from scripts.base.errors import CrashcartError, ExitCode, first_line
from scripts.collection import ade_key, report
from scripts.collection.contract import CollectError, CollectRequest, CollectResult, run_prefix, run_stamp, source_vm_id
from scripts.collection.sas import add_sas_links
from scripts.config.stackoutputs import RepairOutputs
from scripts.evidence import blobs as evidence
from scripts.evidence import verify

log = logging.getLogger("crashcart.collect")

STRATEGY = "rescue-vm"
LOG_TAIL_BYTES = 1024 * 1024  # how much of output.log is searched for the result line


# ---- where the remote side writes ------------------------------------------------------------------------------
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


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


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


# ---- the collector -----------------------------------------------------------------------------------------------
class RescueVmCollector:
    """contract.Collector over the rescue VM: returns the result when at least one dump is stored and
    verified, raises CollectError (with the partial result) for every other outcome."""

    strategy = STRATEGY

    def __init__(self, settings: remote.UploadSettings | None = None, *, credential: Any = None,
                 keyvault_options: dict[str, Any] | None = None):
        self.settings = settings  # upload tuning written into the script (None: the script's defaults)
        self.credential = credential  # reads an ADE disk's BitLocker key from Key Vault (None: DefaultAzureCredential)
        self.keyvault_options = keyvault_options or {}

    def collect(self, request: CollectRequest) -> CollectResult:
        if request.sas_days is not None:
            evidence.check_sas_days(request.sas_days)  # a usage error before anything runs, not after the upload
        run = _Collection(request, self.settings)
        run.credential, run.keyvault_options = self.credential, self.keyvault_options
        report.claim(run.result, run.container, run.prefix)
        run.capture_symptoms()
        try:
            run.wait_for_agent()
            outcome = run.run_remote()
        except (CrashcartError, AzureError) as err:
            run.fail_early(translate_azure_error(err, f"rescue VM {run.vm}"))
            run.write_report()
            raise CollectError.of(run.result) from None
        found = run.remote_result(outcome.execution)
        with step("verify the stored dumps"):
            run.judge(outcome.execution, found)
        if run.result.ok:
            add_sas_links(run.result, run.container, request.sas_days)
        run.write_report()
        _log_summary(run.result)
        if not run.result.ok:
            raise CollectError.of(run.result)
        return run.result


class _Collection:
    """One collection on the rescue VM: the names, clients and result its steps share."""

    def __init__(self, request: CollectRequest, settings: remote.UploadSettings | None):
        outputs = request.outputs
        if outputs is None:
            raise CrashcartError("the rescue-vm strategy needs the repair stack's outputs",
                                 "deploy the repair stack first (`cdktf deploy repair`) or pass --outputs-file",
                                 ExitCode.USAGE)
        if outputs.rescue_os not in remote.TEMPLATES:
            raise CrashcartError(f"the repair stack's rescue_os is {outputs.rescue_os!r}",
                                 "expected windows or linux: redeploy the repair stack", ExitCode.USAGE)
        if request.timeout_minutes <= 0:
            raise CrashcartError(f"timeout {request.timeout_minutes} min is not positive",
                                 "pass --timeout-minutes > 0", ExitCode.USAGE)
        self.request, self.outputs, self.settings = request, outputs, settings
        self.timeout_s = max(1, math.ceil(request.timeout_minutes * 60))
        self.rg, self.vm = outputs.rescue_vm
        stamp = run_stamp(request.now)
        self.source_vm_id = source_vm_id(outputs, request.config)
        self.prefix = run_prefix(self.source_vm_id, stamp)
        self.name = f"crashcart-collect-{stamp.lower()}"
        self.out_dir = request.out_dir / self.prefix
        self.output_blob = f"{self.prefix}/runcommand/output.log"
        self.error_blob = f"{self.prefix}/runcommand/error.log"
        self.compute = AzureClients(outputs.subscription_id).compute
        self.credential: Any = None  # for Key Vault (RescueVmCollector sets it)
        self.keyvault_options: dict[str, Any] = {}
        self.container = evidence.container_client(outputs.evidence_blob_endpoint, outputs.evidence_container)
        # the handler's log blobs wait for the VM identity's role as long as the script's own uploads do
        self.runner = RunCommandRunner(self.compute, self.rg, self.vm, poll_s=request.poll_seconds, stop=request.stop,
                                       permission_wait_s=(settings or remote.UploadSettings()).auth_wait_seconds)
        self.result = CollectResult(
            status="running", exit_code=int(ExitCode.OK), message="", run=self.prefix, strategy=STRATEGY,
            source_vm_id=self.source_vm_id, rescue_vm_id=outputs.rescue_vm_id, rescue_os=outputs.rescue_os,
            container_url=outputs.blob_url(""),
            logs={"output": outputs.blob_url(self.output_blob), "error": outputs.blob_url(self.error_blob)},
            run_command={"name": self.name, "timeout_seconds": self.timeout_s})

    def _bar(self, description: str) -> Any:
        return Progress(description, every=30) if self.request.progress else NullProgress()

    def capture_symptoms(self) -> None:
        """The article's starting point, kept with the evidence: the broken VM's screenshot and serial log.
        Never fails the run (boot diagnostics may be off, or the source VM unreadable)."""
        source = ids.try_parse(self.source_vm_id, "vm")
        if source:
            from scripts.evidence import bootdiag

            self.result.symptoms = bootdiag.capture_symptoms(
                self.compute, self.container, source.resource_group, source.name, self.prefix,
                out_dir=self.out_dir, folder=self.request.symptoms_folder).to_dict()

    def wait_for_agent(self) -> None:
        with step(f"wait for the agent of rescue VM {self.vm}"), self._bar(f"agent of {self.vm}") as bar:
            text = self.runner.wait_for_agent(self.request.agent_wait_minutes * 60,
                                              on_status=lambda t: bar.update(status=t))
            log.info("    %s", text)

    def run_remote(self) -> Outcome:
        command = RemoteCommand(
            name=self.name, script=remote.render(self.outputs.rescue_os, self.settings),
            parameters=remote_parameters(self.outputs, self.prefix, self.settings), timeout_s=self.timeout_s,
            output_blob_uri=self.result.logs["output"], error_blob_uri=self.result.logs["error"],
            protected_parameters=self.key_parameters())
        with step(f"run the {self.outputs.rescue_os} collect script on {self.vm} (run command {self.name})"), \
                self._bar(f"collect on {self.vm}") as bar:
            outcome = self.runner.run(command, on_status=lambda e: bar.update(status=self._status_text(e)))
        self.result.run_command.update(outcome.to_dict())
        return outcome

    def key_parameters(self) -> dict[str, str]:
        """{"BitLockerKey": base64 of the .BEK file} when the source disk is ADE-encrypted, else {}. A source disk
        that cannot be read is a warning in the log (the script still refuses a locked volume, exit 11); a key that cannot be
        read from Key Vault ends the run (exit 3 naming the vault and the role)."""
        disk_id = self.outputs.source_os_disk_id
        if not disk_id:
            return {}
        try:
            references = ade_key.key_references(disk_id, self.source_vm_id)
        except CrashcartError as err:
            log.warning("    the source disk's encryption settings could not be read (%s): a BitLocker-encrypted "
                        "copy will not be unlocked", err.message)
            return {}
        if not references:
            return {}
        with step("read the BitLocker key (BEK) the disk's encryption settings name from Key Vault"):
            keys = ade_key.read_keys(disk_id, self.source_vm_id, self._credential, **self.keyvault_options)
        self.result.notes.append(f"Azure Disk Encryption: the BitLocker key from Key Vault {references[0].vault_name} "
                                 "was handed to the rescue VM as a protected parameter to unlock the disk copy")
        return {"BitLockerKey": base64.b64encode(keys[0].data).decode("ascii")}

    def _credential(self) -> Any:
        if self.credential is None:
            from scripts.azure.clients import credential

            self.credential = credential()
        return self.credential

    def _status_text(self, execution: Execution) -> str:
        """The state, and the upload's progress from the script's progress lines while it runs."""
        text = execution.state
        line = remote.parse_marked(execution.output, remote.PROGRESS_MARKER)
        if line is None and execution.state == "Running":
            line = remote.parse_marked(self._tail(self.output_blob, 8192), remote.PROGRESS_MARKER)
        if line and line.get("total"):
            name = str(line.get("blob", "")).rsplit("/", 1)[-1]
            done, total = float(line.get("done", 0)), float(line["total"])
            text += f" - {name} {100 * done / total:.0f}% of {_size(total)}"
        return text

    def _tail(self, blob: str, size: int, level: int = logging.DEBUG) -> str:
        """The end of one of the command's log blobs ("" when it cannot be read: the logs are a help, not the result)."""
        try:
            return evidence.read_tail(self.container, blob, size) or ""
        except CrashcartError as err:
            log.log(level, "could not read %s: %s", blob, err.message)
            return ""

    def remote_result(self, execution: Execution) -> dict[str, Any] | None:
        """The script's result line: from the instance view, else from output.log (the view keeps 4 KB only)."""
        found = remote.parse_marked(execution.output, remote.RESULT_MARKER)
        if found is None:
            found = remote.parse_marked(self._tail(self.output_blob, LOG_TAIL_BYTES, logging.WARNING),
                                        remote.RESULT_MARKER)
        error_text = execution.error if execution.error.strip() else self._tail(self.error_blob, 4096)
        self.result.remote_error_tail = error_text[-4096:]
        return found

    def judge(self, execution: Execution, found: dict[str, Any] | None) -> None:
        """The outcome from how the command ended, what the script said, and what the blobs hold."""
        r = self.result
        if found is not None:
            r.notes = [str(n) for n in found.get("notes") or []] + r.notes  # the script's, then the kit's
            r.crash_control = found.get("crash_control")
            r.volume = found.get("volume")
        if execution.state == "TimedOut":
            r.conclude("timed_out", f"the collection did not finish within {self.timeout_s / 60:.0f} min "
                                    f"({execution.message or 'TimedOut'})",
                       "raise repair.collect_timeout_minutes (or --timeout-minutes): a complete dump of a large VM "
                       f"takes long to upload; the partial run's logs are in {self.error_blob}")
            return
        if found is None:
            # No result line (lost output, or the script died): the exit code still says what happened.
            status = remote.REMOTE_EXIT.get(execution.exit_code if execution.exit_code is not None else -1, "error")
            if execution.state == "Succeeded" and status == "collected":
                status = "error"  # a success that did not say what it stored cannot be verified
            # the script's last stderr lines, else what the handler said (it failed before or around the script)
            tail = (" | ".join(r.remote_error_tail.strip().splitlines()[-3:])
                    or (first_line(execution.message)[:300] if execution.message.strip() else ""))
            r.conclude(status, f"the run command ended {execution.state} (exit {execution.exit_code}) without a "
                               "result" + (f": {tail}" if tail else ""),
                       _HINTS.get(status, _HINTS["error"]).format(run=self))
            return
        status = str(found.get("status", "error"))
        r.blobs = verify.verify_files(self.container, list(found.get("files") or []),
                                      full_hash=self.request.full_hash)
        r.conclude(status, str(found.get("message", "")), _HINTS.get(status, "").format(run=self))
        if not r.ok:
            return
        problems = [p for b in r.blobs for p in b.problems]
        if not r.blobs or problems:
            r.conclude("verify_failed",
                       "verification failed: " + ("; ".join(problems) if problems else "no blob was reported"),
                       "the stored blobs are incomplete or not dumps: re-run collect (a new run uploads afresh)")

    def fail_early(self, failure: CrashcartError) -> None:
        """The run ended before the script said anything: the agent never got Ready, or Azure refused the
        command. The status names the step; the exit code keeps the failure's own class (an Azure refusal
        stays AZURE_AUTH, which the operator fixes differently from a failed script)."""
        status = "agent_not_ready" if failure.exit_code == ExitCode.AGENT_NOT_READY else "error"
        self.result.conclude(status, failure.message, failure.hint, cause=failure)

    def write_report(self) -> None:
        report.store(self.result, self.outputs, self.out_dir, self.container, self.prefix)


def _log_summary(result: CollectResult) -> None:
    for blob in result.blobs:
        log.info("    %s %s (%s)%s", "ok " if blob.ok else "BAD", blob.name, _size(blob.size or 0),
                 "" if blob.ok else ": " + "; ".join(blob.problems))
    if result.report_files:
        log.info("report: %s%s", result.report_files.get("markdown"),
                 f" and {result.report_blobs['markdown']}" if result.report_blobs else "")
    if result.ok:
        log.info("collected %d dump(s) under %s/%s/", len(result.dumps), result.container_url, result.run)
