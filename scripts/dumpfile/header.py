"""DUMP_HEADER64 ('PAGEDU64') and DUMP_HEADER32 ('PAGEDUMP'): the first page(s) of every kernel dump.

The header answers the first questions without touching memory: what kind of dump this is, which stop
code and parameters the machine died with, on how many processors, when, and how big the file must be.
It is also what decides whether the rest of the file can be trusted, so `DumpHeader.parse` checks what
it can and raises `BadDump` with the reason (not a dump, a user-mode minidump, a header Windows never
finished writing, a truncated header, an impossible run list...).

The two layouts are written down below as C (dissect.cstruct), offsets verified against mindumpdef.h
and kdmp-parser's static_asserts. They name the fields the same way, so one parse path reads both; what
differs is the width of the pointers and where the later fields sit (DUMP_HEADER32 uses 4-byte packing).

Windows fills the header buffer with the string 'PAGE' before setting fields, so a field that still
reads 'PAGE' was never written: a DumpType of 'PAGE' means the dump stopped before it began.
"""

from __future__ import annotations

import datetime as _dt
import enum
from dataclasses import dataclass
from typing import Any

from dissect.cstruct import cstruct

from scripts.dumpfile.errors import BadDump
from scripts.dumpfile.physical import PAGE_PATTERN, PAGE_SIZE, BitmapHeader, PhysicalRun, parse_run_list
from scripts.dumpfile.smalldump import TriageHeader, TriageHeader32

_LAYOUTS = cstruct().load("""
struct DUMP_HEADER64 {                  /* 0x2000 bytes */
    char     Signature[4];              /* 0x000 'PAGE' */
    char     ValidDump[4];              /* 0x004 'DU64' */
    uint32   MajorVersion;              /* 0x008 */
    uint32   MinorVersion;              /* 0x00C the Windows build */
    uint64   DirectoryTableBase;        /* 0x010 */
    uint64   PfnDataBase;               /* 0x018 */
    uint64   PsLoadedModuleList;        /* 0x020 */
    uint64   PsActiveProcessHead;       /* 0x028 */
    uint32   MachineImageType;          /* 0x030 */
    uint32   NumberProcessors;          /* 0x034 */
    uint32   BugCheckCode;              /* 0x038 */
    uint32   _pad0;
    uint64   BugCheckParameter[4];      /* 0x040 */
    char     VersionUser[32];           /* 0x060 */
    uint64   KdDebuggerDataBlock;       /* 0x080 */
    char     PhysicalMemoryBlock[700];  /* 0x088 PHYSICAL_MEMORY_DESCRIPTOR64 (physical.py) */
    char     _pad1[4];
    char     ContextRecord[3000];       /* 0x348 */
    char     Exception[152];            /* 0xF00 EXCEPTION_RECORD64 */
    uint32   DumpType;                  /* 0xF98 */
    uint32   _pad2;
    int64    RequiredDumpSpace;         /* 0xFA0 */
    int64    SystemTime;                /* 0xFA8 FILETIME, UTC */
    char     Comment[128];              /* 0xFB0 */
    int64    SystemUpTime;              /* 0x1030 */
    uint32   MiniDumpFields;            /* 0x1038 */
    uint32   SecondaryDataState;        /* 0x103C */
    uint32   ProductType;               /* 0x1040 */
    uint32   SuiteMask;                 /* 0x1044 */
    uint32   WriterStatus;              /* 0x1048 */
    uint8    Unused1;                   /* 0x104C */
    uint8    KdSecondaryVersion;        /* 0x104D */
    uint8    Unused[2];                 /* 0x104E */
    uint32   Attributes;                /* 0x1050 DUMP_FILE_ATTRIBUTES */
    uint32   BootId;                    /* 0x1054 */
    char     _reserved0[4008];          /* 0x1058 */
};

struct DUMP_HEADER32 {                  /* 0x1000 bytes */
    char     Signature[4];              /* 0x000 'PAGE' */
    char     ValidDump[4];              /* 0x004 'DUMP' */
    uint32   MajorVersion;              /* 0x008 */
    uint32   MinorVersion;              /* 0x00C the Windows build */
    uint32   DirectoryTableBase;        /* 0x010 */
    uint32   PfnDataBase;               /* 0x014 */
    uint32   PsLoadedModuleList;        /* 0x018 */
    uint32   PsActiveProcessHead;       /* 0x01C */
    uint32   MachineImageType;          /* 0x020 */
    uint32   NumberProcessors;          /* 0x024 */
    uint32   BugCheckCode;              /* 0x028 */
    uint32   BugCheckParameter[4];      /* 0x02C */
    char     VersionUser[32];           /* 0x03C */
    uint8    PaeEnabled;                /* 0x05C */
    uint8    KdSecondaryVersion;        /* 0x05D */
    uint8    Spare3[2];                 /* 0x05E */
    uint32   KdDebuggerDataBlock;       /* 0x060 */
    char     PhysicalMemoryBlock[700];  /* 0x064 PHYSICAL_MEMORY_DESCRIPTOR32 (physical.py) */
    char     ContextRecord[1200];       /* 0x320 */
    char     Exception[80];             /* 0x7D0 EXCEPTION_RECORD32 */
    char     Comment[128];              /* 0x820 */
    uint32   Attributes;                /* 0x8A0 DUMP_FILE_ATTRIBUTES */
    uint32   BootId;                    /* 0x8A4 */
    char     _reserved0[1760];          /* 0x8A8 */
    uint32   DumpType;                  /* 0xF88 */
    uint32   MiniDumpFields;            /* 0xF8C */
    uint32   SecondaryDataState;        /* 0xF90 */
    uint32   ProductType;               /* 0xF94 */
    uint32   SuiteMask;                 /* 0xF98 */
    uint32   WriterStatus;              /* 0xF9C */
    int64    RequiredDumpSpace;         /* 0xFA0 */
    char     _reserved2[16];            /* 0xFA8 */
    int64    SystemUpTime;              /* 0xFB8 */
    int64    SystemTime;                /* 0xFC0 FILETIME, UTC */
    char     _reserved3[56];            /* 0xFC8 */
};
""")

