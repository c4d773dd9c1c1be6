"""`summary`: synthesize both stacks and say, in plain words, what `cdktf deploy` would create.

Synth runs as a child process (scripts.run.synth: `python main.py`, exactly as `npx cdktf synth` runs
it), so this never imports cdktf itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scripts.base.console import step
from scripts.run.synth import synth

PROJECT = Path(__file__).resolve().parents[2]
STACKS = ("evidence", "repair")

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


def summarize(config_path: Path, outdir: Path) -> dict[str, Any]:
    """Synthesizes both stacks for the config into `outdir` and describes each: {stack: description}."""
    with step("synthesize the evidence and repair stacks"):
        synth(PROJECT, config_path.resolve(), outdir=outdir.resolve())
    return {name: describe_stack(outdir / "stacks" / name / "cdk.tf.json") for name in STACKS}


def describe_stack(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    resources = [
        {"type": rtype, "name": body.get("name", key), "what": DESCRIPTIONS.get(rtype, rtype)}
        for rtype, items in data.get("resource", {}).items() for key, body in items.items()
    ]
    return {"file": str(path), "resources": resources, "outputs": sorted(data.get("output", {})),
            "variables": sorted(data.get("variable", {}))}
