"""Reading a Windows OS disk without mounting it: partition table -> NTFS -> SYSTEM hive -> dump files.

The snapshot-export strategy (scripts.snapshot_export) never attaches the broken disk to a VM: it reads the
snapshot's export URL with HTTP range requests. This module is the part that understands what it reads,
over any seekable binary file object (a `scripts.rangeio` reader over the URL, or a local image):

1. the partition table: MBR (Generation 1: "System Reserved" then Windows) or GPT (Generation 2: EFI
   system, Microsoft reserved, Windows, Recovery), parsed by dissect.volume. An exported disk is a fixed
   VHD: the raw disk followed by a 512-byte footer (cookie "conectix"), which is recognised and left out;
2. the Windows volume: the NTFS partition (dissect.ntfs) holding Windows\\System32\\config\\SYSTEM. A
   partition whose boot sector carries the BitLocker signature "-FVE-FS-" is encrypted: it cannot be read
   without its key, and the error says how to unlock it;
3. the SYSTEM hive (dissect.regf): Select\\Current names the current control set; its
   Control\\CrashControl gives DumpFile, MinidumpDir, CrashDumpEnabled, DedicatedDumpFile, and Session
   Manager\\Memory Management gives PagingFiles (the same fields the rescue VM's script reports);
4. the dumps: the configured DumpFile, every *.dmp in MinidumpDir, and a dump still sitting at the start
   of pagefile.sys or the DedicatedDumpFile (Windows writes the crash there first and only turns it into
   MEMORY.DMP on the next successful boot, which a VM stuck on a blue screen never has);
5. for each dump, where its bytes are on the disk: its NTFS data runs turned into `Extent`s of disk byte
   offsets, with sparse runs and everything past the valid data length marked as zeros. That map is what
   the server-side copy consumes; the dump's bytes themselves are never read here (only its header).

Nothing here writes anything, talks to Azure or imports the storage SDK. Read costs are whatever the
given file object fetches; with a rangeio reader that is a few MiB for a disk of any size.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from scripts.base.errors import CrashcartError, ExitCode

log = logging.getLogger("crashcart.extract")

SECTOR = 512
VHD_COOKIE = b"conectix"
VHD_FIXED = 2
BITLOCKER_SIGNATURE = b"-FVE-FS-"
NTFS_SIGNATURE = b"NTFS    "
SYSTEM_HIVE = "Windows/System32/config/SYSTEM"
DEFAULT_DUMP_FILE = r"%SystemRoot%\MEMORY.DMP"
DEFAULT_MINIDUMP_DIR = r"%SystemRoot%\Minidump"
PAGEFILE = r"%SystemDrive%\pagefile.sys"

# NTFS attribute flags (ATTRIBUTE_RECORD_HEADER.Flags)
_ATTR_COMPRESSED = 0x00FF
_ATTR_ENCRYPTED = 0x4000
_ATTR_SPARSE = 0x8000

BITLOCKER_HINT = (
    "the Windows volume is BitLocker-encrypted, so its files cannot be read from the snapshot. Ways to unlock it: "
    "(1) Azure Disk Encryption: use the rescue-vm strategy with a Windows rescue VM and unlock the disk copy there "
    "with the BitLocker key (BEK) from the VM's Key Vault secret (`az vm repair create --unlock-encrypted-vm` does "
    "this); (2) BitLocker without ADE: unlock the disk copy on a Windows rescue VM with its 48-digit recovery password "
    "from Microsoft Entra ID / Active Directory or your escrow (`manage-bde -unlock F: -RecoveryPassword <key>`), "
    "then collect with repair.strategy = \"rescue-vm\"; (3) decrypt the volume from a working boot "
    "(`manage-bde -off C:`) before the next crash. crashcart never asks for the key itself")

DENIED_HINT = "collect with repair.strategy = \"rescue-vm\", which reads the disk copy on the rescue VM"


class ExtractError(CrashcartError):
    """The disk could be read but not understood (no Windows volume, encrypted, corrupt)."""

    exit_code = ExitCode.DISK_NOT_FOUND


# ---- what the disk holds --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Extent:
    """`length` bytes of a file from `file_offset`, stored on the disk at `disk_offset` (None: zeros,
    i.e. a sparse run or bytes past the valid data length, which Windows reads as zeros)."""

    file_offset: int
    length: int
    disk_offset: int | None

    @property
    def zero(self) -> bool:
        return self.disk_offset is None


@dataclass
class FileMap:
    """Where the bytes of one file (or of its first `size` bytes) are on the disk."""

    path: str  # on the volume, '/'-separated, as found (e.g. "Windows/MEMORY.DMP")
    size: int  # bytes this map covers: the file size, or less for a dump inside pagefile.sys
    file_size: int
    valid_data_length: int
    extents: list[Extent] = field(default_factory=list)
    resident: bytes | None = None  # data kept inside the MFT record (files under ~700 bytes)
    sparse: bool = False  # the NTFS sparse flag

    @property
    def fragments(self) -> int:
        return sum(1 for e in self.extents if not e.zero)

    @property
    def zero_bytes(self) -> int:
        return sum(e.length for e in self.extents if e.zero)

    def truncated(self, size: int) -> "FileMap":
        """The first `size` bytes only (a dump at the start of a bigger file)."""
        size = min(size, self.size)
        extents = []
        for e in self.extents:
            if e.file_offset >= size:
                break
            length = min(e.length, size - e.file_offset)
            extents.append(Extent(e.file_offset, length, e.disk_offset))
        resident = self.resident[:size] if self.resident is not None else None
        return FileMap(self.path, size, self.file_size, self.valid_data_length, extents, resident, self.sparse)

    def read(self, disk: Any, offset: int, length: int) -> bytes:
        """Bytes `offset`..`offset+length` of the file, read from the disk through the extents (the same
        mapping the server-side copy uses, so reading the header through it also checks the mapping)."""
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        if self.resident is not None:
            return self.resident[offset:end]
        out = bytearray()
        for e in self.extents:
            lo, hi = max(offset, e.file_offset), min(end, e.file_offset + e.length)
            if lo >= hi:
                continue
            if e.zero:
                out += bytes(hi - lo)
            else:
                out += _read_at(disk, e.disk_offset + (lo - e.file_offset), hi - lo)  # type: ignore[operator]
        return bytes(out)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "file_size": self.file_size,
                "valid_data_length": self.valid_data_length, "fragments": self.fragments,
                "zero_bytes": self.zero_bytes, "sparse": self.sparse, "resident": self.resident is not None}


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


@dataclass
class FoundDump:
    kind: str  # memory | minidump | pagefile | dedicated
    windows_path: str  # as Windows names it, e.g. %SystemRoot%\MEMORY.DMP
    blob_suffix: str  # under the run prefix: MEMORY.DMP, Minidump/<name>.dmp, PAGEFILE.DMP, DEDICATED.DMP
    file: FileMap
    header: Any  # scripts.dumpfile.DumpHeader

    def header_dict(self) -> dict[str, Any]:
        """The header as the rescue VM's script records it in a manifest (same keys)."""
        h = self.header
        return {"signature": "PAGEDU64" if h.bits == 64 else "PAGEDUMP", "dump_type": h.dump_type,
                "bugcheck_code": f"{h.bugcheck_code:#x}",
                "bugcheck_parameters": [f"{p:#x}" for p in h.bugcheck_parameters],
                "required_dump_space": h.required_dump_space, "kind": h.kind}


