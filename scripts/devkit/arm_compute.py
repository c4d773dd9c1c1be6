"""The rescue VM in the ARM double: the VM, its instance view (VM agent status) and managed Run Commands.

Shapes follow azure-rest-api-specs (Microsoft.Compute, runCommandExamples/VirtualMachineRunCommand_
CreateOrUpdate.json, _Get.json, _Delete.json; VirtualMachine_InstanceView): a run command is a child
resource `.../virtualMachines/{vm}/runCommands/{name}`; PUT answers 201 with provisioningState
"Creating" and an Azure-AsyncOperation header, GET with `$expand=instanceView` adds
properties.instanceView {executionState, executionMessage, exitCode, output, error, startTime,
endTime, statuses}, DELETE answers 202 with a Location header. Requests are validated the way ARM
does (location, exactly one script source, named parameters, timeout).

What the command "does" is scriptable, so other tests can inject any outcome:

    install_rescue_vm(double, agent=["Not Ready", "Ready"])
    install_run_commands(double, Scripted(["Pending", "Running", "Succeeded"], output=result_line("collected", ...)))
    install_run_commands(double, Scripted(["Running", "TimedOut"]))
    install_run_commands(double, LocalScript(env={"Device": image}))   # runs the real bash script here

`LocalScript` runs the request's script on this machine the way the Linux Run Command handler does:
each named parameter becomes an environment variable, stdout/stderr are captured, the state is Running
until the process ends, then Succeeded (exit 0) or Failed (exitCode set).

An outcome says what happened ("TimedOut": the handler's timeout stopped the script); the instance view
reports it the way the handler of the VM's OS does (scripts/devkit/arm_handler.py): a Linux timeout is
executionState Failed, exitCode -1, "...command terminated with exit status=-1", spanning timeoutInSeconds.
Before the script runs, the handler creates the output/error append blobs with the VM's identity: a rescue VM
installed with `evidence_container=` has its role there (assigned long ago, or `role_delay_s` from now, still
propagating), and a command whose blob that identity may not write yet fails at once without running.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.azure import roles
from scripts.devkit import arm_handler
from scripts.devkit.arm_rbac import blob_scope
from scripts.devkit.armdouble import ArmDouble, Request, Response, error_response

SUB = "00000000-0000-0000-0000-000000000001"
RESCUE_RG = "crashcart-repair-web-01"
RESCUE_VM = "crashcart-rescue"
RESULT_MARKER = "CRASHCART_RESULT"
RESCUE_PRINCIPAL = "5b0e4c3a-0000-0000-0000-0000000000aa"  # the rescue VM's system-assigned identity

Sink = Callable[[str, str], None]  # (blob URI, text): where the handler streams stdout/stderr


def _now(at: dt.datetime | None = None) -> str:
    return (at or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%f0+00:00")


def vm_id(resource_group: str = RESCUE_RG, name: str = RESCUE_VM, subscription: str = SUB) -> str:
    return f"/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Compute/virtualMachines/{name}"


def result_line(status: str, **fields: Any) -> str:
    """A remote script's result line (scripts/remote contract), for Scripted outcomes."""
    body = {"status": status, "message": fields.pop("message", status), "files": [], "notes": [], **fields}
    return f"{RESULT_MARKER} {json.dumps(body)}\n"


# ---- the VM and its agent -------------------------------------------------------------------------------
_AGENT_STATUS = {
    "Ready": {"code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Ready",
              "message": "GuestAgent is running and processing the extensions."},
    "Not Ready": {"code": "ProvisioningState/Unavailable", "level": "Warning", "displayStatus": "Not Ready",
                  "message": "VM status blob is found but not yet populated."},
}


@dataclass
class RescueVm:
    id: str
    name: str
    resource_group: str
    agent: list[str]
    power: str = "running"
    instance_view_reads: int = 0
    os_type: str = "Windows"
    principal_id: str = RESCUE_PRINCIPAL


