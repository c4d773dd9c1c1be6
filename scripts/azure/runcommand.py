"""A managed Run Command on the rescue VM, over azure-mgmt-compute: agent check, start, poll, delete.

Managed (not "action") Run Command, because the collection can run for an hour or more on a large
complete dump: it runs asynchronously (`asyncExecution`), has its own timeout, and streams stdout and
stderr to append blobs (`outputBlobUri`/`errorBlobUri`, written with the VM's managed identity) instead
of keeping only the last 4 KB. Its progress is read from the instance view
(`$expand=instanceView`: executionState Pending/Running/Succeeded/Failed/TimedOut/Canceled).

Nothing runs unless the VM agent reports Ready: the Run Command handler is an extension the agent
installs on first use, and a request to a VM whose agent is not up only fails after a long wait.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scripts.azure.errors import azure_call, translate_azure_error
from scripts.azure.poll import poll
from scripts.base.errors import CrashcartError, ExitCode, first_line
from scripts.base.stop import StopRequest

log = logging.getLogger("crashcart.runcommand")

TERMINAL_STATES = ("Succeeded", "Failed", "TimedOut", "Canceled")
DEFAULT_AGENT_WAIT_MINUTES = 15.0  # a fresh VM's agent is Ready within minutes; 15 covers a slow first boot
DEFAULT_POLL_SECONDS = 10.0


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

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


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
                                 f"rescue VM {vm_name} in {resource_group}")
        seen[0] = text
        if on_poll:
            on_poll(text)
        return text if ready else None

    return poll(probe, timeout_s=timeout_s, interval_s=poll_s, stop=stop, on_timeout=lambda: CrashcartError(
        f"the rescue VM's agent did not report Ready within {timeout_s / 60:.1f} min ({seen[0]})",
        "check the rescue VM's boot diagnostics (az vm boot-diagnostics get-boot-log) and that it can reach "
        "Azure (outbound 443 to the wire server 168.63.129.16); re-run once it is Ready, or raise "
        "--agent-wait-minutes", ExitCode.AGENT_NOT_READY))


def start(compute: Any, resource_group: str, vm_name: str, name: str, *, location: str, script: str,
          parameters: dict[str, str], timeout_s: int, output_blob_uri: str, error_blob_uri: str,
          poll_s: float = 10.0) -> None:
    """Creates the run command (PUT). Returns once ARM has accepted and provisioned it; the script
    itself runs on asynchronously."""
    from azure.mgmt.compute import models

    command = models.VirtualMachineRunCommand(
        location=location,
        properties=models.VirtualMachineRunCommandProperties(
            source=models.VirtualMachineRunCommandScriptSource(script=script),
            parameters=[models.RunCommandInputParameter(name=k, value=v) for k, v in parameters.items()],
            async_execution=True,
            timeout_in_seconds=timeout_s,
            output_blob_uri=output_blob_uri,
            error_blob_uri=error_blob_uri,
            # An empty identity object means the VM's system-assigned identity: the account has no key.
            output_blob_managed_identity=models.RunCommandManagedIdentity(),
            error_blob_managed_identity=models.RunCommandManagedIdentity(),
            treat_failure_as_deployment_failure=False,
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
    return Execution(
        state=_text(view.execution_state) or "Unknown",
        exit_code=view.exit_code,
        output=view.output or "",
        error=view.error or "",
        message=view.execution_message or "",
        start_time=str(view.start_time) if view.start_time else None,
        end_time=str(view.end_time) if view.end_time else None,
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


@dataclass
class Outcome:
    """How a run command ended, and what the runner did about it."""

    execution: Execution
    seconds: float
    deleted: bool

    def to_dict(self) -> dict[str, Any]:
        e = self.execution
        return {"state": e.state, "exit_code": e.exit_code, "message": e.message, "start_time": e.start_time,
                "end_time": e.end_time, "seconds": round(self.seconds, 1), "deleted": self.deleted}


class RunCommandRunner:
    """Runs scripts on one VM: create (async, output/error append blobs), wait (the instance view, with a
    grace period past the handler's own timeout), always delete. A blip while reading the state is
    retried; five in a row fail the wait."""

    MAX_READ_FAILURES = 5

    def __init__(self, compute: Any, resource_group: str, vm_name: str, *, poll_s: float = DEFAULT_POLL_SECONDS,
                 stop: StopRequest | None = None):
        self.compute, self.resource_group, self.vm_name = compute, resource_group, vm_name
        self.poll_s, self.stop = poll_s, stop

    def wait_for_agent(self, timeout_s: float, on_status: Callable[[str], None] | None = None) -> str:
        return wait_for_agent(self.compute, self.resource_group, self.vm_name, timeout_s=timeout_s,
                              poll_s=self.poll_s, on_poll=on_status, stop=self.stop)

    def location(self) -> str:
        return azure_call(lambda: self.compute.virtual_machines.get(self.resource_group, self.vm_name).location,
                          f"VM {self.vm_name} in {self.resource_group}")

    def run(self, command: RemoteCommand, on_status: Callable[[Execution], None] | None = None) -> Outcome:
        """Creates the command, waits for its end and deletes it (also on failure or interrupt)."""
        location = self.location()
        started = time.monotonic()
        try:
            self._create(command, location)
            execution = self._wait(command, started, on_status)
        finally:
            deleted = delete(self.compute, self.resource_group, self.vm_name, command.name, poll_s=self.poll_s)
        return Outcome(execution, time.monotonic() - started, deleted)

    def _create(self, command: RemoteCommand, location: str) -> None:
        from azure.core.exceptions import AzureError, HttpResponseError

        try:
            start(self.compute, self.resource_group, self.vm_name, command.name, location=location,
                  script=command.script, parameters=command.parameters, timeout_s=command.timeout_s,
                  output_blob_uri=command.output_blob_uri, error_blob_uri=command.error_blob_uri,
                  poll_s=self.poll_s)
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
            return poll(probe, timeout_s=remaining, interval_s=self.poll_s, jitter=0.0, stop=self.stop,
                        on_timeout=_NoResult)
        except _NoResult:
            timed_out = last[0]
            timed_out.message = (f"no result after {command.timeout_s + grace:.0f}s "
                                 f"(the run command was still {timed_out.state})")
            timed_out.state = "TimedOut"
            return timed_out


class _NoResult(Exception):
    """The runner's own deadline passed without a terminal state."""
