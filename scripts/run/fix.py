"""`fix`: repair the disk copy, and with `--verify` prove the VM boots from it - or put it back.

After the dump, the operator's question is "how do I get the VM back?". One command, after
`cdktf deploy repair`:

    pipenv run fix disable-driver csagent                 # Start = 4 in every control set of the copy
    pipenv run fix disable-driver --from-triage           # the culprit the collection's triage named
    pipenv run fix remove-file 'Windows\\System32\\drivers\\CrowdStrike\\C-00000291*.sys'
    pipenv run fix safe-mode | last-known-good | revert-pending
    pipenv run fix disable-driver csagent --verify        # ... then swap in, boot, keep or roll back
    pipenv run fix rollback --manifest crashcart-out/<vm>/<stamp>/fix-manifest.json

1. Only the disk copy is changed, on the rescue VM (scripts.remediate: fix.sh / fix.ps1 as a Run Command,
   every value a parameter). The fix manifest (scripts.remediate.manifest) is stored locally and in
   evidence before the first change and after each: every value old and new, every quarantined file's
   SHA-256, the hive's SHA-256 before and after, and the parameters that undo each recipe.
2. `--dry-run` runs the same script in plan mode: it reports exactly what would change, writes nothing.
3. Recipes are applied in order; when one fails, those applied before are undone (ExitStack undo actions)
   so the copy is as it was, and the manifest says so.
4. `--verify` (scripts.run.fix_verify): the swap with its rollback manifest, the boot watched; booted ->
   the fixed disk stays; crashed, stopped or timed out -> the original OS disk is back, automatically.
   After a crash, the dump it wrote on the fixed copy is collected beside the first (scripts.run.fix_dump),
   recorded as `new_dump` in the fix manifest and report with the first dumps; a crash that wrote none says so.
5. `rollback`: the original OS disk back if the fixed copy was kept, then every recipe undone on the copy.

Exit codes: 0 fixed (and booted with --verify), 2 usage or refused swap, 11 copy not found, 12 a recipe
refused or failed (nothing, or everything undone), 13 timeout (boot: rolled back), 15 the VM stopped while
booting the fixed copy (rolled back), 16 the fixed copy crashed again (rolled back), 3-5 Azure errors (a
failed rollback: 5, the message says ROLLBACK FAILED and the command to run).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.azure import ids
from scripts.azure.clients import AzureClients
from scripts.base.console import step
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.stop import StopRequest
from scripts.collection.contract import OUT_DIR, run_prefix, run_stamp
from scripts.config.stackoutputs import RepairOutputs
from scripts.dumpfile.blame import is_windows_module
from scripts.dumpfile.modules import is_placeholder
from scripts.evidence import blobs as evidence
from scripts.nodump import rollback, swap
from scripts.remediate import apply, manifest as fixmanifest, recipes
from scripts.run import fix_dump, fix_verify
from scripts.run.prepare_dump import VerbReport, require_rescue_script

log = logging.getLogger("crashcart.fix")



@dataclass(frozen=True)
class FixRequest:
    outputs: RepairOutputs
    recipes: tuple[recipes.Recipe, ...]
    dry_run: bool = False
    verify: fix_verify.BootOptions | None = None  # None: change the copy only, the VM is not touched
    timing: apply.Timing = field(default_factory=apply.Timing)
    out_dir: Path = OUT_DIR
    now: dt.datetime | None = None
    stop: StopRequest | None = None
    first_collection: dict[str, Any] | None = None  # repair-run's collection: the first dumps (else the newest report)


FixReport = VerbReport


# ---- --from-triage ------------------------------------------------------------------------------------------
def newest_report(out_dir: Path, vm_id: str) -> Path:
    """The newest report.json of a collection of this VM under crashcart-out/<vm key>/<stamp>/."""
    folder = out_dir / run_prefix(vm_id, "x").split("/")[0]
    found = sorted(folder.glob("*/report.json")) if folder.is_dir() else []
    if not found:
        raise CrashcartError(f"no collection report for this VM under {folder}",
                             "collect the dump first (`pipenv run collect`), or pass --report PATH, or name the "
                             "driver: `pipenv run fix disable-driver NAME`", ExitCode.USAGE)
    return found[-1]


def culprit_driver(report_path: Path) -> str:
    """The driver the report's triage verdict names: its culprit (the first frame outside the Windows core),
    else the faulting module; refused when that is a Windows module (windows_modules.txt) or has no name."""
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CrashcartError(f"cannot read the collection report {report_path}: {err}",
                             "pass the report.json `collect` wrote (--report PATH)", ExitCode.USAGE) from None
    verdict = report.get("triage") if isinstance(report, dict) else None
    if not isinstance(verdict, dict):
        raise CrashcartError(f"{report_path} holds no triage verdict",
                             f"run `pipenv run triage <dump>` and name the driver: `pipenv run fix disable-driver "
                             "NAME`", ExitCode.USAGE)
    module = (verdict.get("culprit") or {}).get("module") or (verdict.get("faulting_module") or {}).get("name")
    if module and is_placeholder(str(module)):
        raise CrashcartError(f"the triage verdict in {report_path} blames a module whose name is not in the dump "
                             f"({module})", "name the driver yourself (WinDbg `lm a <base>` on the whole dump): "
                             "`pipenv run fix disable-driver NAME`", ExitCode.USAGE)
    if not module or is_windows_module(str(module)):
        raise CrashcartError(f"the triage verdict in {report_path} names no third-party driver"
                             + (f" ({module} is a Windows component)" if module else ""),
                             "--from-triage disables only a third-party driver: see the verdict's next step (Windows "
                             "Update, support, or another recipe such as revert-pending or last-known-good); to "
                             "disable a Windows driver anyway, name it: `pipenv run fix disable-driver NAME`",
                             ExitCode.USAGE)
    log.info("    triage names %s (%s)", module, verdict.get("summary", ""))
    return recipes.normal_driver(str(module))


# ---- the verb's flow ------------------------------------------------------------------------------------------
def fix(request: FixRequest) -> FixReport:
    """The recipes on the disk copy (manifest first), and with `request.verify` the verified boot."""
    return _Fix(request).run()


class _Fix:
    """One fix run: the names, clients, manifest and JSON document its steps share."""

    def __init__(self, request: FixRequest):
        outputs = request.outputs
        require_rescue_script(outputs, recipes.TEMPLATES)
        if not request.recipes:
            raise CrashcartError("no recipe given", f"name one of: {', '.join(recipes.RECIPES)}", ExitCode.USAGE)
        if request.verify is not None and request.dry_run:
            raise CrashcartError("--verify and --dry-run together", "a dry run changes nothing, so there is no boot "
                                 "to verify: drop one", ExitCode.USAGE)
        self.request, self.outputs = request, outputs
        self.vm = ids.require(outputs.source_vm_id, "vm", swap.OUTPUTS_HINT)
        self.stamp = run_stamp(request.now or dt.datetime.now(dt.timezone.utc))
        self.prefix = run_prefix(self.vm.id, self.stamp)
        self.out_dir = request.out_dir / self.prefix
        self.compute = AzureClients(outputs.subscription_id).compute
        self.container = evidence.container_client(outputs.evidence_blob_endpoint, outputs.evidence_container)
        self.manifest = fixmanifest.new(run=self.prefix, out_dir=self.out_dir, outputs=outputs,
                                        dry_run=request.dry_run)
        self.document: dict[str, Any] = {"run": self.prefix, "vm_id": self.vm.id, "dry_run": request.dry_run,
                                         "recipes": [r.to_dict() for r in request.recipes]}
        # the dumps collected before: known before the fix's own collection (if any) writes a newer report
        self.first = fix_dump.first_dumps(request.first_collection, request.out_dir, self.vm.id) \
            if request.verify is not None else []

    def run(self) -> FixReport:
        request, manifest = self.request, self.manifest
        with step("write the fix manifest (locally and in evidence) before changing the copy"):
            fixmanifest.save(manifest, self.container, require_evidence=True)
        try:
            self.apply_all()
        except CrashcartError as err:
            return self.finish("not_fixed", err)
        if request.dry_run:
            manifest.mark("planned")
            fixmanifest.save(manifest, self.container, require_evidence=False)
            return self.finish("planned")
        manifest.mark("applied")
        fixmanifest.save(manifest, self.container, require_evidence=False)
        if request.verify is None:
            log.info("next: `pipenv run fix ... --verify` boots the VM from the fixed copy (rolled back unless it "
                     "boots), or `pipenv run fix rollback --manifest %s` undoes the fix", manifest.local_path)
            return self.finish("fixed")
        return self.verify(request.verify)

    def apply_all(self) -> None:
        """Every recipe, in order; when one fails, the ones applied before are undone (newest first)."""
        with contextlib.ExitStack() as undo:
            for n, recipe in enumerate(self.request.recipes, 1):
                step_name = f"fix-{self.stamp}-{n}"
                params = recipe.parameters(run_id=step_name, mode="plan" if self.request.dry_run else "apply",
                                           disk_lun=self.outputs.disk_copy_lun)
                try:
                    result = self.run_script(params, step_name, f"{recipe.label} ({'plan' if self.request.dry_run else 'apply'})")
                except apply.RecipeFailed as err:
                    self.document.setdefault("failed", []).append({"recipe": recipe.to_dict(), "result": err.remote_result})
                    raise
                entry = fixmanifest.FixEntry(recipe=recipe.to_dict(), step=step_name, result=result, undo=None)
                if not self.request.dry_run:
                    entry.undo = recipes.undo_parameters(recipe, result, run_id=f"{step_name}-undo",
                                                         disk_lun=self.outputs.disk_copy_lun)
                    if entry.undo:
                        undo.push(self.undo_on_error(entry))
                self.manifest.entries.append(entry)
                fixmanifest.save(self.manifest, self.container, require_evidence=False)
            undo.pop_all()

    def undo_on_error(self, entry: fixmanifest.FixEntry):
        def exit_handler(exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
            if exc is not None:
                log.error("    a later recipe failed: undoing %s on the copy", entry.recipe.get("name"))
                undo_entry(self, entry)
            return False
        return exit_handler

    def run_script(self, params: dict[str, str], step_name: str, label: str) -> dict[str, Any]:
        return apply.run_fix_script(self.compute, self.container, self.outputs, params, prefix=self.prefix,
                                    step_name=step_name, label=label, timing=self.request.timing,
                                    stop=self.request.stop)

    def verify(self, options: fix_verify.BootOptions) -> FixReport:
        manifest = self.manifest
        manifest.mark("verifying")
        fixmanifest.save(manifest, self.container, require_evidence=False)
        try:
            outcome = fix_verify.verify_boot(self.compute, self.container, self.outputs, prefix=self.prefix,
                                             out_dir=self.out_dir, options=options, stop=self.request.stop)
        except fix_verify.NotBooted as err:
            manifest.verify = err.outcome.to_dict()
            manifest.rollback_manifest = err.outcome.manifest.local_path
            failed = "ROLLBACK FAILED" in err.message
            manifest.mark("rolled-back" if not failed else "rollback-failed", err.message)
            fixmanifest.save(manifest, self.container, require_evidence=False)
            self.document["verify"] = manifest.verify
            return self.finish("not_booted", self.after_failed_boot(err, rollback_failed=failed))
        except CrashcartError as err:  # refused swap, or the rollback manifest not stored: the VM was not touched
            manifest.mark("applied", f"not verified: {err.message}")
            fixmanifest.save(manifest, self.container, require_evidence=False)
            return self.finish("fixed_not_verified", err)
        manifest.verify = outcome.to_dict()
        manifest.rollback_manifest = outcome.manifest.local_path
        manifest.mark("kept", "the VM booted from the fixed copy")
        fixmanifest.save(manifest, self.container, require_evidence=False)
        self.document["verify"] = manifest.verify
        self.document["next"] = (
            f"the fixed copy is now {self.vm.name}'s OS disk and still part of the repair stack: detach it from the "
            "stack's state before destroying the stack (terraform -chdir=cdktf.out/stacks/repair state rm <the "
            f"disk copy's address>); `pipenv run rollback --manifest {outcome.manifest.local_path}` puts the original "
            "OS disk back")
        log.warning("    %s", self.document["next"])
        return self.finish("booted")

    def after_failed_boot(self, err: fix_verify.NotBooted, *, rollback_failed: bool) -> CrashcartError:
        """The dump a crash of the fixed copy wrote, collected once the copy is back on the rescue VM (or why
        not), in the manifest and the report as `new_dump`; the error's message then says where it is."""
        verdict = err.outcome.verdict
        if verdict is None:  # the run failed before the boot was watched: there was no boot to crash
            return err
        record: dict[str, Any] = {"collected": False, "first_dumps": self.first, "dumps": []}
        if rollback_failed:
            record["message"] = ("the dump of the crash (if any) was not collected: the fixed copy may still be the "
                                 "VM's OS disk; after the rollback, collect it with `pipenv run collect --strategy "
                                 "rescue-vm`")
        elif verdict.reason != "bugcheck":
            record["message"] = f"no new bugcheck was seen ({verdict.reason}): no new dump to collect"
        elif self.request.stop is not None and self.request.stop.reason is not None:
            record["message"] = (f"the dump of the crash was not collected (the run is stopping: "
                                 f"{self.request.stop.reason}); collect it with `pipenv run collect --strategy "
                                 "rescue-vm` (the fixed copy is back on the rescue VM)")
        else:
            timing = self.request.timing
            record = fix_dump.collect_new_dump(self.outputs, first=self.first, out_dir=self.request.out_dir,
                                               agent_wait_s=timing.agent_wait_s, poll_s=timing.poll_s,
                                               stop=self.request.stop)
        self.manifest.new_dump = record
        fixmanifest.save(self.manifest, self.container, require_evidence=False)
        self.document["new_dump"] = record
        return CrashcartError(f"{err.message}; {record['message']}", err.hint, err.exit_code)

    def finish(self, status: str, error: CrashcartError | None = None) -> FixReport:
        doc = self.document
        doc.update(status=status, manifest=self.manifest.local_path, manifest_blob=self.manifest.evidence_blob,
                   entries=[{"recipe": e.recipe, "status": e.result.get("status"), "changes": e.result.get("changes"),
                             "files": e.result.get("files"), "hive": e.result.get("hive"), "undo": e.undo,
                             "undone": e.undone, "notes": e.result.get("notes")} for e in self.manifest.entries])
        if error is not None:
            doc.update(error=error.message, hint=error.hint)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "fix-report.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n",
                                                      encoding="utf-8")
        return FixReport(doc, error.exit_code if error else ExitCode.OK, error)


