"""A managed Run Command on the rescue VM, over azure-mgmt-compute: agent check, start, poll, delete.

Managed (not "action") Run Command, because the collection can run for an hour or more on a large
complete dump: it runs asynchronously (`asyncExecution`), has its own timeout, and streams stdout and
stderr to append blobs (`outputBlobUri`/`errorBlobUri`, written with the VM's managed identity) instead
of keeping only the last 4 KB. Its progress is read from the instance view
(`$expand=instanceView`: executionState Pending/Running/Succeeded/Failed/TimedOut/Canceled).

Nothing runs unless the VM agent reports Ready: the Run Command handler is an extension the agent
installs on first use, and a request to a VM whose agent is not up only fails after a long wait.

What the handler reports differs per OS, and the runner reads both the same way:
- a timeout: Windows reports executionState TimedOut; the Linux handler kills the script (SIGKILL) and
  reports Failed, exitCode -1, "...command terminated with exit status=-1". The runner calls that a timeout
  (state TimedOut, `reported_state` Failed) when the script was killed by a signal *and* it ran for its
  whole timeoutInSeconds (startTime to endTime, or the runner's own clock) - never from exitCode -1 alone;
  a script killed earlier (e.g. out of memory) stays Failed;
- the log blobs: before the script runs, the handler creates the output/error append blobs with the VM's
  identity. While that identity's role assignment on the container is still propagating, storage answers
  403 AuthorizationPermissionMismatch and the command fails at once ("Error creating AppendBlob ...")
  without running the script. The runner deletes it and creates it again with backoff for up to
  `permission_wait_s` (the same window the remote scripts wait for their role), logging each refusal;
  the handler creates the blobs afresh on the run that starts, so no log is lost. Past the window: exit 3.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scripts.azure.errors import azure_call, translate_azure_error
from scripts.azure.poll import poll
from scripts.base.console import Progress, step
from scripts.base.errors import CrashcartError, ExitCode, first_line
from scripts.base.stop import StopRequest

log = logging.getLogger("crashcart.runcommand")

TERMINAL_STATES = ("Succeeded", "Failed", "TimedOut", "Canceled")
DEFAULT_AGENT_WAIT_MINUTES = 15.0  # a fresh VM's agent is Ready within minutes; 15 covers a slow first boot
DEFAULT_POLL_SECONDS = 10.0
DEFAULT_PERMISSION_WAIT_S = 600.0  # as long as the remote scripts wait for a new role (remote.UploadSettings)
TIMEOUT_TOLERANCE_S = 2.0  # the handler's start/end times have whole seconds
_SIGNALLED = re.compile(r"exit status=-1\b")  # Linux handler: the script was killed by a signal
_STORAGE_REFUSAL = re.compile(r"AuthorizationPermissionMismatch|\b403\b|not authorized", re.IGNORECASE)


@dataclass
class Execution:
    """Where the command is, from its instance view."""

    state: str  # Unknown | Pending | Running | Succeeded | Failed | TimedOut | Canceled
    exit_code: int | None = None
    output: str = ""
    error: str = ""
    message: str = ""
    start_time: str | None = None
    end_time: str | None = None
    ran_s: float | None = None  # endTime - startTime as the handler reported them
    reported_state: str = ""  # the service's own state when the runner reads it differently (a Linux timeout)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def log_blob_refused(self) -> bool:
        """The handler could not create the output/error append blob for lack of permission (the script did
        not run): what a role assignment still propagating looks like."""
        text = self.message.replace(" ", "").lower()
        return self.state == "Failed" and "appendblob" in text and bool(_STORAGE_REFUSAL.search(self.message))


def as_reported(current: Execution, timeout_s: float, elapsed_s: float) -> Execution:
    """`current` with the Linux handler's timeout (Failed, killed by a signal after the whole timeout) read
    as the timeout it is; anything else as the service said it."""
    ran = current.ran_s if current.ran_s is not None else elapsed_s
    if current.state != "Failed" or not _SIGNALLED.search(current.message) or ran < timeout_s - TIMEOUT_TOLERANCE_S:
        return current
    return dataclasses.replace(
        current, state="TimedOut", reported_state=current.state,
        message=f"the handler stopped the script at its timeout of {timeout_s:.0f}s after {ran:.0f}s "
                f"(reported as {current.state}, exit {current.exit_code}: {current.message})")


def agent_status(compute: Any, resource_group: str, vm_name: str) -> tuple[bool, str]:
    """(ready, what the agent and the VM say) from the VM's instance view."""
    view = compute.virtual_machines.instance_view(resource_group, vm_name)
    power = next((s.display_status for s in (view.statuses or []) if (s.code or "").startswith("PowerState/")), None)
    agent = view.vm_agent
    statuses = list(getattr(agent, "statuses", None) or [])
    ready = any((s.display_status or "").lower() == "ready" for s in statuses)
    said = "; ".join(f"{s.display_status}: {s.message}" if s.message else str(s.display_status) for s in statuses)
    version = getattr(agent, "vm_agent_version", None)
    text = f"agent {version or 'unknown version'} - {said or 'no status reported yet'}"
    if power:
        text += f" (VM: {power})"
    return ready, text


