"""The guest of a simulated VM (scripts/devkit/arm_vmops.py): its agent, and what its OS disk's content does.

The guest agent. The instance view of a running VM carries `vmAgent`, a VirtualMachineAgentInstanceView of the
Compute REST spec (Microsoft.Compute ComputeRP, VirtualMachine_InstanceView example):
`{"vmAgentVersion": "2.7.41491.1102", "extensionHandlers": [], "statuses": [InstanceViewStatus]}`, where the
one status is `{"code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Ready", "message":
"GuestAgent is running and processing the extensions.", "time": ...}` once Windows has booted and the agent
runs, and `ProvisioningState/Unavailable` / "Not Ready" before (as `az vm get-instance-view` shows a VM
whose agent has not reported: "VM status blob is found but not yet populated."). A deallocated VM has no
`vmAgent` at all.

The OS disk's content. `ImageDisk` stands for a managed disk whose bytes are a local raw image (the same
file a test's LocalScript hands the rescue VM's script as its Device). The simulated guest reads it as
Windows would at boot:
- the current control set (Select\\Current) of the SYSTEM hive decides whether a culprit driver loads:
  a service named in `culprits` whose Start is below 4 (disabled) bugchecks the machine (0x7E);
- a bugcheck writes the dump CrashControl asks for, onto that disk: CrashDumpEnabled 0 none, 3 a small
  dump in MinidumpDir (`<MMDDYY>-<n>-01.dmp`), anything else (1, 2, 7, absent) a kernel dump at DumpFile
  (%SystemRoot%\\MEMORY.DMP by default, replaced as Windows does with Overwrite=1). The dump is a real
  kernel dump (scripts.devkit.dumpbuilder) written through an ntfs-3g mount of the Windows volume, so a
  collection afterwards finds it where Windows would have put it. `written` records each (path, size,
  SHA-256, bugcheck code), for the tests to compare with what was collected.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AGENT_VERSION = "2.7.41491.1102"
SYSTEM_HIVE = "Windows/System32/config/SYSTEM"
STOP_CODE = 0x7E  # the stop code of BLUESCREEN_XML (arm_vmops): serial log and dump say the same


BLUESCREEN_XML = (
    '<?xml version="1.0"?>\r\n<BP>\r\n<INSTANCE CLASSNAME="BLUESCREEN">\r\n'
    '<PROPERTY NAME="STOPCODE" TYPE="string"><VALUE>"0x7E"</VALUE></PROPERTY>'
    '<PROPERTY NAME="BUGCHECKP1" TYPE="string"><VALUE>"0xFFFFFFFFC0000005"</VALUE></PROPERTY>'
    '<PROPERTY NAME="BUGCHECKP2" TYPE="string"><VALUE>"0xFFFFF8041FB41A2B"</VALUE></PROPERTY>'
    '<PROPERTY NAME="BUGCHECKP3" TYPE="string"><VALUE>"0xFFFFB00A1C2D3E40"</VALUE></PROPERTY>'
    '<PROPERTY NAME="BUGCHECKP4" TYPE="string"><VALUE>"0xFFFFB00A1C2D3680"</VALUE></PROPERTY>\r\n'
    '<machine-info>\r\n<name>WEB-01</name>\r\n<os-product>Windows Server 2019 Datacenter</os-product>\r\n'
    '</machine-info>\r\n</INSTANCE>\r\n</BP>\r\n!SAC>\r\n')

BOOT_TEXT = ("Computer is booting, SAC started and initialized.\r\n\r\n"
             "Use the \"ch -?\" command for information about using channels.\r\n"
             "Use the \"?\" command for general help.\r\n\r\n\r\nSAC>\r\n")


def bmp(width: int = 32, height: int = 16, rgb: tuple[int, int, int] = (0xA4, 0x4F, 0x00)) -> bytes:
    """A small 24-bit BMP (a blue screen's blue), as boot diagnostics store screenshots."""
    row = bytes(rgb[::-1]) * width
    row += b"\0" * ((4 - len(row) % 4) % 4)
    pixels = row * height
    header = b"BM" + (54 + len(pixels)).to_bytes(4, "little") + b"\0\0\0\0" + (54).to_bytes(4, "little")
    info = (40).to_bytes(4, "little") + width.to_bytes(4, "little", signed=True) + height.to_bytes(4, "little", signed=True)
    info += (1).to_bytes(2, "little") + (24).to_bytes(2, "little") + bytes(24)
    return header + info + pixels


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f0+00:00")


def agent_view(ready: bool, version: str = AGENT_VERSION) -> dict[str, Any]:
    """The VirtualMachineAgentInstanceView of a running VM whose agent is Ready, or not yet."""
    if ready:
        status = {"code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Ready",
                  "message": "GuestAgent is running and processing the extensions.", "time": _now()}
    else:
        status = {"code": "ProvisioningState/Unavailable", "level": "Warning", "displayStatus": "Not Ready",
                  "message": "VM status blob is found but not yet populated.", "time": _now()}
    return {"vmAgentVersion": version, "statuses": [status], "extensionHandlers": []}


def windows_path(value: str, default: str) -> str:
    """A CrashControl path (`%SystemRoot%\\MEMORY.DMP`, `C:\\Dumps\\x.dmp`) as a path on the Windows volume."""
    text = (value or default).replace("/", "\\")
    text = re.sub(r"(?i)^%systemroot%", "Windows", text)
    text = re.sub(r"^[A-Za-z]:\\", "", text)
    return text.strip("\\").replace("\\", "/")


@dataclass
class ImageDisk:
    """A managed disk's content as a local raw image (MBR or GPT, Windows on NTFS)."""

    image: Path
    culprits: tuple[str, ...] = ("CSAgent",)  # services whose driver bugchecks the machine when it loads
    written: list[dict[str, Any]] = field(default_factory=list)  # the dumps crashes wrote onto the disk

    def _volume(self, fh: Any) -> Any:
        from scripts.windisk.disk import find_windows_volume

        return find_windows_volume(fh)[0]

    def boot_problem(self) -> str | None:
        """Why Windows bugchecks when it boots from this disk, or None when it boots (a disk whose Windows
        cannot be read does not boot either: that is the reason then)."""
        try:
            return self._culprit_loads()
        except Exception as err:  # noqa: BLE001 - the guest's view: an unreadable system does not boot
            return f"Windows cannot be read from the disk ({type(err).__name__}: {err})"

    def _culprit_loads(self) -> str | None:
        from dissect.regf import RegistryHive

        from scripts.windisk.ntfspath import find

        with open(self.image, "rb") as fh:
            hive = RegistryHive(find(self._volume(fh).ntfs, SYSTEM_HIVE).open())
            current = hive.open("Select").value("Current").value
            control_set = f"ControlSet{int(current):03d}"
            wanted = {c.lower() for c in self.culprits}
            for service in hive.open(control_set + "\\Services").subkeys():
                if service.name.lower() not in wanted:
                    continue
                try:
                    start = int(service.value("Start").value)
                except Exception:  # noqa: BLE001 - no Start value: the service does not load
                    continue
                if start < 4:
                    return f"{service.name} loads (Start {start} in {control_set})"
        return None

    def write_dump(self, *, seed: int) -> dict[str, Any]:
        """What a bugcheck leaves on this disk, per its CrashControl: the dump written, or why none was."""
        try:
            return self._write_dump(seed)
        except (OSError, subprocess.CalledProcessError) as err:  # as a real crash that could not write its dump
            record: dict[str, Any] = {"path": None, "why": f"the dump could not be written: {err}"}
            self.written.append(record)
            return record

    def _write_dump(self, seed: int) -> dict[str, Any]:
        from scripts.devkit.dumpbuilder import build_bitmap_dump, build_triage_dump
        from scripts.windisk.hive import read_crash_control

        with open(self.image, "rb") as fh:
            volume = self._volume(fh)
            settings, _ = read_crash_control(volume)
            offset, size = volume.offset, volume.size
        enabled = settings.crash_dump_enabled
        if enabled == 0:
            record = {"path": None, "why": "CrashDumpEnabled is 0: Windows writes no dump"}
            self.written.append(record)
            return record
        when = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        with tempfile.TemporaryDirectory(prefix="crashcart-guest-") as work:
            local = Path(work) / "crash.dmp"
            if enabled == 3:
                folder = windows_path(settings.minidump_dir, r"%SystemRoot%\Minidump")
                path = f"{folder}/{when:%m%d%y}-{len(self.written) + 1}-01.dmp"
                build_triage_dump(local, seed=seed, bugcheck_code=STOP_CODE, system_time=when)
            else:
                path = windows_path(settings.dump_file, r"%SystemRoot%\MEMORY.DMP")
                build_bitmap_dump(local, seed=seed, bugcheck_code=STOP_CODE, system_time=when)
            data = local.read_bytes()
            _write_file(self.image, offset, size, path, local)
        record = {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                  "bugcheck_code": STOP_CODE, "crash_dump_enabled": enabled}
        self.written.append(record)
        return record


def _write_file(image: Path, offset: int, size: int, path: str, source: Path) -> None:
    """Copies `source` to `path` on the NTFS volume at `offset` of `image` (loop device + ntfs-3g: root)."""
    loop = subprocess.run(["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size),
                           str(image)], capture_output=True, text=True, check=True).stdout.strip()
    mount = Path(tempfile.mkdtemp(prefix="crashcart-guest-mnt-"))
    try:
        subprocess.run(["ntfs-3g", loop, str(mount)], check=True, capture_output=True)
        try:
            target = mount / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
        finally:
            for _ in range(50):
                if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        mount.rmdir()
