"""Loaded kernel modules: which driver an address belongs to.

A bugcheck's faulting address means nothing to an operator; "contosoflt.sys+0x1a2b" does. Two sources:

- Full and bitmap dumps: the kernel's PsLoadedModuleList (its address is in the dump header) is the head
  of a circular doubly linked list of KLDR_DATA_TABLE_ENTRY, linked through InLoadOrderLinks at +0x00.
  On x64 the fields used here (KLDR_ENTRY_HEAD and KLDR_ENTRY_NAMES below) have kept their offsets since
  Windows Vista; TimeDateStamp sits at +0x9C from Windows 10 on.
  Only the bases and sizes are read for every entry; names and the timestamp only for the module that
  matters, so a triage reads a few pages, not the whole list's strings.
  The timestamp is taken from the image's own PE header at DllBase (IMAGE_FILE_HEADER.TimeDateStamp,
  what `lm` shows and what matches the .sys file on disk), falling back to the entry's field.

  x86 kernels (DUMP_HEADER32) have the same list with 4-byte pointers (KLDR_ENTRY_HEAD32 below), the
  TimeDateStamp at +0x58.

- Small dumps: no page tables, so the kernel copies the list into the dump as DUMP_DRIVER_ENTRY64 records:
  the file offset of the driver's name (a DUMP_STRING: ULONG length in characters, then UTF-16 text),
  then a KLDR_DATA_TABLE_ENTRY64 in the dump's own fixed layout, whose TimeDateStamp is at +0x80. x86 small
  dumps hold DUMP_DRIVER_ENTRY32 records instead (smalldump.py), read the same way.

A name that cannot be read (outside the file, not in the dump, implausible length, undecodable or
unprintable text) does not cost the verdict: the module keeps its base and size under a placeholder name
(`<unnamed module at 0x...>`) and `note` says what was wrong with the name.

TimeDateStamp is a build date only for images linked without /Brepro: Microsoft builds its inbox drivers
reproducibly, and then the field holds a hash of the image. The image says so itself with an
IMAGE_DEBUG_TYPE_REPRO entry in its debug directory, which is read (one small read) when the image's
header is in the dump. Where it is not (small dumps carry no images), a documented heuristic decides:
a "date" after the crash or before 1993 (Windows NT 3.1) cannot be a build date, so it is a hash;
anything else is shown as a date, marked unverified.
"""

from __future__ import annotations

import datetime as _dt
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pefile
from dissect.cstruct import cstruct

from scripts.base.errors import printable
from scripts.dumpfile.errors import BadDump, NotInDump
from scripts.dumpfile.paging import is_canonical
from scripts.dumpfile.physical import Source
from scripts.dumpfile.readahead import Batch