def wait_for_agent(compute: Any, resource_group: str, vm_name: str, *, timeout_s: float, poll_s: float,
                   on_poll: Callable[[str], None] | None = None, stop: StopRequest | None = None) -> str:
    """Waits until the VM agent reports Ready; raises AGENT_NOT_READY after `timeout_s`."""
    seen = [""]

    def probe() -> str | None:
        ready, text = azure_call(lambda: agent_status(compute, resource_group, vm_name),
                                 f"VM {vm_name} in {resource_group}")
        seen[0] = text
        if on_poll:
            on_poll(text)
        return text if ready else None

    return poll(probe, timeout_s=timeout_s, interval_s=poll_s, stop=stop, on_timeout=lambda: CrashcartError(
        f"the VM agent of {vm_name} did not report Ready within {timeout_s / 60:.1f} min ({seen[0]})",
        "check the VM's boot diagnostics (az vm boot-diagnostics get-boot-log) and that it can reach "
        "Azure (outbound 443 to the wire server 168.63.129.16); re-run once it is Ready, or raise "
        "--agent-wait-minutes", ExitCode.AGENT_NOT_READY))


def start(compute: Any, resource_group: str, vm_name: str, name: str, *, location: str, script: str,
          parameters: dict[str, str], timeout_s: int, output_blob_uri: str, error_blob_uri: str,
          poll_s: float = 10.0, protected_parameters: dict[str, str] | None = None) -> None:
    """Creates the run command (PUT). Returns once ARM has accepted and provisioned it; the script
    itself runs on asynchronously. `protected_parameters` (a key, say) reach the script like the others
    but are encrypted by the service and never returned by a GET."""
    from azure.mgmt.compute import models

    blobs: dict[str, Any] = {}
    if output_blob_uri or error_blob_uri:
        # An empty identity object means the VM's system-assigned identity: the account has no key.
        blobs = {"output_blob_uri": output_blob_uri or None, "error_blob_uri": error_blob_uri or None,
                 "output_blob_managed_identity": models.RunCommandManagedIdentity() if output_blob_uri else None,
                 "error_blob_managed_identity": models.RunCommandManagedIdentity() if error_blob_uri else None}
    command = models.VirtualMachineRunCommand(
        location=location,
        properties=models.VirtualMachineRunCommandProperties(
            source=models.VirtualMachineRunCommandScriptSource(script=script),
            parameters=[models.RunCommandInputParameter(name=k, value=v) for k, v in parameters.items()],
            protected_parameters=[models.RunCommandInputParameter(name=k, value=v)
                                  for k, v in (protected_parameters or {}).items()] or None,
            async_execution=True,
            timeout_in_seconds=timeout_s,
            treat_failure_as_deployment_failure=False,
            **blobs,
        ),
    )
    # polling_interval applies when ARM sends no Retry-After (azure-core's default would be 30 s)
    poller = compute.virtual_machine_run_commands.begin_create_or_update(
        resource_group, vm_name, name, command, polling_interval=poll_s)
    poller.result()


def execution(compute: Any, resource_group: str, vm_name: str, name: str) -> Execution:
    command = compute.virtual_machine_run_commands.get_by_virtual_machine(
        resource_group, vm_name, name, expand="instanceView")
    props = command.properties
    view = getattr(props, "instance_view", None)
    if view is None:
        provisioning = _text(props.provisioning_state)
        return Execution(state="Failed" if provisioning == "Failed" else "Pending",
                         message=f"provisioning {provisioning}")
    ran = None
    if isinstance(view.start_time, dt.datetime) and isinstance(view.end_time, dt.datetime):
        ran = (view.end_time - view.start_time).total_seconds()
    return Execution(
        state=_text(view.execution_state) or "Unknown",
        exit_code=view.exit_code,
        output=view.output or "",
        error=view.error or "",
        message=view.execution_message or "",
        start_time=str(view.start_time) if view.start_time else None,
        end_time=str(view.end_time) if view.end_time else None,
        ran_s=ran,
    )


