"""The fleet's CI templates (pipelines/fleet-*.yml): they parse, have the keys their platforms require,
and consume exactly what `fleet plan` writes (the matrix keys), with a final job that merges the shards
from evidence whatever the shards did. What `fleet plan --shards N` writes, put into each template where
the pipeline puts it at run time, validates against the platform's schema (the vendored schemas of
check-jsonschema, tests/test_pipelines_yaml.py) for one shard, several, and more shards than VMs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from scripts.run import fleetplan
from tests.run.fleetkit import vm_ids
from tests.test_pipelines_yaml import read_as_platform, schema_errors

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
GH_STEP_KEYS = {"id", "name", "uses", "run", "with", "env", "if", "shell", "continue-on-error", "timeout-minutes",
                "working-directory"}


def load(name: str) -> dict:
    return yaml.safe_load((PIPELINES / name).read_text())


def runs(steps: list[dict]) -> str:
    return "\n".join(s.get("run") or s.get("script") or s.get("bash") or (s.get("inputs") or {}).get("inlineScript", "")
                     or "" for s in steps)


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> dict:
    return fleetplan.plan(tuple(vm_ids(10)), 4, "fleet-x", "vms.txt", tmp_path_factory.mktemp("plan"))


def test_github_fleet_workflow(planned):
    workflow = load("fleet-github-actions.yml")
    assert "secrets." not in (PIPELINES / "fleet-github-actions.yml").read_text()
    assert workflow["permissions"]["id-token"] == "write"
    assert workflow["concurrency"]["cancel-in-progress"] is False
    inputs = workflow.get("on", workflow.get(True))["workflow_dispatch"]["inputs"]
    assert {"vms_file", "shards", "max_parallel"} <= set(inputs)
    jobs = workflow["jobs"]
    assert list(jobs) == ["plan", "shard", "report"]
    for job_id, job in jobs.items():
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", job_id) and job["runs-on"] and job["timeout-minutes"]
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step) and set(step) <= GH_STEP_KEYS, step
    plan = jobs["plan"]
    assert plan["outputs"]["matrix"] == "${{ steps.plan.outputs.matrix }}"
    assert "pipenv run fleet plan" in runs(plan["steps"]) and "jq -c .github_matrix" in runs(plan["steps"])
    shard = jobs["shard"]
    assert shard["needs"] == "plan" and shard["strategy"]["fail-fast"] is False
    assert shard["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    script = runs(shard["steps"])
    assert '--shard "${{ matrix.shard }}"' in script and "--fleet-id \"${{ needs.plan.outputs.fleet_id }}\"" in script
    # every matrix entry fleet plan writes has the key the job reads, within GitHub's 256 jobs
    include = planned["github_matrix"]["include"]
    assert 1 <= len(include) <= 256 and all(re.fullmatch(r"\d+/\d+", e["shard"]) for e in include)
    assert all(fleetplan.parse_shard(e["shard"]) for e in include)
    report = jobs["report"]
    assert "shard" in report["needs"] and "always()" in report["if"]
    assert "pipenv run fleet report --fleet-id" in runs(report["steps"])
    assert any(s.get("uses", "").startswith("actions/upload-artifact@") and "always()" in s.get("if", "")
               for s in report["steps"])


def test_azure_fleet_pipeline(planned):
    pipeline = load("fleet-azure-pipelines.yml")
    assert pipeline["trigger"] == "none" and "secrets" not in (PIPELINES / "fleet-azure-pipelines.yml").read_text()
    jobs = {j["job"]: j for j in pipeline["jobs"]}
    assert list(jobs) == ["plan", "shard", "report"]
    for name, job in jobs.items():
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and job["pool"]["vmImage"] and job["steps"]
        for step in job["steps"]:
            kinds = {"checkout", "task", "script", "bash"} & set(step)
            assert len(kinds) == 1, step
    setter = next(s for s in jobs["plan"]["steps"] if s.get("name") == "matrix")
    assert "task.setvariable variable=legs;isOutput=true" in setter["bash"] and "jq -c .azure_matrix" in setter["bash"]
    shard = jobs["shard"]
    assert shard["dependsOn"] == "plan"
    assert shard["strategy"]["matrix"] == "$[ dependencies.plan.outputs['matrix.legs'] ]"
    assert '--shard "$(SHARD)"' in runs(shard["steps"]) and int(shard["cancelTimeoutInMinutes"]) >= 10
    legs = planned["azure_matrix"]
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", leg) and set(v) == {"SHARD"} for leg, v in legs.items())
    assert json.loads(json.dumps(legs)) == legs
    report = jobs["report"]
    assert "shard" in report["dependsOn"] and "always()" in report["condition"]
    assert "pipenv run fleet report --fleet-id" in runs(report["steps"])


# ---- what `fleet plan` writes, in the templates, against the schemas ------------------------------------
def template(name: str) -> dict:
    return read_as_platform((PIPELINES / name).read_text(encoding="utf-8"), "azure" if "azure" in name else "github")


@pytest.mark.parametrize("vms,shards", [(10, 1), (10, 3), (10, 10), (10, 25), (1, 4), (600, 256)])
def test_planned_matrices_validate_in_the_templates(tmp_path, vms, shards):
    """The matrices as written to matrix-github.json / matrix-azure.json and printed (what the plan job hands
    on: `jq -c .github_matrix` / `.azure_matrix`, one line) replace the run-time expression each template
    puts in strategy.matrix; the result validates, and every job of the matrix has the variables it reads."""
    out = tmp_path / "plan"
    printed = fleetplan.plan(tuple(vm_ids(vms)), shards, "fleet-x", "vms.txt", out)
    expected = min(vms, shards)  # never an empty shard: the schema refuses an empty include, CI an empty job
    github = json.loads((out / "matrix-github.json").read_text())
    azure = json.loads((out / "matrix-azure.json").read_text())
    assert github == printed["github_matrix"] and azure == printed["azure_matrix"]
    assert "\n" not in json.dumps(github, separators=(",", ":"))  # one line: a $GITHUB_OUTPUT / ##vso value
    assert len(github["include"]) == len(azure) == expected and printed["shards"] == expected
    assert sorted(v for i in range(1, expected + 1)
                  for v in (out / f"shard-{i}-of-{expected}.txt").read_text().split()) == sorted(vm_ids(vms))

    workflow = template("fleet-github-actions.yml")
    shard_job = workflow["jobs"]["shard"]
    assert shard_job["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    shard_job["strategy"]["matrix"] = json.loads(json.dumps(github, separators=(",", ":")))
    assert schema_errors(workflow, "github") == []
    reads = set(re.findall(r"\bmatrix\.([A-Za-z_][A-Za-z0-9_-]*)", json.dumps(shard_job)))
    assert reads == {"shard"} and all(reads <= set(entry) for entry in github["include"])

    pipeline = template("fleet-azure-pipelines.yml")
    shard_job = next(j for j in pipeline["jobs"] if j["job"] == "shard")
    assert shard_job["strategy"]["matrix"] == "$[ dependencies.plan.outputs['matrix.legs'] ]"
    shard_job["strategy"]["matrix"] = json.loads(json.dumps(azure, separators=(",", ":")))
    assert schema_errors(pipeline, "azure") == []
    defined = {v["name"] for v in pipeline["variables"]} | set(shard_job.get("variables") or {})
    reads = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", json.dumps(shard_job["steps"]))) - defined
    assert reads == {"SHARD"} and all(reads <= set(leg) for leg in azure.values())
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", leg) for leg in azure)  # Azure's leg names


def test_a_broken_plan_fails_the_schema_check():
    """The check above catches a matrix the platform refuses (an empty include; a leg that is not a mapping)."""
    workflow = template("fleet-github-actions.yml")
    workflow["jobs"]["shard"]["strategy"]["matrix"] = {"include": []}
    assert schema_errors(workflow, "github")
    pipeline = template("fleet-azure-pipelines.yml")
    next(j for j in pipeline["jobs"] if j["job"] == "shard")["strategy"]["matrix"] = {"shard_1_of_1": "1/1"}
    assert schema_errors(pipeline, "azure")