_LAYOUTS = cstruct().load("""
struct LIST_ENTRY64 {
    uint64   Flink;
    uint64   Blink;
};
struct UNICODE_STRING64 {
    uint16   Length;                    /* bytes, without a terminating NUL */
    uint16   MaximumLength;
    uint32   _pad;
    uint64   Buffer;
};

/* KLDR_DATA_TABLE_ENTRY (x64), in the two pieces read from a live list */
struct KLDR_ENTRY_HEAD {                /* what the walk reads for every module */
    LIST_ENTRY64     InLoadOrderLinks;  /* 0x00 */
    uint64   ExceptionTable;            /* 0x10 */
    uint32   ExceptionTableSize;        /* 0x18 */
    uint32   _pad0;
    uint64   GpValue;                   /* 0x20 */
    uint64   NonPagedDebugInfo;         /* 0x28 */
    uint64   DllBase;                   /* 0x30 */
    uint64   EntryPoint;                /* 0x38 */
    uint32   SizeOfImage;               /* 0x40 */
    uint32   _pad1;
};
struct KLDR_ENTRY_NAMES {               /* 0x48, read for the module that is named */
    UNICODE_STRING64 FullDllName;       /* 0x48 */
    UNICODE_STRING64 BaseDllName;       /* 0x58 */
};

/* KLDR_DATA_TABLE_ENTRY (x86), the same two pieces with 4-byte pointers */
struct LIST_ENTRY32 {
    uint32   Flink;
    uint32   Blink;
};
struct UNICODE_STRING32 {
    uint16   Length;
    uint16   MaximumLength;
    uint32   Buffer;
};
struct KLDR_ENTRY_HEAD32 {
    LIST_ENTRY32     InLoadOrderLinks;  /* 0x00 */
    uint32   ExceptionTable;            /* 0x08 */
    uint32   ExceptionTableSize;        /* 0x0C */
    uint32   GpValue;                   /* 0x10 */
    uint32   NonPagedDebugInfo;         /* 0x14 */
    uint32   DllBase;                   /* 0x18 */
    uint32   EntryPoint;                /* 0x1C */
    uint32   SizeOfImage;               /* 0x20 */
};
struct KLDR_ENTRY_NAMES32 {             /* 0x24 */
    UNICODE_STRING32 FullDllName;       /* 0x24 */
    UNICODE_STRING32 BaseDllName;       /* 0x2C */
};

/* a small dump's driver list: KLDR_DATA_TABLE_ENTRY64 in the dump's fixed layout */
struct KLDR_DATA_TABLE_ENTRY64 {
    KLDR_ENTRY_HEAD  Head;              /* 0x00 */
    KLDR_ENTRY_NAMES Names;             /* 0x48 */
    uint32   Flags;                     /* 0x68 */
    uint16   LoadCount;                 /* 0x6C */
    uint16   _undefined5;
    uint64   _undefined6;               /* 0x70 */
    uint32   CheckSum;                  /* 0x78 */
    uint32   _padding1;
    uint32   TimeDateStamp;             /* 0x80 */
    uint32   _padding2;
};
struct DUMP_DRIVER_ENTRY64 {            /* 0x90 bytes */
    uint32   DriverNameOffset;          /* 0x00 file offset of a DUMP_STRING */
    uint32   _pad;
    KLDR_DATA_TABLE_ENTRY64 LdrEntry;   /* 0x08 */
};

""")
_DRIVER_ENTRY = _LAYOUTS.DUMP_DRIVER_ENTRY64

PAGE_SIZE = 0x1000
MAX_MODULES = 4096  # a real system loads a few hundred; more means the list is broken
DRIVER_ENTRY_SIZE = len(_DRIVER_ENTRY)
MAX_NAME_BYTES = 1024
IMAGE_DEBUG_TYPE_REPRO = 16  # the image was linked with /Brepro: TimeDateStamp is a hash
MAX_DEBUG_ENTRIES = 16
NT_3_1 = 0x2C000000  # early 1993: no Windows image is older
HASH = "reproducible-build hash"  # LoadedModule.timestamp_kind for a TimeDateStamp that is not a date



KERNEL_FILE_NAMES = {"ntoskrnl.exe", "ntkrnlmp.exe", "ntkrnlpa.exe", "ntkrpamp.exe"}


def debugger_name(module_name: str) -> str:
    """The module as WinDbg names it in `module!function`: `nt` for the kernel, else the file name without
    its extension (`contosoflt.sys` -> `contosoflt`)."""
    name = module_name.rsplit("\\", 1)[-1]
    if name.lower() in KERNEL_FILE_NAMES:
        return "nt"
    return name.rsplit(".", 1)[0] if "." in name else name


