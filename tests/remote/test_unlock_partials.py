"""The BitLocker unlock partials (_unlock.ps1.j2, _unlock.sh.j2), rendered standalone with _common: PowerShell held
to 5.1 (the cmdlet signatures and the lint rules the templates meet), bash run for real with a stand-in dislocker
that records what it was given (the key reaches it only as a 0600 file, which is gone afterwards and never logged)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from scripts import remote
from tests.remote import pslint, psparse

PS = """[CmdletBinding()]
param([string]$BitLockerKey = '', [string]$DiskLun = '')
{% include '_common.ps1.j2' %}
function Get-ResultFields { return @{} }
{% include '_unlock.ps1.j2' %}
$unlockedRoots = Unlock-DiskCopy (Get-Disk -Number 2)
"""
SH = """#!/bin/bash
{% include '_common.sh.j2' %}
result_fields() { RESULT_ARGS=(); }
{% include '_unlock.sh.j2' %}
TMP=$(mktemp -d)
unlock_bitlocker "$@"
printf 'UNLOCKED %s\\n' "${UNLOCKED_VOLUMES[@]}"
"""
BEK = bytes(range(156))


def _render(text: str) -> str:
    return remote._environment().from_string(text).render(result_marker=remote.RESULT_MARKER)


@pytest.mark.skipif(not psparse.SIGNATURES.is_file(), reason="the 5.1 cmdlet signatures are not there")
def test_the_powershell_partial_meets_windows_powershell_51():
    source = _render(PS)
    assert pslint.findings(source) == []
    script = psparse.Script(source)
    sig = psparse.signatures()
    used = {sig.cmdlet(c.name)[0] for c in script.commands if c.name and sig.cmdlet(c.name)}
    assert {"Set-Acl", "Add-PartitionAccessPath", "Get-Partition", "Remove-Item"} <= used
    # manage-bde runs through the one native-program guard, with the key as a file, never as text
    assert "Invoke-Native 'manage-bde.exe' @('-unlock', $drive, '-RecoveryKey', $keyFile)" in source
    assert "Write-Log" not in "".join(l for l in source.splitlines() if "BitLockerKey" in l or "$bytes" in l)


def _bash(tmp_path: Path, *, key: str | None, dislocker: bool, parts: list[Path]) -> subprocess.CompletedProcess:
    script = tmp_path / "unlock.sh"
    script.write_text(_render(SH))
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for tool in ("bash", "dd", "tr", "mktemp", "base64", "rm", "rmdir", "shred", "mountpoint", "umount", "losetup",
                 "date", "python3", "sleep", "cat", "stat", "cp", "touch"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).unlink(missing_ok=True)
            (bindir / tool).symlink_to(found)
    if dislocker:  # records its arguments, the key file's mode and bytes; makes the plaintext volume file
        (bindir / "dislocker").write_text(
            '#!/bin/bash\nprintf "%s\\n" "$@" > "$RECORD.args"\nkey=$3\nstat -c %a "$key" > "$RECORD.mode"\n'
            'cp "$key" "$RECORD.key"\ntouch "${@: -1}/dislocker-file"\n')
        (bindir / "dislocker").chmod(0o755)
    env = {"PATH": str(bindir), "RECORD": str(tmp_path / "record")}
    if key is not None:
        env["BitLockerKey"] = key
    return subprocess.run([str(bindir / "bash"), str(script), *map(str, parts)], env=env, capture_output=True,
                          text=True, timeout=60)


def _partition(path: Path, bitlocker: bool) -> Path:
    path.write_bytes(b"\xebR\x90" + (b"-FVE-FS-" if bitlocker else b"NTFS    ") + bytes(501))
    return path


@pytest.mark.skipif(shutil.which("python3") is None, reason="the scripts write their JSON with python3")
def test_without_dislocker_a_key_is_refused_up_front_with_the_ways_out(tmp_path):
    run = _bash(tmp_path, key=base64.b64encode(BEK).decode(), dislocker=False,
                parts=[_partition(tmp_path / "p3", True)])
    assert run.returncode == 11
    assert '"status": "disk_not_found"' in run.stdout or '"status":"disk_not_found"' in run.stdout
    assert "dislocker is not on the rescue VM" in run.stdout and 'rescue.os = \\"windows\\"' in run.stdout


@pytest.mark.skipif(shutil.which("python3") is None, reason="the scripts write their JSON with python3")
def test_the_key_reaches_dislocker_as_a_0600_file_that_is_wiped_and_never_logged(tmp_path):
    key = base64.b64encode(BEK).decode()
    plain, locked = _partition(tmp_path / "p2", False), _partition(tmp_path / "p3", True)
    run = _bash(tmp_path, key=key, dislocker=True, parts=[plain, locked])
    assert run.returncode == 0, run.stdout + run.stderr
    args = (tmp_path / "record.args").read_text().split("\n")
    assert args[:5] == ["-r", "-f", args[2], "-V", str(locked)] and args[5] == "--"  # read-only, the BitLocker one only
    assert (tmp_path / "record.mode").read_text().strip() == "600"
    assert (tmp_path / "record.key").read_bytes() == BEK
    assert not Path(args[2]).exists() and not Path(args[2]).parent.exists()  # wiped with its folder
    assert "UNLOCKED " in run.stdout and run.stdout.strip().endswith("/dislocker-file")
    assert key not in run.stdout + run.stderr and key[:24] not in run.stdout + run.stderr


@pytest.mark.skipif(shutil.which("python3") is None, reason="the scripts write their JSON with python3")
def test_a_key_that_is_not_base64_stops_with_exit_2_and_leaves_no_file(tmp_path):
    run = _bash(tmp_path, key="not base64 !!", dislocker=True, parts=[_partition(tmp_path / "p3", True)])
    assert run.returncode == 2 and "BitLockerKey is not base64" in run.stdout
    assert not (tmp_path / "record.args").exists()
    shm = Path("/dev/shm")
    assert not [p for p in (shm.iterdir() if shm.is_dir() else []) if p.name.startswith("crashcart-key.")]