@dataclass
class DiskFindings:
    disk_size: int
    vhd_footer: bool
    scheme: str
    partitions: list[dict[str, Any]]
    volume: Volume
    crash_control: dict[str, Any]
    dumps: list[FoundDump]
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # dumps found but not exportable (compressed, EFS)
    looked_at: list[str] = field(default_factory=list)


# ---- 1. the disk and its partitions ----------------------------------------------------------------------
def _read_at(fh: Any, offset: int, length: int) -> bytes:
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
        footer = _read_at(fh, size - SECTOR, SECTOR)
        if footer[:8] == VHD_COOKIE:
            disk_type = struct.unpack_from(">I", footer, 60)[0]
            if disk_type != VHD_FIXED:
                raise ExtractError(f"the exported disk is a VHD of type {disk_type}, not a fixed VHD",
                                   "export the snapshot again (Azure exports fixed VHDs); a dynamic VHD is not "
                                   "supported", ExitCode.DISK_NOT_FOUND)
            return size - SECTOR, True
    if _read_at(fh, 0, 8) == VHD_COOKIE:
        raise ExtractError("the exported disk is a dynamic VHD", "export a fixed VHD (what Azure exports)")
    return size, False


def _partitions(fh: Any, size: int) -> tuple[str, list[tuple[int, int, int, str, str]]]:
    """(scheme, [(number, offset, size, type, name)]) from dissect.volume; no table: the whole disk."""
    from dissect.volume.disk import Disk

    fh.seek(0)
    try:
        disk = Disk(fh)
    except Exception as err:  # dissect raises DiskError (and struct errors on garbage)
        boot = _read_at(fh, 0, SECTOR)
        if boot[3:11] in (NTFS_SIGNATURE, BITLOCKER_SIGNATURE):
            return "none", [(0, 0, size, "whole disk", "")]
        raise ExtractError(
            f"the disk has no partition table crashcart can read (MBR or GPT): {str(err).splitlines()[0]}",
            "check that the snapshot is of the broken VM's OS disk (source.os_disk_id)") from None
    scheme = type(disk.scheme).__name__.lower()
    parts = []
    for p in disk.partitions:
        if p.size <= 0 or p.type in (0x00, 0xEE, 0x05, 0x0F):  # empty, GPT protective, extended containers
            continue
        parts.append((int(p.number), int(p.offset), int(p.size), str(p.type_name or p.type_str), str(p.name or "")))
    return scheme, parts


