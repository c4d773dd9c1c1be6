"""The checks before a repair-run touches anything: a config for the right VM, stacks synthesized for it
(state keyed by that VM), Terraform on PATH, and a repair stack that takes the credential this rescue OS
needs.

Each one fails with what to do next, before a single resource exists.
"""

from __future__ import annotations

from scripts.azure.identity import vm_key
from scripts.base.console import log
from scripts.base.errors import CrashcartError, ExitCode
from scripts.config.model import Config
from scripts.run.credential import RescueCredential
from scripts.run.settings import RunSettings
from scripts.run.terraform import RepairStackDir, StackDir, terraform_binary

SOURCE_VM_TAG = "crashcart-source-vm"


def ensure_config_file(settings: RunSettings) -> None:
    """Discovers the VM when there is no config yet (needs --vm or CRASHCART_VM_ID)."""
    path = settings.config_path
    if path.exists():
        log.info("    config: %s", path)
        return
    if not settings.vm_id:
        raise CrashcartError(
            f"no config file at {path}, and no VM to discover",
            "pass --vm <VM resource ID> (or set CRASHCART_VM_ID) to discover it, or write the file "
            "(see repair.example.toml; CRASHCART_CONFIG names another path)", ExitCode.USAGE)
    from scripts.run.discover import discover_config, write_config

    log.info("    no config at %s: discovering %s", path, settings.vm_id)
    write_config(discover_config(settings.vm_id), path)


def load_config(settings: RunSettings, stacks: tuple[StackDir, ...]) -> Config:
    """The config, refused when it is for another VM than --vm; the stacks must be synthesized and
    Terraform installed."""
    config = Config.load(settings.config_path)
    if settings.vm_id and config.source.vm_id.lower() != settings.vm_id.lower():
        raise CrashcartError(
            f"the config {settings.config_path} is for {config.source.vm_id}, "
            f"but the VM to repair is {settings.vm_id}",
            "remove the old config (discover then writes a new one) or point CRASHCART_CONFIG elsewhere",
            ExitCode.USAGE)
    for stack in stacks:
        stack.synthesized()  # raises if a stack folder is missing
    terraform_binary()
    return config


def rescue_credential(config: Config, repair: StackDir) -> RescueCredential:
    """A fresh credential of the kind the rescue OS needs, which the synthesized repair stack must declare
    (stacks synthesized for the other OS would leave Terraform without a value)."""
    credential = RescueCredential.generate(config.rescue.os)
    declared = repair.declared_variables()
    if credential.variable not in declared:
        raise CrashcartError(
            f"the synthesized repair stack declares {sorted(declared)}, not {credential.variable} "
            f"for a {config.rescue.os} rescue VM", "re-run without --skip-synth", ExitCode.USAGE)
    return credential


def check_repair_stack_is_for(config: Config, repair: RepairStackDir) -> None:
    """The synthesized repair stack must keep its state under this VM's key and be tagged for this VM:
    stacks synthesized for another VM (or before state was keyed by VM) would resume or destroy that VM's
    stack. `--skip-synth` is where that could happen."""
    key = vm_key(config.source.vm_id)
    where = repair.state_location()
    if key not in where:
        raise CrashcartError(
            f"the synthesized repair stack keeps its state in {where}, not under {config.source.vm_name}'s key "
            f"({key}): it was synthesized for another VM, or by an older crashcart",
            "re-run without --skip-synth (synth keys the state by VM)", ExitCode.USAGE)
    for group in repair.synthesized().get("resource", {}).get("azurerm_resource_group", {}).values():
        tagged = str((group.get("tags") or {}).get(SOURCE_VM_TAG) or "")
        if tagged and tagged.lower() != config.source.vm_id.lower():
            raise CrashcartError(
                f"the synthesized repair stack is for {tagged}, not for {config.source.vm_id}",
                "re-run without --skip-synth", ExitCode.USAGE)