@dataclass(frozen=True)
class _ListLayout:
    """What differs between the x64 and x86 module lists: pointer width, structures, TimeDateStamp offset."""

    bits: int
    head: Any
    names: Any
    timestamp_offset: int  # KLDR_DATA_TABLE_ENTRY.TimeDateStamp, Windows 10 and later

    def pointer_ok(self, value: int) -> bool:
        if self.bits == 64:
            return value != 0 and is_canonical(value)
        return 0 < value < 1 << 32

    def looks_like_entry(self, raw: bytes) -> bool:
        """Whether the bytes of a KLDR_ENTRY_HEAD look like one: kernel links, a page-aligned kernel DllBase
        and a SizeOfImage of a page to 1 GiB (readahead.ListAhead scans fetched pages with it; advisory)."""
        pointer = "<Q" if self.bits == 64 else "<I"
        kernel = 1 << (self.bits - 1)
        flink, blink = struct.unpack_from(pointer + pointer[1], raw)  # InLoadOrderLinks
        if flink < kernel or blink < kernel:
            return False
        base_at, size_at = (0x30, 0x40) if self.bits == 64 else (0x18, 0x20)  # DllBase, SizeOfImage
        (base,) = struct.unpack_from(pointer, raw, base_at)
        (size,) = struct.unpack_from("<I", raw, size_at)
        return base >= kernel and not base & 0xFFF and PAGE_SIZE <= size <= 1 << 30


LAYOUTS = {
    64: _ListLayout(64, _LAYOUTS.KLDR_ENTRY_HEAD, _LAYOUTS.KLDR_ENTRY_NAMES, 0x9C),
    32: _ListLayout(32, _LAYOUTS.KLDR_ENTRY_HEAD32, _LAYOUTS.KLDR_ENTRY_NAMES32, 0x58),
}
KLDR_TIMEDATESTAMP = LAYOUTS[64].timestamp_offset


@dataclass(frozen=True)
class LoadedModule:
    name: str
    base: int
    size: int
    timestamp: int | None = None
    path: str | None = None
    entry_address: int | None = None  # KLDR_DATA_TABLE_ENTRY (full/bitmap) or file offset (small dump)
    timestamp_kind: str | None = None  # "date", HASH, or "date (unverified)"; None without a timestamp
    note: str | None = None  # what could not be read about the module (its name, ...)

    def contains(self, address: int) -> bool:
        return self.base <= address < self.base + self.size

    def symbol(self, address: int) -> str:
        """`name+0xoffset`, the form WinDbg prints."""
        return f"{self.name}+{address - self.base:#x}"

    @property
    def timestamp_utc(self) -> _dt.datetime | None:
        """The build date, or None when the TimeDateStamp is a reproducible-build hash (or absent)."""
        if not self.timestamp or self.timestamp_kind == HASH:
            return None
        return _dt.datetime.fromtimestamp(self.timestamp, _dt.timezone.utc)

    @property
    def timestamp_text(self) -> str | None:
        """`0x65a1f3c9 (2024-01-13 02:31:05 UTC)`, or `0xc9c03000 (a reproducible-build hash, not a date)`."""
        if not self.timestamp:
            return None
        if self.timestamp_kind == HASH:
            return f"{self.timestamp:#010x} (a reproducible-build hash, not a date)"
        stamp = self.timestamp_utc.strftime("%Y-%m-%d %H:%M:%S UTC") if self.timestamp_utc else ""
        return f"{self.timestamp:#010x} ({stamp})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "base": f"{self.base:#x}",
            "size": self.size,
            "end": f"{self.base + self.size:#x}",
            "timestamp": f"{self.timestamp:#010x}" if self.timestamp is not None else None,
            "timestamp_utc": self.timestamp_utc.isoformat() if self.timestamp_utc else None,
            "timestamp_kind": self.timestamp_kind if self.timestamp else None,
            "note": self.note,
        }


def placeholder(base: int) -> str:
    return f"{_UNNAMED}{base:#x}>"


def is_placeholder(name: str) -> bool:
    """Whether `name` is what `placeholder` puts where the dump does not hold a module's name."""
    return name.startswith(_UNNAMED)


_UNNAMED = "<unnamed module at "


