"""`rollback`: put the original OS disk back on the source VM after a `prepare-dump --swap`.

Before the swap touches the VM, `prepare-dump` writes a rollback manifest twice — locally
(`crashcart-out/<vm>/<stamp>/rollback-manifest.json`) and in the evidence container
(`<vm>/<stamp>/rollback-manifest.json`) — naming the original OS disk (ID, name), the prepared copy,
the rescue VM and LUN the copy came from, and the VM's power state before. If either write fails, no
swap happens. The state field follows the run: ready -> swapping -> swapped -> restored.

`restore` is idempotent and safe to re-run at any point:
1. if the VM's OS disk is already the original, the VM is left as it is;
   if it is the prepared copy, the VM is stopped (powerOff without guest shutdown, then deallocate) and
   the original is swapped back in; any other disk means someone else changed the VM: refused;
2. the prepared copy goes back to the rescue VM at its LUN (so `collect` can read it and
   `cdktf destroy repair` removes it), or is deleted with `--delete-copy` (only a disk tagged by
   crashcart);
3. the VM is started again if it was running before (unless `--leave-stopped`).

    pipenv run rollback                       # the newest manifest under crashcart-out/ for the config's VM
    pipenv run rollback --manifest crashcart-out/web-01/20250517T031245Z/rollback-manifest.json
    pipenv run rollback --evidence-blob web-01/20250517T031245Z/rollback-manifest.json   # from evidence
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scripts.evidence import blobs as evidence
from scripts.nodump import swap
from scripts.base.console import emit_json, step
from scripts.config.model import DEFAULT_PATH, Config
from scripts.base.errors import CrashcartError, ExitCode

log = logging.getLogger("crashcart.rollback")

SCHEMA = "crashcart.rollback/1"
MANIFEST_NAME = "rollback-manifest.json"
OUT_DIR = Path("crashcart-out")


@dataclass
class RollbackManifest:
    source_vm_id: str
    original_os_disk_id: str
    original_os_disk_name: str
    prepared_disk_id: str
    rescue_vm_id: str
    rescue_lun: int
    power_state_before: str
    run: str  # <vm>/<stamp>
    evidence_blob_endpoint: str
    evidence_container: str
    state: str = "ready"  # ready | swapping | swapped | restored
    created_at: str = ""
    updated_at: str = ""
    history: list[dict[str, str]] = field(default_factory=list)
    local_path: str = ""
    evidence_blob: str = ""
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
            raise CrashcartError(f"{where} lacks {', '.join(missing)}", "the manifest is damaged: restore the OS disk "
                                 "by hand (az vm update --os-disk <original disk ID>)", ExitCode.USAGE)
        return cls(**{k: v for k, v in data.items() if k in names})

    def mark(self, state: str, note: str = "") -> None:
        now = _now()
        self.state, self.updated_at = state, now
        self.history.append({"at": now, "state": state, **({"note": note} if note else {})})


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def save(manifest: RollbackManifest, container: Any | None, *, require_evidence: bool) -> None:
    """Writes the manifest locally, then to evidence. With `require_evidence`, a failed upload raises
    (before a swap: no swap without both copies); otherwise it is logged (the local copy stands)."""
    path = Path(manifest.local_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    if container is None:
        return
    try:
        evidence.upload_text(container, manifest.evidence_blob, json.dumps(manifest.to_dict(), indent=2, sort_keys=True),
                             "application/json")
    except CrashcartError as err:
        if require_evidence:
            raise CrashcartError(f"the rollback manifest could not be stored in evidence: {err.message}",
                                 f"nothing was changed on the VM; fix access to the evidence container ({err.hint}) "
                                 "and re-run", err.exit_code) from None
        log.warning("the rollback manifest could not be updated in evidence (%s); the local copy %s is current",
                    err.message, path)


def load_local(path: Path) -> RollbackManifest:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CrashcartError(f"cannot read the rollback manifest {path}: {err}",
                             "pass --manifest with the file prepare-dump wrote (or --evidence-blob)",
                             ExitCode.USAGE) from None
    manifest = RollbackManifest.from_dict(data, str(path))
    manifest.local_path = str(path)
    return manifest


def load_from_evidence(container: Any, blob: str, out_dir: Path) -> RollbackManifest:
    raw = evidence.read_bytes(container, blob)
    if raw is None:
        raise CrashcartError(f"no rollback manifest at {blob} in the evidence container",
                             "list them with `az storage blob list --auth-mode login ... --prefix <vm>/`",
                             ExitCode.AZURE_NOT_FOUND)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CrashcartError(f"{blob} is not JSON: {err}", "check the blob", ExitCode.USAGE) from None
    manifest = RollbackManifest.from_dict(data, blob)
    manifest.local_path = str(out_dir / manifest.run / MANIFEST_NAME) if manifest.run else str(out_dir / MANIFEST_NAME)
    manifest.evidence_blob = blob
    return manifest


def newest_local(out_dir: Path, vm_name: str) -> Path:
    found = sorted((out_dir / vm_name).glob(f"*/{MANIFEST_NAME}"))
    if not found:
        raise CrashcartError(f"no rollback manifest under {out_dir / vm_name}",
                             "pass --manifest <file> or --evidence-blob <vm>/<stamp>/rollback-manifest.json",
                             ExitCode.USAGE)
    return found[-1]


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
    vm = swap.VmRef.parse(manifest.source_vm_id)
    result = RestoreResult(vm_id=vm.id, os_disk_id="", state=manifest.state)
    model = swap.get_vm(compute, vm)
    current = swap.os_disk_id(model)
    if swap.same_id(current, manifest.prepared_disk_id):
        swap.stop_and_deallocate(compute, vm, poll_s=poll_s)
        result.steps.append("stopped and deallocated the VM")
        swap.swap_os_disk(compute, vm, manifest.original_os_disk_id, expect_current=manifest.prepared_disk_id,
                          poll_s=poll_s)
        result.steps.append(f"OS disk back to {manifest.original_os_disk_name}")
    elif swap.same_id(current, manifest.original_os_disk_id):
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

    try:
        disk = compute.disks.get(*swap.disk_parts(manifest.prepared_disk_id))
    except ResourceNotFoundError:
        return "already gone"
    except Exception as err:  # noqa: BLE001 - told, not fatal: the original disk is back
        log.warning("could not read the disk copy: %s", err)
        return "left (could not be read)"
    holder = getattr(disk, "managed_by", None)
    if delete_copy:
        tags = getattr(disk, "tags", None) or {}
        if "crashcart" not in {k.lower() for k in tags}:
            raise CrashcartError(f"disk {disk.name} carries no crashcart tag: not deleting it",
                                 "delete it yourself if it is yours, or drop --delete-copy", ExitCode.USAGE)
        if holder:
            swap.detach_data_disk(compute, swap.VmRef.parse(holder), manifest.prepared_disk_id, poll_s=poll_s)
        swap.delete_disk(compute, manifest.prepared_disk_id, poll_s=poll_s)
        return "deleted"
    if not manifest.rescue_vm_id:
        return "left unattached"
    rescue = swap.VmRef.parse(manifest.rescue_vm_id)
    if holder and swap.same_id(holder, rescue.id):
        return f"already attached to {rescue.name}"
    try:
        swap.get_vm(compute, rescue)
    except CrashcartError as err:
        if err.exit_code == ExitCode.AZURE_NOT_FOUND:
            return f"left unattached ({rescue.name} is gone)"
        raise
    swap.attach_data_disk(compute, rescue, manifest.prepared_disk_id, manifest.rescue_lun, poll_s=poll_s)
    return f"reattached to {rescue.name} at LUN {manifest.rescue_lun}"


# ---- the verb -------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, help="the rollback-manifest.json prepare-dump wrote "
                                                      "(default: the newest under --out-dir for the config's VM)")
    parser.add_argument("--evidence-blob", help="read the manifest from the evidence container instead, e.g. "
                                                "web-01/20250517T031245Z/rollback-manifest.json")
    parser.add_argument("--config", help="config file (default: CRASHCART_CONFIG or repair.toml)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="local output folder (default: %(default)s)")
    parser.add_argument("--delete-copy", action="store_true",
                        help="delete the prepared disk copy instead of putting it back on the rescue VM")
    parser.add_argument("--leave-stopped", action="store_true",
                        help="leave the VM deallocated even if it was running before the swap")
    parser.add_argument("--poll-seconds", type=float, default=swap.DEFAULT_POLL_S,
                        help="how often to poll Azure when it gives no Retry-After (default: %(default)s)")


def _container_for(manifest: RollbackManifest) -> Any | None:
    if not manifest.evidence_blob_endpoint or not manifest.evidence_container:
        return None
    try:
        return evidence.container_client(manifest.evidence_blob_endpoint, manifest.evidence_container)
    except CrashcartError as err:
        log.warning("evidence container not reachable (%s): only the local manifest is updated", err.message)
        return None


def run(args: argparse.Namespace) -> int:
    from scripts.azure.clients import AzureClients

    if args.manifest:
        manifest = load_local(args.manifest)
    else:
        config = Config.load(args.config) if (args.config or Path(DEFAULT_PATH).exists()) else None
        if args.evidence_blob:
            if config is None:
                raise CrashcartError("--evidence-blob needs the config (for the evidence account)",
                                     "pass --config, or --manifest with a local copy", ExitCode.USAGE)
            container = evidence.container_client(f"https://{config.evidence_account_name}.blob.core.windows.net",
                                                  config.evidence.container)
            manifest = load_from_evidence(container, args.evidence_blob, args.out_dir)
        else:
            if config is None:
                raise CrashcartError("no --manifest given and no config to find the newest one",
                                     "pass --manifest crashcart-out/<vm>/<stamp>/rollback-manifest.json", ExitCode.USAGE)
            manifest = load_local(newest_local(args.out_dir, config.source.vm_name))
    vm = swap.VmRef.parse(manifest.source_vm_id)
    compute = AzureClients(vm.subscription_id).compute
    with step(f"roll back VM {vm.name} to its original OS disk {manifest.original_os_disk_name}"):
        result = restore(compute, manifest, _container_for(manifest), delete_copy=args.delete_copy,
                         leave_stopped=args.leave_stopped, poll_s=args.poll_seconds)
    for line in result.steps:
        log.info("    %s", line)
    emit_json({"rollback": result.to_dict(), "manifest": manifest.local_path})
    return int(ExitCode.OK)
