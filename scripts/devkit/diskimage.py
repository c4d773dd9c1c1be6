"""Builds the disk image of a broken Windows VM's OS disk: a partition table and real NTFS volumes.

What the rescue script sees on Azure is a raw disk (the disk copy attached at a LUN). The image this
module writes has the same shape as a Generation 2 Windows Server OS disk — GPT with an EFI system
partition, a Microsoft reserved partition, the Windows volume (NTFS) and a recovery volume (NTFS,
without Windows) — or, for Generation 1, an MBR with a "System Reserved" NTFS volume first.

NTFS volumes are made with mkntfs and filled through an ntfs-3g mount of the volume file (root and
FUSE are needed, as for the rescue script itself), then copied into the image at their partition
offsets. A partition's `files` are copied in; its `populate(mount)` hook, when given, then writes
whatever needs more control over how files land on NTFS (gptdisk.py: fragmented and sparse dumps).
The partition table is written here (zlib.crc32 for GPT's checksums), since fdisk/sfdisk are not part
of the test machine's tools.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
MiB = 1 << 20

EFI_SYSTEM = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
MS_RESERVED = uuid.UUID("E3C9E316-0B5C-4DB8-817D-F92DF00215AE")
BASIC_DATA = uuid.UUID("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7")
RECOVERY = uuid.UUID("DE94BBA4-06D1-4D40-A16A-BFD50179D6AC")

Content = bytes | Path  # a file's bytes, or a local file to copy


@dataclass
class Partition:
    size_mib: int
    type_guid: uuid.UUID = BASIC_DATA
    mbr_type: int = 0x07
    name: str = "Basic data partition"
    ntfs_label: str | None = None  # None: not formatted (zeros)
    files: Mapping[str, Content] = field(default_factory=dict)  # "Windows/System32/config/SYSTEM" -> bytes
    populate: Callable[[Path], None] | None = None  # called with the mounted volume, after `files`
    cluster_size: int | None = None  # mkntfs -c; None: mkntfs's default
    compression: bool = False  # mount with ntfs-3g -o compression (files in compressed folders compress)


def can_build() -> str | None:
    """Why this machine cannot build images, or None when it can."""
    if os.geteuid() != 0:
        return "building NTFS test disks mounts them with ntfs-3g: needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse: ntfs-3g cannot mount"
    for tool in ("mkntfs", "ntfs-3g"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package ntfs-3g)"
    return None


def windows_gpt_layout(windows_files: Mapping[str, Content], windows_mib: int = 40) -> list[Partition]:
    """Generation 2 layout: ESP, MSR, Windows (C:), Recovery."""
    return [
        Partition(4, EFI_SYSTEM, 0xEF, "EFI system partition"),
        Partition(2, MS_RESERVED, 0x00, "Microsoft reserved partition"),
        Partition(windows_mib, BASIC_DATA, 0x07, "Basic data partition", "Windows", windows_files),
        Partition(8, RECOVERY, 0x27, "Recovery", "Recovery", {"Recovery/WindowsRE/ReAgent.xml": b"<WindowsRE/>"}),
    ]


def windows_mbr_layout(windows_files: Mapping[str, Content], windows_mib: int = 40) -> list[Partition]:
    """Generation 1 layout: System Reserved (boot files, no Windows), then Windows (C:)."""
    return [
        Partition(8, name="System Reserved", ntfs_label="System Reserved", files={"bootmgr": b"BOOTMGR"}),
        Partition(windows_mib, name="Windows", ntfs_label="Windows", files=windows_files),
    ]


def partition_starts(partitions: list[Partition]) -> list[int]:
    """The first LBA of each partition as `build_disk` places them: in order, from 1 MiB, 1 MiB aligned."""
    starts = []
    lba = MiB // SECTOR
    for part in partitions:
        starts.append(lba)
        lba += part.size_mib * MiB // SECTOR
    return starts


def build_disk(path: Path, partitions: list[Partition], scheme: str = "gpt") -> Path:
    """Writes a disk image (sparse) holding the partitions, 1 MiB aligned, and returns its path."""
    starts = partition_starts(partitions)
    end = MiB // SECTOR + sum(part.size_mib for part in partitions) * MiB // SECTOR
    total = end + MiB // SECTOR  # room for the backup GPT
    with open(path, "wb") as disk:
        disk.truncate(total * SECTOR)
        if scheme == "gpt":
            _write_gpt(disk, partitions, starts, total)
        else:
            _write_mbr(disk, partitions, starts)
        for part, start in zip(partitions, starts):
            if part.ntfs_label is not None:
                with _ntfs_volume(part, start) as volume:
                    _copy_into(volume, disk, start * SECTOR)
    return path


def _write_mbr(disk, partitions: list[Partition], starts: list[int]) -> None:
    if len(partitions) > 4:
        raise ValueError("MBR holds four primary partitions")
    mbr = bytearray(SECTOR)
    struct.pack_into("<I", mbr, 440, 0x5EC7C0DE)  # disk signature
    for i, (part, start) in enumerate(zip(partitions, starts)):
        sectors = part.size_mib * MiB // SECTOR
        struct.pack_into("<B3sB3sII", mbr, 446 + 16 * i, 0x80 if i == 0 else 0, b"\xfe\xff\xff", part.mbr_type,
                         b"\xfe\xff\xff", start, sectors)
    mbr[510:512] = b"\x55\xaa"
    disk.seek(0)
    disk.write(mbr)


def _write_gpt(disk, partitions: list[Partition], starts: list[int], total: int) -> None:
    entries = bytearray(128 * 128)
    for i, (part, start) in enumerate(zip(partitions, starts)):
        last = start + part.size_mib * MiB // SECTOR - 1
        name = part.name.encode("utf-16-le")[:72]
        struct.pack_into("<16s16sQQQ72s", entries, 128 * i, part.type_guid.bytes_le,
                         uuid.uuid5(uuid.NAMESPACE_OID, f"crashcart-part-{i}").bytes_le, start, last, 0, name)
    entries_crc = zlib.crc32(entries)
    disk_guid = uuid.uuid5(uuid.NAMESPACE_OID, "crashcart-test-disk").bytes_le
    last_lba = total - 1

    def header(my_lba: int, alternate: int, entries_lba: int) -> bytes:
        fields = [b"EFI PART", 0x00010000, 92, 0, 0, my_lba, alternate, 34, last_lba - 33, disk_guid,
                  entries_lba, 128, 128, entries_crc]
        raw = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", *fields))
        struct.pack_into("<I", raw, 16, zlib.crc32(raw))
        return bytes(raw).ljust(SECTOR, b"\0")

    protective = bytearray(SECTOR)
    struct.pack_into("<B3sB3sII", protective, 446, 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1,
                     min(total - 1, 0xFFFFFFFF))
    protective[510:512] = b"\x55\xaa"
    disk.seek(0)
    disk.write(protective + header(1, last_lba, 2) + entries)
    disk.seek((last_lba - 32) * SECTOR)
    disk.write(entries + header(last_lba, 1, last_lba - 32))


# how each volume being populated is mounted: `unmounted` mounts it again the same way
_mount_commands: dict[Path, list[str]] = {}


@contextlib.contextmanager
def _ntfs_volume(part: Partition, start_lba: int) -> Iterator[Path]:
    """An NTFS volume file holding the partition's files (made in a temporary folder)."""
    work = Path(tempfile.mkdtemp(prefix="crashcart-ntfs-"))
    volume = work / "volume.ntfs"
    mount = work / "mnt"
    mount.mkdir()
    try:
        with open(volume, "wb") as f:
            f.truncate(part.size_mib * MiB)
        cluster = ["-c", str(part.cluster_size)] if part.cluster_size else []
        subprocess.run(["mkntfs", "-F", "-Q", "-q", *cluster, "-L", part.ntfs_label or "", "-p", str(start_lba),
                        "-H", "255", "-S", "63", str(volume)], check=True, capture_output=True)
        command = ["ntfs-3g", *(["-o", "compression"] if part.compression else []), str(volume), str(mount)]
        subprocess.run(command, check=True, capture_output=True)
        _mount_commands[mount] = command
        try:
            for name, content in part.files.items():
                target = mount / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, Path):
                    shutil.copyfile(content, target)
                else:
                    target.write_bytes(content)
            if part.populate is not None:
                part.populate(mount)
        finally:
            del _mount_commands[mount]
            _unmount(mount)
        yield volume
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def unmounted(mount: Path) -> Iterator[Path]:
    """For a `populate` hook: the volume mounted at `mount` unmounted (everything written so far is on it),
    as its volume file to read raw, then mounted again as before."""
    command = _mount_commands[mount]
    _unmount(mount)
    try:
        yield Path(command[-2])
    finally:
        subprocess.run(command, check=True, capture_output=True)


def _unmount(mount: Path) -> None:
    for _ in range(50):
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"could not unmount {mount}")


def _copy_into(volume: Path, disk, offset: int) -> None:
    chunk = 4 * MiB
    zero = bytes(chunk)
    with open(volume, "rb") as src:
        pos = offset
        while True:
            data = src.read(chunk)
            if not data:
                break
            if data != zero[:len(data)]:  # keep the image sparse
                disk.seek(pos)
                disk.write(data)
            pos += len(data)