def undo_entry(fixer: Any, entry: fixmanifest.FixEntry) -> None:
    """Runs one entry's undo on the copy and records it; a failed undo is told (the manifest keeps the
    parameters, so `fix rollback` can run it again)."""
    try:
        entry.undo_result = fixer.run_script(entry.undo, entry.undo["RunId"], f"undo {entry.recipe.get('name')}")
        entry.undone = True
    except CrashcartError as err:
        log.error("    the undo of %s failed: %s (run `pipenv run fix rollback --manifest %s`)",
                  entry.recipe.get("name"), err.message, fixer.manifest.local_path)
        entry.undo_result = {"status": "error", "message": err.message}
    fixmanifest.save(fixer.manifest, fixer.container, require_evidence=False)


# ---- rollback of a fix ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FixRollbackRequest:
    outputs: RepairOutputs
    manifest_path: Path | None = None
    evidence_blob: str | None = None
    timing: apply.Timing = field(default_factory=apply.Timing)
    poll_s: float = swap.DEFAULT_POLL_S
    stop: StopRequest | None = None


class _Undo:
    """What undo_entry needs: the script runner, the manifest, the container."""

    def __init__(self, request: FixRollbackRequest, manifest: fixmanifest.FixManifest, container: Any):
        self.request, self.manifest, self.container = request, manifest, container
        self.outputs = request.outputs
        self.compute = AzureClients(request.outputs.subscription_id).compute

    def run_script(self, params: dict[str, str], step_name: str, label: str) -> dict[str, Any]:
        return apply.run_fix_script(self.compute, self.container, self.outputs, params, prefix=self.manifest.run,
                                    step_name=step_name, label=label, timing=self.request.timing,
                                    stop=self.request.stop)