def find_windows_volume(fh: Any, size: int | None = None) -> tuple[Volume, str, list[dict[str, Any]], list[str]]:
    """The NTFS volume that holds Windows\\System32\\config\\SYSTEM, with the partition list and notes.
    Raises ExtractError (exit 11) when there is none, naming BitLocker when that is why."""
    from dissect.ntfs import NTFS
    from dissect.util.stream import RangeStream

    size = size if size is not None else disk_size(fh)[0]
    scheme, parts = _partitions(fh, size)
    seen: list[dict[str, Any]] = []
    notes: list[str] = []
    encrypted: list[str] = []
    for number, offset, length, type_name, name in parts:
        boot = _read_at(fh, offset, SECTOR)
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
            ntfs = NTFS(RangeStream(fh, offset, length))
            ntfs.mft.get(SYSTEM_HIVE)
        except FileNotFoundError:
            entry["windows"] = False
            continue
        except NotADirectoryError:
            entry["windows"] = False
            continue
        except Exception as err:  # a damaged volume: say so, keep looking
            notes.append(f"partition {number} is NTFS but could not be read: {str(err).splitlines()[0]}")
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


# ---- 3. the SYSTEM hive -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CrashSettings:
    control_set: str
    dump_file: str
    minidump_dir: str
    dedicated_dump_file: str
    crash_dump_enabled: int | None
    paging_files: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The same shape as the rescue VM's script reports (`crash_control`)."""
        return {"control_set": self.control_set, "DumpFile": self.dump_file,
                "CrashDumpEnabled": self.crash_dump_enabled, "MinidumpDir": self.minidump_dir,
                "DedicatedDumpFile": self.dedicated_dump_file, "PagingFiles": ";".join(self.paging_files)}


