"""What the post-apply steps read from the deployed stacks: their outputs.

Two sources, the same values: `terraform output -json` in the synthesized stack folder (through
scripts.run.terraform, the one place a terraform process starts), or the file `cdktf deploy
--outputs-file` writes. The typed outputs themselves are scripts.config.stackoutputs.

A third, for the evidence stack only: the file `fleet run` hands each VM's repair-run
(`--evidence-outputs`, `HandedEvidence`). The fleet reads the evidence state once; without the file
every child would run `terraform init` + `output` of the same state (each a backend read over the
network with an azurerm backend). The file holds the EvidenceOutputs fields only (names and IDs, no
secret; never the raw `terraform output`, which a later stack version could extend with a sensitive
value) and which state they were read from (`state_identity`): a child whose own evidence stack reads
another state (another project, another backend) refuses the file, as it refuses one it cannot read.
It does not fall back to reading the state: the fleet wrote the file moments before it started the
child, so a missing or foreign one is a fault to show, not to paper over. Nor can the values go stale
silently: the repair stack reads the evidence state itself (cross-stack references) and the child
compares its evidence outputs with the handed ones before collecting (`HandedEvidence.check_against`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.base import userfiles
from scripts.base.errors import CrashcartError, ExitCode, first_line
from scripts.config.stackoutputs import (STACKS_DIR, EvidenceOutputs, RepairOutputs,
                                         repair_outputs_from_file)
from scripts.run.terraform import PASSWORD_HINT, EvidenceStackDir, NotInitialized, RepairStackDir, StackDir


def _deploy_first(stack: StackDir) -> str:
    secret = f"{PASSWORD_HINT} " if stack.name == "repair" else ""
    return f"deploy it first: `{secret}npx cdktf deploy {stack.name}` (or let `pipenv run repair-run` do everything)"


def deployed_outputs(stack: StackDir) -> dict[str, Any]:
    """`terraform output -json` of a deployed stack; a stack never synthesized or not deployed is a usage
    error (exit 2) that says which command comes first. What Terraform said is reduced to its one line
    that matters (scripts.run.terraform.CommandResult.error_summary), cleaned of colours and boxes."""
    stack.synthesized()
    try:
        values = stack.outputs()
    except NotInitialized:
        raise CrashcartError(f"the {stack.name} stack is not deployed from this folder (Terraform was never "
                             f"initialised in {stack.path})", _deploy_first(stack), ExitCode.USAGE) from None
    except CrashcartError as err:
        raise CrashcartError(err.message, f"{_deploy_first(stack)}, or check access to its state backend",
                             ExitCode.USAGE) from None
    if not values:
        raise CrashcartError(f"the {stack.name} stack has no outputs: it is not deployed", _deploy_first(stack),
                             ExitCode.USAGE)
    return values


def load_repair_outputs(outputs_file: Path | None = None, stacks_dir: Path = STACKS_DIR) -> RepairOutputs:
    if outputs_file:
        return repair_outputs_from_file(outputs_file)  # the operator's file: every value checked
    return RepairOutputs.from_values(deployed_outputs(RepairStackDir(stacks_dir)))


def evidence_state(stack: EvidenceStackDir) -> tuple[dict[str, Any], set[str]]:
    """`terraform init`, then one `terraform output -json` of the evidence stack: its output values and the
    declared outputs they lack (any: the stack is absent or incomplete)."""
    stack.init()
    values = stack.outputs()
    return values, stack.missing_outputs(values)


def state_identity(stack: StackDir) -> str:
    """Which state a stack's backend reads: a local file by its real path (links followed: a fleet VM's folder
    links the project's evidence state), a remote one by its account, container and key."""
    kind, settings = stack.backend()
    local = stack.local_state_path()
    if local is not None:
        return f"local:{local.resolve()}"
    return f"{kind}:" + "/".join(str(settings.get(k, "")) for k in ("storage_account_name", "container_name", "key"))


HANDED_FORMAT = "crashcart.evidence-outputs.v1"


@dataclass(frozen=True)
class HandedEvidence:
    """The evidence outputs a fleet read once, and the state it read them from (`state_identity`)."""

    outputs: EvidenceOutputs
    state: str

    def write(self, path: Path) -> None:
        """Written whole or not at all (a temporary file renamed over the old one)."""
        document = {"format": HANDED_FORMAT, "state": self.state, "evidence": dataclasses.asdict(self.outputs)}
        draft = path.with_name(f".{path.name}.draft")
        draft.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        os.replace(draft, path)

    @classmethod
    def load(cls, path: Path, stack: EvidenceStackDir) -> "HandedEvidence":
        """The file, refused (usage error, exit 2) when it cannot be read or was written for another evidence
        state than the one `stack` (this project's synthesized evidence stack) reads."""
        hint = ("re-run the fleet (it writes the file again for every VM it starts), or run repair-run without "
                "--evidence-outputs: it then reads the evidence state itself")
        text = userfiles.read_text(path, "--evidence-outputs", hint, "the evidence outputs")
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as err:  # not JSON, nested too deep
            why = first_line(err)
            raise CrashcartError(f"cannot read the evidence outputs {path}: {why}", hint, ExitCode.USAGE) from None
        if not isinstance(document, dict) or document.get("format") != HANDED_FORMAT:
            raise CrashcartError(f"{path} is not an evidence outputs file written by `fleet run` "
                                 f"(format {HANDED_FORMAT})", hint, ExitCode.USAGE)
        try:
            outputs = EvidenceOutputs.from_values(document.get("evidence"))
        except CrashcartError as err:
            raise CrashcartError(f"{path}: {err.message}", hint, ExitCode.USAGE) from None
        if not all(isinstance(v, str) and v for v in dataclasses.asdict(outputs).values()):
            raise CrashcartError(f"{path} holds an empty or non-text evidence output", hint, ExitCode.USAGE)
        here = state_identity(stack)
        if document.get("state") != here:
            shown = str(document.get("state")).encode("unicode_escape").decode()[:300]  # one line, whatever it holds
            raise CrashcartError(f"{path} holds the outputs of another evidence state ({shown}), not of this "
                                 f"project's evidence stack ({here})", hint, ExitCode.USAGE)
        return cls(outputs, here)

    def check_against(self, repair: RepairOutputs, path: Path) -> None:
        """The repair stack read the evidence state itself (cross-stack references) at its apply: the handed
        outputs, which placed the VM lock, must name the same container the collection writes into."""
        handed = (self.outputs.blob_endpoint.rstrip("/"), self.outputs.container_name)
        read = (repair.evidence_blob_endpoint.rstrip("/"), repair.evidence_container)
        if handed != read:
            raise CrashcartError(
                f"the evidence outputs handed down in {path} (container {handed[1]} at {handed[0]}) differ from "
                f"the evidence state the repair stack read (container {read[1]} at {read[0]}): the evidence stack "
                "changed after the fleet read it", "re-run the fleet: it reads the evidence state again",
                ExitCode.USAGE)
