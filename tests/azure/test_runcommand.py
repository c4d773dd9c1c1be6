"""scripts.azure.runcommand.RunCommandRunner against the ARM double's Run Command handler (scripts/devkit/
arm_compute.py, arm_handler.py), as the handler of each OS reports an execution: a Linux timeout is Failed/-1
"command terminated with exit status=-1", a Windows one TimedOut; the handler creates the output/error append
blobs with the VM's identity before the script runs, and fails the command while that identity's role is still
propagating (storage's 403 AuthorizationPermissionMismatch)."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.request

import pytest

from scripts.azure.clients import AzureClients
from scripts.azure.runcommand import Execution, RemoteCommand, RunCommandRunner, as_reported
from scripts.base.errors import CrashcartError, ExitCode
from scripts.devkit.arm_compute import (RESCUE_RG, RESCUE_VM, SUB, LocalScript, Scripted, install_rescue_vm,
                                        install_run_commands, result_line)

CONTAINER = "http://127.0.0.1:10000/devstoreaccount1/evidence"
LINUX_TIMEOUT = "Execution failed: failed to execute command: command terminated with exit status=-1"


def runner(**options) -> RunCommandRunner:
    return RunCommandRunner(AzureClients(SUB).compute, RESCUE_RG, RESCUE_VM, poll_s=0.01, **options)


def command(timeout_s: int = 300, script: str = "echo hi") -> RemoteCommand:
    return RemoteCommand(name="crashcart-collect-test", script=script, timeout_s=timeout_s,
                         output_blob_uri=f"{CONTAINER}/web-01/run/runcommand/output.log",
                         error_blob_uri=f"{CONTAINER}/web-01/run/runcommand/error.log")


# ---- timeouts as each OS reports them ----------------------------------------------------------------------
def test_a_linux_timeout_is_reported_failed_minus_one_and_read_as_a_timeout(arm):
    install_rescue_vm(arm, os_type="Linux")
    commands = install_run_commands(arm, Scripted(["Running", "TimedOut"]))
    outcome = runner().run(command(timeout_s=300))
    final = commands.served[-1]
    assert (final["executionState"], final["exitCode"], final["executionMessage"]) == ("Failed", -1, LINUX_TIMEOUT)
    ran = dt.datetime.fromisoformat(final["endTime"]) - dt.datetime.fromisoformat(final["startTime"])
    assert ran.total_seconds() == 300  # the handler's timer: timeoutInSeconds after the start
    e = outcome.execution
    assert e.state == "TimedOut" and e.reported_state == "Failed" and e.exit_code == -1
    assert "timeout of 300s" in e.message and LINUX_TIMEOUT in e.message
    assert outcome.to_dict()["reported_state"] == "Failed"


def test_a_windows_timeout_is_reported_timed_out(arm):
    install_rescue_vm(arm, os_type="Windows")
    commands = install_run_commands(arm, Scripted(["Running", "TimedOut"]))
    outcome = runner().run(command())
    assert commands.served[-1]["executionState"] == "TimedOut"
    assert outcome.execution.state == "TimedOut" and outcome.execution.reported_state == ""


def test_a_linux_script_killed_before_its_timeout_is_a_failure_not_a_timeout(arm):
    """exitCode -1 alone is no timeout: a script killed by a signal early (the OOM killer) failed."""
    install_rescue_vm(arm, os_type="Linux")
    install_run_commands(arm, Scripted(["Running", "Failed"], exit_code=-1))
    outcome = runner().run(command(timeout_s=300))
    assert outcome.execution.state == "Failed" and outcome.execution.exit_code == -1
    assert outcome.execution.reported_state == ""


def test_a_linux_scripts_own_failure_keeps_its_exit_code(arm):
    install_rescue_vm(arm, os_type="Linux")
    install_run_commands(arm, Scripted(["Running", "Failed"], exit_code=12, output=result_line("upload_failed")))
    e = runner().run(command()).execution
    assert (e.state, e.exit_code) == ("Failed", 12)
    assert e.message == "Execution failed: failed to execute command: command terminated with exit status=12"


@pytest.mark.slow
def test_a_real_linux_timeout_through_the_handler_model(arm):
    """The script really runs (bash) and really overruns timeoutInSeconds: the handler kills it."""
    install_rescue_vm(arm, os_type="Linux")
    install_run_commands(arm, LocalScript())
    started = time.monotonic()
    outcome = runner().run(command(timeout_s=1, script="echo started; sleep 30"))
    assert time.monotonic() - started < 20
    assert outcome.execution.state == "TimedOut" and outcome.execution.reported_state == "Failed"
    assert outcome.execution.output.startswith("started")


@pytest.mark.parametrize("execution, timed_out", [
    (Execution("Failed", -1, message=LINUX_TIMEOUT, ran_s=600), True),
    (Execution("Failed", -1, message=LINUX_TIMEOUT, ran_s=599), True),  # whole seconds on both ends
    (Execution("Failed", -1, message=LINUX_TIMEOUT, ran_s=30), False),  # killed early: not the timeout
    (Execution("Failed", -1, message="exit code -1 without a word about signals", ran_s=600), False),
    (Execution("Failed", 4, message=LINUX_TIMEOUT, ran_s=600), True),  # newer handlers report exit code 4
    (Execution("Failed", -1, message=LINUX_TIMEOUT), True),  # no times reported: the runner's own clock (600)
    (Execution("Succeeded", 0, message="Execution completed", ran_s=600), False),
])
def test_a_timeout_is_told_by_the_message_and_the_time_it_ran(execution, timed_out):
    assert (as_reported(execution, 600, elapsed_s=600).state == "TimedOut") is timed_out


# ---- the log blobs and the VM identity's role -----------------------------------------------------------------
def test_the_handler_fails_the_command_before_the_script_while_the_role_propagates(arm):
    install_rescue_vm(arm, os_type="Linux", evidence_container=CONTAINER, role_delay_s=60)
    script = Scripted(["Running", "Succeeded"])
    commands = install_run_commands(arm, script)
    with pytest.raises(CrashcartError) as caught:
        runner(permission_wait_s=0).run(command())
    final = commands.served[-1]
    assert final["executionState"] == "Failed" and final["exitCode"] == -101
    assert final["executionMessage"].startswith(
        f"Execution failed: Error creating AppendBlob '{CONTAINER}/web-01/run/runcommand/output.log'")
    assert "AuthorizationPermissionMismatch" in final["executionMessage"]
    assert not script.started  # the script never ran
    err = caught.value
    assert err.exit_code == ExitCode.AZURE_AUTH
    assert "could not create the log blob(s)" in err.message and "AuthorizationPermissionMismatch" in err.message
    assert "role assignment" in err.hint
    assert commands.deleted == ["crashcart-collect-test"]


def test_the_runner_creates_the_command_again_once_the_role_is_in_effect(arm):
    install_rescue_vm(arm, os_type="Linux", evidence_container=CONTAINER, role_delay_s=0.5)
    script = Scripted(["Running", "Succeeded"], output=result_line("collected"))
    commands = install_run_commands(arm, script)
    outcome = runner().run(command())
    assert outcome.execution.state == "Succeeded" and script.started
    assert commands.refused and len(commands.created) == len(commands.refused) + 1
    assert commands.deleted == ["crashcart-collect-test"] * len(commands.created)  # each attempt tidied up
    assert outcome.to_dict()["log_blob_refusals"] == len(commands.refused)
    assert all("AuthorizationPermissionMismatch" in r for r in outcome.refusals)


def test_a_role_on_another_container_is_no_role_here(arm):
    install_rescue_vm(arm, evidence_container="http://127.0.0.1:10000/devstoreaccount1/other")
    commands = install_run_commands(arm, Scripted())
    with pytest.raises(CrashcartError) as caught:
        runner(permission_wait_s=2).run(command())
    assert caught.value.exit_code == ExitCode.AZURE_AUTH
    assert len(commands.created) >= 2  # it did try again within the window


def test_a_vm_whose_identity_has_its_role_runs_at_once(arm):
    install_rescue_vm(arm, evidence_container=CONTAINER)  # assigned long before the run
    commands = install_run_commands(arm, Scripted(["Succeeded"]))
    assert runner().run(command()).execution.state == "Succeeded"
    assert commands.refused == [] and len(commands.created) == 1


def test_the_double_serves_the_refused_view_through_arm(arm):
    """The instance view over HTTP, as any client reads it (no SDK in between)."""
    install_rescue_vm(arm, os_type="Linux", evidence_container=CONTAINER, role_delay_s=60)
    install_run_commands(arm, Scripted())
    compute = AzureClients(SUB).compute
    from azure.mgmt.compute import models

    compute.virtual_machine_run_commands.begin_create_or_update(
        RESCUE_RG, RESCUE_VM, "probe", models.VirtualMachineRunCommand(
            location="westeurope", properties=models.VirtualMachineRunCommandProperties(
                source=models.VirtualMachineRunCommandScriptSource(script="echo"), async_execution=True,
                output_blob_uri=f"{CONTAINER}/x/output.log",
                output_blob_managed_identity=models.RunCommandManagedIdentity())),
        polling_interval=0.01).result()
    url = (f"{arm.url}/subscriptions/{SUB}/resourceGroups/{RESCUE_RG}/providers/Microsoft.Compute/virtualMachines/"
           f"{RESCUE_VM}/runCommands/probe?api-version=2024-07-01&$expand=instanceView")
    with urllib.request.urlopen(url) as response:
        view = json.loads(response.read())["properties"]["instanceView"]
    assert view["executionState"] == "Failed" and view["exitCode"] == -101
    assert "ERROR CODE: AuthorizationPermissionMismatch" in view["executionMessage"]


def test_protected_parameters_reach_the_script_and_are_never_returned(arm, tmp_path):
    """A key handed to the remote script (an unlock key, say) goes as a protected parameter: the script gets
    it, a GET of the run command never shows it, and the command object does not print it."""
    install_rescue_vm(arm, os_type="Linux")
    commands = install_run_commands(arm, LocalScript())
    out = tmp_path / "seen"
    remote = RemoteCommand(name="crashcart-protected", script=f'printf %s "$Secret" > {out}; echo done',
                           parameters={"Visible": "1"}, protected_parameters={"Secret": "s3cr3t-key"}, timeout_s=60)
    assert "s3cr3t-key" not in repr(remote)
    runner().run(remote)
    assert out.read_text() == "s3cr3t-key"
    sent = commands.created[-1]["properties"]
    assert sent["protectedParameters"] == [{"name": "Secret", "value": "s3cr3t-key"}]
    assert not any(k.startswith(("outputBlob", "errorBlob")) for k in sent)  # no log blobs asked, none sent
    assert all("s3cr3t-key" not in json.dumps(view) for view in commands.served)
