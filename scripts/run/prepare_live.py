"""`prepare-dump --live` and `rollback --live`: the crash dump set up on the running source VM, and undone.

    pipenv run prepare-dump --live --dry-run                  # read the VM, show every change old -> new
    pipenv run prepare-dump --live --allow-source-write       # ... and make them (manifest first)
    pipenv run rollback --live                                # put the old values back

No repair stack is needed: the config names the VM and the evidence container. Each step is
scripts.nodump.live (read -> plan -> manifest -> apply -> reboot need). The apply is guarded by an
ExitStack undo registered as soon as the manifest is stored: when the apply fails and the script did not
put back what it had changed itself, the kit restores the manifest's old values (scripts.nodump.live.restore);
whichever way, the manifest's next state in evidence says what happened. Nothing is written without
--allow-source-write (exit 2); --dry-run creates one read-only Run Command on the VM and writes nothing else.

Exit codes: 0 applied (or nothing to change; dry run planned), 2 usage, a source that is not Windows, no
--allow-source-write, a value changed by someone else (rollback), 12 the script refused or failed (nothing
left changed unless it says so), 13 timeout, 14 the VM agent not Ready, 3-5 Azure errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.azure import ids
from scripts.azure.clients import AzureClients
from scripts.azure.errors import azure_call
from scripts.azure.runcommand import RunCommandRunner, show_agent_wait
from scripts.base.console import step
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.stop import StopRequest
from scripts.collection.contract import OUT_DIR, run_prefix, run_stamp
from scripts.config.model import Config
from scripts.evidence import blobs as evidence
from scripts.nodump import live, prepare
from scripts.run.prepare_dump import PrepareDumpReport

log = logging.getLogger("crashcart.prepare")

CONFIG_HINT = "set source.vm_id in the config (pipenv run discover --vm <id> writes it)"


@dataclass(frozen=True)
class LiveRequest:
    """One `prepare-dump --live`. `settings` is what the offline prepare would write; memory_mb 0 in it
    means the VM's own RAM, read from the VM."""

    config: Config
    settings: dict[str, Any]  # PrepareSettings fields except memory_mb
    memory_mb: int = 0
    dry_run: bool = False
    allow_source_write: bool = False
    timing: prepare.Timing = dataclasses.field(default_factory=prepare.Timing)
    out_dir: Path = OUT_DIR
    now: dt.datetime | None = None
    stop: StopRequest | None = None


def source_runner(compute: Any, vm: ids.ResourceId, timing: prepare.Timing, stop: StopRequest | None) -> RunCommandRunner:
    """A Run Command runner on the source VM, once it is known to be Windows and its agent Ready."""
    model = azure_call(lambda: compute.virtual_machines.get(vm.resource_group, vm.name), f"source VM {vm.name}")
    os_disk = getattr(getattr(model, "storage_profile", None), "os_disk", None)
    os_type = str(getattr(getattr(os_disk, "os_type", None), "value", getattr(os_disk, "os_type", None)) or "")
    if os_type.lower() != "windows":
        raise CrashcartError(f"source VM {vm.name} runs {os_type or 'an unknown OS'}: --live sets Windows' CrashControl",
                             "use prepare-dump without --live (the disk copy) for this VM", ExitCode.USAGE)
    runner = RunCommandRunner(compute, vm.resource_group, vm.name, poll_s=timing.poll_s, stop=stop)
    show_agent_wait(runner, timing.agent_wait_s, f"source VM {vm.name}")
    return runner