def install_rescue_vm(double: ArmDouble, *, resource_group: str = RESCUE_RG, name: str = RESCUE_VM,
                      location: str = "westeurope", os_type: str = "Windows",
                      agent: Sequence[str] = ("Ready",), power: str = "running", evidence_container: str | None = None,
                      role_delay_s: float | None = None) -> RescueVm:
    """The rescue VM resource, and its instance view reporting the agent states in `agent` on successive
    reads (the last one repeats): e.g. ["Not Ready", "Not Ready", "Ready"], or ["Not Ready"] forever.

    `evidence_container` (a container URL): the repair stack's role assignment of the VM's identity there
    (roles/vm.json), in the double's RBAC - assigned long before (`role_delay_s` None) or created now and
    honoured `role_delay_s` seconds later. Without it the identity's blob writes are not checked."""
    vm = RescueVm(vm_id(resource_group, name), name, resource_group, list(agent), power, os_type=os_type)
    if evidence_container is not None:
        (assignment,) = [a for a in roles.vm_identity() if a.scope == "evidence-container"]
        scope = blob_scope(evidence_container.rstrip("/"))
        if role_delay_s is None:
            double.rbac.add(vm.principal_id, assignment.role, scope)
        else:
            double.rbac.assign(vm.principal_id, assignment.role, scope, delay_s=role_delay_s)
    double.put(vm.id, {
        "name": name, "id": vm.id, "type": "Microsoft.Compute/virtualMachines", "location": location,
        "identity": {"type": "SystemAssigned", "principalId": vm.principal_id,
                     "tenantId": "72f988bf-0000-0000-0000-000000000001"},
        "properties": {"vmId": "6c1a5f1e-0000-0000-0000-0000000000bb", "hardwareProfile": {"vmSize": "Standard_D4s_v5"},
                       "storageProfile": {"osDisk": {"osType": os_type, "name": f"{name}-os", "createOption": "FromImage"},
                                          "dataDisks": [{"lun": 0, "name": "disk-copy", "createOption": "Attach"}]},
                       "provisioningState": "Succeeded"},
    })

    def instance_view(d: ArmDouble, req: Request, m: Any) -> Response:
        state = vm.agent[min(vm.instance_view_reads, len(vm.agent) - 1)]
        vm.instance_view_reads += 1
        agent_status = dict(_AGENT_STATUS.get(state, {"code": "ProvisioningState/Unavailable", "level": "Warning",
                                                      "displayStatus": state}), time=_now())
        return Response(200, {
            "computerName": name, "osName": "Windows Server 2022 Datacenter" if os_type == "Windows" else "ubuntu",
            "osVersion": "10.0.20348", "hyperVGeneration": "V2",
            "vmAgent": {"vmAgentVersion": "2.7.41491.1102", "statuses": [agent_status], "extensionHandlers": []},
            "disks": [{"name": f"{name}-os", "statuses": [{"code": "ProvisioningState/succeeded", "level": "Info",
                                                          "displayStatus": "Provisioning succeeded"}]}],
            "statuses": [{"code": "ProvisioningState/succeeded", "level": "Info",
                          "displayStatus": "Provisioning succeeded", "time": _now()},
                         {"code": f"PowerState/{vm.power}", "level": "Info", "displayStatus": f"VM {vm.power}"}],
        })

    double.route("GET", rf"{_re(vm.id)}/instanceView", instance_view)
    return vm


def _re(resource_id: str) -> str:
    import re

    return re.escape(resource_id)


# ---- what a run command does ------------------------------------------------------------------------------
@dataclass
class ExecutionView:
    state: str = "Pending"
    exit_code: int = 0
    output: str = ""
    error: str = ""
    message: str = ""
    start_time: str | None = None
    end_time: str | None = None


