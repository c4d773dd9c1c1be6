"""repair-run's Terraform steps: the evidence stack when absent, the repair stack, and its outputs.

Each fails with a DEPLOY_FAILED error that says what to do next; what a failed repair apply created
is the teardown's business (scripts.run.teardown), never this module's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scripts.base.console import log
from scripts.base.errors import CrashcartError, ExitCode
from scripts.config.stackoutputs import RepairOutputs
from scripts.run.outputs import evidence_state, load_repair_outputs
from scripts.run.credential import RescueCredential
from scripts.run.terraform import EvidenceStackDir, RepairStackDir


def ensure_evidence(evidence: EvidenceStackDir) -> tuple[dict[str, Any], bool]:
    """Deploys the evidence stack when any declared output is missing. Returns its output values (read once:
    from the state as found, or once more after this call deployed it) and whether this call deployed it. A
    deployed one is left exactly as it is."""
    values, missing = evidence_state(evidence)
    if not missing:
        log.info("    the evidence stack is deployed: left as it is")
        return values, False
    log.info("    the evidence stack is absent or incomplete (%d output(s) missing): deploying it", len(missing))
    evidence.deploy()
    return evidence.outputs(), True


def deploy_repair(repair: RepairStackDir, credential: RescueCredential) -> None:
    result = repair.deploy(credential.env)
    if not result.ok:
        raise CrashcartError(
            f"terraform apply failed for the repair stack: {result.error_summary()}",
            "fix the cause above (quota, policy, permissions: see README 'Pipeline identity') and re-run; "
            "what was created is being destroyed", ExitCode.DEPLOY_FAILED)


def read_outputs(stacks_dir: Path) -> RepairOutputs:
    try:
        return load_repair_outputs(stacks_dir=stacks_dir)
    except CrashcartError as err:
        raise CrashcartError(f"the repair stack deployed but its outputs cannot be read: {err.message}",
                             "re-run; if it persists, check the state backend", ExitCode.DEPLOY_FAILED) from None
