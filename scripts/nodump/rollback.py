"""The way in and the way back: the rollback manifest, the swap in, and `restore` (verb `rollback`).

Before the swap touches the VM, `prepare-dump` writes a rollback manifest twice — locally
(`crashcart-out/<vm key>/<stamp>/rollback-manifest.json`) and in the evidence container
(`<vm key>/<stamp>/rollback-manifest.json`) — naming the original OS disk (ID, name), the prepared copy,
the rescue VM and LUN the copy came from, and the VM's power state before. If either write fails, no
swap happens. The state field follows the run: ready -> swapping -> swapped (`swap_in`) -> restored.
The local file is rewritten in place; in evidence nothing is ever replaced, so each later state is a new
blob beside the first (`rollback-manifest.<n>-<state>.json`) and a reader takes the newest of them.

`restore` is idempotent and safe to re-run at any point:
1. if the VM's OS disk is already the original, the VM is left as it is;
   if it is the prepared copy, the VM is stopped (powerOff without guest shutdown, then deallocate) and
   the original is swapped back in; any other disk means someone else changed the VM: refused;
2. the prepared copy goes back to the rescue VM at its LUN (so `collect` can read it and
   `cdktf destroy repair` removes it), or is deleted with `--delete-copy` (only a disk tagged by
   crashcart);
3. the VM is started again if it was running before (unless `--leave-stopped`).

    pipenv run rollback                       # the newest manifest under crashcart-out/ for the config's VM
    pipenv run rollback --manifest crashcart-out/web-01-1a2b3c4d/20250517T031245Z/rollback-manifest.json
    pipenv run rollback --evidence-blob web-01-1a2b3c4d/20250517T031245Z/rollback-manifest.json   # from evidence
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scripts.azure import ids
from scripts.azure.errors import translate_azure_error
from scripts.base import signals
from scripts.base.console import step
from scripts.base.errors import CrashcartError, ExitCode, first_line
from scripts.config.model import Config
from scripts.config.stackoutputs import RepairOutputs
from scripts.evidence import blobs as evidence, series
from scripts.nodump import swap

log = logging.getLogger("crashcart.rollback")

SCHEMA = "crashcart.rollback/1"
MANIFEST_NAME = "rollback-manifest.json"
MANIFEST_HINT = ("the manifest is damaged: restore the OS disk by hand "
                 "(az vm update --os-disk <original disk ID>)")


@dataclass
class RollbackManifest(series.Tracked):
    source_vm_id: str
    original_os_disk_id: str
    original_os_disk_name: str
    prepared_disk_id: str
    rescue_vm_id: str
    rescue_lun: int
    power_state_before: str
    run: str  # <vm key>/<stamp>
    evidence_blob_endpoint: str
    evidence_container: str
    state: str = "ready"  # ready | swapping | swapped | restored
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "RollbackManifest":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise CrashcartError(f"{where} is not a crashcart rollback manifest ({SCHEMA})",
                                 "pass the rollback-manifest.json prepare-dump wrote", ExitCode.USAGE)
        names = {f for f in cls.__dataclass_fields__}
        missing = [n for n in ("source_vm_id", "original_os_disk_id", "prepared_disk_id") if not data.get(n)]
        if missing:
            raise CrashcartError(f"{where} lacks {', '.join(missing)}", MANIFEST_HINT, ExitCode.USAGE)
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def for_swap(cls, outputs: RepairOutputs, *, power_state_before: str, run: str, out_dir: Path) -> "RollbackManifest":
        """The manifest of a swap about to happen (state "ready"): `out_dir` is the run's local folder,
        `run` (<vm>/<stamp>) its blob prefix."""
        vm = ids.require(outputs.source_vm_id, "vm", swap.OUTPUTS_HINT)
        rescue = ids.require(outputs.rescue_vm_id, "vm", swap.OUTPUTS_HINT)
        manifest = cls(
            source_vm_id=vm.id, original_os_disk_id=outputs.source_os_disk_id,
            original_os_disk_name=ids.require(outputs.source_os_disk_id, "disk", swap.OUTPUTS_HINT).name,
            prepared_disk_id=outputs.disk_copy_id, rescue_vm_id=rescue.id, rescue_lun=outputs.disk_copy_lun,
            power_state_before=power_state_before, run=run, evidence_blob_endpoint=outputs.evidence_blob_endpoint,
            evidence_container=outputs.evidence_container, created_at=series.now(),
            local_path=str(out_dir / MANIFEST_NAME), evidence_blob=f"{run}/{MANIFEST_NAME}")
        manifest.mark("ready", f"original OS disk {manifest.original_os_disk_name}")
        return manifest


# Stored as a series (scripts.evidence.series): locally rewritten in place; in evidence the first state under
# MANIFEST_NAME, every later one a new numbered blob (the numbers come from the container itself, so a re-run
# of `rollback` continues the series). save(manifest, container, require_evidence=): with it, a failed upload
# raises (before a swap: no swap without both copies); else it is logged (the local copy stands).
SERIES = series.Series(MANIFEST_NAME, "rollback manifest",
                       "pass --manifest with the file prepare-dump wrote (or --evidence-blob)", "the VM",
                       RollbackManifest.from_dict, logger=log.name)
save, load_local, newest_local = SERIES.save, SERIES.load_local, SERIES.newest_local
load_from_evidence = SERIES.load_newest  # (container, blob, out_dir): the newest state of the run's manifest


def find_manifest(*, path: Path | None, evidence_blob: str | None, config: Config | None,
                  out_dir: Path) -> RollbackManifest:
    """The manifest to roll back from: the file `path`, the blob `evidence_blob` in the config's evidence
    container, or else the newest one under `out_dir` for the config's VM."""
    if path:
        return load_local(path)
    if evidence_blob:
        if config is None:
            raise CrashcartError("--evidence-blob needs the config (for the evidence account)",
                                 "pass --config, or --manifest with a local copy", ExitCode.USAGE)
        container = evidence.container_client(config.evidence_blob_endpoint,
                                              config.evidence.container)
        return load_from_evidence(container, evidence_blob, out_dir)
    if config is None:
        raise CrashcartError("no --manifest given and no config to find the newest one",
                             "pass --manifest crashcart-out/<vm key>/<stamp>/rollback-manifest.json", ExitCode.USAGE)
    return load_local(newest_local(out_dir, config.source.vm_id))


