"""scripts.config.stackoutputs: the stacks' outputs, typed; an unreadable outputs file is a usage error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scripts.base.errors import CrashcartError, ExitCode
from scripts.config.stackoutputs import RepairOutputs, outputs_file_values

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("content", [b"\xff\xfe\x00not utf-8", b"{not json", b"[1, 2]", b'"repair"', b"[" * 100000])
def test_an_unreadable_outputs_file_is_a_usage_error(tmp_path, content):
    path = tmp_path / "outputs.json"
    path.write_bytes(content)
    with pytest.raises(CrashcartError) as caught:
        outputs_file_values(path, "repair")
    assert caught.value.exit_code == ExitCode.USAGE and "\n" not in caught.value.message


def test_missing_outputs_are_named():
    with pytest.raises(CrashcartError) as caught:
        RepairOutputs.from_values({"subscription_id": "x"})
    assert caught.value.exit_code == ExitCode.USAGE and "rescue_vm_id" in caught.value.message


def test_collect_with_a_binary_outputs_file_says_so_without_a_traceback(tmp_path):
    path = tmp_path / "outputs.json"
    path.write_bytes(b"\x00\xff" * 64)
    proc = subprocess.run([sys.executable, "-m", "scripts", "collect", "--outputs-file", str(path)], cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert "cannot read outputs file" in proc.stderr and "Traceback" not in proc.stderr
