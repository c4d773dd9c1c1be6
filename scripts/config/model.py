"""The typed configuration of one repair: a TOML file plus CRASHCART_* environment overrides.

Everything synth needs is here, so synthesizing the stacks never calls Azure: `discover` reads the
broken VM once and writes this file; a person or a pipeline can also write it by hand. The stacks
(stacks/) import scripts.config and nothing else from scripts/.

Every value is checked when the config is loaded. A bad value stops the run with one message naming
the field, the value and the form expected (`ConfigError`), never a traceback.

The package, bottom up: sections (one dataclass per table, and the names they share), validate (every
check), load (file, environment, coercion), render (the TOML discover writes) and this module, the
whole Config with the values the stacks and the runtime derive from it. The names other packages use
(Config, DEFAULT_PATH, KIT_TAG, GUID, render_toml) are importable from here.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from scripts.azure import ids
from scripts.base.errors import CrashcartError
from scripts.config.load import read_file, sections_from_dict
from scripts.config.regions import normalize
from scripts.config.render import render_toml
from scripts.config.sections import (DEFAULT_IMAGES, DEFAULT_PATH, EXAMPLE_PATH, GUID, KIT_TAG, Backend, Evidence,
                                     ImageRef, Network, RescueVm, Repair, SourceVm)

__all__ = ["Config", "load_or_exit", "render_toml", "DEFAULT_PATH", "EXAMPLE_PATH", "GUID", "KIT_TAG",
           "ImageRef", "SourceVm", "RescueVm", "Network", "Evidence", "Repair", "Backend"]


@dataclass(frozen=True)
class Config:
    source: SourceVm
    rescue: RescueVm = field(default_factory=RescueVm)
    network: Network = field(default_factory=Network)
    evidence: Evidence = field(default_factory=Evidence)
    repair: Repair = field(default_factory=Repair)
    backend: Backend = field(default_factory=Backend)
    tags: Mapping[str, str] = field(default_factory=dict)

    # ---- derived values the stacks and the runtime share ----------------------------------------
    @property
    def rescue_image(self) -> ImageRef:
        return self.rescue.image or DEFAULT_IMAGES[(self.rescue.os, self.source.hyper_v_generation)]

    @property
    def repair_resource_group(self) -> str:
        return self.repair.resource_group or f"crashcart-repair-{self.source.vm_name}"[:90].rstrip(".")

    @property
    def evidence_location(self) -> str:
        return self.evidence.location or self.source.location

    @property
    def evidence_blob_endpoint(self) -> str:
        """The evidence account's Blob endpoint in the public cloud (the evidence stack's output says the same)."""
        return f"https://{self.evidence_account_name}.blob.core.windows.net"

    @property
    def evidence_account_name(self) -> str:
        if self.evidence.account_id:
            return ids.parse(self.evidence.account_id, "storage_account").name
        if self.evidence.account_name:
            return self.evidence.account_name
        # Globally unique but stable: the same subscription and region always give the same name.
        digest = hashlib.sha256(f"{self.source.subscription_id}/{self.evidence_location}".encode()).hexdigest()
        return f"crashcart{digest[:12]}"

    @property
    def evidence_account_resource_group(self) -> str:
        """The existing account's group when evidence.account_id names one, else the group the stack creates."""
        if self.evidence.account_id:
            return ids.parse(self.evidence.account_id, "storage_account").resource_group
        return self.evidence.resource_group

    @property
    def evidence_account_id(self) -> str:
        return self.evidence.account_id or ids.build(
            "storage_account", self.source.subscription_id, self.evidence.resource_group, self.evidence_account_name)

    @property
    def storage_service_endpoint(self) -> str:
        """Service endpoints reach accounts in the VNet's own region only; Storage.Global reaches any."""
        same_region = normalize(self.evidence_location) == normalize(self.source.location)
        return "Microsoft.Storage" if same_region else "Microsoft.Storage.Global"

    def kit_tags(self, role: str) -> dict[str, str]:
        return {**self.tags, KIT_TAG: role, "crashcart-source-vm": self.source.vm_id}

    # ---- loading and writing (scripts.config.load, scripts.config.render) -------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> "Config":
        """The config file (`path`, CRASHCART_CONFIG or repair.toml) with the environment's overrides."""
        env = os.environ if env is None else env
        return cls.from_dict(read_file(path, env), env)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> "Config":
        """A validated Config of the tables in `data` (as TOML reads them) and the overrides in `env`."""
        return cls(**sections_from_dict(data, {} if env is None else env))

    def to_toml(self, header: str = "") -> str:
        """The config as a commented TOML file (what `discover` writes)."""
        return render_toml(self, header)


def load_or_exit(path: str | None = None) -> Config:
    """For main.py: a config error ends synth with the message and exit code 2, no traceback."""
    try:
        return Config.load(path)
    except CrashcartError as err:
        sys.stderr.write(f"error: {err.message}\n" + (f"next:  {err.hint}\n" if err.hint else ""))
        raise SystemExit(int(err.exit_code)) from None
