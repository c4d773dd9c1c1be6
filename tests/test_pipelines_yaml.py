"""The pipeline templates parse, have the keys their platforms require, and do what the README promises:
OIDC / workload identity sign-in with no stored secret, `make setup` then `pipenv run repair-run`, a
cleanup after a cancelled run, and the report published as an artifact even when the run failed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def load(name: str) -> dict:
    return yaml.safe_load((PIPELINES / name).read_text())


def script_of(step: dict) -> str:
    return step.get("run") or step.get("script") or step.get("bash") or (step.get("inputs") or {}).get(
        "inlineScript", "") or ""


def index_of(steps: list[dict], pattern: str) -> int:
    found = [i for i, s in enumerate(steps) if re.search(pattern, script_of(s))]
    assert found, f"no step runs {pattern!r}"
    return found[0]


# ---- GitHub Actions ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workflow() -> dict:
    return load("github-actions.yml")


def test_github_workflow_has_the_keys_actions_requires(workflow):
    # PyYAML reads the bare key `on` as the boolean True (YAML 1.1); GitHub reads it as "on".
    triggers = workflow.get("on", workflow.get(True))
    assert triggers and "workflow_dispatch" in triggers
    assert workflow["name"]
    assert workflow["jobs"]
    for job_id, job in workflow["jobs"].items():
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", job_id)
        assert job["runs-on"]
        assert isinstance(job["steps"], list) and job["steps"]
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), f"a step has exactly one of uses/run: {step}"
            assert set(step) <= {"id", "name", "uses", "run", "with", "env", "if", "shell", "continue-on-error",
                                 "timeout-minutes", "working-directory"}, step
    inputs = triggers["workflow_dispatch"]["inputs"]
    assert inputs["vm_id"]["required"] is True


def test_github_signs_in_with_oidc_and_stores_no_secret(workflow):
    assert workflow["permissions"]["id-token"] == "write"
    text = (PIPELINES / "github-actions.yml").read_text()
    assert "secrets." not in text
    steps = workflow["jobs"]["repair-run"]["steps"]
    login = next(s for s in steps if s.get("uses", "").startswith("azure/login@"))
    assert set(login["with"]) == {"client-id", "tenant-id", "subscription-id"}
    assert all(v.startswith("${{ vars.") for v in login["with"].values())
    env = workflow["jobs"]["repair-run"]["env"]
    assert env["ARM_USE_OIDC"] == "true"  # Terraform fetches fresh tokens for a late teardown


def test_github_runs_setup_then_repair_run_then_cleans_up_and_publishes(workflow):
    job = workflow["jobs"]["repair-run"]
    steps = job["steps"]
    setup, run = index_of(steps, r"^make setup$"), index_of(steps, r"^pipenv run repair-run$")
    cleanup = index_of(steps, r"repair-run --cleanup")
    assert setup < run < cleanup
    assert "cancelled()" in steps[cleanup]["if"] and "inputs.keep" in steps[cleanup]["if"]
    publish = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert publish["with"]["path"].rstrip("/") == "crashcart-out" and "always()" in publish["if"]
    terraform = next(s for s in steps if s.get("uses", "").startswith("hashicorp/setup-terraform@"))
    assert terraform["with"]["terraform_wrapper"] is False
    assert workflow["concurrency"]["cancel-in-progress"] is False
    assert job["timeout-minutes"] > 180  # more than repair-run's own deadline: the teardown needs time


# ---- Azure DevOps --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline() -> dict:
    return load("azure-pipelines.yml")


def test_azure_pipeline_has_the_keys_azure_devops_requires(pipeline):
    assert pipeline["trigger"] == "none"
    assert {p["name"] for p in pipeline["parameters"]} >= {"vmId", "rescueOs", "keep"}
    for param in pipeline["parameters"]:
        assert param["type"] in ("string", "boolean", "number", "object")
    for job in pipeline["jobs"]:
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", job["job"])
        assert job["pool"]["vmImage"]
        for step in job["steps"]:
            kinds = {"task", "script", "bash", "pwsh", "checkout"} & set(step)
            assert len(kinds) == 1, f"a step is exactly one of task/script/bash/pwsh/checkout: {step}"
            if "task" in step:
                assert re.fullmatch(r"[A-Za-z]+@\d+", step["task"]), step["task"]


def test_azure_pipeline_signs_in_with_workload_identity_and_stores_no_secret(pipeline):
    steps = pipeline["jobs"][0]["steps"]
    cli_steps = [s for s in steps if s.get("task") == "AzureCLI@2"]
    assert cli_steps
    for step in cli_steps:
        inputs = step["inputs"]
        assert {"azureSubscription", "scriptType", "scriptLocation", "inlineScript"} <= set(inputs)
        assert inputs["addSpnToEnvironment"] is True
        assert "ARM_USE_OIDC=true" in inputs["inlineScript"]
        assert step["env"]["SYSTEM_ACCESSTOKEN"] == "$(System.AccessToken)"
    text = (PIPELINES / "azure-pipelines.yml").read_text()
    assert not re.search(r"(?i)client_?secret|ARM_CLIENT_SECRET|password", text)


def test_azure_pipeline_runs_setup_then_repair_run_then_cleans_up_and_publishes(pipeline):
    job = pipeline["jobs"][0]
    steps = job["steps"]
    setup, run = index_of(steps, r"^make setup$"), index_of(steps, r"pipenv run repair-run$")
    cleanup = index_of(steps, r"repair-run --cleanup")
    assert setup < run < cleanup
    assert "canceled()" in steps[cleanup]["condition"] and "parameters.keep" in steps[cleanup]["condition"]
    publish = next(s for s in steps if s.get("task") == "PublishPipelineArtifact@1")
    assert publish["inputs"]["targetPath"] == "crashcart-out" and publish["condition"] == "always()"
    assert job["cancelTimeoutInMinutes"] >= 15  # the teardown's time after a cancel
    assert job["timeoutInMinutes"] > 180