def evidence_container(manifest: RollbackManifest) -> Any | None:
    """The evidence container the manifest is mirrored in; None when it is not named or not reachable
    (then only the local manifest is kept current: the rollback itself must not wait for storage)."""
    if not manifest.evidence_blob_endpoint or not manifest.evidence_container:
        return None
    try:
        return evidence.container_client(manifest.evidence_blob_endpoint, manifest.evidence_container)
    except CrashcartError as err:
        log.warning("evidence container not reachable (%s): only the local manifest is updated", err.message)
        return None


# ---- the way in -----------------------------------------------------------------------------------------------
def swap_in(compute: Any, manifest: RollbackManifest, container: Any | None, *,
            poll_s: float = swap.DEFAULT_POLL_S) -> None:
    """Makes the prepared copy the VM's OS disk and starts the VM: stop + deallocate, detach the copy from
    the rescue VM, swap, start. The manifest (already saved as "ready") records "swapping" before the
    OS disk changes and "swapped" after, so a rollback from any point knows where it stands."""
    vm = ids.require(manifest.source_vm_id, "vm", MANIFEST_HINT)
    rescue = ids.require(manifest.rescue_vm_id, "vm", MANIFEST_HINT)
    swap.stop_and_deallocate(compute, vm, poll_s=poll_s)
    swap.detach_data_disk(compute, rescue, manifest.prepared_disk_id, poll_s=poll_s)
    manifest.mark("swapping")
    save(manifest, container, require_evidence=False)
    swap.swap_os_disk(compute, vm, manifest.prepared_disk_id, expect_current=manifest.original_os_disk_id,
                      poll_s=poll_s)
    manifest.mark("swapped", f"OS disk {ids.require(manifest.prepared_disk_id, 'disk', swap.OUTPUTS_HINT).name}")
    save(manifest, container, require_evidence=False)
    swap.start(compute, vm, poll_s=poll_s)


