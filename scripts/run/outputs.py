"""What the post-apply steps read from the deployed stacks: their outputs.

Two sources, the same values: `terraform output -json` in the synthesized stack folder (through
scripts.run.terraform, the one place a terraform process starts), or the file `cdktf deploy
--outputs-file` writes. The typed outputs themselves are scripts.config.stackoutputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scripts.base.errors import CrashcartError, ExitCode
from scripts.config.stackoutputs import STACKS_DIR, EvidenceOutputs, RepairOutputs, outputs_file_values
from scripts.run.terraform import EvidenceStackDir, RepairStackDir, StackDir


def deployed_outputs(stack: StackDir) -> dict[str, Any]:
    """`terraform output -json` of a deployed stack; a stack never synthesized or not deployed is a usage
    error that says which command comes first."""
    stack.synthesized()
    try:
        values = stack.outputs()
    except CrashcartError as err:
        raise CrashcartError(err.message, f"deploy the stack first (`cdktf deploy {stack.name}`), or check access "
                             "to its state backend", ExitCode.USAGE) from None
    if not values:
        raise CrashcartError(f"the {stack.name} stack has no outputs: it is not deployed",
                             f"run `cdktf deploy {stack.name}` (or `pipenv run repair-run`)", ExitCode.USAGE)
    return values


def load_repair_outputs(outputs_file: Path | None = None, stacks_dir: Path = STACKS_DIR) -> RepairOutputs:
    values = outputs_file_values(outputs_file, "repair") if outputs_file else deployed_outputs(
        RepairStackDir(stacks_dir))
    return RepairOutputs.from_values(values)


def load_evidence_outputs(outputs_file: Path | None = None, stacks_dir: Path = STACKS_DIR) -> EvidenceOutputs:
    values = outputs_file_values(outputs_file, "evidence") if outputs_file else deployed_outputs(
        EvidenceStackDir(stacks_dir))
    return EvidenceOutputs.from_values(values)