ATTRIBUTE_ENCRYPTED = 1 << 8  # DUMP_FILE_ATTRIBUTES.EncryptedDumpData
ATTRIBUTE_DECRYPTED = 1 << 9  # DUMP_FILE_ATTRIBUTES.DecryptedDump
HEADER_SIZE_64 = len(_LAYOUTS.DUMP_HEADER64)
HEADER_SIZE_32 = len(_LAYOUTS.DUMP_HEADER32)
assert (HEADER_SIZE_64, HEADER_SIZE_32) == (0x2000, 0x1000)
# How many bytes `read_header` reads: the 64-bit header plus what follows it that decides the layout
# (the bitmap header, or TRIAGE_DUMP64).
PROBE_SIZE = HEADER_SIZE_64 + 0x80

_FILETIME_EPOCH = _dt.datetime(1601, 1, 1, tzinfo=_dt.timezone.utc)
MACHINES = {0x8664: "x64", 0xAA64: "arm64", 0x014C: "x86", 0x01C4: "arm"}


@dataclass(frozen=True)
class _Flavour:
    """What differs between the two headers: pointer width, layout, and the machines each is written for."""

    bits: int
    layout: Any  # the cstruct type
    machines: frozenset[int]

    @property
    def size(self) -> int:
        return len(self.layout)


