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
from scripts.base import endpoints, userfiles
from scripts.base.errors import CrashcartError, ExitCode, first_line, printable
from scripts.base.rangeio import check_url

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
    text = userfiles.read_text(path, "--outputs-file", "pass the file written by `cdktf deploy --outputs-file`",
                               "outputs file")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:  # not JSON, nested too deep
        raise CrashcartError(f"cannot read outputs file {path}: {first_line(err)}",
                             "pass the file written by `cdktf deploy --outputs-file`", ExitCode.USAGE) from None
    if not isinstance(data, dict) or stack not in data:
        raise CrashcartError(f"outputs file {path} has no '{stack}' stack",
                             f"deploy it with `cdktf deploy {stack} --outputs-file {path}`", ExitCode.USAGE)
    values = data[stack]
    if not isinstance(values, dict):
        raise CrashcartError(f"outputs file {path}: the '{stack}' stack's outputs are not a JSON object",
                             f"pass the file `cdktf deploy {stack} --outputs-file` writes", ExitCode.USAGE)
    return {name: _unwrapped(value) for name, value in values.items()}


def _unwrapped(value: Any) -> Any:
    """`terraform output -json` writes each output as {"value": ..., "type": ..., "sensitive": ...}; cdktf's
    outputs file writes the value itself. No output the stacks declare is an object, so the two shapes cannot
    be confused: the terraform shape is read as its value."""
    if isinstance(value, dict) and "value" in value and set(value) <= {"value", "type", "sensitive"}:
        return value["value"]
    return value


# the resource IDs among the repair stack's outputs and their kind ("" is an output the strategy left empty)
_REPAIR_IDS = {"rescue_vm_id": "vm", "disk_copy_id": "disk", "snapshot_id": "snapshot", "source_vm_id": "vm",
               "source_os_disk_id": "disk"}
MAX_LUN = 63  # Azure's data disk LUNs are 0..63


def repair_outputs_from_file(path: Path) -> RepairOutputs:
    """The repair stack's outputs from a file the operator names (--outputs-file), every value checked: a
    wrong type, a malformed resource ID or an endpoint a token must not go to is a usage error (exit 2)."""
    values = outputs_file_values(path, "repair")
    kwargs = _declared(RepairOutputs, values, "repair")
    hint = "pass the file `cdktf deploy repair --outputs-file` wrote, unedited"

    def bad(name: str, expected: str) -> CrashcartError:
        shown = printable(repr(kwargs[name]))[:200]
        return CrashcartError(f"outputs file {path}: {name} = {shown} is not {expected}", hint, ExitCode.USAGE)

    lun = kwargs["disk_copy_lun"]
    if isinstance(lun, str) and lun.isascii() and lun.isdigit():
        lun = int(lun)
    if isinstance(lun, bool) or not isinstance(lun, int) or not 0 <= lun <= MAX_LUN:
        raise bad("disk_copy_lun", f"a LUN (a whole number 0..{MAX_LUN})")
    kwargs["disk_copy_lun"] = lun
    for name, value in kwargs.items():
        if name != "disk_copy_lun" and not isinstance(value, str):
            raise bad(name, "text")
    for name, kind in _REPAIR_IDS.items():
        if kwargs[name] and ids.try_parse(kwargs[name], kind) is None:
            raise bad(name, f"a resource ID ({ids.FORMS[kind]})")
    if kwargs["rescue_os"] not in ("windows", "linux"):
        raise bad("rescue_os", '"windows" or "linux"')
    if not kwargs["evidence_container"]:
        raise bad("evidence_container", "a container name")
    try:  # the kit sends its Azure AD token there: the rule every URL it is given passes
        check_url(kwargs["evidence_blob_endpoint"])
        refused = endpoints.token_refusal(kwargs["evidence_blob_endpoint"])
    except CrashcartError as err:
        refused = err.message
    if refused:
        raise bad("evidence_blob_endpoint", "an Azure Storage blob endpoint over https (plain http only on this "
                                            f"machine): {refused}")
    return RepairOutputs(**kwargs)
