"""The rescue VM's world for the collection tests: disk images of broken Windows VMs, HTTPS Azurite with
OAuth, the fake IMDS, and a helper that runs the rendered bash script the way the Linux Run Command
handler would. Test modules import the fixtures they use (`from tests.support.rescue import ...`).
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scripts.remote import render
from scripts.devkit import dumpbuilder
from scripts.devkit import hivebuilder
from scripts.devkit import diskimage as windisk
from scripts.devkit.hivebuilder import REG_DWORD, REG_EXPAND_SZ
from tests.support.storagefakes import FakeImds, Tls, env_for_script, make_tls, service_client, start_azurite_oauth

HOSTILE = "x'; $(touch {canary}) `touch {canary}` \"q\" ; echo pwned\n&& rm -rf / #"


def sha256_file(path: Path, length: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = length
        while True:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining == 0:
                    break
    return digest.hexdigest()


@dataclass
class WindowsDisk:
    """A disk image and what is on it (local copies of the dumps, to compare against)."""

    image: Path
    dumps: dict[str, Path] = field(default_factory=dict)  # blob suffix -> local file with the expected bytes
    pagefile_dump_size: int = 0
    bugchecks: dict[str, int] = field(default_factory=dict)


def build_broken_disk(folder: Path) -> WindowsDisk:
    """The OS disk of a VM in a 0x7E crash loop, Generation 2 (GPT):
    - CrashControl in ControlSet002 (Select\\Current = 2) points the dump to a non-default path,
      %SystemRoot%\\Crash Dumps\\LATEST.DMP; ControlSet001 holds decoy values;
    - an older MEMORY.DMP at the default path (not what CrashControl names: must not be taken);
    - three minidumps (one of them a 32-bit 'PAGEDUMP'), plus a .dmp that is not a dump and a text file
      (both skipped);
    - pagefile.sys starting with a dump Windows never converted (RequiredDumpSpace bytes of it)."""
    folder.mkdir(parents=True, exist_ok=True)
    latest = dumpbuilder.build_bitmap_dump(folder / "latest.dmp", seed=11)
    older = dumpbuilder.build_bitmap_dump(folder / "older.dmp", seed=12, bugcheck_code=0xD1)
    mini1 = dumpbuilder.build_triage_dump(folder / "mini1.dmp", seed=13)
    mini2 = dumpbuilder.build_triage_dump(folder / "mini2.dmp", seed=14, bugcheck_code=0x1000007E)
    mini32 = dumpbuilder.build_x86_dump(folder / "mini32.dmp", triage=True, seed=16, bugcheck_code=0x8E)
    in_pagefile = dumpbuilder.build_bitmap_dump(folder / "pagefile-dump.dmp", seed=15, bugcheck_code=0x1000007E)
    pagefile = folder / "pagefile.sys"
    rng = random.Random(5)
    pagefile.write_bytes(in_pagefile.path.read_bytes() + rng.randbytes(300 * 1024 + 123))
    hive = hivebuilder.system_hive(current=2, crash_control={
        "CrashDumpEnabled": (REG_DWORD, 7),
        "DumpFile": (REG_EXPAND_SZ, r"%SystemRoot%\Crash Dumps\LATEST.DMP"),
        "MinidumpDir": (REG_EXPAND_SZ, r"%SystemRoot%\Minidump"),
        "AutoReboot": (REG_DWORD, 1),
    }, paging_files=[r"C:\pagefile.sys 0 0"])
    files = {
        "Windows/System32/config/SYSTEM": hive,
        "Windows/Crash Dumps/LATEST.DMP": latest.path,
        "Windows/MEMORY.DMP": older.path,
        "Windows/Minidump/052424-11234-01.dmp": mini1.path,
        "Windows/Minidump/052524-9921-01.dmp": mini2.path,
        "Windows/Minidump/010203-4567-01.dmp": mini32.path,  # a 32-bit small dump (DUMP_HEADER32)
        "Windows/Minidump/broken.dmp": b"MDMP" + bytes(9000),
        "Windows/Minidump/readme.txt": b"not a dump",
        "pagefile.sys": pagefile,
    }
    image = windisk.build_disk(folder / "broken-os-disk.img", windisk.windows_gpt_layout(files, windows_mib=40))
    return WindowsDisk(
        image=image,
        dumps={"MEMORY.DMP": latest.path, "Minidump/052424-11234-01.dmp": mini1.path,
               "Minidump/052524-9921-01.dmp": mini2.path, "Minidump/010203-4567-01.dmp": mini32.path,
               "PAGEFILE.DMP": in_pagefile.path},
        pagefile_dump_size=in_pagefile.file_size,
        bugchecks={"MEMORY.DMP": 0x7E, "PAGEFILE.DMP": 0x1000007E},
    )


def build_dumpless_disk(folder: Path) -> WindowsDisk:
    """Windows with default CrashControl, the page file on the temporary disk (D:), and no dump anywhere."""
    folder.mkdir(parents=True, exist_ok=True)
    hive = hivebuilder.system_hive(current=1, paging_files=[r"D:\pagefile.sys 0 0"])
    files = {"Windows/System32/config/SYSTEM": hive, "Windows/System32/ntoskrnl.exe": b"MZ" + bytes(4000)}
    return WindowsDisk(image=windisk.build_disk(folder / "dumpless.img", windisk.windows_gpt_layout(files, 24)))


def build_non_windows_disk(folder: Path) -> WindowsDisk:
    """A Generation 1 (MBR) disk whose only NTFS volume is System Reserved: no Windows on it."""
    folder.mkdir(parents=True, exist_ok=True)
    layout = windisk.windows_mbr_layout({}, 16)[:1]
    return WindowsDisk(image=windisk.build_disk(folder / "no-windows.img", layout, "mbr"))


# ---- fixtures ---------------------------------------------------------------------------------------------
def _skip_unless_images() -> None:
    reason = windisk.can_build()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def azurite_https(tls):
    with start_azurite_oauth(tls) as instance:
        yield instance


@pytest.fixture(scope="module")
def imds():
    with FakeImds() as server:
        yield server


@pytest.fixture(scope="module")
def broken_disk(tmp_path_factory) -> WindowsDisk:
    _skip_unless_images()
    return build_broken_disk(tmp_path_factory.mktemp("broken"))


@pytest.fixture(scope="module")
def dumpless_disk(tmp_path_factory) -> WindowsDisk:
    _skip_unless_images()
    return build_dumpless_disk(tmp_path_factory.mktemp("dumpless"))


@pytest.fixture(scope="module")
def non_windows_disk(tmp_path_factory) -> WindowsDisk:
    _skip_unless_images()
    return build_non_windows_disk(tmp_path_factory.mktemp("nowin"))


@pytest.fixture
def container(azurite_https, tls):
    """A fresh container in the HTTPS Azurite; yields its ContainerClient (key-authenticated: the test's
    own view, not what the scripts use)."""
    name = f"dumps-{uuid.uuid4().hex[:10]}"
    client = service_client(azurite_https, tls).create_container(name)
    yield client


@pytest.fixture(scope="module")
def linux_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "collect.sh"
    path.write_text(render("linux"))
    return path


def run_bash(script: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs the script as the Linux Run Command handler does: bash, parameters as environment."""
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=timeout)


def script_env(azurite, container_client, imds, tls, image: Path, prefix: str, **extra: str) -> dict[str, str]:
    return env_for_script(blob_endpoint=azurite.blob_endpoint, container=container_client.container_name,
                          prefix=prefix, device=image, imds=imds.url, ca_bundle=tls.cert, **extra)


def loop_devices_of(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout.strip()


def mounted_fuse_under(prefix: str = "/tmp/crashcart.") -> list[str]:
    with open("/proc/mounts") as f:
        return [line for line in f if prefix in line]