_FLAVOURS = {
    b"DU64": _Flavour(64, _LAYOUTS.DUMP_HEADER64, frozenset({0x8664, 0xAA64})),
    b"DUMP": _Flavour(32, _LAYOUTS.DUMP_HEADER32, frozenset({0x014C, 0x01C4})),
}


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
    bitmap: BitmapHeader | None = None  # bitmap dumps, when the probe covered it (0x38 bytes after the header)
    triage: TriageHeader | None = None  # small dumps, when the probe covered TRIAGE_DUMP64 / TRIAGE_DUMP32
    pae_enabled: bool | None = None  # 32-bit only

    # -- parsing ----------------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes) -> "DumpHeader":
        """Parses the start of a dump. `data` must hold the whole header (0x2000 bytes for 64-bit,
        0x1000 for 32-bit); with PROBE_SIZE bytes the bitmap or small-dump header is parsed too."""
        data = bytes(data)
        if len(data) < 8:
            raise BadDump(f"not a kernel dump: the file is only {len(data)} byte{'' if len(data) == 1 else 's'} long")
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
        flavour = _FLAVOURS.get(valid)
        if flavour is None:
            raise BadDump(f"not a Windows kernel dump: unknown header flavour {data[:8]!r} (expected 'DU64' or 'DUMP')")
        return cls._parse(data, flavour)

    @classmethod
    def _parse(cls, data: bytes, flavour: _Flavour) -> "DumpHeader":
        bits = flavour.bits
        if len(data) < flavour.size:
            raise BadDump(f"truncated: {len(data)} bytes, shorter than the {flavour.size}-byte {bits}-bit dump header")
        raw = flavour.layout(data)
        dump_type = int(raw.DumpType)
        cls._check_common(raw.MachineImageType, flavour.machines, bits, raw.NumberProcessors, dump_type)
        runs, pages = (None, None)
        if dump_type == DumpType.FULL:
            runs, pages = parse_run_list(raw.PhysicalMemoryBlock, bits)
        # What follows the header decides the layout: the bitmap or small-dump header of either width.
        after = data[flavour.size:]
        bitmap = triage = None
        if dump_type in BITMAP_TYPES and len(after) >= BitmapHeader.SIZE:
            bitmap = BitmapHeader.parse(after[:BitmapHeader.SIZE], flavour.size, bits)
        contents = TriageHeader if bits == 64 else TriageHeader32
        if dump_type == DumpType.TRIAGE and len(after) >= contents.SIZE:
            triage = contents.parse(after[:contents.SIZE])
        pae = getattr(raw, "PaeEnabled", None)  # DUMP_HEADER32 only
        return cls(
            bits=bits, major_version=int(raw.MajorVersion), minor_version=int(raw.MinorVersion),
            directory_table_base=int(raw.DirectoryTableBase), pfn_database=int(raw.PfnDataBase),
            ps_loaded_module_list=int(raw.PsLoadedModuleList), ps_active_process_head=int(raw.PsActiveProcessHead),
            machine_type=int(raw.MachineImageType), processors=int(raw.NumberProcessors),
            bugcheck_code=int(raw.BugCheckCode), bugcheck_parameters=tuple(int(p) for p in raw.BugCheckParameter),
            kd_debugger_data_block=int(raw.KdDebuggerDataBlock), dump_type=dump_type,
            required_dump_space=int(raw.RequiredDumpSpace), system_time=_filetime(raw.SystemTime),
            system_up_time=_duration(raw.SystemUpTime), attributes=int(raw.Attributes), comment=_text(raw.Comment),
            physical_runs=runs, physical_pages=pages, bitmap=bitmap, triage=triage,
            pae_enabled=bool(pae) if pae in (0, 1) else None,
        )

    @staticmethod
    def _check_common(machine: int, allowed: frozenset[int], bits: int, processors: int, dump_type: int) -> None:
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
        """The size the file needs for its own layout to be whole. A bitmap or small dump whose second
        header was not part of the probe needs at least that second header; None when the header alone
        cannot tell more."""
        if self.dump_type == DumpType.FULL and self.physical_pages is not None:
            return self.header_size + self.physical_pages * PAGE_SIZE
        if self.bitmap is not None:
            return self.bitmap.minimum_file_size
        if self.triage is not None:
            return self.triage.minimum_file_size
        if self.dump_type in BITMAP_TYPES:
            return self.header_size + BitmapHeader.SIZE
        if self.dump_type == DumpType.TRIAGE:
            return HEADER_SIZE_64 + TriageHeader.SIZE if self.bits == 64 else HEADER_SIZE_32 + TriageHeader32.SIZE
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
    reader = open_source(source, concurrency=1) if owned else source  # one header: no pool of connections
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