def _text(value: Any) -> str:
    """An SDK enum member or a plain string, as the service spelled it ('Succeeded', not 'ExecutionState.SUCCEEDED')."""
    return str(getattr(value, "value", value) or "")


def delete(compute: Any, resource_group: str, vm_name: str, name: str, poll_s: float = 10.0) -> bool:
    """Deletes the run command (which also stops a script still running). Never raises: a leftover
    run command is an untidiness the repair teardown removes with the VM, not a failed collection."""
    try:
        compute.virtual_machine_run_commands.begin_delete(resource_group, vm_name, name,
                                                          polling_interval=poll_s).result()
        return True
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        log.warning("could not delete run command %s on %s: %s", name, vm_name, first_line(err))
        return False


# ---- the whole lifecycle of one command: the one way the kit runs a script on a VM ------------------------------
@dataclass(frozen=True)
class RemoteCommand:
    """A script to run on a VM as a managed run command; every value reaches it as a parameter."""

    name: str  # the run command's resource name, unique per run
    script: str
    parameters: dict[str, str] = field(default_factory=dict)
    timeout_s: int = 3600
    output_blob_uri: str = ""
    error_blob_uri: str = ""
    protected_parameters: dict[str, str] = field(default_factory=dict, repr=False)  # never logged or shown


@dataclass
class Outcome:
    """How a run command ended, and what the runner did about it."""

    execution: Execution
    seconds: float
    deleted: bool
    refusals: list[str] = field(default_factory=list)  # the handler's message for each attempt refused its log blobs

    def to_dict(self) -> dict[str, Any]:
        e = self.execution
        body = {"state": e.state, "exit_code": e.exit_code, "message": e.message, "start_time": e.start_time,
                "end_time": e.end_time, "seconds": round(self.seconds, 1), "deleted": self.deleted}
        if e.reported_state:
            body["reported_state"] = e.reported_state
        if self.refusals:
            body["log_blob_refusals"] = len(self.refusals)
        return body