class Outcome:
    """Decides what a run command does: `start` when it is created, `view` on each instance-view read,
    `cancel` when it is deleted."""

    def start(self, body: dict[str, Any], parameters: dict[str, str]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def view(self) -> ExecutionView:  # pragma: no cover - interface
        raise NotImplementedError

    def cancel(self) -> None:
        pass


@dataclass
class Scripted(Outcome):
    """Reports `states` on successive reads (the last repeats). `effect(parameters)` runs when the
    command is created (e.g. puts blobs in Azurite as the script would) and may return a dict
    overriding exit_code/output/error. Output and error appear once a terminal state is reached."""

    states: Sequence[str] = ("Pending", "Running", "Succeeded")
    exit_code: int = 0
    output: str = ""
    error: str = ""
    effect: Callable[[dict[str, str]], dict[str, Any] | None] | None = None
    reads: int = 0
    started: bool = False
    started_at: dt.datetime | None = None
    timeout_s: int = 0

    def start(self, body: dict[str, Any], parameters: dict[str, str]) -> None:
        self.started = True
        self.started_at = dt.datetime.now(dt.timezone.utc)
        self.timeout_s = int(body["properties"].get("timeoutInSeconds") or 0)
        if self.effect is not None:
            changes = self.effect(parameters) or {}
            for key, value in changes.items():
                setattr(self, key, value)

    def view(self) -> ExecutionView:
        state = self.states[min(self.reads, len(self.states) - 1)]
        self.reads += 1
        done = state in arm_handler.TERMINAL
        begun = self.started_at or dt.datetime.now(dt.timezone.utc)
        # a timeout ends when the handler's timer does: timeoutInSeconds after the start (played back at once)
        ended = begun + dt.timedelta(seconds=self.timeout_s) if state == "TimedOut" else None
        return ExecutionView(state=state, exit_code=self.exit_code if done else 0,
                             output=self.output if done else "", error=self.error if done else "",
                             start_time=_now(begun) if state != "Pending" else None,
                             end_time=_now(ended) if done else None)


@dataclass
class HandlerRefused(Outcome):
    """The handler could not create a log blob: the command failed before its script ran."""

    uri: str
    at: str = field(default_factory=_now)

    def start(self, body: dict[str, Any], parameters: dict[str, str]) -> None:  # pragma: no cover - never started
        raise AssertionError("a refused command has no script to start")

    def view(self) -> ExecutionView:
        return ExecutionView(state="Failed", exit_code=arm_handler.EXIT_BLOB_CREATE_FAILED,
                             message=arm_handler.refusal_message(self.uri), start_time=self.at, end_time=self.at)


@dataclass
class LocalScript(Outcome):
    """Runs the command's script here with bash, parameters as environment variables (the Linux handler's
    contract) plus `env` (what the test's machine needs: the disk image as Device, the fake IMDS, the
    CA bundle). Enforces timeoutInSeconds like the handler (state TimedOut)."""

    env: dict[str, str] = field(default_factory=dict)
    shell: str = "bash"
    process: subprocess.Popen | None = None
    result: ExecutionView = field(default_factory=ExecutionView)
    script_path: Path | None = None
    on_exit: Callable[[ExecutionView], None] | None = None

    def start(self, body: dict[str, Any], parameters: dict[str, str]) -> None:
        props = body["properties"]
        folder = Path(tempfile.mkdtemp(prefix="runcommand-"))
        self.script_path = folder / "script.sh"
        self.script_path.write_text(props["source"]["script"])
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **parameters, **self.env}
        # its own process group: at the timeout the whole script goes, not only the shell (a child left
        # holding the output pipes would keep the "handler" from reporting, where the real one writes to files)
        self.process = subprocess.Popen([self.shell, str(self.script_path)], env=env, cwd=folder,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
        self.result = ExecutionView(state="Running", start_time=_now())
        timeout = int(props.get("timeoutInSeconds") or 0) or None
        threading.Thread(target=self._wait, args=(timeout,), daemon=True).start()

    def _wait(self, timeout: int | None) -> None:
        assert self.process is not None
        try:
            out, err = self.process.communicate(timeout=timeout)
            state = "Succeeded" if self.process.returncode == 0 else "Failed"
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            out, err = self.process.communicate()
            state = "TimedOut"
        self.result = ExecutionView(state=state, exit_code=self.process.returncode, output=out, error=err,
                                    start_time=self.result.start_time, end_time=_now())
        if self.on_exit is not None:
            self.on_exit(self.result)

    def view(self) -> ExecutionView:
        return self.result

    def cancel(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()


# ---- the routes ---------------------------------------------------------------------------------------------
@dataclass
class RunCommands:
    """The run commands of one VM; `created` keeps every PUT body (for assertions), `deleted` the names."""

    double: ArmDouble
    outcome_factory: Callable[[], Outcome]
    output_sink: Sink | None = None
    error_sink: Sink | None = None
    output_in_instance_view: bool = True
    created: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    streamed: set[str] = field(default_factory=set)
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)  # run command ID -> its VM (OS, identity)
    refused: list[str] = field(default_factory=list)  # the log blob URI of each command failed before its script
    served: list[dict[str, Any]] = field(default_factory=list)  # every instance view ARM answered, as sent
    running_until: dict[str, tuple[float, str]] = field(default_factory=dict)  # ID -> (end of its modelled run, start)

    def put(self, d: ArmDouble, req: Request, m: Any) -> Response:
        vm_resource = d.get(m.group("vm_id"))
        if vm_resource is None:
            return error_response(404, "ParentResourceNotFound",
                                  f"Can not perform requested operation on nested resource. Parent resource "
                                  f"'{m.group('vm').split('/')[-1]}' not found.")
        body = req.body if isinstance(req.body, dict) else {}
        problem = _validate(body)
        if problem:
            return error_response(400, *problem)
        name = m.group("name")
        props = dict(body["properties"])
        resource_id = f"{m.group('vm_id')}/runCommands/{name}"
        resource = {"name": name, "id": resource_id, "type": "Microsoft.Compute/virtualMachines/runCommands",
                    "location": body["location"].replace(" ", "").lower(), "tags": body.get("tags") or {},
                    "properties": {**{k: v for k, v in props.items()
                                      if k not in ("protectedParameters", "runAsPassword")},
                                   "provisioningState": "Creating"}}
        self.created.append(body)
        d.put(resource_id, resource)
        self.vms[resource_id.lower()] = vm_resource
        refused = arm_handler.refused_log_blob(d.rbac, vm_resource, props)  # created before the script runs
        if refused is not None:
            self.refused.append(refused)
            self.outcomes[resource_id.lower()] = HandlerRefused(refused)
        else:
            outcome = self.outcome_factory()
            self.outcomes[resource_id.lower()] = outcome
            # the handler hands protected parameters to the script like the others (they are only hidden on GET)
            outcome.start(body, {p["name"]: p["value"]
                                 for p in [*(props.get("parameters") or []), *(props.get("protectedParameters") or [])]})

        def provisioned() -> None:
            stored = d.get(resource_id)
            if stored is not None:
                stored["properties"]["provisioningState"] = "Succeeded"

        headers = d.long_running(resource_id, on_done=provisioned, kind="run_command.create")
        # the script runs for as long as the double's duration profile says (scripts/devkit/armdouble.py)
        self.running_until[resource_id.lower()] = (time.monotonic() + d.durations.of("run_command.execution"), _now())
        return Response(201, resource, {"Azure-AsyncOperation": headers["Azure-AsyncOperation"], "Retry-After": "0"})

    def get(self, d: ArmDouble, req: Request, m: Any) -> Response:
        resource_id = f"{m.group('vm_id')}/runCommands/{m.group('name')}"
        stored = d.get(resource_id)
        if stored is None:
            return d.not_found(resource_id)
        body = json.loads(json.dumps(stored))
        if req.query.get("$expand", "").lower() == "instanceview":
            body["properties"]["instanceView"] = self._instance_view(resource_id, stored)
        return Response(200, body)

    def _instance_view(self, resource_id: str, stored: dict[str, Any]) -> dict[str, Any]:
        outcome = self.outcomes[resource_id.lower()]
        until, began = self.running_until.get(resource_id.lower(), (0.0, ""))
        if time.monotonic() < until:  # still within its modelled duration
            view = ExecutionView(state="Running", start_time=began)
        else:
            view = outcome.view()
        vm = self.vms.get(resource_id.lower()) or {}
        done = view.state in arm_handler.TERMINAL
        if done and resource_id.lower() not in self.streamed and not isinstance(outcome, HandlerRefused):
            self.streamed.add(resource_id.lower())
            props = stored["properties"]
            for sink, key, text in ((self.output_sink, "outputBlobUri", view.output),
                                    (self.error_sink, "errorBlobUri", view.error)):
                if sink and props.get(key) and arm_handler.may_append(self.double.rbac, vm, props[key]):
                    sink(props[key], text)
        os_type = str((((vm.get("properties") or {}).get("storageProfile") or {}).get("osDisk") or {})
                      .get("osType") or "Windows")
        state, exit_code, message = arm_handler.reported(view.state, view.exit_code, view.message, os_type=os_type)
        served = {
            "executionState": state, "executionMessage": message, "exitCode": exit_code,
            "output": view.output if self.output_in_instance_view else "",
            "error": view.error if self.output_in_instance_view else "",
            "startTime": view.start_time, "endTime": view.end_time,
            "statuses": [{"code": "ProvisioningState/succeeded", "level": "Info",
                          "displayStatus": "Provisioning succeeded", "time": _now()}],
        }
        self.served.append(served)
        return served

    def delete(self, d: ArmDouble, req: Request, m: Any) -> Response:
        resource_id = f"{m.group('vm_id')}/runCommands/{m.group('name')}"
        if d.get(resource_id) is None:
            return Response(204)
        outcome = self.outcomes.get(resource_id.lower())
        if outcome is not None:
            outcome.cancel()  # deleting a run command stops a script that is still running
        d.delete(resource_id)
        self.deleted.append(m.group("name"))
        # ARM announces the delete as an async operation (both headers); it is done by the first poll
        return Response(202, None, d.long_running(resource_id, polls=0, kind="run_command.delete"))


def _validate(body: dict[str, Any]) -> tuple[str, str] | None:
    """ARM's answers to a malformed run command (code, message), or None."""
    if not body.get("location"):
        return "LocationRequired", "The location property is required for this definition."
    props = body.get("properties")
    if not isinstance(props, dict):
        return "InvalidRequestContent", "The request content was invalid: properties is required."
    source = props.get("source") or {}
    given = [k for k in ("script", "scriptUri", "commandId") if source.get(k)]
    if len(given) != 1:
        return "InvalidParameter", "Exactly one of script, scriptUri or commandId must be specified in source."
    for p in props.get("parameters") or []:
        if not isinstance(p, dict) or not p.get("name") or "value" not in p:
            return "InvalidParameter", "Each parameter must have a name and a value."
    timeout = props.get("timeoutInSeconds", 0)
    if not isinstance(timeout, int) or timeout < 0:
        return "InvalidParameter", "timeoutInSeconds must be a non-negative integer."
    for key in ("asyncExecution", "treatFailureAsDeploymentFailure"):
        if key in props and not isinstance(props[key], bool):
            return "InvalidRequestContent", f"{key} must be a boolean."
    for key in ("outputBlobUri", "errorBlobUri"):
        if props.get(key) and not str(props[key]).startswith(("https://", "http://127.0.0.1")):
            return "InvalidParameter", f"{key} must be an https URI."
    return None


def install_run_commands(double: ArmDouble, outcome: Outcome | Callable[[], Outcome], *,
                         output_sink: Sink | None = None, error_sink: Sink | None = None,
                         output_in_instance_view: bool = True) -> RunCommands:
    """Routes for managed run commands on every VM in the double. `outcome` is one Outcome (used for every
    command) or a factory making one per command."""
    factory = outcome if callable(outcome) and not isinstance(outcome, Outcome) else (lambda: outcome)
    commands = RunCommands(double, factory, output_sink, error_sink, output_in_instance_view)
    base = (r"(?P<vm_id>/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Compute/virtualMachines/"
            r"(?P<vm>[^/]+))/runCommands/(?P<name>[^/]+)")
    double.route("PUT", base, commands.put)
    double.route("GET", base, commands.get)
    double.route("DELETE", base, commands.delete)
    return commands
