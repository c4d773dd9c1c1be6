"""The fleet's CI templates (pipelines/fleet-*.yml): they parse, have the keys their platforms require,
and consume exactly what `fleet plan` writes (the matrix keys), with a final job that merges the shards
from evidence whatever the shards did. (No JSON schema is vendored here: the checks are structural, as in
tests/test_pipelines_yaml.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from scripts.run import fleetplan
from tests.run.fleetkit import vm_ids

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
    assert '--shard "$(SHARD)"' in runs(shard["steps"]) and shard["cancelTimeoutInMinutes"] >= 10
    legs = planned["azure_matrix"]
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", leg) and set(v) == {"SHARD"} for leg, v in legs.items())
    assert json.loads(json.dumps(legs)) == legs
    report = jobs["report"]
    assert "shard" in report["dependsOn"] and "always()" in report["condition"]
    assert "pipenv run fleet report --fleet-id" in runs(report["steps"])