class RunCommandRunner:
    """Runs scripts on one VM: create (async, output/error append blobs), wait (the instance view, with a
    grace period past the handler's own timeout), always delete. A blip while reading the state is
    retried; five in a row fail the wait. A command whose log blobs the VM identity may not write yet is
    created again, with backoff, for up to `permission_wait_s`."""

    MAX_READ_FAILURES = 5

    def __init__(self, compute: Any, resource_group: str, vm_name: str, *, poll_s: float = DEFAULT_POLL_SECONDS,
                 stop: StopRequest | None = None, permission_wait_s: float = DEFAULT_PERMISSION_WAIT_S):
        self.compute, self.resource_group, self.vm_name = compute, resource_group, vm_name
        self.poll_s, self.stop, self.permission_wait_s = poll_s, stop, permission_wait_s

    def wait_for_agent(self, timeout_s: float, on_status: Callable[[str], None] | None = None) -> str:
        return wait_for_agent(self.compute, self.resource_group, self.vm_name, timeout_s=timeout_s,
                              poll_s=self.poll_s, on_poll=on_status, stop=self.stop)

    def location(self) -> str:
        return azure_call(lambda: self.compute.virtual_machines.get(self.resource_group, self.vm_name).location,
                          f"VM {self.vm_name} in {self.resource_group}")

    def run(self, command: RemoteCommand, on_status: Callable[[Execution], None] | None = None) -> Outcome:
        """Creates the command, waits for its end and deletes it (also on failure or interrupt); again while
        the handler cannot create the log blobs yet (the script did not run)."""
        location = self.location()
        started = time.monotonic()
        refusals: list[str] = []
        deleted = [False]

        def attempt() -> Execution | None:
            begun = time.monotonic()
            try:
                self._create(command, location)
                execution = self._wait(command, begun, on_status)
            finally:
                deleted[0] = delete(self.compute, self.resource_group, self.vm_name, command.name, poll_s=self.poll_s)
            if not execution.log_blob_refused:
                return execution
            refusals.append(execution.message)
            log.warning("the handler on %s could not create the run command's log blobs, so the script did not run "
                        "(the VM identity's role on the container may still be propagating): %s; trying again",
                        self.vm_name, _refusal(execution.message))
            return None

        execution = poll(attempt, timeout_s=self.permission_wait_s, interval_s=self.poll_s * 3, backoff=2.0,
                         max_interval_s=max(self.poll_s * 3, 60.0), stop=self.stop,
                         on_timeout=lambda: self._logs_refused(command, refusals, time.monotonic() - started))
        return Outcome(execution, time.monotonic() - started, deleted[0], refusals)

    def _logs_refused(self, command: RemoteCommand, refusals: list[str], seconds: float) -> CrashcartError:
        blobs = " and ".join(u.split("?", 1)[0] for u in (command.output_blob_uri, command.error_blob_uri) if u)
        return CrashcartError(
            f"the Run Command handler on {self.vm_name} could not create the log blob(s) {blobs} with the VM's "
            "identity "
            f"({len(refusals)} attempt(s) in {seconds:.0f}s, the script never ran): {_refusal(refusals[-1])}",
            "check the repair stack's role assignment of the rescue VM's identity on the evidence container "
            "(az role assignment list --assignee <rescue_vm_principal_id> --all) and that its condition allows the "
            "run's prefix; re-run collect once it is in effect", ExitCode.AZURE_AUTH)

    def _create(self, command: RemoteCommand, location: str) -> None:
        from azure.core.exceptions import AzureError, HttpResponseError

        try:
            start(self.compute, self.resource_group, self.vm_name, command.name, location=location,
                  script=command.script, parameters=command.parameters, timeout_s=command.timeout_s,
                  output_blob_uri=command.output_blob_uri, error_blob_uri=command.error_blob_uri,
                  poll_s=self.poll_s, protected_parameters=command.protected_parameters)
        except HttpResponseError as err:
            if err.status_code in (401, 403, 404):
                raise translate_azure_error(err, f"run command on VM {self.vm_name}",
                                            doing=f"create a run command on VM {self.vm_name}") from None
            detail = getattr(getattr(err, "error", None), "message", None) or first_line(err)
            raise CrashcartError(f"the run command could not be created on {self.vm_name}: {first_line(detail)}",
                                 "check the VM in the portal (Extensions + applications) and re-run",
                                 ExitCode.COLLECT_FAILED) from None
        except (AzureError, ConnectionError, TimeoutError) as err:  # no answer at all: sign-in, network
            raise translate_azure_error(err, f"run command on VM {self.vm_name}",
                                        doing=f"create a run command on VM {self.vm_name}") from None

    def _wait(self, command: RemoteCommand, started: float,
              on_status: Callable[[Execution], None] | None) -> Execution:
        # The handler enforces timeoutInSeconds itself (state TimedOut); this deadline only covers a command
        # that never gets picked up or never reports back.
        grace = min(300.0, max(1.0, command.timeout_s * 0.25))
        remaining = command.timeout_s + grace - (time.monotonic() - started)
        last: list[Execution] = [Execution(state="Pending")]
        failures = [0]

        def probe() -> Execution | None:
            try:
                current = execution(self.compute, self.resource_group, self.vm_name, command.name)
            except Exception as err:  # noqa: BLE001 - a blip in a long wait must not orphan the command
                failures[0] += 1
                if failures[0] >= self.MAX_READ_FAILURES or getattr(err, "status_code", None) in (401, 403, 404):
                    raise translate_azure_error(err, f"run command {command.name}") from None
                log.warning("reading run command %s failed (%s), retrying", command.name, first_line(err))
                return None
            failures[0] = 0
            last[0] = current
            if on_status:
                on_status(current)
            return current if current.finished else None

        try:
            done = poll(probe, timeout_s=remaining, interval_s=self.poll_s, jitter=0.0, stop=self.stop,
                        on_timeout=_NoResult)
            return as_reported(done, command.timeout_s, time.monotonic() - started)
        except _NoResult:
            timed_out = last[0]
            timed_out.message = (f"no result after {command.timeout_s + grace:.0f}s "
                                 f"(the run command was still {timed_out.state})")
            timed_out.state = "TimedOut"
            return timed_out


