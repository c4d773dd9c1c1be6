"""DUMP_HEADER64 ('PAGEDU64') and DUMP_HEADER32 ('PAGEDUMP'): the first page(s) of every kernel dump.

The header answers the first questions without touching memory: what kind of dump this is, which stop
code and parameters the machine died with, on how many processors, when, and how big the file must be.
It is also what decides whether the rest of the file can be trusted, so `DumpHeader.parse` checks what
it can and raises `BadDump` with the reason (not a dump, a user-mode minidump, a header Windows never
finished writing, a truncated header, an impossible run list...).

Layouts (offsets verified against mindumpdef.h and kdmp-parser's static_asserts):

    DUMP_HEADER64 (0x2000 bytes)              DUMP_HEADER32 (0x1000 bytes, 4-byte packing)
    0x000 'PAGE'  0x004 'DU64'                0x000 'PAGE'  0x004 'DUMP'
    0x008 MajorVersion  0x00C MinorVersion    0x008 MajorVersion  0x00C MinorVersion (build)
    0x010 DirectoryTableBase                  0x010 DirectoryTableBase
    0x018 PfnDataBase                         0x014 PfnDataBase
    0x020 PsLoadedModuleList                  0x018 PsLoadedModuleList
    0x028 PsActiveProcessHead                 0x01C PsActiveProcessHead
    0x030 MachineImageType                    0x020 MachineImageType
    0x034 NumberProcessors                    0x024 NumberProcessors
    0x038 BugCheckCode                        0x028 BugCheckCode
    0x040 BugCheckParameter1..4 (8 bytes)     0x02C BugCheckParameter1..4 (4 bytes)
    0x080 KdDebuggerDataBlock                 0x05C PaeEnabled  0x060 KdDebuggerDataBlock
    0x088 PhysicalMemoryBlock (700 bytes)     0x064 PhysicalMemoryBlock (700 bytes)
    0x348 ContextRecord (3000 bytes)          0x320 ContextRecord (1200 bytes)
    0xF00 Exception (EXCEPTION_RECORD64)      0x7D0 Exception (EXCEPTION_RECORD32)
    0xF98 DumpType                            0x820 Comment  0x8A0 Attributes
    0xFA0 RequiredDumpSpace                   0xF88 DumpType
    0xFA8 SystemTime (FILETIME, UTC)          0xFA0 RequiredDumpSpace
    0xFB0 Comment (128)                       0xFB8 SystemUpTime  0xFC0 SystemTime
    0x1030 SystemUpTime  0x1040 ProductType
    0x1050 Attributes (DUMP_FILE_ATTRIBUTES)

Windows fills the header buffer with the string 'PAGE' before setting fields, so a field that still
reads 'PAGE' was never written: a DumpType of 'PAGE' means the dump stopped before it began.
"""

from __future__ import annotations

import datetime as _dt
import enum
import struct
from dataclasses import dataclass
from typing import Any

from scripts.dumpfile.errors import BadDump
from scripts.dumpfile.physical import PAGE_SIZE, BitmapHeader, PhysicalRun
from scripts.dumpfile.smalldump import TriageHeader

PAGE_PATTERN = 0x45474150  # b"PAGE" read as a little-endian ULONG
ATTRIBUTE_ENCRYPTED = 1 << 8  # DUMP_FILE_ATTRIBUTES.EncryptedDumpData
ATTRIBUTE_DECRYPTED = 1 << 9  # DUMP_FILE_ATTRIBUTES.DecryptedDump
HEADER_SIZE_64 = 0x2000
HEADER_SIZE_32 = 0x1000
# How many bytes `read_header` reads: the 64-bit header plus what follows it that decides the layout
# (the bitmap header, or TRIAGE_DUMP64).
PROBE_SIZE = HEADER_SIZE_64 + 0x80

_FILETIME_EPOCH = _dt.datetime(1601, 1, 1, tzinfo=_dt.timezone.utc)
MACHINES = {0x8664: "x64", 0xAA64: "arm64", 0x014C: "x86", 0x01C4: "arm"}
_MACHINES_64 = {0x8664, 0xAA64}
_MACHINES_32 = {0x014C, 0x01C4}


class DumpType(enum.IntEnum):
    """DUMP_TYPES from mindumpdef.h, plus the debugger-written 'RDMP' types (8-10)."""

    FULL = 1  # complete memory dump, run list
    SUMMARY = 2  # kernel summary dump (pre-Windows 8 layout)
    HEADER = 3  # header only
    TRIAGE = 4  # small memory dump, \Windows\Minidump
    BITMAP_FULL = 5  # bitmap dump: kernel/automatic ('SDMP') or complete ('FDMP')
    BITMAP_KERNEL = 6  # bitmap kernel dump (live kernel dumps)
    AUTOMATIC = 7
    KERNEL_MEMORY = 8  # .dump /k
    KERNEL_AND_USER_MEMORY = 9  # .dump /ka
    COMPLETE_MEMORY = 10  # .dump /f


