"""The Linux rescue script (collect.sh.j2) on an Azure Disk Encryption (BitLocker) disk copy, run for real:

the disk copy is a GPT image whose Windows partition is dissect.fve's real BitLocker volume (tests/windisk/conftest.py)
holding our NTFS; the key (base64 of the .BEK file) arrives as the environment variable BitLockerKey, as a managed
Run Command hands over a protected parameter. dislocker is not on this machine, so a stand-in plays it: called the
way the script calls dislocker (`-r -f <key file> -V <partition> -- <target>`), it records the key file's mode and
path and writes `<target>/dislocker-file`, the decrypted volume, with dissect.fve. Everything else is the real
script: the read-only loop devices, ntfs-3g ro, the offline hive, the upload to HTTPS Azurite with OAuth.

What an operator relies on: with the key the dumps are collected byte-identical from the encrypted copy and the
key file is gone afterwards (0600 while it existed) and in no output; without a key the locked volume is the
exit-11 refusal; with a key and no dislocker the script stops before touching the disk."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from scripts import remote
from tests.remote.test_remote_bash import result_of
from tests.support.rescue import azurite_https, container, imds, linux_script, run_bash, script_env, tls  # noqa: F401
from tests.windisk.conftest import bde_data, bitlocker_disk  # noqa: F401 - fixtures

pytestmark = [pytest.mark.slow, pytest.mark.root]
PREFIX = "web-01-5f2a9c3d/20260101T000000Z"

STAND_IN = f"""#!{sys.executable}
import os, sys
args = sys.argv[1:]
key, part, target = args[args.index("-f") + 1], args[args.index("-V") + 1], args[-1]
record = os.environ["RECORD"]
open(record + ".mode", "w").write(oct(os.stat(key).st_mode & 0o777))
open(record + ".key_path", "w").write(key)
open(record + ".args", "w").write(" ".join(a for a in args if a != key))
from dissect.fve.bde import bde
with open(part, "rb") as fh, open(key, "rb") as bek:
    fve = bde.BDE(fh)
    fve.unlock_with_bek(bek)
    stream = fve.open()
    with open(os.path.join(target, "dislocker-file"), "wb") as out:
        while True:
            chunk = stream.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)
"""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _env(tmp_path: Path, azurite_https, container, imds, tls, bitlocker_disk, *, dislocker: bool, **extra: str):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    if dislocker:
        (bindir / "dislocker").write_text(STAND_IN)
        (bindir / "dislocker").chmod(0o755)
    env = script_env(azurite_https, container, imds, tls, bitlocker_disk.path, PREFIX,
                     RECORD=str(tmp_path / "record"), **extra)
    env["PATH"] = f"{bindir}:{env['PATH']}"
    return env


def test_the_bitlocker_copy_is_unlocked_with_the_protected_key_and_the_dumps_are_byte_identical(
        linux_script, bitlocker_disk, container, azurite_https, imds, tls, tmp_path):
    key = base64.b64encode(bitlocker_disk.volume.bek).decode()
    env = _env(tmp_path, azurite_https, container, imds, tls, bitlocker_disk, dislocker=True, BitLockerKey=key)
    proc = run_bash(linux_script, env)
    result = result_of(proc)
    assert proc.returncode == 0, proc.stderr
    assert result["status"] == "collected", result
    assert result["volume"]["bitlocker_unlocked"] is True and result["volume"]["mounted_read_only"] is True
    originals = bitlocker_disk.windows.originals
    stored = container.download_blob(f"{PREFIX}/MEMORY.DMP").readall()
    assert _sha(stored) == _sha(originals["Windows/MEMORY.DMP"].read_bytes())
    # the key reached dislocker only as a 0600 file, which is gone with its folder; it is in no output
    record = tmp_path / "record"
    assert Path(f"{record}.mode").read_text() == "0o600"
    key_path = Path(Path(f"{record}.key_path").read_text())
    assert not key_path.exists() and not key_path.parent.exists()
    assert "-r" in Path(f"{record}.args").read_text().split()  # read-only
    for text in (proc.stdout, proc.stderr, json.dumps(result)):
        assert key not in text
    for blob in container.list_blobs():
        assert key.encode() not in container.download_blob(blob.name).readall()


def test_without_a_key_the_locked_copy_is_exit_11(linux_script, bitlocker_disk, container, azurite_https, imds, tls,
                                                   tmp_path):
    env = _env(tmp_path, azurite_https, container, imds, tls, bitlocker_disk, dislocker=True)
    proc = run_bash(linux_script, env)
    result = result_of(proc)
    assert proc.returncode == 11 and result["status"] == "disk_not_found", result
    assert not Path(f"{tmp_path / 'record'}.mode").exists()  # dislocker never ran


def test_a_key_without_dislocker_stops_before_touching_the_disk(linux_script, bitlocker_disk, container,
                                                                azurite_https, imds, tls, tmp_path):
    key = base64.b64encode(bitlocker_disk.volume.bek).decode()
    env = _env(tmp_path, azurite_https, container, imds, tls, bitlocker_disk, dislocker=False, BitLockerKey=key)
    proc = run_bash(linux_script, env)
    result = result_of(proc)
    assert proc.returncode == 11 and "dislocker" in result["message"], result
    assert "looking for the broken Windows volume" not in proc.stderr + proc.stdout
    assert key not in proc.stdout + proc.stderr


@pytest.mark.parametrize("os_name", ["linux", "windows"])
def test_both_scripts_unlock_only_from_the_parameter_and_hold_no_key(os_name):
    script = remote.render(os_name)
    if os_name == "linux":
        assert "{% include" not in script and "need_unlock_tools" in script and "unlock_bitlocker \"${loops[@]}\"" in script
    else:
        assert "[string]$BitLockerKey = ''" in script and "Unlock-DiskCopy $disk" in script