def read_crash_control(volume: Volume) -> tuple[CrashSettings, list[str]]:
    """CrashControl of the current control set (Select\\Current), read from the offline SYSTEM hive."""
    from dissect.regf import RegistryHive

    for name in ("dissect.regf", "dissect.ntfs", "dissect.volume"):  # their warnings are ours to phrase
        logging.getLogger(name).setLevel(logging.ERROR)
    notes: list[str] = []
    try:
        hive = RegistryHive(volume.ntfs.mft.get(SYSTEM_HIVE).open())
    except Exception as err:
        raise ExtractError(f"the SYSTEM hive on the Windows volume cannot be read: {str(err).splitlines()[0]}",
                           "the hive may be damaged; try repair.strategy = \"rescue-vm\"",
                           ExitCode.COLLECT_FAILED) from None
    if hive.header.Sequence1 != hive.header.Sequence2:
        notes.append("the SYSTEM hive was being written when the VM stopped (its transaction logs were not "
                     "replayed): CrashControl is read as last flushed")

    def value(path: str, name: str) -> Any:
        try:
            return hive.open(path).value(name).value
        except Exception:  # RegistryKeyNotFoundError / RegistryValueNotFoundError
            return None

    current = value("Select", "Current")
    if not isinstance(current, int) or current <= 0:
        notes.append("SYSTEM hive has no Select\\Current; assuming ControlSet001")
        current = 1
    control_set = f"ControlSet{current:03d}"
    base = f"{control_set}\\Control\\CrashControl"
    enabled = value(base, "CrashDumpEnabled")
    paging = value(f"{control_set}\\Control\\Session Manager\\Memory Management", "PagingFiles")
    if isinstance(paging, str):
        paging = [paging]
    settings = CrashSettings(
        control_set=control_set,
        dump_file=_text(value(base, "DumpFile")),
        minidump_dir=_text(value(base, "MinidumpDir")),
        dedicated_dump_file=_text(value(base, "DedicatedDumpFile")),
        crash_dump_enabled=enabled if isinstance(enabled, int) else None,
        paging_files=[p for p in (paging or []) if isinstance(p, str) and p],
    )
    if settings.crash_dump_enabled == 0:
        notes.append("CrashDumpEnabled is 0 on the broken VM: Windows was set to write no dump")
    notes += _paging_notes(settings.paging_files)
    return settings, notes


def _text(value: Any) -> str:
    return value.strip("\0").strip() if isinstance(value, str) else ""


def _paging_notes(entries: list[str]) -> list[str]:
    notes = []
    for entry in entries:
        drive = entry[:2].upper()
        if len(drive) == 2 and drive[1] == ":" and drive[0].isalpha() and drive != "C:":
            notes.append(f"the page file is configured on {drive} ({entry.split(' ')[0]}), not on the OS disk: on "
                         "Azure that is usually the temporary disk, which does not survive a stop/redeploy and is "
                         "not part of the snapshot, so any crash data written to it is gone")
        elif drive == "?:":
            notes.append(f"the page file is system-managed on any drive ({entry.split(' ')[0]}): if Windows placed "
                         "it on the temporary disk, crash data written there is gone")
    return notes


def volume_path(windows_path: str) -> str | None:
    """A Windows path of the broken VM as a '/'-separated path on its OS volume, or None when it is on
    another drive (mirrors `win_to_rel` in scripts/remote/collect.sh.j2)."""
    p = windows_path.replace("/", "\\").strip()
    if p.startswith("\\??\\"):
        p = p[4:]
    low = p.lower()
    for prefix, replacement in (("%systemroot%", "Windows"), ("%windir%", "Windows"), ("%systemdrive%", ""),
                                ("\\systemroot", "Windows"), ("c:", "")):
        if low.startswith(prefix):
            rest = replacement + p[len(prefix):]
            break
    else:
        return None
    parts = [part for part in rest.split("\\") if part and part != "."]
    if any(part == ".." for part in parts):
        return None
    return "/".join(parts)


# ---- 5. a file's extents ----------------------------------------------------------------------------------
class NotExportable(Exception):
    """The file exists but its bytes on disk are not its content (compressed or EFS-encrypted)."""


