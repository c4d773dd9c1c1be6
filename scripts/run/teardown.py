"""The undo action of a repair run: what ending the run owes a repair stack that may exist.

RepairRun registers a `RepairTeardown` on its ExitStack the moment the repair stack may exist (an
earlier run's leftovers were found, or the repair apply is about to start), so the run ends with it
whatever happened: a failed step, a bug, a signal or the deadline. The ExitStack is closed inside
scripts.base.signals.deferred, so no signal stops it (only SIGKILL; the next run, `--cleanup` or `sweep`
then finish the job). `--keep` turns it off and `kept()` says how to remove the stack later.

In order: put a swapped source VM back on its original OS disk (an unfinished `prepare-dump --swap`
leaves the VM booting from the disk copy this stack owns), `terraform apply -destroy` (retried), and
`terraform state list` to prove nothing is left; then the local state file and its .backup are deleted
(they held the rescue VM's admin password). The evidence stack is never part of it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.azure.identity import vm_key
from scripts.azure.poll import poll
from scripts.base.console import log, step
from scripts.base.errors import CrashcartError, ExitCode, first_line
from scripts.config.model import Config
from scripts.run.credential import RescueCredential
from scripts.run.terraform import RepairStackDir


class RepairTeardown:
    """Restore a swapped source, destroy the repair stack, check its state; what happened goes into
    `record` (the result's repair_stack) and `error` (None: nothing is left)."""

    def __init__(self, repair: RepairStackDir, config: Config, credential: RescueCredential, *, out_dir: Path,
                 attempts: int, retry_seconds: float, record: dict[str, Any],
                 on_phase: Callable[[str], None] = lambda name: None):
        self.repair = repair
        self.config = config
        self.credential = credential
        self.out_dir = out_dir
        self.attempts = attempts
        self.retry_seconds = retry_seconds
        self.record = record
        self.on_phase = on_phase
        self.error: CrashcartError | None = None
        self.keep = False

    def __call__(self) -> None:
        """The undo action (ExitStack callback): never raises, so the report is always written."""
        if self.keep:
            return
        try:
            self.on_phase("teardown")
            self.error = self.restore_swapped_source()
            if self.error is None:
                with step("teardown: destroy the repair stack"):
                    self.error = self.destroy()
        except Exception as exc:  # a bug in the teardown path: say what is left, never lose the report
            log.exception("the teardown failed unexpectedly")
            self.error = CrashcartError(
                f"the teardown failed unexpectedly ({exc!r}); the repair stack may still be deployed",
                "run `pipenv run repair-run --cleanup`, and please report this with the log",
                ExitCode.TEARDOWN_FAILED)

    def kept(self) -> None:
        """--keep: the teardown will not run; say what stays and how to remove it."""
        self.keep = True
        self.record["kept"] = True
        log.warning("==> teardown skipped (--keep): the repair stack stays deployed and costs money until removed.\n"
                    "    remove it with `pipenv run repair-run --cleanup` (same config), or by hand:\n"
                    "      cd %s && TF_VAR_%s=<any 12+ characters> terraform apply -destroy -auto-approve\n"
                    "    `pipenv run sweep --delete` removes its resource group once its "
                    "crashcart-expires-at tag has passed", self.repair.path, self.credential.variable)

    def kept_for_fix(self, rollback_manifest: str) -> str:
        """repair-run --fix booted the VM from the fixed copy: the teardown will not run (it would refuse with 31:
        destroying the stack deletes the disk the VM now boots from). Returns the operator's next step."""
        self.keep = True
        self.record.update(kept=True, kept_for_fix=True, kept_reason="verified fix: the VM boots from the fixed disk "
                           "copy, which belongs to the repair stack")
        next_step = (f"the VM is fixed and boots from the repair stack's disk copy; the repair stack stays on purpose "
                     f"(destroying it would delete that disk). Keep it, or take the fix back with `pipenv run rollback "
                     f"--manifest {rollback_manifest}` and then `pipenv run repair-run --cleanup`; do not run "
                     "`sweep --delete` on its resource group while the VM uses the disk")
        log.warning("==> teardown skipped on purpose: %s", next_step)
        return next_step

    def restore_swapped_source(self) -> CrashcartError | None:
        """Puts the original OS disk back first (rollback is idempotent). If that fails, the repair stack
        stays: destroying it cannot succeed, and the copy is what the VM boots from."""
        from scripts.nodump import rollback

        vm_name = self.config.source.vm_name
        for path in self._rollback_manifests(rollback.MANIFEST_NAME):
            try:
                manifest = rollback.load_local(path)
                if manifest.state == "restored" or manifest.source_vm_id.lower() != self.config.source.vm_id.lower():
                    continue  # done, or another VM's (one of the same name elsewhere)
                if manifest.state == "kept":  # `fix --verify` proved the VM boots from the fixed copy
                    return CrashcartError(
                        f"the repair stack was NOT destroyed: {vm_name} boots from the fixed disk copy, which belongs "
                        f"to the repair stack (a verified fix, {path}); destroying the stack would delete that disk "
                        "and putting the original back would undo the fix",
                        "keep the repair resource group until the VM's own disk is fixed the same way, or take the "
                        f"fix back with `pipenv run rollback --manifest {path}` and then `pipenv run repair-run "
                        "--cleanup`", ExitCode.TEARDOWN_FAILED)
                from scripts.azure.clients import AzureClients

                with step(f"teardown: put {vm_name}'s original OS disk back first ({path})"):
                    rollback.restore(AzureClients(self.config.source.subscription_id).compute, manifest, None)
            except Exception as err:  # noqa: BLE001 - whatever it was, the stack must stay
                return CrashcartError(
                    f"the repair stack was NOT destroyed: {vm_name} may still run on the disk copy, and putting "
                    f"its original OS disk back failed: {first_line(err)}",
                    f"run `pipenv run rollback --manifest {path}`, then `pipenv run repair-run --cleanup`",
                    ExitCode.TEARDOWN_FAILED)
        return None

    def _rollback_manifests(self, name: str) -> list[Path]:
        """This VM's run folders: under its key, and under its bare name (where prepare-dump wrote them
        before runs were keyed by VM)."""
        folders = dict.fromkeys([self.out_dir / vm_key(self.config.source.vm_id),
                                 self.out_dir / self.config.source.vm_name])
        return sorted(path for folder in folders for path in folder.glob(f"*/{name}"))

    def destroy(self) -> CrashcartError | None:
        """`apply -destroy` on the repair stack, retried with a growing pause, then checked with `state list`.
        Never raises (it runs after failures); the returned error says what is left."""
        last_error = ""
        tries = itertools.count(1)

        def attempt() -> bool | None:
            nonlocal last_error
            number = next(tries)
            try:
                result = self.repair.destroy(self.credential.env)
            except CrashcartError as err:  # e.g. terraform vanished
                last_error = err.message
            else:
                if result.ok:
                    return True
                last_error = result.error_summary()
            if number >= self.attempts:
                return False
            log.warning("    destroy attempt %d/%d failed (%s); retrying in %.0fs", number, self.attempts,
                        last_error, self.retry_seconds * 2 ** (number - 1))
            return None

        # No stop request reaches the destroy, its retries or the check after it: a half-done destroy is what
        # leaves resources behind, and an interrupted check would report what is left as unknown.
        stop, self.repair.stop = self.repair.stop, None
        try:
            poll(attempt, timeout_s=math.inf, interval_s=self.retry_seconds, max_interval_s=math.inf, backoff=2.0,
                 jitter=0.0)
            try:
                remaining = self.repair.resources()
            except CrashcartError as err:
                remaining = [f"unknown: {err.message}"]
        finally:
            self.repair.stop = stop
        self.record["remaining"] = remaining
        if not remaining:
            self.record["destroyed"] = True
            deleted = self.repair.forget_local_state()
            self.record["state_files_deleted"] = [str(path) for path in deleted]
            log.info("    the repair stack is destroyed%s; the evidence stack was not touched",
                     f" and its local state deleted ({', '.join(p.name for p in deleted)})" if deleted else "")
            return None
        return CrashcartError(
            f"the repair stack could not be destroyed ({last_error or 'unknown error'}); still deployed: "
            f"{', '.join(remaining)}",
            f"run `pipenv run repair-run --cleanup` (or `cd {self.repair.path} && TF_VAR_{self.credential.variable}="
            "<any 12+ characters> terraform apply -destroy -auto-approve`) once the cause is fixed; `pipenv run sweep "
            "--delete` removes the resource group after its crashcart-expires-at time", ExitCode.TEARDOWN_FAILED)
