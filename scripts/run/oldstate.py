"""Repair stacks kept under crashcart's old naming, found before anything else happens to a VM's stack.

Before the state was keyed by VM (scripts.azure.identity.vm_key), the repair stack kept it in one place
per folder - `terraform.repair.tfstate` in the project folder - or, with the azurerm backend, under
`<key_prefix>/<vm name>/repair.tfstate`, which two VMs of the same name share. A run today never reads
those, so a stack kept there (`--keep`, a crash) would be forgotten: still deployed, still costing,
still holding a disk copy with an uncollected dump. It might also belong to another VM. So a run looks
for one and, when it holds resources, refuses (exit 2) with the exact commands to look at it and to
take it over or destroy it. It never reuses, moves or destroys it itself.

The owner is read from the state (the repair resource group's `crashcart-source-vm` tag), when it is
there, so the message can name the VM and the file or key the state belongs under now.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.azure.identity import vm_key
from scripts.base.errors import CrashcartError, ExitCode
from scripts.config.model import Config
from scripts.run.terraform import PASSWORD_HINT, RepairStackDir, StackDir

log = logging.getLogger("crashcart.run")

OLD_LOCAL_STATE = "terraform.repair.tfstate"
SOURCE_VM_TAG = "crashcart-source-vm"


@dataclass(frozen=True)
class OldStack:
    where: str  # the file, or the backend key
    resources: list[str]
    owner: str  # the source VM's resource ID, "" when the state does not say
    group: str  # the repair resource group's name, "" when unknown


def read_old_stack(document: Any, where: str) -> OldStack | None:
    """The resources an old state document holds (None: none, or not a state)."""
    if not isinstance(document, dict) or not isinstance(document.get("resources"), list):
        return None
    addresses, owner, group = [], "", ""
    for item in document["resources"]:
        if not isinstance(item, dict) or item.get("mode", "managed") != "managed":
            continue
        addresses.append(f"{item.get('type')}.{item.get('name')}")
        if item.get("type") == "azurerm_resource_group":
            for instance in item.get("instances") or []:
                attributes = (instance or {}).get("attributes") or {}
                tags = attributes.get("tags") or {}
                owner = owner or str(tags.get(SOURCE_VM_TAG) or "")
                group = group or str(attributes.get("name") or "")
    return OldStack(where, addresses, owner, group) if addresses else None


def old_local_stack(repair: RepairStackDir) -> OldStack | None:
    """`terraform.repair.tfstate` beside the per-VM state files (the project folder)."""
    new = repair.local_state_path()
    folder = new.parent if new is not None else repair.stacks_dir.parent.parent
    path = folder / OLD_LOCAL_STATE
    if not path.is_file() or (new is not None and path == new):
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise CrashcartError(f"{path} (a repair stack's state from crashcart's old naming) cannot be read",
                             f"look at it (`terraform state list -state={path}`) and move it out of the way",
                             ExitCode.USAGE) from None
    return read_old_stack(document, str(path))


class _StateProbe(StackDir):
    """A folder holding only a backend block, to read a state no synthesized stack points at."""

    name = ".old-repair-state"

    def __init__(self, stacks_dir: Path, kind: str, settings: dict[str, Any]):
        super().__init__(stacks_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        self.stack_file.write_text(json.dumps({"terraform": {"backend": {kind: settings}}}), encoding="utf-8")


def old_remote_stack(config: Config, repair: RepairStackDir) -> OldStack | None:
    """The azurerm key `<key_prefix>/<vm name>/repair.tfstate`, read with `terraform state pull`."""
    kind, settings = repair.backend()
    if kind != "azurerm":
        return None
    old_key = f"{config.backend.key_prefix}/{config.source.vm_name}/repair.tfstate"
    if settings.get("key") == old_key:
        return None
    probe = _StateProbe(repair.stacks_dir, kind, {**settings, "key": old_key})
    probe.init()
    where = f"{settings.get('storage_account_name')}/{settings.get('container_name')}/{old_key}"
    return read_old_stack(probe.pulled_state(), where)


def refuse_old_stacks(config: Config, repair: RepairStackDir) -> None:
    """Exit 2 with the commands to handle it when an old-naming repair stack still holds resources."""
    local = old_local_stack(repair)
    if local is not None:
        raise _refusal(local, config, _local_hint(local, repair))
    remote = old_remote_stack(config, repair)
    if remote is not None:
        raise _refusal(remote, config, _remote_hint(remote, repair))


def _refusal(old: OldStack, config: Config, hint: str) -> CrashcartError:
    whose = f"of {old.owner}" if old.owner else "of a VM its state does not name"
    if old.owner and old.owner.lower() == config.source.vm_id.lower():
        whose += " (this VM)"
    shown = ", ".join(old.resources[:4]) + (", ..." if len(old.resources) > 4 else "")
    return CrashcartError(
        f"a repair stack kept under crashcart's old naming is still deployed: {old.where} holds "
        f"{len(old.resources)} resource(s) {whose} ({shown}); a run never reuses or destroys it by itself",
        hint, ExitCode.USAGE)


def _local_hint(old: OldStack, repair: RepairStackDir) -> str:
    path = Path(old.where)
    look = f"look at it with `terraform state list -state={path}`"
    if old.owner:
        target = path.with_name(f"terraform.repair.{vm_key(old.owner)}.tfstate")
        return (f"{look}; give it to its VM with `mv {path} {target}`, then remove it with `pipenv run repair-run "
                f"--cleanup` run with that VM's config (or resume it with a plain repair-run)")
    group = f" (or delete its resource group: `az group delete -n {old.group}`, then the file)" if old.group else ""
    return (f"{look}; destroy it from stacks synthesized for its VM: `cd {repair.path} && "
            f"{PASSWORD_HINT} terraform apply -destroy -auto-approve -state={path}`{group}")


def _remote_hint(old: OldStack, repair: RepairStackDir) -> str:
    key = old.where.split("/", 2)[-1]
    return (f"from stacks synthesized for its VM: look at it with `cd {repair.path} && terraform init -reconfigure "
            f"-backend-config=key={key} && terraform state list`, destroy it with `{PASSWORD_HINT} terraform "
            f"apply -destroy -auto-approve`, then `terraform init -reconfigure` to return to the per-VM key")
