"""The Linux rescue scripts download nothing at run time (issue 12: a locked-down subnet has no route to a
package mirror, and the scripts used to apt-get ntfs-3g and hivex).

An Ubuntu 24.04 marketplace image has neither ntfs-3g nor hivex, but has python3 and a kernel with the ntfs3
driver. The scripts run for real here, each in a private mount namespace where the tools an Ubuntu image
lacks are gone (an empty, non-executable file is bind-mounted over each: `command -v` no longer finds it) and
apt-get only records that it was called. This machine's kernel has no ntfs3 module, so `mount` is a shim
that stands for the kernel driver: it accepts only `-t ntfs3 -o ...ro...` and mounts through a copy of the
real ntfs-3g taken aside, read-only; or, for a kernel without the driver, refuses as mount does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from scripts.nodump import prepare
from scripts.remote import RESULT_MARKER, render
from tests.remote.test_remote_prepare import build_gen1, crash_control_hive, leftovers, sha256
from tests.support.rescue import (  # noqa: F401 - fixtures
    azurite_https, broken_disk, container, imds, linux_script, loop_devices_of, mounted_fuse_under, script_env,
    sha256_file, tls,
)

pytestmark = [pytest.mark.slow, pytest.mark.root]

PREFIX = "web-01/20250601T000000Z"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # what the scripts search first
NOT_ON_UBUNTU = ("ntfs-3g", "hivexget", "hivexsh", "hivexml", "hivexregedit")

KERNEL_NTFS3 = """#!/bin/bash
printf 'mount %s\\n' "$*" >> {log}
[[ $1 == -t && $2 == ntfs3 && $3 == -o && $# == 6 ]] || {{ echo "mount: unexpected arguments: $*" >&2; exit 1; }}
[[ ,$4, == *,ro,* ]] || {{ echo "mount: the evidence volume must be mounted read-only" >&2; exit 1; }}
exec {ntfs3g} -o ro "$5" "$6"
"""
NO_KERNEL_NTFS3 = """#!/bin/bash
printf 'mount %s\\n' "$*" >> {log}
echo "mount: $6: unknown filesystem type 'ntfs3'." >&2
exit 32
"""
APT_GET = """#!/bin/bash
printf 'apt-get %s\\n' "$*" >> {log}
echo "E: no route to the package mirror (a subnet without egress)" >&2
exit 100
"""


def _can_unshare() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return None if proc.returncode == 0 else f"no private mount namespace here: {proc.stderr.decode()[:200]}"


@pytest.fixture
def ubuntu(tmp_path):
    """run(script, env, mount=KERNEL_NTFS3 | NO_KERNEL_NTFS3, hide=...) -> (process, result, calls): the script
    as on a stock Ubuntu image, and every mount / apt-get call it made."""
    reason = _can_unshare()
    if reason:
        pytest.skip(reason)
    log = tmp_path / "calls.log"
    log.touch()
    real = tmp_path / "real-ntfs-3g"
    shutil.copy2(shutil.which("ntfs-3g", path=SYSTEM_PATH), real)
    empty = tmp_path / "not-installed"
    empty.write_bytes(b"")
    empty.chmod(0o644)

    def shim(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text.format(log=log, ntfs3g=real))
        path.chmod(0o755)
        return path

    def run(script: Path, env: dict[str, str], mount: str = KERNEL_NTFS3, hide: tuple[str, ...] = NOT_ON_UBUNTU):
        binds = [(empty, shutil.which(t, path=SYSTEM_PATH)) for t in hide if shutil.which(t, path=SYSTEM_PATH)]
        binds.append((shim("apt-get", APT_GET), shutil.which("apt-get", path=SYSTEM_PATH) or "/usr/bin/apt-get"))
        binds.append((shim("mount", mount), shutil.which("mount", path=SYSTEM_PATH)))  # last: `mount` binds the rest
        setup = " && ".join(f"mount --bind '{src}' '{dst}'" for src, dst in binds)
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                               f'{setup} && exec bash "$0"', str(script)],
                              env=env, capture_output=True, text=True, timeout=180)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER + " ")]
        assert len(lines) == 1, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        return proc, json.loads(lines[0][len(RESULT_MARKER) + 1:]), log.read_text().splitlines()

    return run


def test_collect_on_a_stock_ubuntu_image_uses_the_kernel_ntfs3_and_reads_the_hive_itself(
        ubuntu, linux_script, broken_disk, container, azurite_https, imds, tls):
    image_before = sha256_file(broken_disk.image)
    proc, result, calls = ubuntu(linux_script, script_env(azurite_https, container, imds, tls, broken_disk.image,
                                                           PREFIX, BlockSize="65536", Parallel="3"))
    assert proc.returncode == 0 and result["status"] == "collected", proc.stderr
    assert [c for c in calls if c.startswith("apt-get")] == []  # nothing downloaded or installed
    mounts = [c for c in calls if c.startswith("mount ")]
    assert mounts and all(c.startswith("mount -t ntfs3 -o ro,") for c in mounts)
    assert result["volume"]["ntfs_driver"] == "ntfs3" and result["volume"]["mounted_read_only"] is True
    # the registry was read without hivex: the current control set (Select\Current = 2), not the decoy
    assert result["crash_control"]["control_set"] == "ControlSet002"
    assert result["crash_control"]["DumpFile"] == r"%SystemRoot%\Crash Dumps\LATEST.DMP"
    assert result["crash_control"]["CrashDumpEnabled"] == 7
    assert result["crash_control"]["PagingFiles"] == r"C:\pagefile.sys 0 0"
    names = {b.name for b in container.list_blobs()}
    assert {f"{PREFIX}/{suffix}" for suffix in broken_disk.dumps} <= names  # the dump CrashControl names, too
    memory = container.download_blob(f"{PREFIX}/MEMORY.DMP").readall()
    assert memory == broken_disk.dumps["MEMORY.DMP"].read_bytes()
    assert sha256_file(broken_disk.image) == image_before
    assert loop_devices_of(broken_disk.image) == ""


def test_collect_without_any_ntfs_driver_says_so_and_installs_nothing(
        ubuntu, linux_script, broken_disk, container, azurite_https, imds, tls):
    proc, result, calls = ubuntu(linux_script, script_env(azurite_https, container, imds, tls, broken_disk.image,
                                                           PREFIX), mount=NO_KERNEL_NTFS3)
    assert (proc.returncode, result["status"]) == (11, "disk_not_found"), proc.stderr
    message = result["message"]
    assert "no ntfs-3g" in message and "ntfs3" in message and "unknown filesystem type" in message
    assert "installs nothing" in message and 'rescue.os = "windows"' in message
    assert [c for c in calls if c.startswith("apt-get")] == []
    assert list(container.list_blobs()) == []
    assert loop_devices_of(broken_disk.image) == ""


@pytest.fixture(scope="module")
def prepare_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prepare") / "prepare.sh"
    path.write_text(prepare.render_script("linux"))
    return path


@pytest.mark.parametrize("hide", [NOT_ON_UBUNTU, ("hivexsh",)])
def test_prepare_dump_without_hivex_refuses_up_front_naming_the_ways_out(ubuntu, prepare_script, tmp_path, hide):
    image = build_gen1(tmp_path / "disk", crash_control_hive([r"C:\pagefile.sys 0 0"]))
    before = sha256(image)
    env = {"PATH": os.environ.get("PATH", SYSTEM_PATH), "HOME": "/root", "Device": str(image),
           "RunId": "20250601T000000Z", "MemoryMB": "16384"}
    proc, result, calls = ubuntu(prepare_script, env, hide=hide)
    assert (proc.returncode, result["status"]) == (12, "refused"), proc.stderr
    message = result["message"]
    assert "hivexsh" in message and "downloads nothing at run time" in message and "Nothing was written" in message
    assert 'rescue.os = \\"windows\\"' not in message and 'rescue.os = "windows"' in message
    assert "rescue.image" in message
    assert [c for c in calls if c.startswith(("apt-get", "mount "))] == []  # refused before touching the disk
    assert sha256(image) == before and leftovers(image) == ""


def test_no_rendered_linux_script_installs_packages():
    for script in (render("linux"), prepare.render_script("linux")):
        for word in ("apt-get", "apt install", "dpkg -i", "snap install", "pip install"):
            assert word not in script, word
