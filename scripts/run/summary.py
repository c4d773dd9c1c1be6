"""`summary`: synthesize both stacks and say, in plain words, what `cdktf deploy` would create.

Synth runs as a child process (`python main.py`), exactly as `npx cdktf synth` runs it, so this verb
never imports cdktf itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from scripts.base.console import emit_json, log, step
from scripts.config.model import DEFAULT_PATH, Config
from scripts.base.errors import CrashcartError, ExitCode

PROJECT = Path(__file__).resolve().parents[2]

# What each resource type is, for a person reading the plan.
DESCRIPTIONS = {
    "azurerm_resource_group": "resource group",
    "azurerm_storage_account": "storage account (private, Azure AD only, versioned, soft delete)",
    "azurerm_storage_container": "private blob container for dumps",
    "azurerm_storage_container_immutability_policy": "time-based retention on the container",
    "azurerm_snapshot": "snapshot of the broken OS disk (read only)",
    "azurerm_managed_disk": "disk copy made from the snapshot",
    "azurerm_virtual_network": "isolated virtual network",
    "azurerm_subnet": "subnet with a storage service endpoint",
    "azurerm_network_security_group": "NSG denying all inbound traffic",
    "azurerm_subnet_network_security_group_association": "NSG attached to the subnet",
    "azurerm_network_interface": "private NIC (no public IP)",
    "azurerm_windows_virtual_machine": "Windows rescue VM with a managed identity",
    "azurerm_linux_virtual_machine": "Linux rescue VM with a managed identity",
    "azurerm_virtual_machine_data_disk_attachment": "disk copy attached to the rescue VM",
    "azurerm_role_assignment": "rescue VM may write its own dumps to the evidence container",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help=f"config file (default: CRASHCART_CONFIG or {DEFAULT_PATH})")
    parser.add_argument("--outdir", default="cdktf.out", help="where to synthesize (default: cdktf.out)")


def run(args: argparse.Namespace) -> int:
    config_path = args.config or os.environ.get("CRASHCART_CONFIG") or DEFAULT_PATH
    config = Config.load(config_path)
    outdir = Path(args.outdir)
    with step("synthesize the evidence and repair stacks"):
        synth(config_path, outdir)
    stacks = {name: describe_stack(outdir / "stacks" / name / "cdk.tf.json") for name in ("evidence", "repair")}
    print_summary(config, stacks)
    emit_json({"config": str(config_path), "outdir": str(outdir), "stacks": stacks})
    return ExitCode.OK


def synth(config_path: str, outdir: Path) -> None:
    env = {**os.environ, "CRASHCART_CONFIG": str(Path(config_path).resolve()), "CDKTF_OUTDIR": str(outdir.resolve())}
    result = subprocess.run([sys.executable, str(PROJECT / "main.py")], cwd=PROJECT, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise CrashcartError(f"synth failed: {result.stderr.strip()[-2000:]}",
                             "fix the config named above and re-run", ExitCode.USAGE)


def describe_stack(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    resources = [
        {"type": rtype, "name": body.get("name", key), "what": DESCRIPTIONS.get(rtype, rtype)}
        for rtype, items in data.get("resource", {}).items() for key, body in items.items()
    ]
    return {"file": str(path), "resources": resources, "outputs": sorted(data.get("output", {})),
            "variables": sorted(data.get("variable", {}))}


def print_summary(config: Config, stacks: dict[str, Any]) -> None:
    s = config.source
    log.info("")
    log.info("Rescue plan for %s (%s, %s, zone %s)", s.vm_name, s.resource_group, s.location, s.zone or "none")
    log.info("  source disk: %s GiB %s, %s, %s, %s controller", s.os_disk_size_gb, s.os_disk_sku,
             s.hyper_v_generation, s.security_type, s.disk_controller)
    log.info("  rescue VM: %s %s from %s", config.rescue.os, config.rescue.size, config.rescue_image)
    for name, stack in stacks.items():
        log.info("")
        log.info("cdktf deploy %s  (%s)", name, stack["file"])
        for item in stack["resources"]:
            log.info("  + %-62s %s", f"{item['type']}.{item['name']}", item["what"])
        if stack["variables"]:
            log.info("  variables supplied at deploy time: %s (TF_VAR_<name>)", ", ".join(stack["variables"]))
    log.info("")
    log.info("The source VM and its disk are only read. `cdktf destroy repair` removes the repair stack;")
    log.info("the evidence stack and its dumps stay.")
