"""The disk and its volumes: an exported VHD, its partition table, and the NTFS volume that holds Windows.

An exported managed disk or snapshot is a fixed VHD: the raw disk followed by a 512-byte footer (cookie
"conectix"), which is recognised and left out. The partition table is MBR (Generation 1: "System
Reserved" then Windows, logical partitions in an extended one: mbr.py) or GPT (Generation 2: EFI system,
Microsoft reserved, Windows, Recovery; the backup copy when the primary is damaged: gpt.py), or a dynamic
disk's LDM database (ldm.py). The Windows volume is the NTFS partition (dissect.ntfs) holding
Windows\\System32\\config\\SYSTEM; a partition whose boot sector carries the BitLocker signature
"-FVE-FS-" is encrypted: given its BitLocker key (the BEK Azure Disk Encryption keeps in Key Vault) it is
unlocked through dissect.fve (scripts.windisk.bitlocker) and read decrypted, its dump's bytes then passing
through the kit; without a key (and not suspended) it cannot be read, and the error says how to unlock it.

Everything here reads through any seekable binary file object (a `scripts.base.rangeio` reader over the
export URL, or a local image) and only reads the few sectors it needs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from scripts.base.errors import ExitCode, first_line
from scripts.windisk import bitlocker
from scripts.windisk.errors import ExtractError, damaged
from scripts.windisk.ntfspath import find, open_volume

SECTOR = 512
VHD_COOKIE = b"conectix"
VHD_FIXED = 2
BITLOCKER_SIGNATURE = b"-FVE-FS-"
NTFS_SIGNATURE = b"NTFS    "
SYSTEM_HIVE = "Windows/System32/config/SYSTEM"

BITLOCKER_HINT = (
    "the Windows volume is BitLocker-encrypted and no key for it was given, so its files cannot be read. Ways to "
    "unlock it: (1) Azure Disk Encryption: crashcart reads the BitLocker key (BEK) from the Key Vault the disk's "
    "encryption settings name, with Key Vault Secrets User (+ Key Vault Crypto User with a KEK) on that vault; "
    "(2) BitLocker without ADE: unlock the disk copy on a Windows rescue VM with its 48-digit recovery password "
    "from Microsoft Entra ID / Active Directory or your escrow (`manage-bde -unlock F: -RecoveryPassword <key>`), "
    "then collect with repair.strategy = \"rescue-vm\"; (3) decrypt the volume from a working boot "
    "(`manage-bde -off C:`) before the next crash")


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
    # BitLocker: how it was unlocked ("" for a plain NTFS volume), and the disk as the volume's files must be
    # read (a bitlocker.DecryptedDisk: disk offsets, the volume's bytes decrypted); None: read the disk itself
    encryption: str = ""
    reader: Any = None
    # a dynamic (LDM) volume of several runs of sectors (ldm.py): (disk offset, bytes) of each, in volume order.
    # `offset` and `size` are then its first run only, so that a reader that assumes one contiguous run reads
    # nothing past it; `disk_spans` maps volume offsets through all of them
    extents: tuple[tuple[int, int], ...] = ()

    @property
    def total_size(self) -> int:
        """The volume's bytes, all its runs together."""
        return sum(n for _, n in self.extents) or self.size

    def disk_spans(self, at: int, length: int) -> list[tuple[int, int]]:
        """(disk offset, bytes) of the volume's bytes `at`..`at+length`; ValueError when they are not all in it."""
        runs = self.extents or ((self.offset, self.size),)
        spans, start = [], 0
        for disk_offset, run in runs:
            lo, hi = max(at, start), min(at + length, start + run)
            if lo < hi:
                spans.append((disk_offset + lo - start, hi - lo))
            start += run
        if at < 0 or length < 0 or at + length > start:
            raise ValueError(f"bytes {at}+{length} are outside the {start}-byte volume")
        return spans

    def to_dict(self) -> dict[str, Any]:
        read = "snapshot export (HTTP range requests, read-only)"
        body = {"partition": self.number, "scheme": self.scheme, "type": self.type, "name": self.name,
                "partition_start_sector": self.offset // SECTOR, "offset": self.offset, "size": self.total_size,
                "cluster_size": self.cluster_size, "read": read}
        if self.extents:
            body["extents"] = [{"offset": offset, "size": n} for offset, n in self.extents]
        if self.encryption:
            body.update(encryption=f"BitLocker, unlocked with {self.encryption}",
                        read=f"{read}; {bitlocker.THROUGH_THE_KIT}")
        return body


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


