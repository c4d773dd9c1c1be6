"""`pipenv run collect` before `cdktf deploy repair` (issue #13): Terraform's answer reaches the user as one
clean line - no colour codes, no box drawing, no escaped byte dump, no library logging - and exit 2 with
the next step. Against the real Terraform (1.11 here), offline: a synthesized-looking stack folder whose
only resource is the built-in terraform_data."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.fake_terraform import write_shim

REPO = Path(__file__).resolve().parents[2]
REAL_TERRAFORM = shutil.which("terraform")


def stack_folder(root: Path) -> Path:
    folder = root / "cdktf.out" / "stacks" / "repair"
    folder.mkdir(parents=True)
    folder.joinpath("cdk.tf.json").write_text(json.dumps({
        "terraform": {"backend": {"local": {"path": "../../../terraform.repair.web-01-76f7ec91.tfstate"}}},
        "variable": {"rescue_admin_password": {"type": "string", "sensitive": True}},
        "resource": {"terraform_data": {"quick": {"input": "x"}}},
        "output": {"rescue_vm_id": {"value": "${terraform_data.quick.output}"}},
    }))
    return folder


def collect(cwd: Path, terraform: str, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRASHCART_", "FAKE_TF_"))}
    env.update(PYTHONPATH=str(REPO), CRASHCART_TERRAFORM=terraform, FAKE_TF_LOG=str(cwd / "tf.jsonl"))
    return subprocess.run([sys.executable, "-m", "scripts", "collect", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env)


def assert_told_cleanly(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("next:  "), done.stderr
    assert message in lines[0]
    assert "npx cdktf deploy repair" in lines[1] and "TF_VAR_rescue_admin_password" in lines[1]
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", done.stderr)  # no escape codes or control characters
    assert not re.search(r"[│╷╵]", done.stderr) and "b'" not in done.stderr and "\\x1b" not in done.stderr
    assert done.stdout == ""


@pytest.mark.skipif(not REAL_TERRAFORM, reason="terraform is not on PATH")
def test_collect_before_deploy_with_the_real_terraform(tmp_path):
    folder = stack_folder(tmp_path)
    done = collect(tmp_path, REAL_TERRAFORM)
    assert_told_cleanly(done, f"the repair stack is not deployed from this folder (Terraform was never "
                              f"initialised in {folder})")
    subprocess.run([REAL_TERRAFORM, "init", "-input=false", "-no-color"], cwd=folder, capture_output=True, check=True)
    done = collect(tmp_path, REAL_TERRAFORM)
    assert_told_cleanly(done, "the repair stack has no outputs: it is not deployed")


def test_collect_before_deploy_with_the_fake_terraform(tmp_path):
    stack_folder(tmp_path)
    shim = write_shim(tmp_path / "bin")
    done = collect(tmp_path, str(shim))
    assert_told_cleanly(done, "the repair stack is not deployed from this folder")
