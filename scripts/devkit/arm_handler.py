"""The Run Command handler's side of a managed run command in the ARM double: what it reports per OS, and the
output/error append blobs it creates with the VM's identity before the script runs.

Linux (Azure/run-command-handler-linux, MIT; internal/cmds/cmds.go, internal/exec/exec.go,
internal/commandProcessor/commandProcessor.go):

- before the script runs, `enable` creates (or replaces: an existing blob is cleared) the append blobs named by
  outputBlobUri and errorBlobUri, output first. If that fails, the command ends there: executionState Failed,
  exitCode -101 (ExitCode_BlobCreateOrReplaceFailed), executionMessage "Execution failed: Error creating
  AppendBlob '<uri>' using SAS token or Managed identity. [guidance naming 'Storage Blob Data Contributor']:
  [...]: <the storage error>" - the script never starts;
- the script runs under `context.WithTimeout(timeoutInSeconds)`: at the timeout it is killed (SIGKILL), Go's
  exit status of a signalled process is -1, and the handler reports executionState **Failed**, exitCode -1,
  "Execution failed: failed to execute command: command terminated with exit status=-1" - not TimedOut;
- otherwise Succeeded "Execution completed", or Failed "...command terminated with exit status=<n>", exitCode n;
  startTime is taken before the blobs are created, endTime when the script has ended (RFC 3339, seconds).

Windows: the handler's source is not public. The double reports a timeout with the documented executionState
TimedOut, and a refused log blob like the Linux handler does (Failed before the script runs).
"""

from __future__ import annotations

from typing import Any

from scripts.devkit.arm_rbac import (BLOB_ADD, BLOB_WRITE, STORAGE_DENIAL_CODE, STORAGE_DENIAL_MESSAGE, Rbac,
                                     blob_scope)

EXIT_BLOB_CREATE_FAILED = -101  # Linux handler: ExitCode_BlobCreateOrReplaceFailed
EXIT_SIGNALLED = -1  # Go's exit status of a process killed by a signal (the timeout's SIGKILL)
LINUX_TIMEOUT_MESSAGE = "Execution failed: failed to execute command: command terminated with exit status=-1"
WINDOWS_TIMEOUT_MESSAGE = "The script execution timed out."
TERMINAL = ("Succeeded", "Failed", "TimedOut", "Canceled")


def is_linux(os_type: str) -> bool:
    return os_type.lower() == "linux"


def reported(state: str, exit_code: int, message: str, *, os_type: str) -> tuple[str, int, str]:
    """(executionState, exitCode, executionMessage) as the handler of `os_type` reports an execution the
    outcome describes as `state` (TimedOut: the handler's timeout stopped the script)."""
    if not is_linux(os_type):
        return state, exit_code, message or (WINDOWS_TIMEOUT_MESSAGE if state == "TimedOut" else "")
    if state == "TimedOut":
        return "Failed", EXIT_SIGNALLED, LINUX_TIMEOUT_MESSAGE
    if state == "Failed":
        return state, exit_code, message or ("Execution failed: failed to execute command: command terminated "
                                             f"with exit status={exit_code}")
    if state == "Succeeded":
        return state, 0, message or "Execution completed"
    if state == "Running":
        return state, 0, message or "Execution in progress"
    return state, exit_code, message


def refusal_message(uri: str) -> str:
    """The executionMessage of a command whose log blob the VM identity could not create (storage's 403)."""
    logged = uri.split("?", 1)[0]
    return (f"Execution failed: Error creating AppendBlob '{logged}' using SAS token or Managed identity. [...] make "
            "sure Azure blob and identity exist, and identity has been given access to storage blob's container "
            "with 'Storage Blob Data Contributor' role assignment. [...]: Creating or Replacing append blob failed.: "
            f"Error creating or replacing the Append blob '{logged}'. [...]: PUT {logged}\n"
            f"RESPONSE 403: 403 {STORAGE_DENIAL_MESSAGE}\nERROR CODE: {STORAGE_DENIAL_CODE}")


def refused_log_blob(rbac: Rbac, vm: dict[str, Any], props: dict[str, Any], *, action: str = BLOB_WRITE) -> str | None:
    """The first of outputBlobUri, errorBlobUri the VM's system-assigned identity may not write (`action`), or
    None. Only an identity the double's RBAC models (rbac.knows) is checked; a blob given with a SAS is not."""
    principal = str((vm.get("identity") or {}).get("principalId") or "")
    if not principal or not rbac.knows(principal):
        return None
    for key in ("outputBlobUri", "errorBlobUri"):
        uri = str(props.get(key) or "")
        if not uri or "sig=" in uri:
            continue
        if not rbac.decide_data(principal, action, blob_scope(uri)).allowed:
            return uri
    return None


def may_append(rbac: Rbac, vm: dict[str, Any], uri: str) -> bool:
    """Whether the handler's Append Block to `uri` succeeds (it only logs a failed append and goes on)."""
    return refused_log_blob(rbac, vm, {"outputBlobUri": uri}, action=BLOB_ADD) is None
