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
from dataclasses import dataclass
from typing import Any

from scripts.base.errors import CrashcartError, ExitCode

log = logging.getLogger("crashcart.runcommand")

TERMINAL_STATES = ("Succeeded", "Failed", "TimedOut", "Canceled")


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


def vm_location(compute: Any, resource_group: str, vm_name: str) -> str:
    from azure.core.exceptions import HttpResponseError

    from scripts.azure.clients import translate_azure_error

    try:
        return compute.virtual_machines.get(resource_group, vm_name).location
    except HttpResponseError as err:
        raise translate_azure_error(err, f"rescue VM {vm_name} in {resource_group}") from None


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
                   on_poll: Callable[[str], None] | None = None) -> str:
    """Waits until the VM agent reports Ready; raises AGENT_NOT_READY after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        ready, text = agent_status(compute, resource_group, vm_name)
        if on_poll:
            on_poll(text)
        if ready:
            return text
        if time.monotonic() >= deadline:
            raise CrashcartError(
                f"the rescue VM's agent did not report Ready within {timeout_s / 60:.1f} min ({text})",
                "check the rescue VM's boot diagnostics (az vm boot-diagnostics get-boot-log) and that it can reach "
                "Azure (outbound 443 to the wire server 168.63.129.16); re-run `collect` once it is Ready, or "
                "raise --agent-wait-minutes",
                ExitCode.AGENT_NOT_READY)
        time.sleep(poll_s)


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
        log.warning("could not delete run command %s on %s: %s", name, vm_name, str(err).splitlines()[0])
        return False