def timestamp_kind(timestamp: int | None, repro: bool | None, crash_time: _dt.datetime | None) -> str | None:
    """Is this TimeDateStamp a date? `repro` is what the image's debug directory says (None: not read)."""
    if not timestamp:
        return None
    if repro is not None:
        return HASH if repro else "date"
    too_late = crash_time is not None and timestamp > crash_time.timestamp() + 86400
    return HASH if too_late or timestamp < NT_3_1 else "date (unverified)"


ReadVirtual = Callable[[int, int], bytes]


def describe_entry(read: ReadVirtual, entry: int, base: int, size: int, build: int, bits: int = 64,
                   crash_time: _dt.datetime | None = None, batch: Batch | None = None) -> LoadedModule:
    """Names one KLDR_DATA_TABLE_ENTRY and finds its timestamp. Never fails on the name: a name that is not
    readable becomes a placeholder and a note. A `batch` fetches the names and the image header together."""
    layout = LAYOUTS[bits]
    name = path = note = None
    if batch is not None:
        batch.fetch(describe_ranges(batch, layout, entry, base))
    try:
        names = layout.names(read(entry + len(layout.head), len(layout.names)))
        name = _read_unicode_string(read, names.BaseDllName)
        try:
            path = _read_unicode_string(read, names.FullDllName)
        except (NotInDump, _BadName):
            path = None
        if name is None:
            note = "the module's name is empty"
    except NotInDump as err:
        note = f"the module's name is not in the dump: {err.reason}"
    except _BadName as err:
        note = f"the module's name is not readable: {err}"
    image = read_image_header(read, base)
    timestamp = image[0] if image else None
    if timestamp is None and build >= 10240:
        try:
            timestamp = struct.unpack("<I", read(entry + layout.timestamp_offset, 4))[0] or None
        except NotInDump:
            timestamp = None
    kind = timestamp_kind(timestamp, image[1] if image else None, crash_time)
    return LoadedModule(name=name or placeholder(base), base=base, size=size, timestamp=timestamp, path=path,
                        entry_address=entry, timestamp_kind=kind, note=note)


def describe_ranges(batch: Batch, layout: _ListLayout, entry: int, base: int,
                     raw_entry: bytes = b"") -> list[tuple[int, int]]:
    """What `describe_entry` reads: the entry's names (when the entry is at hand, or its bytes are
    `raw_entry`) and timestamp, the image header."""
    ranges = [(entry + len(layout.head), len(layout.names)), (entry + layout.timestamp_offset, 4), (base, 0x1000)]
    raw = raw_entry[len(layout.head):len(layout.head) + len(layout.names)]
    if len(raw) != len(layout.names):
        raw = batch.peek(entry + len(layout.head), len(layout.names))
    if raw is not None:
        names = layout.names(raw)
        ranges += [(int(s.Buffer), min(int(s.Length), MAX_NAME_BYTES)) for s in (names.BaseDllName, names.FullDllName)]
    return ranges


