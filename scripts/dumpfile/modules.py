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

- Small dumps: no page tables, so the kernel copies the list into the dump as DUMP_DRIVER_ENTRY64 records:
  the file offset of the driver's name (a DUMP_STRING: ULONG length in characters, then UTF-16 text),
  then a KLDR_DATA_TABLE_ENTRY64 in the dump's own fixed layout, whose TimeDateStamp is at +0x80.
"""

from __future__ import annotations

import datetime as _dt
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dissect.cstruct import cstruct

from scripts.dumpfile.errors import BadDump, NotInDump
from scripts.dumpfile.paging import is_canonical
from scripts.dumpfile.physical import Source

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
_HEAD = _LAYOUTS.KLDR_ENTRY_HEAD
_NAMES = _LAYOUTS.KLDR_ENTRY_NAMES
_DRIVER_ENTRY = _LAYOUTS.DUMP_DRIVER_ENTRY64

MAX_MODULES = 4096  # a real system loads a few hundred; more means the list is broken
KLDR_TIMEDATESTAMP = 0x9C  # KLDR_DATA_TABLE_ENTRY.TimeDateStamp in a live x64 kernel, Windows 10 and later
DRIVER_ENTRY_SIZE = len(_DRIVER_ENTRY)


@dataclass(frozen=True)
class LoadedModule:
    name: str
    base: int
    size: int
    timestamp: int | None = None
    path: str | None = None
    entry_address: int | None = None  # KLDR_DATA_TABLE_ENTRY (full/bitmap) or file offset (small dump)

    def contains(self, address: int) -> bool:
        return self.base <= address < self.base + self.size

    def symbol(self, address: int) -> str:
        """`name+0xoffset`, the form WinDbg prints."""
        return f"{self.name}+{address - self.base:#x}"

    @property
    def timestamp_utc(self) -> _dt.datetime | None:
        if not self.timestamp:
            return None
        return _dt.datetime.fromtimestamp(self.timestamp, _dt.timezone.utc)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "base": f"{self.base:#x}",
            "size": self.size,
            "end": f"{self.base + self.size:#x}",
            "timestamp": f"{self.timestamp:#010x}" if self.timestamp is not None else None,
            "timestamp_utc": self.timestamp_utc.isoformat() if self.timestamp_utc else None,
        }


@dataclass
class ListWalk:
    """The outcome of walking PsLoadedModuleList: how far it got and why it stopped early, if it did."""

    count: int = 0
    complete: bool = False
    problem: str | None = None
    entries: list[tuple[int, int, int]] = field(default_factory=list)  # (entry address, DllBase, SizeOfImage)


ReadVirtual = Callable[[int, int], bytes]


def walk_loaded_modules(read: ReadVirtual, head: int) -> ListWalk:
    """Follows InLoadOrderLinks from `head`, recording each entry's base and size. Stops at the head, a
    loop, an unreadable entry or MAX_MODULES entries, and says which."""
    walk = ListWalk()
    seen = {head}
    try:
        (current,) = struct.unpack("<Q", read(head, 8))
    except NotInDump as err:
        walk.problem = f"PsLoadedModuleList ({head:#x}) is not readable: {err.reason}"
        return walk
    while current != head:
        if current in seen:
            walk.problem = f"the module list loops back to {current:#x} without returning to its head"
            return walk
        if not is_canonical(current) or current == 0:
            walk.problem = f"the module list has a broken link ({current:#x}) after {walk.count} entries"
            return walk
        if walk.count >= MAX_MODULES:
            walk.problem = f"the module list has more than {MAX_MODULES} entries; stopped"
            return walk
        seen.add(current)
        try:
            entry = _HEAD(read(current, len(_HEAD)))
        except NotInDump as err:
            walk.problem = f"module list entry {walk.count} ({current:#x}) is not in the dump: {err.reason}"
            return walk
        walk.entries.append((current, int(entry.DllBase), int(entry.SizeOfImage)))
        walk.count += 1
        current = int(entry.InLoadOrderLinks.Flink)
    walk.complete = True
    return walk


def describe_entry(read: ReadVirtual, entry: int, base: int, size: int, build: int) -> LoadedModule:
    """Names one KLDR_DATA_TABLE_ENTRY and finds its timestamp."""
    names = _NAMES(read(entry, len(_HEAD) + len(_NAMES))[len(_HEAD):])
    name = _read_unicode_string(read, names.BaseDllName) or f"<module at {base:#x}>"
    try:
        path = _read_unicode_string(read, names.FullDllName)
    except NotInDump:
        path = None
    timestamp = pe_timestamp(read, base)
    if timestamp is None and build >= 10240:
        try:
            timestamp = struct.unpack("<I", read(entry + KLDR_TIMEDATESTAMP, 4))[0] or None
        except NotInDump:
            timestamp = None
    return LoadedModule(name=name, base=base, size=size, timestamp=timestamp, path=path, entry_address=entry)


def pe_timestamp(read: ReadVirtual, base: int) -> int | None:
    """IMAGE_FILE_HEADER.TimeDateStamp of the image mapped at `base` (None if its header is not in the dump)."""
    try:
        dos = read(base, 0x40)
        if dos[:2] != b"MZ":
            return None
        (e_lfanew,) = struct.unpack_from("<I", dos, 0x3C)
        if not 0x40 <= e_lfanew <= 0x1000 - 24:
            return None
        nt = read(base + e_lfanew, 12)
    except NotInDump:
        return None
    if nt[:4] != b"PE\0\0":
        return None
    return struct.unpack_from("<I", nt, 8)[0]


def _read_unicode_string(read: ReadVirtual, string: Any) -> str | None:
    """The text of a UNICODE_STRING64 (None for an empty or implausible one)."""
    length, buffer = int(string.Length), int(string.Buffer)
    if length == 0 or buffer == 0:
        return None
    if length % 2 or length > 1024:
        return None
    return read(buffer, length).decode("utf-16-le", "replace")


# --------------------------------------------------------------------------------------------------
# small dumps


def read_driver_list(source: Source, offset: int, count: int) -> list[LoadedModule]:
    """The DUMP_DRIVER_ENTRY64 records of a small dump, named through its string pool."""
    if count == 0:
        return []
    raw = source.read_at(offset, count * DRIVER_ENTRY_SIZE)
    if len(raw) != count * DRIVER_ENTRY_SIZE:
        raise BadDump(f"truncated: the small dump's driver list ({count} entries at {offset:#x}) runs past the end of the file")
    modules = []
    for i, record in enumerate(_DRIVER_ENTRY[count](raw)):
        ldr = record.LdrEntry
        full = _dump_string(source, record.DriverNameOffset, i)
        name = full.replace("/", "\\").rsplit("\\", 1)[-1]
        modules.append(LoadedModule(name=name, base=int(ldr.Head.DllBase), size=int(ldr.Head.SizeOfImage),
                                    timestamp=int(ldr.TimeDateStamp) or None,
                                    path=full if full != name else None,
                                    entry_address=offset + i * DRIVER_ENTRY_SIZE))
    return modules


def _dump_string(source: Source, offset: int, index: int) -> str:
    """DUMP_STRING: ULONG length in characters (ntiodump.h says bytes; the kernel's own reader and real
    dumps use characters), then UTF-16LE text and a NUL."""
    head = source.read_at(offset, 4)
    if len(head) != 4:
        raise BadDump(f"corrupt: the name of driver {index} points outside the file ({offset:#x})")
    (chars,) = struct.unpack("<I", head)
    if chars > 1024:
        raise BadDump(f"corrupt: the name of driver {index} claims {chars} characters")
    text = source.read_at(offset + 4, 2 * chars)
    if len(text) != 2 * chars:
        raise BadDump(f"truncated: the name of driver {index} runs past the end of the file")
    return text.decode("utf-16-le", "replace")


def find_module(modules: list[LoadedModule] | Iterator[LoadedModule], address: int) -> LoadedModule | None:
    for module in modules:
        if module.contains(address):
            return module
    return None