def _partitions(fh: Any, size: int) -> tuple[str, list[tuple[int, int, int, str, str, Any]], list[str]]:
    """(scheme, [(number, offset, size, type, name, extents)], notes): GPT (gpt.py, from the backup copy when the
    primary is damaged), MBR (mbr.py, logical partitions of an extended one too), and after the table's
    partitions a dynamic disk's readable LDM volumes (ldm.py; `extents`: their runs on the disk, () for a
    partition, None for the dynamic disk's own partitions, which hold no filesystem); no table but a volume
    boot sector: the whole disk. A partition that starts past the end of the disk is left out (and noted); one
    that runs past it is cut."""
    from scripts.windisk import gpt, ldm, mbr

    def read(offset: int, length: int) -> bytes:
        return read_at(fh, offset, length)

    boot = read_at(fh, 0, SECTOR)
    if boot[3:11] in (NTFS_SIGNATURE, BITLOCKER_SIGNATURE):
        return "none", [(0, 0, size, "whole disk", "", ())], []
    try:
        table = mbr.parse(boot)
        if any(entry.type == mbr.GPT_PROTECTIVE for entry in table.entries):
            scheme, (found, notes, ldm_at) = "gpt", gpt.read_gpt(read, size)
        else:
            scheme, (found, notes, ldm_at) = "mbr", mbr.read_mbr(read, size)
        if ldm_at is not None:  # a dynamic disk: the table's partitions stay listed (LDM's not read), then its volumes
            volumes, notes = ldm.read_ldm(read, size, ldm_at, scheme, notes,
                                          first_number=max((e.number for e in found), default=0) + 1)
            found = [e if not ldm.is_container(e.type) else ldm.LdmEntry(*e, extents=None) for e in found] + volumes
    except damaged() as err:  # TableError (a ValueError), and what cstruct raises on a short read
        raise ExtractError(
            f"the disk has no partition table crashcart can read (MBR or GPT): {first_line(err)}",
            "check that the snapshot is of the broken VM's OS disk (source.os_disk_id)") from None
    parts = []
    for entry in found:
        number, offset, length, type_name, name = entry[:5]
        extents = getattr(entry, "extents", ())
        if extents or extents is None:  # an LDM volume (ldm.py checked its runs against the data area), or LDM's own
            parts.append((number, offset, length, type_name, _text(name), extents))
            continue
        if offset >= size:
            notes.append(f"partition {number} starts at byte {offset}, past the end of the {size}-byte disk: ignored")
            continue
        if offset + length > size:
            notes.append(f"partition {number} runs past the end of the disk: read up to the disk's end")
            length = size - offset
        parts.append((number, offset, length, type_name, _text(name), ()))
    return scheme, parts, notes


def _joined(fh: Any, extents: tuple[tuple[int, int], ...]) -> Any:
    """The bytes of an LDM volume made of several runs on the disk, as one stream (in volume order)."""
    from dissect.util.stream import MappingStream, RangeStream

    stream, at = MappingStream(), 0
    for offset, length in extents:
        stream.add(at, length, RangeStream(fh, offset, length))
        at += length
    return stream


def _text(value: Any) -> str:
    """A partition name as a report may show it: printable, one line."""
    return "".join(ch for ch in str(value or "") if ch.isprintable())


