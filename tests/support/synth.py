"""Synthesizes the stacks for several config variants in one process (jsii loads once per session)."""

from __future__ import annotations

import copy
import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.config.model import Config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "repair.example.toml"
SUB = "00000000-0000-0000-0000-000000000001"
EXISTING_SUBNET = (f"/subscriptions/{SUB}/resourceGroups/net-hub/providers/Microsoft.Network/"
                   "virtualNetworks/hub/subnets/rescue")
EXISTING_ACCOUNT = f"/subscriptions/{SUB}/resourceGroups/sec-evidence/providers/Microsoft.Storage/storageAccounts/secdumps01"


def example_data() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE.read_text())


def variant_data(name: str) -> dict[str, Any]:
    """The example config with the changes that make each variant interesting."""
    data = copy.deepcopy(example_data())
    s, r, n, e, p, b = (data[k] for k in ("source", "rescue", "network", "evidence", "repair", "backend"))
    if name == "gen1":
        s.update(hyper_v_generation="V1", security_type="Standard", zone="", os_disk_sku="Standard_LRS")
    elif name == "linux":
        r.update(os="linux")
    elif name == "existing":
        n.update(subnet_id=EXISTING_SUBNET)
        e.update(account_id=EXISTING_ACCOUNT, firewall=True, allowed_ip_ranges=["203.0.113.0/24"])
    elif name == "nvme":
        s.update(disk_controller="NVMe", os_disk_sku="Premium_ZRS", security_type="Standard")
        r.update(size="Standard_D4ads_v6")
    elif name == "pipeline":
        b.update(kind="azurerm", resource_group="crashcart-state", storage_account="crashcartstate01")
        e.update(immutability_days=365, location="northeurope")
        p.update(strategy="snapshot-export", ttl_hours=4)
    elif name != "default":
        raise ValueError(name)
    return data


VARIANTS = ("default", "gen1", "linux", "existing", "nvme", "pipeline")


@dataclass
class Synthesized:
    name: str
    config: Config
    outdir: Path

    def stack_path(self, stack: str) -> Path:
        return self.outdir / "stacks" / stack / "cdk.tf.json"

    def text(self, stack: str) -> str:
        return self.stack_path(stack).read_text()

    def json(self, stack: str) -> dict[str, Any]:
        return json.loads(self.text(stack))

    def resources(self, stack: str, rtype: str) -> list[dict[str, Any]]:
        return list(self.json(stack).get("resource", {}).get(rtype, {}).values())

    def resource(self, stack: str, rtype: str) -> dict[str, Any]:
        found = self.resources(stack, rtype)
        assert len(found) == 1, f"expected one {rtype} in {stack}, found {len(found)}"
        return found[0]


def synth_variants(root: Path) -> dict[str, Synthesized]:
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
    from main import build_app

    out: dict[str, Synthesized] = {}
    for name in VARIANTS:
        config = Config.from_dict(variant_data(name))
        outdir = root / name
        build_app(config, str(outdir)).synth()
        out[name] = Synthesized(name, config, outdir)
    return out
