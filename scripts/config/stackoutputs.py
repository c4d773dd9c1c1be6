"""What the post-apply steps need from the deployed stacks, read from Terraform's outputs.

The stacks declare these outputs under fixed names (stacks/repair.py, stacks/evidence.py); this module
types them and reads the file `cdktf deploy --outputs-file` writes ({"<stack>": {"<name>": value}}).
`terraform output -json` is read by scripts.run.outputs, where terraform runs.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.azure import ids
from scripts.base.errors import CrashcartError, ExitCode, first_line

STACKS_DIR = Path("cdktf.out") / "stacks"


@dataclass(frozen=True)
class RepairOutputs:
    """The `repair` stack's outputs (names are a contract with stacks/repair.py)."""

    subscription_id: str
    resource_group_name: str
    rescue_vm_id: str
    rescue_vm_name: str
    rescue_vm_principal_id: str
    rescue_os: str  # "windows" | "linux"
    disk_copy_id: str
    disk_copy_lun: int
    snapshot_id: str
    source_vm_id: str
    source_os_disk_id: str
    evidence_account_name: str
    evidence_blob_endpoint: str
    evidence_container: str

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> "RepairOutputs":
        kwargs = _declared(cls, values, "repair")
        kwargs["disk_copy_lun"] = int(kwargs["disk_copy_lun"])
        return cls(**kwargs)

    @property
    def rescue_vm(self) -> tuple[str, str]:
        """(resource group, name) of the rescue VM, from its ID (older outputs: the group and name outputs)."""
        found = ids.try_parse(self.rescue_vm_id, "vm")
        return (found.resource_group, found.name) if found else (self.resource_group_name, self.rescue_vm_name)

    def blob_url(self, name: str) -> str:
        """The URL of a blob in the evidence container (the container's own URL for an empty name)."""
        container = f"{self.evidence_blob_endpoint.rstrip('/')}/{urllib.parse.quote(self.evidence_container)}"
        return f"{container}/{urllib.parse.quote(name)}" if name else container


@dataclass(frozen=True)
class EvidenceOutputs:
    """The `evidence` stack's outputs."""

    account_id: str
    account_name: str
    blob_endpoint: str
    container_name: str
    container_scope_id: str
    resource_group_name: str

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> "EvidenceOutputs":
        return cls(**_declared(cls, values, "evidence"))


def _declared(cls: type, values: Any, stack: str) -> dict[str, Any]:
    """The outputs `cls` declares, taken from `values`; a usage error naming what is missing."""
    names = [f.name for f in dataclasses.fields(cls)]
    missing = names if not isinstance(values, dict) else [n for n in names if n not in values]
    if missing:
        raise CrashcartError(
            f"the {stack} stack's outputs lack {', '.join(missing)}",
            f"deploy the {stack} stack first (`cdktf deploy {stack}`), from this version of crashcart", ExitCode.USAGE)
    return {n: values[n] for n in names}


def outputs_file_values(path: Path, stack: str) -> dict[str, Any]:
    """Values from `cdktf deploy --outputs-file <path>`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: not UTF-8, not JSON
        raise CrashcartError(f"cannot read outputs file {path}: {first_line(err)}",
                             "pass the file written by `cdktf deploy --outputs-file`", ExitCode.USAGE) from None
    if not isinstance(data, dict) or stack not in data:
        raise CrashcartError(f"outputs file {path} has no '{stack}' stack",
                             f"deploy it with `cdktf deploy {stack} --outputs-file {path}`", ExitCode.USAGE)
    return data[stack]
