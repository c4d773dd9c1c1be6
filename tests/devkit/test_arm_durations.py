"""The ARM double's duration profile (scripts/devkit/armdouble.py, Durations): by default nothing takes time;
with a profile, a long-running operation stays InProgress, the resource it creates in Creating and a run
command's execution Running for the modelled time, and ARM's Retry-After says the whole seconds left."""

from __future__ import annotations

import json
import time
import urllib.request

from scripts.devkit.arm_compute import Scripted, install_rescue_vm, install_run_commands, vm_id
from scripts.devkit.armdouble import AZURE_SECONDS, Durations

VERSION = "2024-07-01"


def call(arm, method: str, url: str, body: dict | None = None) -> tuple[int, dict, dict]:
    if not url.startswith("http"):
        url = f"{arm.url}{url}{'&' if '?' in url else '?'}api-version={VERSION}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return response.status, json.loads(response.read() or b"null") or {}, dict(response.headers)


def start_command(arm) -> tuple[str, str]:
    install_rescue_vm(arm)
    install_run_commands(arm, Scripted(("Running", "Succeeded"), output="done"))
    command = f"{vm_id()}/runCommands/collect"
    _, _, headers = call(arm, "PUT", command, {"location": "westeurope", "properties": {
        "source": {"script": "echo done"}, "asyncExecution": True}})
    return command, headers["Azure-AsyncOperation"]


def test_by_default_nothing_takes_time(arm):
    assert arm.durations.of("deploy") == 0 and arm.durations.per_vm() == 0
    command, status_url = start_command(arm)
    states = [call(arm, "GET", status_url)[1]["status"] for _ in range(2)]
    assert states == ["InProgress", "Succeeded"]  # lro_polls (1), then done: as before the profile
    views = [call(arm, "GET", f"{command}?$expand=instanceView")[1]["properties"]["instanceView"]["executionState"]
             for _ in range(2)]
    assert views == ["Running", "Succeeded"]


def test_operations_last_their_modelled_time(arm, monkeypatch):
    monkeypatch.setattr(arm, "durations", Durations({"run_command.create": 2.0}, 0.5))
    began = time.monotonic()
    command, status_url = start_command(arm)
    polls, answers = 0, []
    while True:
        _, body, headers = call(arm, "GET", status_url)
        polls += 1
        if body["status"] != "InProgress":
            break
        answers.append(headers["Retry-After"])
        state = call(arm, "GET", command)[1]["properties"]["provisioningState"]
        assert state == "Creating", state
        time.sleep(0.05)
    assert body["status"] == "Succeeded" and time.monotonic() - began >= 1.0  # 2 s at scale 0.5
    assert polls > 2 and answers[0] == "0" and call(arm, "GET", command)[1]["properties"]["provisioningState"] == \
        "Succeeded"


def test_a_run_commands_script_runs_for_its_modelled_time(arm, monkeypatch):
    monkeypatch.setattr(arm, "durations", Durations({"run_command.execution": 2.0}, 0.5))
    began = time.monotonic()
    command, _ = start_command(arm)
    views = []
    while not views or views[-1] == "Running":  # whatever the outcome says meanwhile
        views.append(call(arm, "GET", f"{command}?$expand=instanceView")[1]["properties"]["instanceView"]
                     ["executionState"])
        time.sleep(0.05)
    assert time.monotonic() - began >= 1.0 and views[-1] == "Succeeded" and views.count("Running") > 2, views


def test_retry_after_says_the_whole_seconds_left(arm, monkeypatch):
    monkeypatch.setattr(arm, "durations", Durations.azure_like(1 / 20))
    assert arm.durations.of("deploy") == AZURE_SECONDS["deploy"] / 20 and arm.durations.of(None) == 0
    assert arm.durations.per_vm() == sum(AZURE_SECONDS[k] for k in ("deploy", "run_command.create",
                                                                    "run_command.execution", "run_command.delete",
                                                                    "destroy")) / 20
    headers = arm.long_running(vm_id(), kind="vm.start")  # the hook arm_vmops' start/restart pass `kind=` to
    _, body, answer = call(arm, "GET", headers["Azure-AsyncOperation"])
    assert body["status"] == "InProgress" and answer["Retry-After"] == "2"  # 60 s / 20 = 3 s: 2 whole seconds left