# ---- a script's answer: the one way a script is run for the result line it prints -------------------------------
# It sits here, beside the runner, because it is about running: nodump, remediate and collection (floor 4) may not
# import each other, and the two things it needs from elsewhere come in as callables - how to find the answer in
# a text (scripts.remote.parse_marked with the marker, floor 2) and how to read the end of the command's output
# blob (scripts.evidence.blobs.read_tail, floor 3) - so it stays on floor 2 without knowing either.
@dataclass
class Timing:
    """How long a script may run (each script's module sets its own default), the agent wait, the polling."""

    timeout_s: int = 3600
    agent_wait_s: float = DEFAULT_AGENT_WAIT_MINUTES * 60
    poll_s: float = DEFAULT_POLL_SECONDS


class ScriptFailed(CrashcartError):
    """The script ran and answered, but not as hoped; `remote_result` is what it said."""

    def __init__(self, message: str, hint: str, exit_code: ExitCode, remote_result: dict[str, Any]):
        super().__init__(message, hint, exit_code)
        self.remote_result = remote_result


@dataclass(frozen=True)
class Answer:
    """How one script's answer is read, and what its failures are called (one line each)."""

    parse: Callable[[str | None], dict[str, Any] | None]  # the answer in a text (None: there is none)
    ran: str  # "<ran> ended Failed (exit 1) without a result"
    unfinished: str  # "<unfinished> did not finish within 20 min"
    timeout_hint: str
    failure_hint: str
    read_log: Callable[[], str | None] | None = None  # the end of the output blob (the instance view keeps 4 KB)
    log_name: str = ""  # that blob, as a warning names it


def show_agent_wait(runner: RunCommandRunner, timeout_s: float, what: str) -> None:
    """Waits for the VM agent (`what`: "rescue VM web-01-rescue"), with a progress line."""
    with step(f"wait for the agent of {what}"), Progress(f"agent of {runner.vm_name}", every=30) as bar:
        runner.wait_for_agent(timeout_s, on_status=lambda text: bar.update(status=text))


def run_for_answer(runner: RunCommandRunner, command: RemoteCommand, answer: Answer, *, what: str, doing: str,
                   shown: str | None = None, step_text: str = "") -> tuple[dict[str, Any], Execution]:
    """Runs `command`; returns the script's answer (from the instance view's output, else from the output
    blob) and how the command ended. A timeout, or an end without an answer, is a CrashcartError; the
    answer's notes are logged. With `shown`, the run is a step (`step_text`) with a progress line named
    `shown`. The one way for prepare, fix and the live prepare; it lives beside the runner (floor 2, see
    the comment above `Answer`) because their packages may not import each other."""
    def run(on_status: Callable[[Execution], None] | None) -> Execution:
        return azure_call(lambda: runner.run(command, on_status=on_status), what, doing=doing).execution

    if shown:
        with step(step_text), Progress(shown, every=30) as bar:
            done = run(lambda e: bar.update(status=e.state))
    else:
        done = run(None)
    found = answer.parse(done.output)
    if found is None and answer.read_log is not None:
        try:
            found = answer.parse(answer.read_log())
        except CrashcartError as err:
            log.warning("could not read %s: %s", answer.log_name, err.message)
    if done.state == "TimedOut":
        raise CrashcartError(f"{answer.unfinished} did not finish within {command.timeout_s / 60:.0f} min",
                             answer.timeout_hint, ExitCode.TIMED_OUT)
    if found is None:
        tail = " | ".join((done.error or "").strip().splitlines()[-3:])
        raise CrashcartError(f"{answer.ran} ended {done.state} (exit {done.exit_code}) without a result"
                             + (f": {tail}" if tail else ""), answer.failure_hint, ExitCode.COLLECT_FAILED)
    for note in found.get("notes") or []:
        log.info("    note: %s", note)
    return found, done


def _refusal(message: str) -> str:
    """What storage said about a refused log blob, short: its error code when the message has one."""
    found = (re.search(r"AuthorizationPermissionMismatch|AuthorizationFailure", message)
             or re.search(r"\b40[34]\b[^\n]*", message))
    if found is None:
        return first_line(message)[:300]
    said = found.group(0).strip()
    return f"storage answered {said}" if said[0].isdigit() else f"storage answered 403 {said}"


class _NoResult(Exception):
    """The runner's own deadline passed without a terminal state."""