def undo_on_exit(compute: Any, container: Any | None, outcome: Any, *, run: str, copy: str,
                 failed: type[CrashcartError], leave_stopped: bool, poll_s: float,
                 keep: Callable[[], bool] | None = None) -> Callable[..., bool]:
    """The undo action of a swapped run (for contextlib.ExitStack.push): `restore` however the block ends -
    unless it ended cleanly and `keep()` says the copy stays. The error that ended the block goes on after;
    a failed rollback replaces it (it is what the operator must act on first): `failed(message, hint, exit
    code, outcome)`. `outcome` holds the `manifest` and gets `error` and `restore`; `run` is what the log
    calls the run ("the swapped run"), `copy` the disk that may still be in ("prepared copy")."""
    manifest: RollbackManifest = outcome.manifest
    vm_name = ids.require(manifest.source_vm_id, "vm", swap.OUTPUTS_HINT).name

    def roll_back(exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None and keep is not None and keep():
            return False
        if exc is not None:
            outcome.error = exc.message if isinstance(exc, CrashcartError) else f"{type(exc).__name__}: {exc}"
            log.error("    %s failed (%s): rolling back", run, outcome.error)
        # A Ctrl-C (or SIGTERM) meanwhile waits until the original disk is back (scripts.base.signals).
        with signals.deferred(f"the rollback of {vm_name}"), \
                step(f"roll back: {vm_name} back on {manifest.original_os_disk_name}"):
            try:
                outcome.restore = restore(compute, manifest, container, leave_stopped=leave_stopped, poll_s=poll_s)
            except Exception as err:  # noqa: BLE001 - whatever failed: say what to run
                said = err.message if isinstance(err, CrashcartError) else f"{type(err).__name__}: {err}"
                outcome.error = (f"ROLLBACK FAILED: VM {vm_name} may still run on the {copy} ({said})"
                                 + (f"; the run had failed before: {outcome.error}" if outcome.error else ""))
                raise failed(outcome.error, f"run `pipenv run rollback --manifest {manifest.local_path}` (or "
                             f"with --evidence-blob {manifest.evidence_blob}); it is safe to repeat",
                             ExitCode.AZURE_FAILED, outcome) from None
            for line in outcome.restore.steps:
                log.info("    %s", line)
        return False

    return roll_back


# ---- restoring ------------------------------------------------------------------------------------------------
@dataclass
class RestoreResult:
    vm_id: str
    os_disk_id: str
    state: str
    steps: list[str] = field(default_factory=list)
    copy: str = ""  # reattached | deleted | left | already attached
    started: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def restore(compute: Any, manifest: RollbackManifest, container: Any | None, *, delete_copy: bool = False,
            leave_stopped: bool = False, poll_s: float = swap.DEFAULT_POLL_S) -> RestoreResult:
    """Puts the original OS disk back and returns the prepared copy (see the module doc). Idempotent."""
    vm = ids.require(manifest.source_vm_id, "vm", MANIFEST_HINT)
    result = RestoreResult(vm_id=vm.id, os_disk_id="", state=manifest.state)
    model = swap.get_vm(compute, vm)
    current = swap.os_disk_id(model)
    if ids.same(current, manifest.prepared_disk_id):
        swap.stop_and_deallocate(compute, vm, poll_s=poll_s)
        result.steps.append("stopped and deallocated the VM")
        swap.swap_os_disk(compute, vm, manifest.original_os_disk_id, expect_current=manifest.prepared_disk_id,
                          poll_s=poll_s)
        result.steps.append(f"OS disk back to {manifest.original_os_disk_name}")
    elif ids.same(current, manifest.original_os_disk_id):
        result.steps.append(f"the VM already runs on its original OS disk {manifest.original_os_disk_name}")
    else:
        raise CrashcartError(
            f"VM {vm.name}'s OS disk is {current}: neither the original ({manifest.original_os_disk_id}) nor the "
            f"prepared copy ({manifest.prepared_disk_id}); not touching it",
            "someone changed the VM after the swap: check it in the portal (Disks) and swap by hand "
            f"(az vm update -g {vm.resource_group} -n {vm.name} --os-disk <disk ID>)", ExitCode.USAGE)
    result.os_disk_id = manifest.original_os_disk_id
    manifest.mark("restored", "original OS disk in place")
    save(manifest, container, require_evidence=False)

    result.copy = _return_copy(compute, manifest, delete_copy, poll_s)
    result.steps.append(f"disk copy {result.copy}")

    if manifest.power_state_before in ("running", "starting") and not leave_stopped:
        if swap.power_state(compute, vm) != "running":
            swap.start(compute, vm, poll_s=poll_s)
            result.started = True
            result.steps.append("started the VM again (it was running before)")
    result.state = manifest.state
    return result


def _return_copy(compute: Any, manifest: RollbackManifest, delete_copy: bool, poll_s: float) -> str:
    from azure.core.exceptions import ResourceNotFoundError

    copy = ids.require(manifest.prepared_disk_id, "disk", MANIFEST_HINT)
    try:
        disk = compute.disks.get(copy.resource_group, copy.name)
    except ResourceNotFoundError:
        return "already gone"
    except Exception as err:  # noqa: BLE001 - told, not fatal: the original disk is back
        if getattr(err, "status_code", None) in (401, 403):  # a missing role is the operator's to fix: say so
            raise translate_azure_error(err, f"disk copy {copy.name}") from None
        log.warning("could not read the disk copy: %s", first_line(err))
        return "left (could not be read)"
    holder = getattr(disk, "managed_by", None)
    if delete_copy:
        tags = getattr(disk, "tags", None) or {}
        if "crashcart" not in {k.lower() for k in tags}:
            raise CrashcartError(f"disk {disk.name} carries no crashcart tag: not deleting it",
                                 "delete it yourself if it is yours, or drop --delete-copy", ExitCode.USAGE)
        if holder:
            swap.detach_data_disk(compute, ids.require(holder, "vm", swap.OUTPUTS_HINT), manifest.prepared_disk_id, poll_s=poll_s)
        swap.delete_disk(compute, manifest.prepared_disk_id, poll_s=poll_s)
        return "deleted"
    if not manifest.rescue_vm_id:
        return "left unattached"
    rescue = ids.require(manifest.rescue_vm_id, "vm", MANIFEST_HINT)
    if holder and ids.same(holder, rescue.id):
        return f"already attached to {rescue.name}"
    try:
        swap.get_vm(compute, rescue)
    except CrashcartError as err:
        if err.exit_code == ExitCode.AZURE_NOT_FOUND:
            return f"left unattached ({rescue.name} is gone)"
        raise
    swap.attach_data_disk(compute, rescue, manifest.prepared_disk_id, manifest.rescue_lun, poll_s=poll_s)
    return f"reattached to {rescue.name} at LUN {manifest.rescue_lun}"
