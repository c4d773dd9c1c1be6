"""scripts.config.stackoutputs: the stacks' outputs, typed; an unreadable outputs file is a usage error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.base.errors import CrashcartError, ExitCode
from scripts.config.stackoutputs import RepairOutputs, outputs_file_values, repair_outputs_from_file

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


# ---- a file the operator names (--outputs-file): every value checked, both terraform shapes ---------------
SUB = "00000000-0000-0000-0000-000000000001"
GOOD = {
    "subscription_id": SUB, "resource_group_name": "crashcart-repair-web-01",
    "rescue_vm_id": f"/subscriptions/{SUB}/resourceGroups/crashcart-repair-web-01/providers/Microsoft.Compute/"
                    "virtualMachines/crashcart-rescue",
    "rescue_vm_name": "crashcart-rescue", "rescue_vm_principal_id": "11111111-1111-1111-1111-111111111111",
    "rescue_os": "windows",
    "disk_copy_id": f"/subscriptions/{SUB}/resourceGroups/crashcart-repair-web-01/providers/Microsoft.Compute/disks/c",
    "disk_copy_lun": 0,
    "snapshot_id": f"/subscriptions/{SUB}/resourceGroups/crashcart-repair-web-01/providers/Microsoft.Compute/"
                   "snapshots/s",
    "source_vm_id": f"/subscriptions/{SUB}/resourceGroups/prod/providers/Microsoft.Compute/virtualMachines/web-01",
    "source_os_disk_id": f"/subscriptions/{SUB}/resourceGroups/prod/providers/Microsoft.Compute/disks/web-01-os",
    "evidence_account_name": "acct", "evidence_blob_endpoint": "https://acct.blob.core.windows.net/",
    "evidence_container": "dumps",
}


def _file(tmp_path, document, prefix=b"") -> Path:
    path = tmp_path / "outputs.json"
    path.write_bytes(prefix + json.dumps(document).encode())
    return path


def test_the_cdktf_shape_with_a_bom_and_the_terraform_output_shape_read_the_same(tmp_path):
    plain = repair_outputs_from_file(_file(tmp_path, {"repair": GOOD}, prefix=b"\xef\xbb\xbf"))
    wrapped = {name: {"value": value, "type": "string", "sensitive": False} for name, value in GOOD.items()}
    assert repair_outputs_from_file(_file(tmp_path, {"repair": wrapped})) == plain
    assert plain.disk_copy_lun == 0 and plain.rescue_vm == ("crashcart-repair-web-01", "crashcart-rescue")


@pytest.mark.parametrize("name, value", [
    ("disk_copy_lun", "abc"), ("disk_copy_lun", None), ("disk_copy_lun", 1.5), ("disk_copy_lun", -1),
    ("disk_copy_lun", True), ("disk_copy_lun", 64), ("evidence_container", 5), ("evidence_container", ""),
    ("evidence_blob_endpoint", "http://evil.example.com/"), ("evidence_blob_endpoint", "not a url"),
    ("rescue_vm_id", "garbage"), ("source_os_disk_id", GOOD["source_vm_id"]), ("rescue_os", "solaris"),
    ("subscription_id", {"nested": 1}),
])
def test_a_wrong_value_is_a_usage_error_naming_it(tmp_path, name, value):
    with pytest.raises(CrashcartError) as caught:
        repair_outputs_from_file(_file(tmp_path, {"repair": {**GOOD, name: value}}))
    assert caught.value.exit_code == ExitCode.USAGE and name in caught.value.message
    assert "\n" not in caught.value.message


def test_a_loopback_endpoint_an_empty_id_and_a_digit_string_lun_are_fine(tmp_path):
    got = repair_outputs_from_file(_file(tmp_path, {"repair": {
        **GOOD, "evidence_blob_endpoint": "http://127.0.0.1:10000/devstoreaccount1", "rescue_vm_id": "",
        "disk_copy_lun": "3"}}))
    assert got.disk_copy_lun == 3 and got.rescue_vm_id == ""


@pytest.mark.parametrize("verb", [["collect"], ["prepare-dump", "--dry-run"]])
def test_a_fifo_or_a_bad_lun_as_outputs_file_is_refused_at_once(tmp_path, verb):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "repair.toml").write_text((REPO / "repair.example.toml").read_text())
    bad = _file(tmp_path, {"repair": {**GOOD, "disk_copy_lun": "abc"}})
    for path, words in ((fifo, "not a regular file"), (bad, "disk_copy_lun")):
        proc = subprocess.run([sys.executable, "-m", "scripts", *verb, "--outputs-file", str(path)], cwd=tmp_path,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == ExitCode.USAGE, proc.stderr
        assert words in proc.stderr and "Traceback" not in proc.stderr
