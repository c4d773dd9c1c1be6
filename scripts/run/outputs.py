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
    values = outputs_file_values(outputs_file, "repair") if outputs_file else deployed_outputs(
        RepairStackDir(stacks_dir))
    return RepairOutputs.from_values(values)


def load_evidence_outputs(outputs_file: Path | None = None, stacks_dir: Path = STACKS_DIR) -> EvidenceOutputs:
    values = outputs_file_values(outputs_file, "evidence") if outputs_file else deployed_outputs(
        EvidenceStackDir(stacks_dir))
    return EvidenceOutputs.from_values(values)
