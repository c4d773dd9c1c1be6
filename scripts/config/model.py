"""The typed configuration of one repair: a TOML file plus CRASHCART_* environment overrides.

Everything synth needs is here, so synthesizing the stacks never calls Azure: `discover` reads the
broken VM once and writes this file; a person or a pipeline can also write it by hand. The stacks
(stacks/) import scripts.config and nothing else from scripts/.

Every value is checked when the config is loaded, by pydantic models whose fields carry Azure's rules.
A bad value stops the run with one line naming the field, the value and the form expected
(`ConfigError`, exit code 2), never a traceback.

The package, bottom up: shown (how a value appears in a message), regions, validate (every rule, as
pydantic validators), sections (one model per table, and the names they share), load (file,
environment via pydantic-settings, the first failure as a ConfigError), render (the TOML discover
writes) and this module, the whole Config with the values the stacks and the runtime derive from it.
The names other packages use (Config, DEFAULT_PATH, KIT_TAG, GUID, render_toml) are importable from here.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from scripts.azure import ids
from scripts.azure.identity import vm_key
from scripts.base.console import report_error
from scripts.base.errors import CrashcartError
from scripts.config.load import build, read_file
from scripts.config.regions import normalize
from scripts.config.render import render_toml
from scripts.config.sections import (DEFAULT_IMAGES, DEFAULT_PATH, EXAMPLE_PATH, KIT_TAG, Backend, Evidence,
                                     ImageRef, Network, RescueVm, Repair, SourceVm)
from scripts.config.validate import GUID, Invalid, check, rule, text

__all__ = ["Config", "load_or_exit", "render_toml", "DEFAULT_PATH", "EXAMPLE_PATH", "GUID", "KIT_TAG",
           "ImageRef", "DEFAULT_IMAGES", "SourceVm", "RescueVm", "Network", "Evidence", "Repair", "Backend"]

KIT_TAGS = (KIT_TAG, "crashcart-source-vm", "crashcart-expires-at")  # set by the kit on every resource
MAX_TAGS = 45  # Azure allows 50 per resource; the kit adds its own
_TAG_NAME_ILLEGAL = re.compile(r"[<>%&\\?/]")


def flat_tags(value: Any) -> dict[str, str]:
    """Flat `name = "value"` strings within Azure's limits (a storage account's: names 1-128, values 0-256)."""
    if not isinstance(value, Mapping):
        raise Invalid('a [tags] table of name = "value" pairs')
    check(len(value) <= MAX_TAGS, f"at most {MAX_TAGS} tags (Azure allows 50; crashcart adds {len(KIT_TAGS)})",
          value=f"{len(value)} tags")
    out: dict[str, str] = {}
    seen: set[str] = set()
    for key, item in value.items():
        try:
            name = text(key)
            check(0 < len(name) <= 128 and not _TAG_NAME_ILLEGAL.search(name),
                  "a tag name of 1-128 characters without < > % & \\ ? /", value=key)
            check(name.lower() not in KIT_TAGS, "a tag name crashcart does not set itself", value=item)
            check(name.lower() not in seen, "a tag name used once (Azure tag names ignore case)", value=key)
            if not isinstance(item, str):
                raise Invalid('a string value (tags are flat name = "value" pairs; quote numbers)')
            out[name] = text(item, 256)
        except Invalid as err:
            raise Invalid(err.expected, err.hint, at=f".{key}", value=err.value if err.value is not
                          Invalid.NO_VALUE else item) from None
        seen.add(name.lower())
    return out


class Config(BaseModel):
    """The whole repair: one validated, frozen model per section plus the tags."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: SourceVm
    rescue: RescueVm = Field(default_factory=RescueVm)
    network: Network = Field(default_factory=Network)
    evidence: Evidence = Field(default_factory=Evidence)
    repair: Repair = Field(default_factory=Repair)
    backend: Backend = Field(default_factory=Backend)
    tags: Annotated[dict[str, str], rule(flat_tags)] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.evidence.firewall and self.network.create and not self.evidence.allowed_subnet_ids:
            raise Invalid(
                "false, unless the rescue VM's subnet is allowed through the firewall",
                "a default-deny firewall must let the rescue subnet in: set network.subnet_id to a long-lived subnet "
                "(it is then allowed automatically) or list it in evidence.allowed_subnet_ids",
                at="evidence.firewall", value=True)
        return self

    # ---- derived values the stacks and the runtime share ----------------------------------------
    @property
    def rescue_image(self) -> ImageRef:
        return self.rescue.image or DEFAULT_IMAGES[(self.rescue.os, self.source.hyper_v_generation)]

    @property
    def repair_resource_group(self) -> str:
        """repair.resource_group, else `crashcart-repair-<vm key>`: keyed by the VM's resource ID, so two VMs
        named alike in other groups or subscriptions never share a repair group (at most 66 characters)."""
        return self.repair.resource_group or f"crashcart-repair-{vm_key(self.source.vm_id)}"

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
        """A validated Config of the tables in `data` (as TOML reads them) and the overrides in `env` (none
        when None; CRASHCART_EXTRA_REGIONS is then read from os.environ)."""
        return build(cls, data, env)

    def to_toml(self, header: str = "") -> str:
        """The config as a commented TOML file (what `discover` writes)."""
        return render_toml(self, header)


def load_or_exit(path: str | None = None) -> Config:
    """For main.py: a config error ends synth with the message and exit code 2, no traceback."""
    try:
        return Config.load(path)
    except CrashcartError as err:
        report_error(err)
        raise SystemExit(int(err.exit_code)) from None