def read_image_header(read: ReadVirtual, base: int) -> tuple[int, bool | None] | None:
    """(IMAGE_FILE_HEADER.TimeDateStamp, whether the debug directory has a REPRO entry) of the image mapped
    at `base`; None if its header is not in the dump or not a PE header. The REPRO answer is None when the
    debug directory itself is not in the dump."""
    try:
        header = read(base, 0x1000)
    except NotInDump:
        return None
    if header[:2] != b"MZ":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pe = pefile.PE(data=header, fast_load=True)
        timestamp = int(pe.FILE_HEADER.TimeDateStamp)
        directory = pe.OPTIONAL_HEADER.DATA_DIRECTORY[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_DEBUG"]]
    except (pefile.PEFormatError, LookupError, AttributeError, ValueError, OverflowError, struct.error):
        return None  # a header the dump holds but that is not a PE header: no timestamp from it
    entry_size = 28  # IMAGE_DEBUG_DIRECTORY
    count = min(int(directory.Size) // entry_size, MAX_DEBUG_ENTRIES)
    if not directory.VirtualAddress or not count:
        return timestamp, False
    try:
        table = read(base + int(directory.VirtualAddress), count * entry_size)
    except NotInDump:
        return timestamp, None
    types = {struct.unpack_from("<I", table, i * entry_size + 12)[0] for i in range(count)}
    return timestamp, IMAGE_DEBUG_TYPE_REPRO in types


def pe_timestamp(read: ReadVirtual, base: int) -> int | None:
    """IMAGE_FILE_HEADER.TimeDateStamp of the image mapped at `base` (None if its header is not in the dump)."""
    image = read_image_header(read, base)
    return image[0] if image else None


class _BadName(ValueError):
    """A module name that is there but cannot be right (its text says why)."""


def _read_unicode_string(read: ReadVirtual, string: Any) -> str | None:
    """The text of a UNICODE_STRING (None for an empty one; _BadName for an implausible one)."""
    length, buffer = int(string.Length), int(string.Buffer)
    if length == 0 or buffer == 0:
        return None
    if length % 2 or length > MAX_NAME_BYTES:
        raise _BadName(f"it claims {length} bytes")
    return _checked_text(read(buffer, length))


def _checked_text(raw: bytes) -> str:
    text = raw.decode("utf-16-le", "replace")
    if "\ufffd" in text or not text.isprintable():
        raise _BadName(f'"{printable(text[:40])}"')
    return text


# --------------------------------------------------------------------------------------------------
# small dumps


def read_driver_list(source: Source, offset: int, count: int,
                     crash_time: _dt.datetime | None = None, layout: Any = None) -> list[LoadedModule]:
    """The DUMP_DRIVER_ENTRY64 records (or another `layout` with the same fields) of a small dump, named through
    its string pool. A driver whose name cannot be read keeps its base and size under a placeholder name, with a note."""
    if count == 0:
        return []
    layout = _DRIVER_ENTRY if layout is None else layout
    entry_size = len(layout)
    raw = source.read_at(offset, count * entry_size)
    if len(raw) != count * entry_size:
        raise BadDump(f"truncated: the small dump's driver list ({count} entries at {offset:#x}) runs past the end of the file")
    modules = []
    for i, record in enumerate(layout[count](raw)):
        ldr = record.LdrEntry
        base = int(ldr.Head.DllBase)
        note = None
        try:
            full = _dump_string(source, record.DriverNameOffset, i)
            name = full.replace("/", "\\").rsplit("\\", 1)[-1]
            if not name:
                raise _BadName("it is empty")
        except _BadName as err:
            full = name = None
            note = f"the name of driver {i} is not readable: {err}"
        timestamp = int(ldr.TimeDateStamp) or None
        modules.append(LoadedModule(name=name or placeholder(base), base=base, size=int(ldr.Head.SizeOfImage),
                                    timestamp=timestamp, path=full if full != name else None,
                                    entry_address=offset + i * entry_size,
                                    timestamp_kind=timestamp_kind(timestamp, None, crash_time), note=note))
    return modules


def _dump_string(source: Source, offset: int, index: int) -> str:
    """DUMP_STRING: ULONG length in characters (ntiodump.h says bytes; the kernel's own reader and real
    dumps use characters), then UTF-16LE text and a NUL. _BadName says what is wrong with it."""
    head = source.read_at(offset, 4)
    if len(head) != 4:
        raise _BadName(f"it points outside the file ({offset:#x})")
    (chars,) = struct.unpack("<I", head)
    if chars > MAX_NAME_BYTES:
        raise _BadName(f"it claims {chars} characters")
    text = source.read_at(offset + 4, 2 * chars)
    if len(text) != 2 * chars:
        raise _BadName("it runs past the end of the file")
    return _checked_text(text)


def find_module(modules: list[LoadedModule] | Iterator[LoadedModule], address: int) -> LoadedModule | None:
    for module in modules:
        if module.contains(address):
            return module
    return None
