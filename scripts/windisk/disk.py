"""The disk and its volumes: an exported VHD, its partition table, and the NTFS volume that holds Windows.

An exported managed disk or snapshot is a fixed VHD: the raw disk followed by a 512-byte footer (cookie
"conectix"), which is recognised and left out. The partition table is MBR (Generation 1: "System
Reserved" then Windows) or GPT (Generation 2: EFI system, Microsoft reserved, Windows, Recovery), parsed
by dissect.volume. The Windows volume is the NTFS partition (dissect.ntfs) holding
Windows\\System32\\config\\SYSTEM; a partition whose boot sector carries the BitLocker signature
"-FVE-FS-" is encrypted, cannot be read without its key, and the error says how to unlock it.

Everything here reads through any seekable binary file object (a `scripts.base.rangeio` reader over the
export URL, or a local image) and only reads the few sectors it needs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from scripts.base.errors import ExitCode, first_line
from scripts.windisk.errors import ExtractError, damaged
from scripts.windisk.ntfspath import find, open_volume

SECTOR = 512
VHD_COOKIE = b"conectix"
VHD_FIXED = 2
BITLOCKER_SIGNATURE = b"-FVE-FS-"
NTFS_SIGNATURE = b"NTFS    "
SYSTEM_HIVE = "Windows/System32/config/SYSTEM"
GPT_HEADER_SIZE = 92
GPT_ENTRY_SIZE = 128  # UEFI: 128 * 2^n bytes; Windows writes 128
GPT_MAX_ENTRY_SIZE = 4096
GPT_MAX_ENTRIES = 16384  # Windows writes 128; the UEFI minimum array is 16 KiB

BITLOCKER_HINT = (
    "the Windows volume is BitLocker-encrypted, so its files cannot be read from the snapshot. Ways to unlock it: "
    "(1) Azure Disk Encryption: use the rescue-vm strategy with a Windows rescue VM and unlock the disk copy there "
    "with the BitLocker key (BEK) from the VM's Key Vault secret (`az vm repair create --unlock-encrypted-vm` does "
    "this); (2) BitLocker without ADE: unlock the disk copy on a Windows rescue VM with its 48-digit recovery password "
    "from Microsoft Entra ID / Active Directory or your escrow (`manage-bde -unlock F: -RecoveryPassword <key>`), "
    "then collect with repair.strategy = \"rescue-vm\"; (3) decrypt the volume from a working boot "
    "(`manage-bde -off C:`) before the next crash. crashcart never asks for the key itself")


@dataclass
class Volume:
    """The NTFS volume holding Windows."""

    number: int  # partition number (1-based), 0 when the disk has no partition table
    offset: int  # byte offset on the disk
    size: int
    scheme: str  # gpt | mbr | none
    type: str
    name: str
    cluster_size: int
    ntfs: Any  # dissect.ntfs.NTFS

    def to_dict(self) -> dict[str, Any]:
        return {"partition": self.number, "scheme": self.scheme, "type": self.type, "name": self.name,
                "partition_start_sector": self.offset // SECTOR, "offset": self.offset, "size": self.size,
                "cluster_size": self.cluster_size, "read": "snapshot export (HTTP range requests, read-only)"}


def read_at(fh: Any, offset: int, length: int) -> bytes:
    """`length` bytes at `offset`: one ranged read on a rangeio reader, seek and read on a file."""
    if hasattr(fh, "read_at"):
        return fh.read_at(offset, length)
    fh.seek(offset)
    return fh.read(length)


def _size_of(fh: Any) -> int:
    if hasattr(fh, "size") and isinstance(fh.size, int):
        return fh.size
    here = fh.tell()
    try:
        return fh.seek(0, 2)
    finally:
        fh.seek(here)


def disk_size(fh: Any) -> tuple[int, bool]:
    """(size of the raw disk, whether a fixed-VHD footer follows it). A dynamic or differencing VHD is
    refused: an exported managed disk or snapshot is always a fixed VHD."""
    size = _size_of(fh)
    if size >= SECTOR:
        footer = read_at(fh, size - SECTOR, SECTOR)
        if footer[:8] == VHD_COOKIE:
            disk_type = struct.unpack_from(">I", footer, 60)[0]
            if disk_type != VHD_FIXED:
                raise ExtractError(f"the exported disk is a VHD of type {disk_type}, not a fixed VHD",
                                   "export the snapshot again (Azure exports fixed VHDs); a dynamic VHD is not "
                                   "supported", ExitCode.DISK_NOT_FOUND)
            return size - SECTOR, True
    if read_at(fh, 0, 8) == VHD_COOKIE:
        raise ExtractError("the exported disk is a dynamic VHD", "export a fixed VHD (what Azure exports)")
    return size, False


def _partitions(fh: Any, size: int) -> tuple[str, list[tuple[int, int, int, str, str]], list[str]]:
    """(scheme, [(number, offset, size, type, name)], notes) from dissect.volume; no table: the whole disk.
    A partition that starts past the end of the disk is left out (and noted); one that runs past it is cut."""
    from dissect.volume.disk import Disk

    try:
        check_gpt(fh, size)
        fh.seek(0)  # dissect reads from where the file stands
        disk = Disk(fh)
    except damaged() as err:  # dissect raises DiskError (and struct errors on garbage); check_gpt ValueError
        boot = read_at(fh, 0, SECTOR)
        if boot[3:11] in (NTFS_SIGNATURE, BITLOCKER_SIGNATURE):
            return "none", [(0, 0, size, "whole disk", "")], []
        raise ExtractError(
            f"the disk has no partition table crashcart can read (MBR or GPT): {first_line(err)}",
            "check that the snapshot is of the broken VM's OS disk (source.os_disk_id)") from None
    scheme = type(disk.scheme).__name__.lower()
    parts, notes = [], []
    for p in disk.partitions:
        if p.size <= 0 or p.type in (0x00, 0xEE, 0x05, 0x0F):  # empty, GPT protective, extended containers
            continue
        number, offset, length = int(p.number), int(p.offset), int(p.size)
        if offset >= size:
            notes.append(f"partition {number} starts at byte {offset}, past the end of the {size}-byte disk: ignored")
            continue
        if offset + length > size:
            notes.append(f"partition {number} runs past the end of the disk: read up to the disk's end")
            length = size - offset
        parts.append((number, offset, length, str(p.type_name or p.type_str), _text(p.name)))
    return scheme, parts, notes


def check_gpt(fh: Any, size: int) -> None:
    """Raises ValueError for a GPT header no disk has. dissect.volume trusts its partition entry count and
    size: a count of 2^32 would loop for hours over a big disk, an entry size of 1 reads overlapping
    garbage as partitions. The header is the one the protective MBR partition (type 0xEE) points at."""
    mbr = read_at(fh, 0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return
    starts = [struct.unpack_from("<I", mbr, 446 + 16 * i + 8)[0] for i in range(4) if mbr[446 + 16 * i + 4] == 0xEE]
    if not starts:
        return
    header = read_at(fh, starts[0] * SECTOR, GPT_HEADER_SIZE)
    if header[:8] != b"EFI PART" or len(header) < GPT_HEADER_SIZE:
        return  # not a GPT header: dissect says so itself
    array_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    if entry_size < GPT_ENTRY_SIZE or entry_size % GPT_ENTRY_SIZE or entry_size > GPT_MAX_ENTRY_SIZE:
        raise ValueError(f"the GPT header is corrupt: its partition entry size is {entry_size} (expected a multiple "
                         f"of {GPT_ENTRY_SIZE} bytes, at most {GPT_MAX_ENTRY_SIZE})")
    if count > GPT_MAX_ENTRIES:
        raise ValueError(f"the GPT header is corrupt: it lists {count} partition entries (at most "
                         f"{GPT_MAX_ENTRIES} are plausible)")
    if array_lba * SECTOR + count * entry_size > size:
        raise ValueError(f"the GPT header is corrupt: its partition entry array (LBA {array_lba}, {count} entries) "
                         f"ends past the end of the {size}-byte disk")


def _text(value: Any) -> str:
    """A partition name as a report may show it: printable, one line."""
    return "".join(ch for ch in str(value or "") if ch.isprintable())


def find_windows_volume(fh: Any, size: int | None = None) -> tuple[Volume, str, list[dict[str, Any]], list[str]]:
    """The NTFS volume that holds Windows\\System32\\config\\SYSTEM, with the partition list and notes.
    Raises ExtractError (exit 11) when there is none, naming BitLocker when that is why."""
    from dissect.util.stream import RangeStream

    size = size if size is not None else disk_size(fh)[0]
    scheme, parts, notes = _partitions(fh, size)
    seen: list[dict[str, Any]] = []
    encrypted: list[str] = []
    for number, offset, length, type_name, name in parts:
        boot = read_at(fh, offset, SECTOR)
        entry: dict[str, Any] = {"partition": number, "offset": offset, "size": length, "type": type_name,
                                 "name": name, "filesystem": None}
        seen.append(entry)
        if boot[3:11] == BITLOCKER_SIGNATURE:
            entry["filesystem"] = "BitLocker"
            encrypted.append(f"partition {number} ({name or type_name}, {length >> 20} MiB)")
            continue
        if boot[3:11] != NTFS_SIGNATURE:
            continue
        entry["filesystem"] = "NTFS"
        try:
            ntfs = open_volume(RangeStream(fh, offset, length))
            find(ntfs, SYSTEM_HIVE)
        except (FileNotFoundError, NotADirectoryError):
            entry["windows"] = False
            continue
        except damaged() as err:  # a damaged volume: say so, keep looking
            notes.append(f"partition {number} is NTFS but could not be read: {first_line(err)}")
            continue
        entry["windows"] = True
        volume = Volume(number, offset, length, scheme, type_name, name, int(ntfs.cluster_size), ntfs)
        return volume, scheme, seen, notes
    listing = ", ".join(f"{p['partition']}: {p['name'] or p['type']} {p['size'] >> 20} MiB {p['filesystem'] or 'not NTFS'}"
                        for p in seen) or "none"
    if encrypted:
        raise ExtractError(
            f"the Windows volume is encrypted with BitLocker ({'; '.join(encrypted)} starts with the "
            f"'-FVE-FS-' signature); partitions: {listing}", BITLOCKER_HINT)
    raise ExtractError(
        f"no NTFS volume holding Windows\\System32\\config\\SYSTEM was found on the disk ({scheme.upper()}; "
        f"partitions: {listing})" + (f"; {'; '.join(notes)}" if notes else ""),
        "check that the snapshot is of the broken VM's OS disk (source.os_disk_id); a volume damaged this much "
        "may still mount on a rescue VM: try repair.strategy = \"rescue-vm\"")
