"""`python -m scripts fleet` as a person types it: the verb, its subcommands, usage errors (one line,
exit 2, no traceback), and `fleet plan`'s JSON on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.run.fleetkit import vm_ids

REPO = Path(__file__).resolve().parents[2]


def fleet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRASHCART_")}
    return subprocess.run([sys.executable, "-m", "scripts", "fleet", *args], cwd=cwd, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(REPO)}, timeout=60)


def test_fleet_is_a_verb():
    listed = subprocess.run([sys.executable, "-m", "scripts", "--help"], cwd=REPO, capture_output=True, text=True)
    assert "fleet" in listed.stdout  # --help asked for: on stdout, as every verb's


def test_plan_prints_the_matrices(tmp_path):
    vms = tmp_path / "vms.txt"
    vms.write_text("\n".join(vm_ids(7)) + "\n")
    done = fleet("plan", "--vms", str(vms), "--shards", "3", "--out", "plan", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    planned = json.loads(done.stdout)
    assert [e["vms"] for e in planned["github_matrix"]["include"]] == [3, 2, 2]
    assert (tmp_path / "plan" / "matrix-azure.json").exists()
    assert planned["fleet_id"].startswith("fleet-")


def test_usage_errors_are_one_line_and_exit_2(tmp_path):
    vms = tmp_path / "vms.txt"
    vms.write_text(vm_ids(1)[0] + "\n")
    cases = [
        ("run", "--vms", str(vms), "--selector", "tag:env=prod"),  # one or the other
        ("plan", "--vms", str(tmp_path / "missing.txt"), "--shards", "2"),
        ("plan", "--vms", str(vms), "--shards", "0"),
        ("run", "--vms", str(vms), "--fleet-id", "Bad/Id"),
        ("report",),
    ]
    for args in cases:
        done = fleet(*args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr and done.stderr.startswith("error: "), done.stderr
    selector = fleet(*cases[0], cwd=tmp_path)
    assert "either --vms FILE or --selector TERMS" in selector.stderr


def test_run_without_a_deployed_evidence_stack_says_what_to_do(tmp_path):
    vms = tmp_path / "vms.txt"
    vms.write_text(vm_ids(1)[0] + "\n")
    done = fleet("run", "--vms", str(vms), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "synthesize the stacks first" in done.stderr
