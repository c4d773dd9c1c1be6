"""`prepare-dump`: no MEMORY.DMP on the disk — make the VM write one, trigger it, collect it, roll back.

Microsoft's article ends with "if you cannot find Memory.dmp, generate one with an NMI": configure the
crash dump on the disk, boot it, make it crash (or send a non-maskable interrupt from the serial
console), and collect the dump. By hand that is a dozen steps across RDP, regedit, bcdedit, the
portal and the serial console; here it is one command, after `cdktf deploy repair`:

    pipenv run prepare-dump                      # symptoms + prepare the disk copy (nothing else changes)
    pipenv run prepare-dump --swap               # ... then swap it in, trigger, collect, roll back

1. Symptoms: the broken VM's boot diagnostics screenshot and serial log go to evidence
   (`<vm key>/<stamp>/bootdiag/`, scripts.evidence.bootdiag; the key: scripts.azure.identity.vm_key) — every run.
2. Prepare the disk copy only (scripts.nodump.prepare). Old and new values:
   `<vm key>/<stamp>/prepare/manifest.json`.
3. `--swap` (the only write crashcart ever makes to the source VM, scripts.nodump.swap): refused when the
   copy cannot boot the VM (generation, security type, controller, region/zone); otherwise the rollback
   manifest is written locally and to evidence FIRST, then: stop + deallocate the VM, detach the copy
   from the rescue VM, make it the VM's OS disk, start, wait for the bugcheck on the serial log (after
   `--nmi-after-minutes` without one: send the NMI with `--send-nmi`, or print the exact
   `az serial-console send nmi` command), give Windows `--dump-wait-minutes` to write the dump, capture
   the stop screen. The rollback (scripts.nodump.rollback.restore: original disk back, copy back on the
   rescue VM at its LUN, VM started again if it was running) is the undo action registered as soon as
   the manifest is stored: it runs whatever happened after, Ctrl-C included, and no further Ctrl-C or
   SIGTERM cuts it short (scripts.base.signals.deferred: they act once the original disk is back).
4. Collect the new dump from the copy through the normal path (the rescue-vm collector), into the
   same run folder.

Exit codes: 0 done (prepared; or dump collected), 2 usage or swap refused, 11 disk copy not found on the
rescue VM, 12 the remote preparation failed or was refused (nothing written), 13/14 timeouts, 10/15 from
the collection, 3-5 Azure errors. A failed rollback says so and prints the `pipenv run rollback` command.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.azure.clients import AzureClients
from scripts.azure import ids
from scripts.base.console import Progress, step
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.stop import StopRequest
from scripts.collection.contract import (DEFAULT_TIMEOUT_MINUTES, OUT_DIR, CollectError, CollectRequest, run_prefix,
                                         run_stamp)
from scripts.collection.rescue_vm import RescueVmCollector
from scripts.config.model import Config
from scripts.config.stackoutputs import RepairOutputs
from scripts.evidence import blobs as evidence
from scripts.evidence import bootdiag
from scripts.nodump import prepare, rollback, swap

log = logging.getLogger("crashcart.prepare")


@dataclass
class TriggerOptions:
    """How the swapped run waits for the crash, and how it ends."""

    timeout_s: float = 30 * 60
    nmi_after_s: float | None = 10 * 60
    auto_nmi: bool = False
    dump_wait_s: float = 180.0
    poll_s: float = 15.0
    leave_stopped: bool = False


@dataclass(frozen=True)
class PrepareDumpRequest:
    """One `prepare-dump`: what to write on the copy and, with `trigger`, the swapped run after it."""

    config: Config
    outputs: RepairOutputs
    settings: prepare.PrepareSettings
    timing: prepare.Timing = field(default_factory=prepare.Timing)  # the prepare run command
    dry_run: bool = False  # inspect only: show what would change, write nothing
    trigger: TriggerOptions | None = None  # None: prepare only, the source VM is not touched
    collect: bool = True  # after the swapped run
    collect_timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES
    out_dir: Path = OUT_DIR
    now: dt.datetime | None = None
    stop: StopRequest | None = None


@dataclass
class VerbReport:
    """A verb's JSON document, its exit code and the error to tell (None when it went well): prepare-dump
    (also --live) and fix."""

    document: dict[str, Any]
    exit_code: ExitCode = ExitCode.OK
    error: CrashcartError | None = None


PrepareDumpReport = VerbReport


def require_rescue_script(outputs: RepairOutputs, templates: dict[str, str]) -> None:
    """Refuses a repair stack whose rescue OS has no script in `templates` (prepare-dump's, fix's)."""
    if outputs.rescue_os not in templates:
        raise CrashcartError(f"the repair stack's rescue_os is {outputs.rescue_os!r}", "redeploy the repair stack",
                             ExitCode.USAGE)


@dataclass
class SwapOutcome:
    manifest: rollback.RollbackManifest
    check: dict[str, Any] = field(default_factory=dict)
    watch: swap.CrashWatch | None = None
    symptoms_after: bootdiag.Symptoms | None = None
    restore: rollback.RestoreResult | None = None
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": self.manifest.local_path, "manifest_blob": self.manifest.evidence_blob,
                "state": self.manifest.state, "check": self.check,
                "watch": self.watch.to_dict() if self.watch else None,
                "symptoms_after_crash": self.symptoms_after.to_dict() if self.symptoms_after else None,
                "rollback": self.restore.to_dict() if self.restore else None, "error": self.error}


class SwapFailed(CrashcartError):
    """The swapped run failed; `outcome` says how far it got and whether the rollback worked."""

    def __init__(self, message: str, hint: str, exit_code: ExitCode, outcome: SwapOutcome):
        super().__init__(message, hint, exit_code)
        self.outcome = outcome


# ---- the swapped run ------------------------------------------------------------------------------------------
def swap_trigger_restore(compute: Any, container: Any, outputs: RepairOutputs, *, prefix: str, out_dir: Path,
                         check: swap.SwapCheck, options: TriggerOptions,
                         stop: StopRequest | None = None) -> SwapOutcome:
    """Stop, swap in the copy, start, wait for the crash, capture the stop screen — then always put the
    original back (an undo action, registered once the manifest that makes it possible is stored)."""
    vm = ids.require(outputs.source_vm_id, "vm", swap.OUTPUTS_HINT)
    manifest = rollback.RollbackManifest.for_swap(outputs, power_state_before=swap.power_state(compute, vm),
                                                  run=prefix, out_dir=out_dir)
    with step("write the rollback manifest (locally and in evidence) before touching the VM"):
        rollback.save(manifest, container, require_evidence=True)
        log.info("    %s and %s", manifest.local_path, manifest.evidence_blob)
    outcome = SwapOutcome(manifest=manifest, check=check.facts)
    baseline = swap.serial_log(compute, vm)  # none: any stop in the log after the swap counts
    try:
        with contextlib.ExitStack() as undo:
            undo.push(rollback.undo_on_exit(compute, container, outcome, run="the swapped run", copy="prepared copy",
                                            failed=SwapFailed, leave_stopped=options.leave_stopped,
                                            poll_s=options.poll_s))
            with step(f"swap the prepared copy in as {vm.name}'s OS disk"):
                rollback.swap_in(compute, manifest, container, poll_s=options.poll_s)
            with step(f"wait for {vm.name} to crash (serial log)"), Progress(f"{vm.name}", every=60) as bar:
                outcome.watch = swap.wait_for_crash(
                    compute, vm, baseline=baseline, timeout_s=options.timeout_s, poll_s=options.poll_s,
                    nmi_after_s=options.nmi_after_s, auto_nmi=options.auto_nmi,
                    on_poll=lambda text: bar.update(status=text), stop=stop)
            watch = outcome.watch
            if watch.crashed:
                log.info("    stop %s after %.0fs; giving Windows %.0fs to write the dump",
                         (watch.bugcheck or {}).get("code"), watch.seconds, options.dump_wait_s)
                swap.wait_for_dump(options.dump_wait_s, poll_s=options.poll_s, stop=stop)
            else:
                log.warning("    no crash seen on the serial log (%s after %.0fs): collecting anyway", watch.reason,
                            watch.seconds)
            outcome.symptoms_after = bootdiag.capture_symptoms(compute, container, vm.resource_group, vm.name, prefix,
                                                               out_dir=out_dir, folder="bootdiag/after-crash")
    except SwapFailed:
        raise
    except CrashcartError as err:
        raise SwapFailed(f"{err.message} (rolled back: {vm.name} is on its original OS disk again)", err.hint,
                         err.exit_code, outcome) from None
    return outcome


# ---- the verb's flow ------------------------------------------------------------------------------------------
def prepare_dump(request: PrepareDumpRequest) -> PrepareDumpReport:
    """Symptoms, prepare the copy, and with `request.trigger` the swapped run and the collection."""
    return _PrepareDump(request).run()


class _PrepareDump:
    """One prepare-dump run: the names, clients and JSON document its steps share."""

    def __init__(self, request: PrepareDumpRequest):
        outputs = request.outputs
        require_rescue_script(outputs, prepare.TEMPLATES)
        self.request, self.outputs = request, outputs
        self.vm = ids.require(outputs.source_vm_id, "vm", swap.OUTPUTS_HINT)
        self.now = request.now or dt.datetime.now(dt.timezone.utc)
        self.stamp = run_stamp(self.now)
        self.prefix = run_prefix(self.vm.id, self.stamp)  # <vm key>/<stamp>: the rescue VM may write only there
        self.out_dir = request.out_dir / self.prefix
        self.compute = AzureClients(outputs.subscription_id).compute
        self.container = evidence.container_client(outputs.evidence_blob_endpoint, outputs.evidence_container)
        self.document: dict[str, Any] = {
            "run": self.prefix, "vm_id": self.vm.id, "dump_type": request.settings.dump_type_name,
            "settings": request.settings.parameters(run_id=self.stamp, mode="prepare", disk_lun=None)}

    def run(self) -> PrepareDumpReport:
        request, document = self.request, self.document
        with step(f"capture {self.vm.name}'s boot diagnostics (symptoms)"):
            document["symptoms"] = bootdiag.capture_symptoms(self.compute, self.container, self.vm.resource_group,
                                                             self.vm.name, self.prefix, out_dir=self.out_dir).to_dict()
        check = None
        if request.trigger is not None:
            with step("check that the disk copy can take the OS disk's place"):
                check = swap.preflight(self.compute, self.outputs)
        try:
            found = prepare.prepare_disk(self.compute, self.container, self.outputs, request.settings,
                                         prefix=self.prefix, run_id=self.stamp, inspect=request.dry_run,
                                         timing=request.timing, stop=request.stop)
        except prepare.PrepareFailed as err:
            document.update(status="not_prepared", prepare=err.remote_result, error=err.message, hint=err.hint)
            self.write("manifest.json", "prepare-manifest.json", document)
            return PrepareDumpReport(document, err.exit_code, err)
        document["prepare"] = found
        for change in prepare.changed_values(found):
            log.info("    %s %s\\%s: %s -> %s", change.get("store"), change.get("key"), change.get("name"),
                     prepare.shown(change.get("old")), prepare.shown(change.get("new")))
        document["manifest"] = self.write("manifest.json", "prepare-manifest.json",
                                          {**document, "status": found.get("status")})
        if request.trigger is None:
            document["status"] = found.get("status")
            document["next"] = "pipenv run prepare-dump --swap" if not request.dry_run else "pipenv run prepare-dump"
            log.info("next: `%s` swaps the prepared copy in, triggers the crash, collects the dump and rolls back",
                     "pipenv run prepare-dump --swap")
            return PrepareDumpReport(document)
        assert check is not None
        return self.swapped_run(check, request.trigger)

    def swapped_run(self, check: swap.SwapCheck, options: TriggerOptions) -> PrepareDumpReport:
        document = self.document
        try:
            outcome = swap_trigger_restore(self.compute, self.container, self.outputs, prefix=self.prefix,
                                           out_dir=self.out_dir, check=check, options=options, stop=self.request.stop)
        except SwapFailed as err:
            document.update(status="failed", swap=err.outcome.to_dict(), error=err.message, hint=err.hint)
            self.write("report.json", "prepare-report.json", document)
            return PrepareDumpReport(document, err.exit_code, err)
        document["swap"] = outcome.to_dict()
        report = PrepareDumpReport(document)
        if self.request.collect:
            with step("collect the new dump from the disk copy"):
                try:
                    document["collect"] = self.collect().to_dict()
                except CollectError as err:
                    document["collect"] = err.result.to_dict() if err.result is not None else None
                    document.update(error=err.message, hint=err.hint)
                    report.exit_code, report.error = err.exit_code, err
        document["status"] = ("swapped" if not self.request.collect
                              else "collected" if report.exit_code == ExitCode.OK else "not_collected")
        self.write("report.json", "prepare-report.json", document)
        return report

    def collect(self) -> Any:
        """The dump the crash wrote on the copy, now back on the rescue VM: the normal collection, with this
        run's clock, so it lands in the same run folder."""
        request = self.request
        return RescueVmCollector().collect(CollectRequest(
            outputs=self.outputs, config=request.config, timeout_minutes=request.collect_timeout_minutes,
            agent_wait_minutes=request.timing.agent_wait_s / 60, poll_seconds=request.timing.poll_s,
            out_dir=request.out_dir, now=self.now, stop=request.stop))

    def write(self, blob_name: str, file_name: str, document: dict[str, Any]) -> str:
        """The document in the run folder and in evidence (`<prefix>/prepare/<blob_name>`); a failed upload
        is told, not fatal: the local copy stands."""
        text = json.dumps(document, indent=2, sort_keys=True, default=str)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / file_name
        path.write_text(text + "\n", encoding="utf-8")
        blob = f"{self.prefix}/prepare/{blob_name}"
        try:
            evidence.upload_text(self.container, blob, text, "application/json")
        except CrashcartError as err:
            log.warning("%s could not be stored in evidence: %s (kept in %s)", blob, err.message, path)
        return str(path)
