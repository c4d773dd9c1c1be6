"""What the post-apply steps need from the deployed stacks, read from Terraform's outputs.

The stacks declare these outputs under fixed names (stacks/repair.py, stacks/evidence.py); this module
is their only reader. Two sources, the same values: `terraform output -json` in the synthesized stack
folder (cdktf.out/stacks/<stack>, through python-terraform), or the file `cdktf deploy --outputs-file`
writes ({"<stack>": {"<name>": value}}).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.base.errors import CrashcartError, ExitCode

STACKS_DIR = Path("cdktf.out") / "stacks"


def terraform_binary() -> str:
    """`CRASHCART_TERRAFORM` or `terraform` on PATH."""
    name = os.environ.get("CRASHCART_TERRAFORM", "terraform")
    found = shutil.which(name)
    if not found:
        raise CrashcartError(
            f"terraform was not found ({name})",
            "install Terraform >= 1.5 (https://developer.hashicorp.com/terraform/install) or point "
            "CRASHCART_TERRAFORM at the binary",
            ExitCode.USAGE)
    return found


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
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in values]
        if missing:
            raise CrashcartError(
                f"the repair stack's outputs lack {', '.join(missing)}",
                "deploy the repair stack first (`cdktf deploy repair`), from this version of crashcart",
                ExitCode.USAGE)
        kwargs = {n: values[n] for n in names}
        kwargs["disk_copy_lun"] = int(kwargs["disk_copy_lun"])
        return cls(**kwargs)


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
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in values]
        if missing:
            raise CrashcartError(f"the evidence stack's outputs lack {', '.join(missing)}",
                                 "deploy it first: `cdktf deploy evidence`", ExitCode.USAGE)
        return cls(**{n: values[n] for n in names})


def terraform_outputs(stack: str, stacks_dir: Path = STACKS_DIR) -> dict[str, Any]:
    """`terraform output -json` in the stack's synthesized folder, as {name: value}."""
    from python_terraform import Terraform

    folder = stacks_dir / stack
    if not (folder / "cdk.tf.json").exists():
        raise CrashcartError(f"{folder}/cdk.tf.json does not exist",
                             "synthesize the stacks first: `npx cdktf synth` (or `pipenv run python main.py`)",
                             ExitCode.USAGE)
    tf = Terraform(working_dir=str(folder), terraform_bin_path=terraform_binary())
    code, out, err = tf.output_cmd(json=True)
    if code != 0:
        raise CrashcartError(f"terraform output failed in {folder}: {(err or out).strip().splitlines()[-1:]}",
                             f"deploy the stack first (`cdktf deploy {stack}`)", ExitCode.USAGE)
    raw = json.loads(out or "{}")
    if not raw:
        raise CrashcartError(f"the {stack} stack has no outputs: it is not deployed",
                             f"run `cdktf deploy {stack}` (or `pipenv run repair-run`)", ExitCode.USAGE)
    return {name: item["value"] for name, item in raw.items()}


def outputs_file_values(path: Path, stack: str) -> dict[str, Any]:
    """Values from `cdktf deploy --outputs-file <path>`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CrashcartError(f"cannot read outputs file {path}: {err}",
                             "pass the file written by `cdktf deploy --outputs-file`", ExitCode.USAGE) from None
    if stack not in data:
        raise CrashcartError(f"outputs file {path} has no '{stack}' stack",
                             f"deploy it with `cdktf deploy {stack} --outputs-file {path}`", ExitCode.USAGE)
    return data[stack]


def load_repair_outputs(outputs_file: Path | None = None, stacks_dir: Path = STACKS_DIR) -> RepairOutputs:
    values = outputs_file_values(outputs_file, "repair") if outputs_file else terraform_outputs("repair", stacks_dir)
    return RepairOutputs.from_values(values)


def load_evidence_outputs(outputs_file: Path | None = None, stacks_dir: Path = STACKS_DIR) -> EvidenceOutputs:
    values = outputs_file_values(outputs_file, "evidence") if outputs_file else terraform_outputs("evidence", stacks_dir)
    return EvidenceOutputs.from_values(values)