def map_file(volume: Volume, path: str) -> FileMap | None:
    """The file's default data stream as extents of disk byte offsets; None when there is no such file.
    Raises NotExportable for NTFS-compressed or EFS-encrypted files."""
    from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE

    try:
        record = volume.ntfs.mft.get(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if record.is_dir():
        return None
    attrs = record.attributes.find("", ATTRIBUTE_TYPE_CODE.DATA)
    if not attrs:
        return None
    if attrs[0].header.resident:
        data = attrs[0].data()
        return FileMap(path, len(data), len(data), len(data), [], resident=data)
    stream = sorted((a for a in attrs if not a.header.resident), key=lambda a: a.header.lowest_vcn)
    first = stream[0].header
    flags = int(first.flags)
    if flags & _ATTR_COMPRESSED:
        raise NotExportable(f"{path} is NTFS-compressed")
    if flags & _ATTR_ENCRYPTED:
        raise NotExportable(f"{path} is EFS-encrypted")
    file_size = int(first.size)
    vdl = min(int(first.header.Form.Nonresident.ValidDataLength), file_size)
    cluster = volume.cluster_size
    extents: list[Extent] = []
    at = 0
    for attr in stream:
        for lcn, count in attr.header.dataruns():
            if at >= file_size:
                break
            length = min(count * cluster, file_size - at)
            disk = None if lcn is None else volume.offset + lcn * cluster
            _add(extents, at, length, disk, vdl)
            at += length
    if at < file_size:  # runs end early: the rest reads as zeros
        _add(extents, at, file_size - at, None, vdl)
    return FileMap(path, file_size, file_size, vdl, extents, sparse=bool(flags & _ATTR_SPARSE))


def _add(extents: list[Extent], at: int, length: int, disk: int | None, vdl: int) -> None:
    """Appends an extent, cut at the valid data length (zeros past it), merging with its neighbour
    when the two are contiguous on disk (or both zeros)."""
    pieces = []
    if disk is not None and at < vdl < at + length:
        pieces = [(at, vdl - at, disk), (vdl, at + length - vdl, None)]
    elif disk is not None and at >= vdl:
        pieces = [(at, length, None)]
    else:
        pieces = [(at, length, disk)]
    for offset, size, where in pieces:
        if extents:
            last = extents[-1]
            contiguous = (last.disk_offset is None and where is None) or (
                last.disk_offset is not None and where is not None and last.disk_offset + last.length == where)
            if contiguous and last.file_offset + last.length == offset:
                extents[-1] = Extent(last.file_offset, last.length + size, last.disk_offset)
                continue
        extents.append(Extent(offset, size, where))


def _list_dir(volume: Volume, path: str) -> list[str]:
    try:
        record = volume.ntfs.mft.get(path)
        if not record.is_dir():
            return []
        return sorted(record.listdir(ignore_dos=True))
    except (FileNotFoundError, NotADirectoryError):
        return []


# ---- 4. the dumps -----------------------------------------------------------------------------------------
def find_dumps(disk: Any, volume: Volume, settings: CrashSettings) -> tuple[list[FoundDump], list[str], list[str], list[str]]:
    """(dumps, notes, skipped, looked_at): every kernel dump on the volume that crashcart collects."""
    from scripts.dumpfile.errors import BadDump
    from scripts.dumpfile.header import PROBE_SIZE, DumpHeader

    dumps: list[FoundDump] = []
    notes: list[str] = []
    skipped: list[str] = []
    dump_file = settings.dump_file or DEFAULT_DUMP_FILE
    minidump_dir = settings.minidump_dir or DEFAULT_MINIDUMP_DIR
    looked_at = [dump_file, minidump_dir, PAGEFILE] + ([settings.dedicated_dump_file] if settings.dedicated_dump_file else [])

    def header_of(fmap: FileMap) -> Any | None:
        probe = fmap.read(disk, 0, min(PROBE_SIZE, fmap.size))
        try:
            return DumpHeader.parse(probe)
        except BadDump:
            return None

    def mapped(windows_path: str, rel: str) -> FileMap | None:
        try:
            return map_file(volume, rel)
        except NotExportable as err:
            skipped.append(f"{windows_path}: {err}")
            notes.append(f"{windows_path} was found but {str(err).split(' is ', 1)[-1]}: its bytes on disk are not "
                         f"the file's, so it cannot be copied server-side; collect it with repair.strategy = "
                         f"\"rescue-vm\"")
            return None

    # the configured dump
    rel = volume_path(dump_file)
    if rel is None:
        notes.append(f"DumpFile is {dump_file}, which is not on the OS disk: it cannot be collected from the snapshot")
    else:
        fmap = mapped(dump_file, rel)
        if fmap is None:
            if not any(s.startswith(dump_file) for s in skipped):
                notes.append(f"no dump at {dump_file}")
        else:
            header = header_of(fmap)
            if header is None:
                start = fmap.read(disk, 0, 8)
                notes.append(f"{dump_file} exists but is not a kernel dump (starts with "
                             f"{start.decode('ascii', 'replace')!r}): skipped")
            else:
                dumps.append(FoundDump("memory", dump_file, "MEMORY.DMP", fmap, header))
                _check_size(header, fmap, dump_file, notes)

    # the minidumps
    rel = volume_path(minidump_dir)
    if rel is None:
        notes.append(f"MinidumpDir is {minidump_dir}, not on the OS disk")
    else:
        for name in _list_dir(volume, rel):
            if not name.lower().endswith(".dmp"):
                continue
            windows_path = f"{minidump_dir}\\{name}"
            fmap = mapped(windows_path, f"{rel}/{name}")
            if fmap is None:
                continue
            header = header_of(fmap)
            if header is None:
                notes.append(f"{windows_path} is not a kernel dump: skipped")
                continue
            dumps.append(FoundDump("minidump", windows_path, f"Minidump/{name}", fmap, header))

    # a dump Windows never turned into a dump file
    containers = [("pagefile", PAGEFILE, "PAGEFILE.DMP")]
    if settings.dedicated_dump_file:
        containers.append(("dedicated", settings.dedicated_dump_file, "DEDICATED.DMP"))
    for kind, windows_path, suffix in containers:
        rel = volume_path(windows_path)
        if rel is None:
            continue
        fmap = mapped(windows_path, rel)
        if fmap is None:
            continue
        header = header_of(fmap)
        if header is None:
            log.debug("%s holds no crash dump", windows_path)
            continue
        required = int(header.required_dump_space or 0)
        if not 8192 <= required <= fmap.size:
            notes.append(f"{windows_path} starts with a dump header but its RequiredDumpSpace ({required}) does not "
                         f"fit the file ({fmap.size} bytes): not collected")
            continue
        notes.append(f"{windows_path} holds a crash dump Windows never turned into a dump file (the VM did not boot "
                     f"again after the crash): collected as {suffix}")
        dumps.append(FoundDump(kind, windows_path, suffix, fmap.truncated(required), header))
    return dumps, notes, skipped, looked_at


def _check_size(header: Any, fmap: FileMap, windows_path: str, notes: list[str]) -> None:
    from scripts.dumpfile.errors import BadDump

    try:
        header.check_size(fmap.size)
    except BadDump as err:
        notes.append(f"{windows_path}: {err.message}")


def inspect_disk(fh: BinaryIO | Any) -> DiskFindings:
    """Everything the export needs to know about a disk: its Windows volume, CrashControl and the dumps
    with their extents. Raises ExtractError for a disk without a readable Windows volume."""
    size, footer = disk_size(fh)
    volume, scheme, partitions, notes = find_windows_volume(fh, size)
    settings, hive_notes = read_crash_control(volume)
    dumps, dump_notes, skipped, looked_at = find_dumps(fh, volume, settings)
    return DiskFindings(disk_size=size, vhd_footer=footer, scheme=scheme, partitions=partitions, volume=volume,
                        crash_control=settings.to_dict(), dumps=dumps, notes=notes + hive_notes + dump_notes,
                        skipped=skipped, looked_at=looked_at)