def find_windows_volume(fh: Any, size: int | None = None, *, bek: bytes | None = None
                        ) -> tuple[Volume, str, list[dict[str, Any]], list[str]]:
    """The NTFS volume that holds Windows\\System32\\config\\SYSTEM, with the partition list and notes.
    A BitLocker volume is unlocked with `bek` (the .BEK file's bytes; none needed when its protection is
    suspended) and read decrypted: the Volume's `reader` is then the disk to read its files from. Raises
    ExtractError (exit 11) when there is none, naming BitLocker when that is why."""
    from dissect.util.stream import RangeStream

    size = size if size is not None else disk_size(fh)[0]
    scheme, parts, notes = _partitions(fh, size)
    seen: list[dict[str, Any]] = []
    encrypted: list[str] = []
    refused: list[ExtractError] = []
    for number, offset, length, type_name, name, extents in parts:
        entry: dict[str, Any] = {"partition": number, "offset": offset, "size": length, "type": type_name,
                                 "name": name, "filesystem": None}
        seen.append(entry)
        if extents is None:  # a dynamic disk's database or data area: its volumes are listed on their own
            entry["filesystem"] = "LDM"
            continue
        boot = read_at(fh, offset, SECTOR)
        reader, how, stream = None, "", RangeStream(fh, offset, length)
        if len(extents) > 1:  # an LDM volume of several runs: its bytes are the runs joined
            stream = _joined(fh, extents)
            entry["extents"] = [{"offset": at, "size": n} for at, n in extents]
        if bitlocker.is_bitlocker(boot):
            entry["filesystem"] = "BitLocker"
            where = f"partition {number} ({name or type_name}, {length >> 20} MiB)"
            try:
                unlocked = bitlocker.unlock(stream, bek=bek, where=f"partition {number}")
            except ExtractError as err:  # another volume's key, damaged metadata: keep looking, say so at the end
                if bek is not None:  # without a key, the volume is simply one that cannot be read
                    refused.append(err)
                encrypted.append(where)
                continue
            if unlocked is None:
                encrypted.append(where)
                continue
            how, entry["unlocked"] = unlocked.how, unlocked.how
            runs = list(extents or ((offset, length),))
            reader = bitlocker.DecryptedDisk(lambda at, n: read_at(fh, at, n), size, runs, unlocked)
            stream = _joined(reader, extents) if len(extents) > 1 else RangeStream(reader, offset, length)
            boot = reader.read_at(offset, SECTOR)
        if boot[3:11] != NTFS_SIGNATURE:
            continue
        entry["filesystem"] = "NTFS" if not how else "NTFS in BitLocker"
        try:
            ntfs = open_volume(stream)
            find(ntfs, SYSTEM_HIVE)
        except (FileNotFoundError, NotADirectoryError):
            entry["windows"] = False
            continue
        except damaged() as err:  # a damaged volume: say so, keep looking
            notes.append(f"partition {number} is NTFS but could not be read: {first_line(err)}")
            continue
        entry["windows"] = True
        volume = Volume(number, offset, extents[0][1] if len(extents) > 1 else length, scheme, type_name, name,
                        int(ntfs.cluster_size), ntfs, how, reader, extents if len(extents) > 1 else ())
        if how:
            notes.append(f"partition {number} is BitLocker-encrypted, unlocked with {how}: {bitlocker.THROUGH_THE_KIT}")
        return volume, scheme, seen, notes
    listing = ", ".join(f"{p['partition']}: {p['name'] or p['type']} {p['size'] >> 20} MiB {p['filesystem'] or 'not NTFS'}"
                        for p in seen) or "none"
    if refused:
        raise ExtractError(f"{'; '.join(e.message for e in refused)}; partitions: {listing}", refused[0].hint)
    if encrypted:
        raise ExtractError(
            f"the Windows volume is encrypted with BitLocker ({'; '.join(encrypted)} starts with the "
            f"'-FVE-FS-' signature); partitions: {listing}", BITLOCKER_HINT)
    raise ExtractError(
        f"no NTFS volume holding Windows\\System32\\config\\SYSTEM was found on the disk ({scheme.upper()}; "
        f"partitions: {listing})" + (f"; {'; '.join(notes)}" if notes else ""),
        "check that the snapshot is of the broken VM's OS disk (source.os_disk_id); a volume damaged this much "
        "may still mount on a rescue VM: try repair.strategy = \"rescue-vm\"")