def prepare_live(request: LiveRequest) -> PrepareDumpReport:
    """read -> plan -> (dry run: stop) -> manifest -> apply -> report the reboot need."""
    if not request.dry_run and not request.allow_source_write:
        raise CrashcartError("--live changes the running source VM's registry and needs --allow-source-write",
                             "look first with `pipenv run prepare-dump --live --dry-run`, then add --allow-source-write",
                             ExitCode.USAGE)
    config = request.config
    vm = ids.require(config.source.vm_id, "vm", CONFIG_HINT)
    stamp = run_stamp(request.now or dt.datetime.now(dt.timezone.utc))
    prefix = run_prefix(vm.id, stamp)
    compute = AzureClients(vm.subscription).compute
    runner = source_runner(compute, vm, request.timing, request.stop)
    timeout = request.timing.timeout_s
    with step(f"read CrashControl and the page file of {vm.name} (nothing is written)"):
        facts = live.read(runner, run_id=stamp, timeout_s=timeout)
    memory_mb = request.memory_mb or facts.memory_mb
    settings = prepare.PrepareSettings(memory_mb=memory_mb, **request.settings)
    the_plan = live.plan(settings, facts)
    document: dict[str, Any] = {"run": prefix, "vm_id": vm.id, "live": True, "dry_run": request.dry_run,
                                "facts": dataclasses.asdict(facts), "plan": the_plan.to_dict()}
    for note in the_plan.choice.notes:
        log.info("    note: %s", note)
    for change in the_plan.changed:
        log.info("    %s", change.line())
    if request.dry_run:
        document.update(status="planned", reboot_needed=the_plan.reboot_needed,
                        next="pipenv run prepare-dump --live --allow-source-write")
        return PrepareDumpReport(document)
    if not the_plan.changed:
        document.update(status="unchanged", reboot_needed=False, next="wait for the next crash, then pipenv run collect")
        return PrepareDumpReport(document)
    container = evidence.container_client(config.evidence_blob_endpoint, config.evidence.container)
    manifest = live.LiveManifest.for_plan(the_plan, vm_id=vm.id, run=prefix, out_dir=request.out_dir / prefix,
                                          blob_endpoint=config.evidence_blob_endpoint,
                                          container=config.evidence.container)
    with step("write the live manifest (old values, locally and in evidence) before writing to the VM"):
        live.save(manifest, container, require_evidence=True)
        log.info("    %s and %s", manifest.local_path, manifest.evidence_blob)
    document.update(manifest=manifest.local_path, manifest_blob=manifest.evidence_blob)
    try:
        with contextlib.ExitStack() as undo:
            undo.push(_restore_on_failure(runner, manifest, container, stamp, timeout, document))
            with step(f"write {len(the_plan.changed)} CrashControl value(s) on {vm.name}"):
                document["apply"] = live.apply(runner, the_plan, run_id=stamp, timeout_s=timeout)
    except CrashcartError as err:
        document.update(status="failed", state=manifest.state, error=err.message, hint=err.hint)
        return PrepareDumpReport(document, err.exit_code, err)
    manifest.reboot_needed = the_plan.reboot_needed
    manifest.mark("applied", f"{len(the_plan.changed)} value(s) set")
    live.save(manifest, container, require_evidence=False)
    log.warning("%s %s: %s", vm.name, "needs a restart" if the_plan.reboot_needed else "needs no restart", live.REBOOT_REASON)
    document.update(status="applied", state=manifest.state, manifest_blob=manifest.evidence_blob,
                    reboot_needed=the_plan.reboot_needed, reboot_reason=live.REBOOT_REASON,
                    next=(f"restart {vm.name} (az vm restart -g {vm.resource_group} -n {vm.name}); after its next crash "
                          "run `pipenv run collect`; `pipenv run rollback --live` puts the old values back"))
    return PrepareDumpReport(document)


def _restore_on_failure(runner: RunCommandRunner, manifest: live.LiveManifest, container: Any, run_id: str,
                        timeout_s: int, document: dict[str, Any]) -> Callable[..., bool]:
    """The undo of the apply: when it failed and the script did not put everything back itself, the kit
    restores the manifest's old values. The manifest's next state says which; the error goes on."""

    def undo(exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            return False
        if isinstance(exc, live.LiveFailed) and exc.restored:
            document["apply"] = exc.remote_result
            manifest.mark("not_applied", "the script wrote nothing, or put back what it wrote")
            live.save(manifest, container, require_evidence=False)
            return False
        log.error("    the apply failed (%s): restoring the old values", getattr(exc, "message", exc))
        try:
            with step(f"restore the old CrashControl values on {runner.vm_name}"):
                document["restore"] = live.restore(runner, manifest, run_id=run_id + "r", timeout_s=timeout_s).to_dict()
            manifest.mark("restored", "restored by the kit after a failed apply")
        except CrashcartError as err:
            manifest.mark("restore_failed", err.message)
            live.save(manifest, container, require_evidence=False)
            raise CrashcartError(
                f"RESTORE FAILED after a failed apply on {runner.vm_name} ({err.message}); the apply had failed: "
                f"{getattr(exc, 'message', exc)}", f"run `pipenv run rollback --live --manifest {manifest.local_path}` "
                "(safe to repeat)", err.exit_code) from None
        live.save(manifest, container, require_evidence=False)
        return False

    return undo


def rollback_live(manifest: live.LiveManifest, *, timing: prepare.Timing, now: dt.datetime | None = None,
                  stop: StopRequest | None = None) -> dict[str, Any]:
    """`rollback --live`: the manifest's old values back on its VM; the manifest's next state records it."""
    vm = ids.require(manifest.source_vm_id, "vm", live.MANIFEST_HINT)
    compute = AzureClients(vm.subscription).compute
    container = None
    if manifest.evidence_blob_endpoint and manifest.evidence_container:
        container = evidence.container_client(manifest.evidence_blob_endpoint, manifest.evidence_container)
    runner = source_runner(compute, vm, timing, stop)
    stamp = run_stamp(now or dt.datetime.now(dt.timezone.utc))
    with step(f"put back the old CrashControl values on {vm.name}"):
        outcome = live.restore(runner, manifest, run_id=stamp, timeout_s=timing.timeout_s)
    for line in outcome.restored:
        log.info("    %s", line)
    manifest.mark("restored", f"{len(outcome.restored)} value(s) put back")
    live.save(manifest, container, require_evidence=False)
    if outcome.reboot_needed:
        log.warning("%s needs a restart: %s", vm.name, live.REBOOT_REASON)
    return {"rollback": outcome.to_dict(), "manifest": manifest.local_path, "manifest_blob": manifest.evidence_blob,
            "state": manifest.state, "vm_id": vm.id}
