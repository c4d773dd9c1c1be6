"""repair-run: the whole job in one unattended command, with the teardown guaranteed.

    discover (no config yet) -> synth -> load config -> deploy evidence (when absent) -> lock the VM
    -> leftovers of an earlier run? -> deploy repair -> outputs -> collect -> [--fix: fix, verify the boot]
    -> destroy repair (always; not after a verified fix, whose disk the stack owns) -> release the lock -> report

This module owns that order and nothing else; every step is a call into a module that does the work
(preflight, synth, terraform, stackoutputs, the collection strategies, teardown), each of which a
person can also run alone. Terraform runs on cdktf.out/stacks/* exactly as a person would run it.

What "guaranteed" means here. Once the repair stack may exist (an earlier run left resources in its
state, or its apply is about to start), a `RepairTeardown` is registered on the run's ExitStack, so
the run ends by destroying it whatever happened: a failed step, a bug, SIGINT, SIGTERM or the
--timeout deadline (scripts.run.stop). `--keep` pops it off the stack and says how to do it later. The
evidence stack is never destroyed: the Terraform layer has no way to (scripts.run.terraform).

Everything a run keeps per VM is keyed by scripts.azure.identity.vm_key (the VM's name and a hash of its
resource ID): the repair stack's state (synth writes it so; `check_repair_stack_is_for` refuses stacks
synthesized for another VM), the lock, the report folder. One run per VM at a time: the lock is a lease
on `locks/<vm_key>` in the evidence container (scripts.run.lock). That is why the evidence stack is
ensured *before* the leftovers are looked at: the lock lives in it, and whatever a run does to a VM's
repair stack - resume it, destroy it - happens under the lock. (A repair stack cannot exist without the
evidence stack: it reads the evidence state's outputs.) One run per project folder too: runs there share
cdktf.out (scripts.run.lock.FolderLock).

A re-run after a crash finds what the last one left in the repair stack's state (local files, or an
azurerm blob in pipelines). With `--on-leftovers resume` (default) the run applies the stack again
(Terraform completes whatever is missing) and collects; with `destroy` it removes the leftovers first.
`--cleanup` only removes them. A stack kept under the old, per-folder naming is refused with the
commands to handle it (scripts.run.oldstate). Exit codes: scripts.base.errors, README "Exit codes".

The evidence stack's outputs (its container: the lock's place) are read once per run: by the deploy step
(`terraform init` + `output`; once more only after deploying it), or by --cleanup's lock step. A VM's run
under `fleet run` reads none: the fleet read them once and hands them down (`--evidence-outputs FILE`,
scripts.run.outputs.HandedEvidence, checked to be this project's evidence state, and after the repair
apply against the evidence outputs the repair stack read); the fleet requires a deployed evidence stack,
so such a run never deploys it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from scripts.azure.identity import vm_key
from scripts.base import signals
from scripts.base.console import log, report_error, step
from scripts.base.errors import CrashcartError
from scripts.base.stop import StopRun
from scripts.config.model import Config
from scripts.config.stackoutputs import EvidenceOutputs, RepairOutputs
from scripts.run import deploy, oldstate, preflight, preflight_run
from scripts.run.collect import collect
from scripts.run.credential import RescueCredential
from scripts.run.lock import FolderLock, VmLock, now
from scripts.run.outputs import HandedEvidence, evidence_state
from scripts.run.result import RunOutcome, RunResult
from scripts.run.settings import DEPLOY_ALLOWANCE_MINUTES, RunSettings, minutes
from scripts.run.stop import StopGuard
from scripts.run.synth import synth
from scripts.run.teardown import RepairTeardown
from scripts.run.terraform import EvidenceStackDir, RepairStackDir

T = TypeVar("T")


class RepairRun:
    """One run: the steps in order, each recorded in the result; the teardown as the undo action."""

    def __init__(self, settings: RunSettings, stop: StopGuard, evidence_file: Path | None = None):
        self.settings = settings
        self.evidence_file = evidence_file  # --evidence-outputs: handed down by `fleet run`
        self.stop = stop
        self.run_id = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
        self.result = RunResult(self.run_id, now(), "cleanup" if settings.cleanup_only else "repair")
        self.folder_lock = FolderLock(settings.stacks_dir.parent, self.run_id)
        self.lock: VmLock | None = None  # taken once the evidence stack exists
        self.evidence = EvidenceStackDir(settings.stacks_dir, stop)
        self.repair = RepairStackDir(settings.stacks_dir, stop)
        self.undo = contextlib.ExitStack()
        self.config: Config | None = None
        self.credential: RescueCredential | None = None
        self.teardown: RepairTeardown | None = None  # registered on `undo` once the repair stack may exist
        self.evidence_outputs: EvidenceOutputs | None = None  # read once per run (or handed down)
        self.handed: HandedEvidence | None = None

    # The order, in one place.
    def steps(self) -> None:
        self._step("config", lambda: preflight.ensure_config_file(self.settings))
        if not self.settings.cleanup_only and preflight_run.strategy_left_to_preflight(self.settings.config_path):
            self._step("preflight", self.choose_strategy)
        if not self.settings.skip_synth:
            self._step("synth", self.synth)
        config = self._step("load config", self.load_config)
        if self.evidence_file is not None:
            self._step("evidence outputs", self.take_handed_evidence)
        elif not self.settings.cleanup_only:
            self._step("deploy evidence", self.ensure_evidence)
        self._step("lock", self.take_lock)
        self._step("find leftovers", self.find_leftovers)
        if self.settings.cleanup_only:
            return
        self._step("deploy repair", self.deploy_repair)
        outputs = self._step("read outputs", self.read_outputs)
        self._step("collect", lambda: collect(outputs, config, self.settings, self.stop, self.result))
        if self.settings.fix:
            self._step("fix", lambda: self.fix_and_verify(outputs))

    def execute(self) -> RunOutcome:
        """Runs the steps, then the undo actions (the teardown, the lock's release), then the report."""
        error: CrashcartError | None = None
        bug: Exception | None = None
        stopped: str | None = None  # a signal after the last step, or during the teardown, changes nothing
        try:
            try:
                self.folder_lock.claim()
                self.steps()
            except StopRun:
                stopped = self.stop.reason
            except CrashcartError as err:
                error, stopped = err, self.stop.reason
            except Exception as exc:  # a bug: still tear down first, then let it surface as one
                bug, stopped = exc, self.stop.reason
            if self.teardown is not None and self.settings.keeps_stack:
                self.teardown.kept()
            # A second Ctrl-C (or SIGTERM) waits until the teardown and the release are done.
            with signals.deferred("the teardown"):
                self.stop.finishing = True
                self.undo.close()
            return self.finish(error, bug, stopped)
        finally:
            self.folder_lock.release()

    def owe_teardown(self) -> None:
        """From here on the repair stack may exist: the run ends by tearing it down. Registered once, by
        whichever comes first: leftovers found, or the repair apply about to start."""
        if self.teardown is not None:
            return
        assert self.config is not None and self.credential is not None
        self.teardown = RepairTeardown(
            self.repair, self.config, self.credential, out_dir=self.settings.out_dir,
            attempts=self.settings.teardown_attempts, retry_seconds=self.settings.teardown_retry_seconds,
            record=self.result.repair_stack, on_phase=self._phase)
        self.undo.callback(self.teardown)
        self.result.repair_stack["touched"] = True

    def _phase(self, name: str) -> None:
        if self.lock is not None:
            self.lock.phase(name)

    def _step(self, name: str, func: Callable[[], T]) -> T:
        self.stop.check()
        if self.lock is not None:
            self.lock.check()
        self._phase(name)
        record: dict[str, Any] = {"name": name, "status": "running"}
        self.result.steps.append(record)
        started = time.monotonic()
        try:
            with step(name):
                value = func()
            record["status"] = "ok"
            return value
        except BaseException as exc:
            record["status"] = "stopped" if self.stop.reason else "failed"
            if isinstance(exc, CrashcartError):
                record["error"] = exc.message
            raise
        finally:
            record["seconds"] = round(time.monotonic() - started, 1)

    # ---- steps ------------------------------------------------------------------------------------------
    def choose_strategy(self) -> None:
        """Preflight picks the strategy (snapshot-export when allowed, else rescue-vm) unless one is forced;
        a blocker stops the run here, before anything exists (scripts.run.preflight_run)."""
        self.result.steps[-1].update(preflight_run.choose_for_run(self.settings.config_path))

    def fix_and_verify(self, outputs: RepairOutputs) -> None:
        """--fix: the recipe on the copy, the swap, the boot watched (scripts.run.repair_fix). Booted: the stack
        stays on purpose (the fixed disk is in it); else the original disk is back and the run fails."""
        from scripts.run import fix_verify, repair_fix

        settings = self.settings
        options = fix_verify.BootOptions(
            timeout_s=settings.fix_boot_timeout_seconds, settle_s=settings.fix_settle_seconds,
            poll_s=max(0.01, settings.poll_seconds) if settings.poll_seconds is not None else 15.0)
        collect_doc = self.result.collect if isinstance(self.result.collect, dict) else None
        report = repair_fix.fix_and_verify(settings.fix, outputs, collect_doc, out_dir=settings.out_dir,
                                           options=options, stop=self.stop)
        self.result.fix = report.document
        if report.error is not None:
            raise report.error
        assert self.teardown is not None
        self.result.next = self.teardown.kept_for_fix(str((report.document.get("verify") or {}).get(
            "rollback_manifest") or report.document.get("manifest")))

    def synth(self) -> None:
        synth(self.settings.project_dir, self.settings.config_path, stop=self.stop)
        for stack in (self.evidence, self.repair):
            stack.synthesized()  # raises if a stack folder is missing

    def load_config(self) -> Config:
        self.config = preflight.load_config(self.settings, (self.evidence, self.repair))
        self.result.vm = {"id": self.config.source.vm_id, "key": vm_key(self.config.source.vm_id)}
        preflight.check_repair_stack_is_for(self.config, self.repair)
        if self.stop.deadline_seconds is None:
            allowed = (self.config.repair.collect_timeout_minutes + DEPLOY_ALLOWANCE_MINUTES) * 60.0
            self.stop.arm(allowed)
            log.info("    deadline: %s (repair.collect_timeout_minutes + %dm; --timeout sets another)",
                     minutes(allowed), DEPLOY_ALLOWANCE_MINUTES)
        self.credential = preflight.rescue_credential(self.config, self.repair)
        return self.config

    def ensure_evidence(self) -> None:
        values, deployed = deploy.ensure_evidence(self.evidence)
        self.result.evidence_stack["deployed_by_this_run"] = deployed
        self.evidence_outputs = EvidenceOutputs.from_values(values)

    def take_handed_evidence(self) -> None:
        """--evidence-outputs: the evidence outputs the fleet read, instead of reading the evidence state."""
        assert self.evidence_file is not None
        self.handed = HandedEvidence.load(self.evidence_file, self.evidence)
        self.evidence_outputs = self.handed.outputs
        self.result.evidence_stack["outputs_from"] = str(self.evidence_file)
        log.info("    the evidence outputs handed down by the fleet: container %s (%s)",
                 self.evidence_outputs.container_name, self.evidence_file)

    def take_lock(self) -> None:
        """The VM's lock, in the evidence container; released after the teardown (undo action). --cleanup
        deploys nothing: without an evidence stack there is no repair stack to clean up either."""
        assert self.config is not None
        if self.evidence_outputs is None:  # --cleanup: the deploy step did not run
            values, missing = evidence_state(self.evidence)
            if missing:
                log.warning("    the evidence stack is not deployed, so no lock can be taken; without it no repair "
                            "stack can have been deployed either: looking anyway")
                return
            self.evidence_outputs = EvidenceOutputs.from_values(values)
        from scripts.evidence.blobs import container_client

        evidence = self.evidence_outputs
        lock = VmLock(container_client(evidence.blob_endpoint, evidence.container_name), self.config.source.vm_id,
                      self.run_id, lease_seconds=self.settings.lock_lease_seconds, stop=self.stop)
        lock.acquire()
        self.lock = lock
        self.undo.callback(self.release_lock)  # before any teardown is registered: it runs after it
        self.result.lock = {"blob": lock.name, "previous": dict(vars(lock.previous)) if lock.previous else None}

    def release_lock(self) -> None:
        assert self.lock is not None
        failed = self.teardown is not None and self.teardown.error is not None
        self.lock.release("teardown_failed" if failed else "kept" if self.result.repair_stack["kept"] else "released")

    def find_leftovers(self) -> None:
        """What an earlier run left in the repair stack's state (and under the old naming), and what to do."""
        assert self.config is not None
        oldstate.refuse_old_stacks(self.config, self.repair)
        self.repair.init()
        leftovers = self.repair.resources()
        self.result.repair_stack["leftovers_found"] = leftovers
        if not leftovers:
            if self.settings.cleanup_only:
                log.info("    the repair stack holds nothing: nothing to clean up")
            return
        self.owe_teardown()
        log.warning("    an earlier run left %d resource(s) of the repair stack: %s", len(leftovers),
                    ", ".join(leftovers))
        if self.settings.cleanup_only:
            return  # the teardown removes them
        if self.settings.on_leftovers == "resume":
            log.info("    --on-leftovers resume: the apply below completes the stack and the collection runs again")
            return
        log.info("    --on-leftovers destroy: removing them before starting again")
        assert self.teardown is not None
        error = self.teardown.destroy()
        if error is not None:
            raise error
        self.result.repair_stack["destroyed"] = False  # this run deploys it again

    def deploy_repair(self) -> None:
        assert self.credential is not None
        self.owe_teardown()
        deploy.deploy_repair(self.repair, self.credential)

    def read_outputs(self) -> RepairOutputs:
        outputs = deploy.read_outputs(self.settings.stacks_dir)
        self.result.outputs = dataclasses.asdict(outputs)
        if self.handed is not None:
            assert self.evidence_file is not None
            self.handed.check_against(outputs, self.evidence_file)
        return outputs

    # ---- the end ----------------------------------------------------------------------------------------
    def finish(self, error: CrashcartError | None, bug: Exception | None, stopped: str | None) -> RunOutcome:
        """Picks the exit code, writes the report, tells the operator how it ended."""
        teardown_error = self.teardown.error if self.teardown is not None else None
        told = self.result.conclude(error=error, teardown_error=teardown_error, bug=bug, stopped=stopped,
                                    is_deadline=self.stop.is_deadline, cleanup_only=self.settings.cleanup_only)
        self.result.write(self.settings.out_dir)
        if told is not None:
            report_error(told)
        elif self.result.status == "succeeded":
            log.info("repair-run %s: done%s", self.run_id, self.result.aftermath())
        elif self.result.status == "fixed":
            log.info("repair-run %s: the VM is fixed and booted%s\nnext: %s", self.run_id, self.result.aftermath(),
                     self.result.next)
        elif self.result.status == "cleaned_up":
            log.info("repair-run --cleanup: %s%s", "the leftovers are destroyed" if self.teardown is not None
                     else "nothing was left", self.result.aftermath())
        return RunOutcome(self.result.exit_code, self.result.to_dict(), bug)
