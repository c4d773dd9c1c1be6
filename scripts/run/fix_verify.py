"""`fix --verify`: swap the fixed copy in, start the VM, and decide from evidence whether it boots.

The swap is prepare-dump's (scripts.nodump.swap / rollback): refused up front when the copy cannot take
the OS disk's place, the rollback manifest written locally and to evidence BEFORE the VM is touched, the
rollback registered as an undo action as soon as that manifest is stored. Then the boot is watched:

- a new bugcheck on the serial log (the stop XML EMS writes, or a "STOP:" line) -> crashed: roll back
  (exit 16, CRASHED_AGAIN; scripts.run.fix then collects the dump that crash wrote: scripts.run.fix_dump);
- the VM stopped or deallocated while it should boot -> roll back;
- the guest agent reports Ready in the instance view and, for `settle_s` after that, no bugcheck -> booted:
  the fixed disk stays, the original OS disk is kept (unattached) for `pipenv run rollback`;
- none of these within `timeout_s` -> roll back (a VM that hangs at boot is not fixed).

The boot diagnostics screenshot and serial log after the boot go to evidence (`bootdiag/after-fix/`).
Whatever happens after the manifest is stored - an Azure error, Ctrl-C (deferred until the original disk
is back, scripts.base.signals) - the VM ends on its original OS disk unless the boot was proven.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.azure import ids
from scripts.azure.errors import azure_call
from scripts.azure.poll import poll
from scripts.azure.runcommand import agent_status
from scripts.base.console import Progress, step
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.stop import StopRequest
from scripts.config.stackoutputs import RepairOutputs
from scripts.evidence import bootdiag
from scripts.nodump import rollback, swap

log = logging.getLogger("crashcart.fix")


@dataclass
class BootOptions:
    timeout_s: float = 20 * 60
    settle_s: float = 120.0  # after the agent is Ready, how long the serial log must stay free of a stop
    poll_s: float = 15.0
    leave_stopped: bool = False  # after a rollback: do not start the VM on its original disk again


@dataclass
class BootVerdict:
    booted: bool
    reason: str  # agent-ready | bugcheck | stopped | timeout
    seconds: float
    bugcheck: dict[str, Any] | None = None
    agent: str = ""
    polls: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"booted": self.booted, "reason": self.reason, "seconds": round(self.seconds, 1),
                "bugcheck": self.bugcheck, "agent": self.agent, "polls": self.polls}


@dataclass
class VerifyOutcome:
    manifest: rollback.RollbackManifest
    verdict: BootVerdict | None = None
    symptoms: bootdiag.Symptoms | None = None
    restore: rollback.RestoreResult | None = None
    kept: bool = False
    error: str = ""
    steps: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kept_fixed_disk": self.kept, "verdict": self.verdict.to_dict() if self.verdict else None,
                "rollback_manifest": self.manifest.local_path, "rollback_manifest_blob": self.manifest.evidence_blob,
                "state": self.manifest.state, "symptoms_after_boot": self.symptoms.to_dict() if self.symptoms else None,
                "rollback": self.restore.to_dict() if self.restore else None, "error": self.error}


# how a boot that did not prove itself ends: a new bugcheck has its own code (the copy crashed again), a boot that
# never got the agent Ready is a timeout, a VM that stopped by itself is a failed verification
EXIT_FOR = {"bugcheck": ExitCode.CRASHED_AGAIN, "timeout": ExitCode.TIMED_OUT, "stopped": ExitCode.VERIFY_FAILED}


class NotBooted(CrashcartError):
    """The fixed copy did not boot (or the run failed); the VM is back on its original disk unless the
    message says ROLLBACK FAILED. `outcome` says how far it got."""

    def __init__(self, message: str, hint: str, exit_code: ExitCode, outcome: VerifyOutcome):
        super().__init__(message, hint, exit_code)
        self.outcome = outcome


class _NoVerdict(Exception):
    """The watch reached its timeout."""


def watch_boot(compute: Any, vm: ids.ResourceId, *, baseline: str, options: BootOptions,
               on_poll: Callable[[str], None] | None = None, stop: StopRequest | None = None) -> BootVerdict:
    """Polls serial log, power state and guest agent until the boot is proven or disproven, or the timeout."""
    started = time.monotonic()
    verdict = BootVerdict(booted=False, reason="timeout", seconds=0.0)
    ready_since: list[float] = []

    def probe() -> BootVerdict | None:
        verdict.polls += 1
        elapsed = time.monotonic() - started
        found = bootdiag.serial_bugcheck(swap.new_text(baseline, swap.serial_log(compute, vm)))
        if found:
            verdict.reason, verdict.bugcheck = "bugcheck", found
            return verdict
        state = swap.power_state(compute, vm)
        if state in ("stopped", "deallocated"):
            verdict.reason = "stopped"
            return verdict
        ready, verdict.agent = azure_call(lambda: agent_status(compute, vm.resource_group, vm.name),
                                          f"VM {vm.name}", doing=f"read the instance view of VM {vm.name}")
        if on_poll:
            on_poll(f"{state}, {elapsed:.0f}s, {verdict.agent}")
        if not ready:
            ready_since.clear()
            return None
        if not ready_since:
            ready_since.append(elapsed)
            log.info("    the guest agent is Ready after %.0fs; watching the serial log for %.0fs more",
                     elapsed, options.settle_s)
        if elapsed - ready_since[0] >= options.settle_s:
            verdict.booted, verdict.reason = True, "agent-ready"
            return verdict
        return None

    try:
        poll(probe, timeout_s=options.timeout_s, interval_s=options.poll_s, jitter=0.0, stop=stop,
             on_timeout=_NoVerdict)
    except _NoVerdict:
        pass  # the verdict says "timeout"
    verdict.seconds = time.monotonic() - started
    return verdict


def verify_boot(compute: Any, container: Any, outputs: RepairOutputs, *, prefix: str, out_dir: Path,
                options: BootOptions, stop: StopRequest | None = None) -> VerifyOutcome:
    """Swap the fixed copy in, watch the boot, keep it or roll back (see the module doc). Raises NotBooted
    unless the boot was proven; then the VM runs on the fixed copy."""
    vm = ids.require(outputs.source_vm_id, "vm", swap.OUTPUTS_HINT)
    with step("check that the fixed copy can take the OS disk's place"):
        swap.preflight(compute, outputs)
    manifest = rollback.RollbackManifest.for_swap(outputs, power_state_before=swap.power_state(compute, vm),
                                                  run=prefix, out_dir=out_dir)
    with step("write the rollback manifest (locally and in evidence) before touching the VM"):
        rollback.save(manifest, container, require_evidence=True)
        log.info("    %s and %s", manifest.local_path, manifest.evidence_blob)
    outcome = VerifyOutcome(manifest=manifest)
    baseline = swap.serial_log(compute, vm)
    try:
        with contextlib.ExitStack() as undo:
            undo.push(rollback.undo_on_exit(compute, container, outcome, run="the verified boot", copy="fixed copy",
                                            failed=NotBooted, leave_stopped=options.leave_stopped,
                                            poll_s=options.poll_s, keep=lambda: outcome.kept))
            with step(f"swap the fixed copy in as {vm.name}'s OS disk and start it"):
                rollback.swap_in(compute, manifest, container, poll_s=options.poll_s)
            with step(f"watch {vm.name} boot (serial log, guest agent; up to {options.timeout_s / 60:.0f} min)"), \
                    Progress(vm.name, every=60) as bar:
                outcome.verdict = watch_boot(compute, vm, baseline=baseline, options=options, stop=stop,
                                             on_poll=lambda text: bar.update(status=text))
            outcome.symptoms = bootdiag.capture_symptoms(compute, container, vm.resource_group, vm.name, prefix,
                                                         out_dir=out_dir, folder="bootdiag/after-fix")
            outcome.kept = outcome.verdict.booted
    except NotBooted:
        raise
    except CrashcartError as err:
        raise NotBooted(f"{err.message} (rolled back: {vm.name} is on its original OS disk again)", err.hint,
                        err.exit_code, outcome) from None
    verdict = outcome.verdict
    if not outcome.kept:
        why = {"bugcheck": f"it crashed again (stop {(verdict.bugcheck or {}).get('code')})",
               "stopped": "it stopped while booting",
               "timeout": f"the guest agent did not report Ready within {options.timeout_s / 60:.0f} min"}[verdict.reason]
        outcome.error = f"the fixed copy did not boot {vm.name}: {why}; rolled back to the original OS disk"
        raise NotBooted(outcome.error, "the fix manifest records what was changed on the copy (now back on the "
                        "rescue VM): try another recipe (`pipenv run fix ...`), or `pipenv run fix rollback` to undo it; "
                        f"the serial log and screenshot are in evidence under {prefix}/bootdiag/after-fix/",
                        EXIT_FOR[verdict.reason], outcome)
    manifest.mark("kept", "the fixed copy booted: it stays the OS disk")
    rollback.save(manifest, container, require_evidence=False)
    log.info("    %s booted on the fixed copy (guest agent Ready, no stop for %.0fs): kept", vm.name, options.settle_s)
    return outcome
