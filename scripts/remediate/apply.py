"""One recipe on the disk copy: the fix script as a managed Run Command on the rescue VM, and its answer.

The script (scripts/remote/fix.{sh,ps1}.j2, rendered by recipes.render_script) gets every value as a Run
Command parameter; it answers with one result line (status, changes old/new, files with SHA-256, the
hive's hashes). Its output and error logs go to evidence under `<run>/fix/<step>/runcommand/`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from scripts import remote
from scripts.azure import runcommand
from scripts.azure.runcommand import Answer, RemoteCommand, RunCommandRunner, run_for_answer, show_agent_wait
from scripts.base.errors import ExitCode
from scripts.base.stop import StopRequest
from scripts.config.stackoutputs import RepairOutputs
from scripts.evidence import blobs as evidence
from scripts.remediate.recipes import DONE, render_script

log = logging.getLogger("crashcart.fix")

FIX_TIMEOUT_MINUTES = 30  # DISM /RevertPendingActions on a large image takes minutes; a hive edit seconds


@dataclass
class Timing(runcommand.Timing):
    timeout_s: int = FIX_TIMEOUT_MINUTES * 60


class RecipeFailed(runcommand.ScriptFailed):
    """The script ran and answered, but did not apply the recipe; `remote_result` is what it said."""


def run_fix_script(compute: Any, container: Any, outputs: RepairOutputs, parameters: dict[str, str], *,
                   prefix: str, step_name: str, label: str, timing: Timing,
                   stop: StopRequest | None = None) -> dict[str, Any]:
    """Runs the fix script with `parameters` on the rescue VM; returns its result. Raises RecipeFailed
    when it answered but did not apply (refused, disk not found, error), CrashcartError otherwise."""
    rg, name = outputs.rescue_vm
    runner = RunCommandRunner(compute, rg, name, poll_s=timing.poll_s, stop=stop)
    show_agent_wait(runner, timing.agent_wait_s, f"rescue VM {name}")
    folder = f"{prefix}/fix/{step_name}/runcommand"
    output_blob, error_blob = f"{folder}/output.log", f"{folder}/error.log"
    command = RemoteCommand(
        name=f"crashcart-fix-{step_name.lower()}"[:64], script=render_script(outputs.rescue_os), parameters=parameters,
        timeout_s=timing.timeout_s, output_blob_uri=outputs.blob_url(output_blob),
        error_blob_uri=outputs.blob_url(error_blob))
    answer = Answer(
        parse=lambda text: remote.parse_marked(text, remote.RESULT_MARKER), ran="the fix run command", unfinished=label,
        timeout_hint=f"see {error_blob} in the evidence container; `pipenv run fix rollback` undoes what the fix "
                     "manifest recorded",
        failure_hint=f"see {error_blob} in the evidence container and the rescue VM's extension status",
        read_log=lambda: evidence.read_tail(container, output_blob), log_name=output_blob)
    found, _ = run_for_answer(runner, command, answer, what=f"rescue VM {name}",
                              doing=f"run the fix script on rescue VM {name}", shown=f"fix on {name}",
                              step_text=f"{label} on the disk copy ({name}, run command {command.name})")
    status = str(found.get("status", "error"))
    if status not in DONE:
        raise _not_applied(status, found, outputs, name, error_blob, label)
    for change in found.get("changes") or []:
        if change.get("changed"):
            log.info("    %s %s\\%s: %s -> %s", change.get("store"), change.get("key"), change.get("name"),
                     shown(change.get("old")), shown(change.get("new")))
    for moved in found.get("files") or []:
        log.info("    %s -> %s (sha256 %s)%s", moved.get("path"), moved.get("quarantine"), moved.get("sha256"),
                 "" if moved.get("moved") else " (would move)")
    return found


def _not_applied(status: str, found: dict[str, Any], outputs: RepairOutputs, rescue_name: str, error_blob: str,
                 label: str) -> RecipeFailed:
    message = f"{label} was not applied ({status}): {found.get('message', '')}"
    if status == "disk_not_found":
        return RecipeFailed(message, f"check that the disk copy is attached to {rescue_name} at LUN "
                            f"{outputs.disk_copy_lun}; an encrypted OS disk (BitLocker/ADE) must be unlocked first",
                            ExitCode.DISK_NOT_FOUND, found)
    if status == "error" and "parameter" in str(found.get("message", "")):
        return RecipeFailed(message, "fix the value and re-run; nothing was written", ExitCode.USAGE, found)
    hint = ("nothing was written to the disk copy; follow the message, then re-run `pipenv run fix`"
            if status == "refused" else f"see {error_blob} in the evidence container; the fix manifest records what "
            "was changed before, and `pipenv run fix rollback` undoes it")
    return RecipeFailed(message, hint, ExitCode.COLLECT_FAILED, found)


def shown(record: Any) -> str:
    if not record:
        return "(absent)"
    if isinstance(record, dict) and record.get("type") == "BCD_OBJECT":  # safe-mode's copy of {default}
        return f"BCD entry {record.get('id')} '{record.get('description')}' (safeboot {record.get('safeboot')})"
    if isinstance(record, dict):
        return str(record.get("value", record.get("hex", record)))
    return str(record)