BITMAP_TYPES = (DumpType.BITMAP_FULL, DumpType.BITMAP_KERNEL, DumpType.AUTOMATIC)


@dataclass(frozen=True)
class DumpHeader:
    """A parsed, sanity-checked dump header. Encryption is reported (`encrypted`), not refused, so that
    a collector can still verify an encrypted upload; `open_dump` is what refuses to read one."""

    bits: int  # 64 or 32
    major_version: int
    minor_version: int  # the Windows build number
    directory_table_base: int
    pfn_database: int
    ps_loaded_module_list: int
    ps_active_process_head: int
    machine_type: int
    processors: int
    bugcheck_code: int
    bugcheck_parameters: tuple[int, int, int, int]
    kd_debugger_data_block: int
    dump_type: int
    required_dump_space: int
    system_time: _dt.datetime | None
    system_up_time: _dt.timedelta | None
    attributes: int
    comment: str
    physical_runs: tuple[PhysicalRun, ...] | None  # full dumps only
    physical_pages: int | None
    bitmap: BitmapHeader | None = None  # bitmap dumps, when the probe covered 0x2000..0x2038
    triage: TriageHeader | None = None  # small dumps, when the probe covered TRIAGE_DUMP64
    pae_enabled: bool | None = None  # 32-bit only

    # -- parsing ----------------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes) -> "DumpHeader":
        """Parses the start of a dump. `data` must hold the whole header (0x2000 bytes for 64-bit,
        0x1000 for 32-bit); with PROBE_SIZE bytes the bitmap or small-dump header is parsed too."""
        data = bytes(data)
        if len(data) < 8:
            raise BadDump(f"not a kernel dump: the file is only {len(data)} bytes long")
        signature, valid = data[0:4], data[4:8]
        if not data[:HEADER_SIZE_32].strip(b"\0"):
            raise BadDump(
                "not a kernel dump: the file starts with zeros (the space was reserved for a dump that was "
                "never written)",
                "the crash did not produce a dump: check CrashControl (`prepare-dump`) and capture a new one",
            )
        if signature == b"MDMP":
            raise BadDump(
                "this is a user-mode minidump (MDMP) of a process, not a kernel crash dump",
                "use the MEMORY.DMP from the Windows folder, or a file from \\Windows\\Minidump",
            )
        if signature != b"PAGE":
            raise BadDump(f"not a Windows kernel dump: the file starts with {data[:8]!r}, expected 'PAGEDU64' or 'PAGEDUMP'")
        if valid == b"PAGE":
            raise BadDump(
                "the dump header was never completed (it still holds the 'PAGE' fill pattern): Windows "
                "did not finish writing this dump",
                "the dump was interrupted (reset during the write, or a page file too small): capture a new one",
            )
        if valid == b"DU64":
            return cls._parse64(data)
        if valid == b"DUMP":
            return cls._parse32(data)
        raise BadDump(f"not a Windows kernel dump: unknown header flavour {data[:8]!r} (expected 'DU64' or 'DUMP')")

    @classmethod
    def _parse64(cls, data: bytes) -> "DumpHeader":
        if len(data) < HEADER_SIZE_64:
            raise BadDump(f"truncated: {len(data)} bytes, shorter than the {HEADER_SIZE_64}-byte 64-bit dump header")
        major, minor, dtb, pfn_db, modules, processes = struct.unpack_from("<IIQQQQ", data, 0x08)
        machine, processors, code = struct.unpack_from("<III", data, 0x30)
        params = struct.unpack_from("<4Q", data, 0x40)
        (kd_block,) = struct.unpack_from("<Q", data, 0x80)
        (dump_type,) = struct.unpack_from("<I", data, 0xF98)
        required, system_time, *_ = struct.unpack_from("<qq", data, 0xFA0)
        comment = data[0xFB0:0x1030]
        (up_time,) = struct.unpack_from("<q", data, 0x1030)
        (attributes,) = struct.unpack_from("<I", data, 0x1050)
        cls._check_common(machine, _MACHINES_64, 64, processors, dump_type)
        runs, pages = (None, None)
        if dump_type == DumpType.FULL:
            runs, pages = cls._runs(data, 0x88, 64)
        bitmap = triage = None
        if dump_type in BITMAP_TYPES and len(data) >= HEADER_SIZE_64 + BitmapHeader.SIZE:
            bitmap = BitmapHeader.parse(data[HEADER_SIZE_64:HEADER_SIZE_64 + BitmapHeader.SIZE])
        if dump_type == DumpType.TRIAGE and len(data) >= HEADER_SIZE_64 + TriageHeader.SIZE:
            triage = TriageHeader.parse(data[HEADER_SIZE_64:HEADER_SIZE_64 + TriageHeader.SIZE])
        return cls(
            bits=64, major_version=major, minor_version=minor, directory_table_base=dtb, pfn_database=pfn_db,
            ps_loaded_module_list=modules, ps_active_process_head=processes, machine_type=machine,
            processors=processors, bugcheck_code=code, bugcheck_parameters=params, kd_debugger_data_block=kd_block,
            dump_type=dump_type, required_dump_space=required, system_time=_filetime(system_time),
            system_up_time=_duration(up_time), attributes=attributes, comment=_text(comment),
            physical_runs=runs, physical_pages=pages, bitmap=bitmap, triage=triage,
        )

    @classmethod
    def _parse32(cls, data: bytes) -> "DumpHeader":
        if len(data) < HEADER_SIZE_32:
            raise BadDump(f"truncated: {len(data)} bytes, shorter than the {HEADER_SIZE_32}-byte 32-bit dump header")
        major, minor, dtb, pfn_db, modules, processes, machine, processors, code = struct.unpack_from("<9I", data, 0x08)
        params = struct.unpack_from("<4I", data, 0x2C)
        pae, kd_block = data[0x5C], struct.unpack_from("<I", data, 0x60)[0]
        comment = data[0x820:0x8A0]
        (attributes,) = struct.unpack_from("<I", data, 0x8A0)
        (dump_type,) = struct.unpack_from("<I", data, 0xF88)
        (required,) = struct.unpack_from("<q", data, 0xFA0)
        up_time, system_time = struct.unpack_from("<qq", data, 0xFB8)
        cls._check_common(machine, _MACHINES_32, 32, processors, dump_type)
        runs, pages = (None, None)
        if dump_type == DumpType.FULL:
            runs, pages = cls._runs(data, 0x64, 32)
        return cls(
            bits=32, major_version=major, minor_version=minor, directory_table_base=dtb, pfn_database=pfn_db,
            ps_loaded_module_list=modules, ps_active_process_head=processes, machine_type=machine,
            processors=processors, bugcheck_code=code, bugcheck_parameters=params, kd_debugger_data_block=kd_block,
            dump_type=dump_type, required_dump_space=required, system_time=_filetime(system_time),
            system_up_time=_duration(up_time), attributes=attributes, comment=_text(comment),
            physical_runs=runs, physical_pages=pages, pae_enabled=bool(pae) if pae in (0, 1) else None,
        )

    @staticmethod
    def _check_common(machine: int, allowed: set[int], bits: int, processors: int, dump_type: int) -> None:
        if dump_type == PAGE_PATTERN:
            raise BadDump(
                "the dump header was never completed (DumpType still holds the 'PAGE' fill pattern): Windows "
                "did not finish writing this dump",
                "the dump was interrupted (reset during the write, or a page file too small): capture a new one",
            )
        if dump_type not in {t.value for t in DumpType}:
            raise BadDump(f"corrupt: unknown dump type {dump_type} ({dump_type:#x}) in the header")
        if machine not in allowed:
            raise BadDump(
                f"corrupt: machine type {machine:#x} ({MACHINES.get(machine, 'unknown')}) in a {bits}-bit dump header"
            )
        if not 0 < processors <= 4096:
            raise BadDump(f"corrupt: the header says the machine had {processors} processors")

    @staticmethod
    def _runs(data: bytes, offset: int, bits: int) -> tuple[tuple[PhysicalRun, ...], int]:
        """PHYSICAL_MEMORY_DESCRIPTOR: NumberOfRuns, NumberOfPages, then (BasePage, PageCount) runs,
        all in a 700-byte buffer (64-bit: ULONG, pad, ULONG64, then 16-byte runs; 32-bit: 8-byte runs)."""
        if bits == 64:
            count, _pad, pages = struct.unpack_from("<IIQ", data, offset)
            first, size, fmt = offset + 16, 16, "<QQ"
        else:
            count, pages = struct.unpack_from("<II", data, offset)
            first, size, fmt = offset + 8, 8, "<II"
        capacity = (700 - (first - offset)) // size
        if count == PAGE_PATTERN or not 0 < count <= capacity:
            raise BadDump(f"corrupt: the physical memory descriptor has {count:#x} runs (at most {capacity} fit)")
        runs = tuple(PhysicalRun(*struct.unpack_from(fmt, data, first + size * i)) for i in range(count))
        if sum(r.page_count for r in runs) != pages:
            raise BadDump(
                f"corrupt: the physical memory runs add up to {sum(r.page_count for r in runs)} pages, "
                f"the descriptor says {pages}"
            )
        ordered = sorted(runs, key=lambda r: r.base_page)
        for a, b in zip(ordered, ordered[1:]):
            if a.base_page + a.page_count > b.base_page:
                raise BadDump(f"corrupt: physical memory runs overlap at page {b.base_page:#x}")
        return runs, pages

    # -- what it means ----------------------------------------------------------------------------

    @property
    def header_size(self) -> int:
        return HEADER_SIZE_64 if self.bits == 64 else HEADER_SIZE_32

    @property
    def machine(self) -> str:
        return MACHINES.get(self.machine_type, f"{self.machine_type:#x}")

    @property
    def encrypted(self) -> bool:
        return bool(self.attributes & ATTRIBUTE_ENCRYPTED) and self.attributes != PAGE_PATTERN

    @property
    def type(self) -> DumpType:
        return DumpType(self.dump_type)

    @property
    def kind(self) -> str:
        """What an operator calls it."""
        t = self.type
        if t == DumpType.FULL:
            return "complete memory dump"
        if t in BITMAP_TYPES:
            if self.bitmap is not None and self.bitmap.complete:
                return "complete memory dump (bitmap)"
            if t == DumpType.AUTOMATIC:
                return "automatic memory dump (bitmap)"
            return "kernel or automatic memory dump (bitmap)"
        return {
            DumpType.SUMMARY: "kernel summary dump (pre-Windows 8)",
            DumpType.HEADER: "header-only dump",
            DumpType.TRIAGE: "small memory dump (minidump)",
            DumpType.KERNEL_MEMORY: "kernel memory dump (debugger)",
            DumpType.KERNEL_AND_USER_MEMORY: "kernel and user memory dump (debugger)",
            DumpType.COMPLETE_MEMORY: "complete memory dump (debugger)",
        }[t]

    @property
    def minimum_file_size(self) -> int | None:
        """The size the file needs for its own layout to be whole; None when the header alone cannot
        tell (a bitmap or small dump whose second header was not part of the probe)."""
        if self.dump_type == DumpType.FULL and self.physical_pages is not None:
            return self.header_size + self.physical_pages * PAGE_SIZE
        if self.bitmap is not None:
            return self.bitmap.minimum_file_size
        if self.triage is not None:
            return self.triage.minimum_file_size
        return None

    def check_size(self, file_size: int) -> None:
        """Raises BadDump when the file is shorter than its own layout says (a truncated copy)."""
        if file_size < self.header_size:
            raise BadDump(f"truncated: {file_size} bytes, shorter than the {self.header_size}-byte dump header")
        needed = self.minimum_file_size
        if needed is not None and file_size < needed:
            raise BadDump(
                f"truncated: the file is {file_size:,} bytes but its {self.kind} layout needs {needed:,} "
                f"({_size(needed - file_size)} missing)",
                "the copy or upload did not complete, or the dump volume ran out of space: copy it again "
                "(compare the size with the source), or collect the dump again",
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "PAGEDU64 (DUMP_HEADER64)" if self.bits == 64 else "PAGEDUMP (DUMP_HEADER32)",
            "dump_type": self.dump_type,
            "dump_type_name": self.type.name,
            "kind": self.kind,
            "machine": self.machine,
            "processors": self.processors,
            "windows_build": self.minor_version,
            "bugcheck_code": f"{self.bugcheck_code:#x}",
            "bugcheck_parameters": [f"{p:#x}" for p in self.bugcheck_parameters],
            "system_time": self.system_time.isoformat() if self.system_time else None,
            "system_uptime_seconds": int(self.system_up_time.total_seconds()) if self.system_up_time else None,
            "required_dump_space": self.required_dump_space,
            "encrypted": self.encrypted,
            "directory_table_base": f"{self.directory_table_base:#x}",
            "ps_loaded_module_list": f"{self.ps_loaded_module_list:#x}",
        }


def read_header(source: Any) -> DumpHeader:
    """Reads and parses the header of a path, URL or open source (anything with `read_at` and `size`),
    including the size check. For verifying an upload: `read_header(open_source(url))`."""
    from scripts.base.rangeio import open_source

    owned = not hasattr(source, "read_at")
    reader = open_source(source) if owned else source
    try:
        header = DumpHeader.parse(reader.read_at(0, PROBE_SIZE))
        header.check_size(reader.size)
        return header
    finally:
        if owned:
            reader.close()


def _filetime(value: int) -> _dt.datetime | None:
    if value <= 0 or value == 0x4547415045474150:
        return None
    try:
        return _FILETIME_EPOCH + _dt.timedelta(microseconds=value // 10)
    except OverflowError:
        return None


def _duration(value: int) -> _dt.timedelta | None:
    if value <= 0 or value == 0x4547415045474150:
        return None
    try:
        return _dt.timedelta(microseconds=value // 10)
    except OverflowError:
        return None


def _text(raw: bytes) -> str:
    if raw.startswith(b"PAGE"):
        return ""
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:,} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return str(count)  # pragma: no cover
