"""`make demo`'s verb: synth as a child process, then a readable plan and JSON for pipelines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support.synth import EXAMPLE, REPO


def test_summary_synthesizes_both_stacks_and_describes_them(tmp_path):
    outdir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "scripts", "summary", "--config", str(EXAMPLE), "--outdir", str(outdir)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (outdir / "stacks/evidence/cdk.tf.json").exists() and (outdir / "stacks/repair/cdk.tf.json").exists()
    report = json.loads(result.stdout)
    repair_types = {r["type"] for r in report["stacks"]["repair"]["resources"]}
    assert {"azurerm_snapshot", "azurerm_managed_disk", "azurerm_windows_virtual_machine",
            "azurerm_virtual_machine_data_disk_attachment", "azurerm_role_assignment"} <= repair_types
    assert report["stacks"]["repair"]["variables"] == ["rescue_admin_password"]
    assert "Rescue plan for web-01" in result.stderr
    assert "snapshot of the broken OS disk" in result.stderr


def test_summary_with_a_bad_config_says_so_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('zone = "1"', 'zone = "7"'))
    result = subprocess.run([sys.executable, "-m", "scripts", "summary", "--config", str(bad)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert 'source.zone = "7"' in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not (REPO / "node_modules/.bin/cdktf").exists() or not shutil.which("pipenv"),
                    reason="cdktf-cli or pipenv missing: run `make setup`")
def test_cdktf_cli_synth_writes_both_stacks(tmp_path):
    """The README's path: `npx cdktf synth` runs `pipenv run python main.py` from cdktf.json."""
    env = {**os.environ, "CRASHCART_CONFIG": str(EXAMPLE), "CHECKPOINT_DISABLE": "1", "CI": "1",
           "PIPENV_VENV_IN_PROJECT": "1", "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20"}
    outdir = tmp_path / "cdktf.out"
    result = subprocess.run([str(REPO / "node_modules/.bin/cdktf"), "synth", "--output", str(outdir)],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=420)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for stack in ("evidence", "repair"):
        data = json.loads((outdir / "stacks" / stack / "cdk.tf.json").read_text())
        assert data["resource"], stack