def rollback_fix(request: FixRollbackRequest) -> FixReport:
    """The original OS disk back when the fixed copy was kept, then every recipe undone on the copy, newest
    first. Idempotent: undone entries are skipped, a restore of a VM already on its disk changes nothing."""
    outputs = request.outputs
    container = evidence.container_client(outputs.evidence_blob_endpoint, outputs.evidence_container)
    manifest = fixmanifest.load(path=request.manifest_path, evidence_blob=request.evidence_blob, container=container)
    if not ids.same(manifest.disk_copy_id, outputs.disk_copy_id):
        raise CrashcartError(f"the fix manifest is for disk copy {manifest.disk_copy_id}, the repair stack's copy is "
                             f"{outputs.disk_copy_id}", "use the outputs of the repair stack the fix ran with",
                             ExitCode.USAGE)
    undoer = _Undo(request, manifest, container)
    document: dict[str, Any] = {"run": manifest.run, "manifest": manifest.local_path}
    if manifest.rollback_manifest and Path(manifest.rollback_manifest).is_file():
        swapped = rollback.load_local(Path(manifest.rollback_manifest))
        with step("put the original OS disk back (the fixed copy was kept)"):
            document["restore"] = rollback.restore(undoer.compute, swapped, container, poll_s=request.poll_s).to_dict()
    for entry in reversed(manifest.entries):
        if entry.undo and not entry.undone:
            undo_entry(undoer, entry)
    failed = [e.recipe.get("name") for e in manifest.entries if e.undo and not e.undone]
    manifest.mark("undone" if not failed else "undo-failed")
    fixmanifest.save(manifest, container, require_evidence=False)
    document.update(status=manifest.state, undone=[e.recipe for e in manifest.entries if e.undone])
    if failed:
        error = CrashcartError(f"the undo of {', '.join(map(str, failed))} failed", "see the log; re-run "
                               "`pipenv run fix rollback` (it skips what is already undone)", ExitCode.COLLECT_FAILED)
        return FixReport(document, error.exit_code, error)
    return FixReport(document)
