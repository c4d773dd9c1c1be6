"""The pipeline templates parse, validate against their platforms' schemas, and do what the README promises:
OIDC / workload identity sign-in with no stored secret, `make setup` then `pipenv run repair-run`, a
cleanup after a cancelled run, and the report published as an artifact even when the run failed.

The schemas are the ones check-jsonschema (a dev package) vendors, read from the installed package, never
copied here: SchemaStore's github-workflow.json and Microsoft's azure-pipelines-vscode service-schema.json
(their licences beside them, check_jsonschema/builtin_schemas/vendor/licenses). They are applied with the
jsonschema library under the draft each declares in `$schema`, to the YAML read as the platforms read it
(YAML 1.2: `on` is a key, not a boolean), Azure's after check-jsonschema's azure-pipelines transform (the
compile-time `${{ }}` expressions unnested, as the Azure Pipelines language server does).
"""

from __future__ import annotations

import functools
import io
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ruamel.yaml import YAML

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
VENDORED = "check_jsonschema.builtin_schemas.vendor"
SCHEMAS = {"github": "github-workflows.json", "azure": "azure-pipelines.json"}


def platform_of(name: str) -> str:
    return "azure" if "azure" in name else "github"


@functools.cache
def validator(platform: str) -> Any:
    """The validator of the vendored schema, for the draft its `$schema` declares (both: Draft-07)."""
    schema = json.loads(resources.files(VENDORED).joinpath(SCHEMAS[platform]).read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema, default=None)
    assert cls is not None, f"{SCHEMAS[platform]} declares a $schema jsonschema does not know: {schema.get('$schema')}"
    return cls(schema)


def read_as_platform(text: str, platform: str) -> Any:
    """The YAML as the CI system reads it: YAML 1.2 (ruamel, as check-jsonschema), keys as strings; Azure's
    compile-time expressions unnested by check-jsonschema's own transform."""
    from check_jsonschema.transforms.azure_pipelines import azure_main

    document = YAML(typ="safe", pure=True).load(io.StringIO(text))
    document = json.loads(json.dumps(document, default=str))
    return azure_main(document) if platform == "azure" else document


def schema_errors(document: Any, platform: str) -> list[str]:
    """What the schema rejects, one line per error: its deepest cause (an anyOf/oneOf error's branch that
    got furthest into the document), as `$.path: message`."""

    def leaves(error: Any) -> list[Any]:
        return [leaf for c in error.context or [] for leaf in leaves(c)] or [error]

    found = []
    for error in validator(platform).iter_errors(document):
        causes = leaves(error)
        depth = max(len(c.absolute_path) for c in causes)
        deepest = [c for c in causes if len(c.absolute_path) == depth]
        others = f" (and {len(deepest) - 1} other alternatives fail there)" if len(deepest) > 1 else ""
        found.append(f"{deepest[0].json_path}: {deepest[0].message[:300]}{others}")
    return found


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
    # strings: the schema types every Azure Pipelines scalar so (test_every_template_validates_...)
    assert int(job["cancelTimeoutInMinutes"]) >= 15  # the teardown's time after a cancel
    assert int(job["timeoutInMinutes"]) > 180


# ---- the schemas -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.name for p in PIPELINES.glob("*.yml")))
def test_every_template_validates_against_its_platforms_schema(name):
    platform = platform_of(name)
    document = read_as_platform((PIPELINES / name).read_text(encoding="utf-8"), platform)
    assert schema_errors(document, platform) == [], name


def test_the_schema_check_rejects_a_broken_template():
    """Deliberately broken copies of the templates: a check that passed these would pass anything."""

    def broken(name: str, breaking: Any) -> list[str]:
        platform = platform_of(name)
        document = read_as_platform((PIPELINES / name).read_text(encoding="utf-8"), platform)
        assert schema_errors(document, platform) == []
        breaking(document)
        return schema_errors(document, platform)

    misspelt = broken("azure-pipelines.yml", lambda d: d["jobs"][0].update(timeoutMinutes="240"))
    assert misspelt and "timeoutMinutes" in misspelt[0], misspelt
    as_int = broken("fleet-azure-pipelines.yml", lambda d: d["jobs"][1].update(cancelTimeoutInMinutes=30))
    assert as_int and as_int[0].startswith("$.jobs[1].cancelTimeoutInMinutes"), as_int
    unknown_task = broken("azure-pipelines.yml", lambda d: d["jobs"][0]["steps"].append(
        {"task": "UseNode@1", "inputs": {"version": "22.x"}}))  # a task the schema has no inputs for
    assert unknown_task and unknown_task[0].startswith("$.jobs[0].steps[8]"), unknown_task
    both = broken("github-actions.yml", lambda d: d["jobs"]["repair-run"]["steps"].append(
        {"name": "both", "uses": "actions/checkout@v4", "run": "true"}))
    assert both and both[0].startswith("$.jobs['repair-run'].steps[10]"), both
    no_include = broken("fleet-github-actions.yml", lambda d: d["jobs"]["shard"]["strategy"].update(
        matrix={"include": []}))
    assert no_include and "$.jobs.shard.strategy.matrix" in no_include[0], no_include
    # and YAML as GitHub reads it: an unquoted `on` stays the key `on` (PyYAML would make it True)
    assert "on" in read_as_platform((PIPELINES / "github-actions.yml").read_text(encoding="utf-8"), "github")
