"""TRIAGE_DUMP64 / TRIAGE_DUMP32: the table of contents of a small memory dump (\\Windows\\Minidump\\*.dmp, DumpType 4).

A small dump holds no physical memory and no page tables. Instead the kernel copies, at crash time, the
few things a first analysis needs and records where it put them (offsets from the start of the file) in
a TRIAGE_DUMP64 right after the 0x2000-byte header (its layout is below, as C for dissect.cstruct).

The 4 bytes at ValidOffset must read 'TRGD' (TRIAGE_DUMP_VALID): Windows writes them last, so their
absence means the small dump was cut short. The driver list (see modules.py) is what names the faulting
driver; the crashing thread's stack, the data page and the data blocks are the only virtual memory a
small dump has, and `TriageMemory` serves reads from them (the 0x7E exception record lives on that stack).

x86 small dumps put a TRIAGE_DUMP32 right after their 0x1000-byte DUMP_HEADER32: the same fields with ULONG
TopOfStack and DataPageAddress and no ArchitectureSpecific union (0x68 bytes; the layout is a public
reconstruction of mindumpdef.h, "TRIAGE_DUMP32 ... /*0048*/ULONG TopOfStack; /*004c*/ULONG DataPageAddress",
which rizin's dmp_specs.h and dbgeng's writer, `ptdh = &NewHeader->Triage` with MEMORY_DUMP32, agree with).
Its driver list is DUMP_DRIVER_ENTRY32 (below; modules.read_driver_list reads it). Its TRIAGE_DATA_BLOCKs are not read: mindumpdef has one
TRIAGE_DATA_BLOCK with a ULONG64 Address for both widths, rizin a 12-byte 32-bit one; nothing public settles it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from dissect.cstruct import cstruct

from scripts.dumpfile.errors import BadDump, NotInDump
from scripts.dumpfile.physical import Source

TRIAGE_VALID = b"TRGD"
CONTEXT_BYTES = 0x4D0  # the x64 CONTEXT at ContextOffset

_LAYOUTS = cstruct().load("""
struct TRIAGE_DUMP64 {                  /* at 0x2000; offsets are from the start of the file */
    uint32   ServicePackBuild;          /* 0x00 */
    uint32   SizeOfDump;                /* 0x04 */
    uint32   ValidOffset;               /* 0x08 where 'TRGD' is */
    uint32   ContextOffset;             /* 0x0C */
    uint32   ExceptionOffset;           /* 0x10 */
    uint32   MmOffset;                  /* 0x14 */
    uint32   UnloadedDriversOffset;     /* 0x18 */
    uint32   PrcbOffset;                /* 0x1C */
    uint32   ProcessOffset;             /* 0x20 */
    uint32   ThreadOffset;              /* 0x24 */
    uint32   CallStackOffset;           /* 0x28 */
    uint32   SizeOfCallStack;           /* 0x2C */
    uint32   DriverListOffset;          /* 0x30 DUMP_DRIVER_ENTRY64[DriverCount] (modules.py) */
    uint32   DriverCount;               /* 0x34 */
    uint32   StringPoolOffset;          /* 0x38 */
    uint32   StringPoolSize;            /* 0x3C */
    uint32   BrokenDriverOffset;        /* 0x40 */
    uint32   TriageOptions;             /* 0x44 */
    uint64   TopOfStack;                /* 0x48 */
    char     ArchitectureSpecific[16];  /* 0x50 */
    uint64   DataPageAddress;           /* 0x60 */
    uint32   DataPageOffset;            /* 0x68 */
    uint32   DataPageSize;              /* 0x6C */
    uint32   DebuggerDataOffset;        /* 0x70 */
    uint32   DebuggerDataSize;          /* 0x74 */
    uint32   DataBlocksOffset;          /* 0x78 TRIAGE_DATA_BLOCK[DataBlocksCount] */
    uint32   DataBlocksCount;           /* 0x7C */
};

struct TRIAGE_DUMP32 {                  /* at 0x1000; offsets are from the start of the file */
    uint32   ServicePackBuild;          /* 0x00 */
    uint32   SizeOfDump;                /* 0x04 */
    uint32   ValidOffset;               /* 0x08 where 'TRGD' is */
    uint32   ContextOffset;             /* 0x0C */
    uint32   ExceptionOffset;           /* 0x10 */
    uint32   MmOffset;                  /* 0x14 */
    uint32   UnloadedDriversOffset;     /* 0x18 */
    uint32   PrcbOffset;                /* 0x1C */
    uint32   ProcessOffset;             /* 0x20 */
    uint32   ThreadOffset;              /* 0x24 */
    uint32   CallStackOffset;           /* 0x28 */
    uint32   SizeOfCallStack;           /* 0x2C */
    uint32   DriverListOffset;          /* 0x30 DUMP_DRIVER_ENTRY32[DriverCount] (modules.py) */
    uint32   DriverCount;               /* 0x34 */
    uint32   StringPoolOffset;          /* 0x38 */
    uint32   StringPoolSize;            /* 0x3C */
    uint32   BrokenDriverOffset;        /* 0x40 */
    uint32   TriageOptions;             /* 0x44 */
    uint32   TopOfStack;                /* 0x48 */
    uint32   DataPageAddress;           /* 0x4C */
    uint32   DataPageOffset;            /* 0x50 */
    uint32   DataPageSize;              /* 0x54 */
    uint32   DebuggerDataOffset;        /* 0x58 */
    uint32   DebuggerDataSize;          /* 0x5C */
    uint32   DataBlocksOffset;          /* 0x60 */
    uint32   DataBlocksCount;           /* 0x64 */
};

/* an x86 small dump's driver list entry: the name's file offset, then KLDR_DATA_TABLE_ENTRY32 in the dump's
   fixed 0x48-byte layout (packed: the public definition says "do not grow this structure as the dump files
   use a packed array" of them); field paths as modules.py's DUMP_DRIVER_ENTRY64, so one reader reads both */
struct KLDR_ENTRY_HEAD32 {
    uint32   InLoadOrderLinks[2];       /* 0x00 */
    uint32   _undefined[3];             /* 0x08 */
    uint32   NonPagedDebugInfo;         /* 0x14 */
    uint32   DllBase;                   /* 0x18 */
    uint32   EntryPoint;                /* 0x1C */
    uint32   SizeOfImage;               /* 0x20 */
};
struct KLDR_DATA_TABLE_ENTRY32 {
    KLDR_ENTRY_HEAD32 Head;             /* 0x00 */
    char     Names[16];                 /* 0x24 FullDllName, BaseDllName (UNICODE_STRING32, kernel pointers) */
    uint32   Flags;                     /* 0x34 */
    uint16   LoadCount;                 /* 0x38 */
    uint16   _undefined5;
    uint32   _undefined6;               /* 0x3C */
    uint32   CheckSum;                  /* 0x40 */
    uint32   TimeDateStamp;             /* 0x44 */
};
struct DUMP_DRIVER_ENTRY32 {            /* 0x4C bytes */
    uint32   DriverNameOffset;          /* 0x00 file offset of a DUMP_STRING */
    KLDR_DATA_TABLE_ENTRY32 LdrEntry;   /* 0x04 */
};

struct TRIAGE_DATA_BLOCK {              /* a piece of virtual memory the small dump kept */
    uint64   Address;
    uint32   Offset;                    /* in the file */
    uint32   Size;
};
""")
_DATA_BLOCK = _LAYOUTS.TRIAGE_DATA_BLOCK


def _snake(name: str) -> str:
    """TRIAGE_DUMP64's field names as TriageHeader's: SizeOfCallStack -> size_of_call_stack."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass(frozen=True)
class TriageHeader:
    service_pack_build: int
    size_of_dump: int
    valid_offset: int
    context_offset: int
    exception_offset: int
    mm_offset: int
    unloaded_drivers_offset: int
    prcb_offset: int
    process_offset: int
    thread_offset: int
    call_stack_offset: int
    size_of_call_stack: int
    driver_list_offset: int
    driver_count: int
    string_pool_offset: int
    string_pool_size: int
    broken_driver_offset: int
    triage_options: int
    top_of_stack: int
    data_page_address: int
    data_page_offset: int
    data_page_size: int
    debugger_data_offset: int
    debugger_data_size: int
    data_blocks_offset: int
    data_blocks_count: int
    NAME = "TRIAGE_DUMP64"
    SIZE = len(_LAYOUTS.TRIAGE_DUMP64)
    OFFSET = 0x2000
    DRIVER_ENTRY_SIZE = 0x90  # DUMP_DRIVER_ENTRY64
    DRIVER_ENTRY = None  # the layout of a driver list entry: None for modules.py's DUMP_DRIVER_ENTRY64
    DATA_BLOCKS = True  # whether its TRIAGE_DATA_BLOCKs are read

    @classmethod
    def parse(cls, data: bytes) -> "TriageHeader":
        if len(data) < cls.SIZE:
            raise BadDump(f"truncated: the small dump's {cls.NAME} at {cls.OFFSET:#x} is incomplete")
        layout = getattr(_LAYOUTS, cls.NAME)
        raw = layout(data)
        kept = {f.name for f in dataclasses.fields(cls)}  # all but ArchitectureSpecific
        return cls(**{_snake(name): int(raw[name]) for name in layout.fields if _snake(name) in kept})

    @property
    def minimum_file_size(self) -> int:
        return max(self.size_of_dump, self.valid_offset + 4)

    def check(self, file_size: int) -> None:
        """The structural checks a reader needs before following any offset: every offset the header
        records lies inside the file, and every region it sizes ends inside it."""
        if self.valid_offset < self.OFFSET + self.SIZE or self.valid_offset + 4 > max(self.size_of_dump, file_size):
            raise BadDump(f"corrupt: {self.NAME}.ValidOffset {self.valid_offset:#x} is outside the small dump")
        if self.driver_count > 16384:
            raise BadDump(f"corrupt: the small dump claims {self.driver_count} drivers")
        for name, offset, size in self._regions():
            if offset and (offset < self.OFFSET or offset + size > file_size):
                raise BadDump(
                    f"corrupt: the small dump's {name} ({size} bytes at {offset:#x}) lies outside the "
                    f"{file_size}-byte file"
                )
        for name, offset in self._pointers():
            if offset >= file_size:
                raise BadDump(f"corrupt: the small dump's {name} offset {offset:#x} points past the end of the "
                              f"{file_size}-byte file")

    def _regions(self) -> tuple[tuple[str, int, int], ...]:
        """(name, file offset, size) of what the header sizes and a reader may follow."""
        return (
            ("driver list", self.driver_list_offset, self.driver_count * self.DRIVER_ENTRY_SIZE),
            ("string pool", self.string_pool_offset, self.string_pool_size),
            ("call stack", self.call_stack_offset, self.size_of_call_stack),
            ("data page", self.data_page_offset, self.data_page_size),
            ("debugger data", self.debugger_data_offset, self.debugger_data_size),
        ) + ((("data block table", self.data_blocks_offset, self.data_blocks_count * len(_DATA_BLOCK)),)
             if self.DATA_BLOCKS else ())

    def _pointers(self) -> tuple[tuple[str, int], ...]:
        """(name, file offset) of the structures the header only points at."""
        return (("context", self.context_offset), ("exception", self.exception_offset), ("Mm", self.mm_offset),
                ("unloaded drivers", self.unloaded_drivers_offset), ("PRCB", self.prcb_offset),
                ("process", self.process_offset), ("thread", self.thread_offset),
                ("broken driver", self.broken_driver_offset))


@dataclass(frozen=True)
class TriageHeader32(TriageHeader):
    """TRIAGE_DUMP32 at 0x1000 of an x86 small dump (see the module docstring)."""

    NAME = "TRIAGE_DUMP32"
    SIZE = len(_LAYOUTS.TRIAGE_DUMP32)
    OFFSET = 0x1000
    DRIVER_ENTRY_SIZE = 0x4C
    DRIVER_ENTRY = _LAYOUTS.DUMP_DRIVER_ENTRY32
    DATA_BLOCKS = False


assert (TriageHeader32.SIZE, len(TriageHeader32.DRIVER_ENTRY)) == (0x68, 0x4C)


class TriageMemory:
    """The virtual memory a small dump carries: the crashing thread's stack
    ([TopOfStack - SizeOfCallStack, TopOfStack)), the data page and the TRIAGE_DATA_BLOCKs."""

    def __init__(self, source: Source, header: TriageHeader):
        self.source = source
        self.regions: list[tuple[int, int, int]] = []  # (virtual address, size, file offset)
        many = getattr(source, "read_many", None)
        if many is not None:  # what the header locates, from a range reader in one batch instead of a read each
            many([(offset, size) for _, offset, size in header._regions() if offset and size]
                 + [(header.valid_offset, 4), (header.context_offset, CONTEXT_BYTES)])
        if header.call_stack_offset and header.size_of_call_stack:
            self.regions.append((header.top_of_stack - header.size_of_call_stack, header.size_of_call_stack,
                                 header.call_stack_offset))
        if header.data_page_offset and header.data_page_size:
            self.regions.append((header.data_page_address, header.data_page_size, header.data_page_offset))
        if header.DATA_BLOCKS and header.data_blocks_offset and 0 < header.data_blocks_count <= 4096:
            raw = source.read_at(header.data_blocks_offset, len(_DATA_BLOCK) * header.data_blocks_count)
            for block in _DATA_BLOCK[len(raw) // len(_DATA_BLOCK)](raw):
                if block.Size and block.Offset + block.Size <= source.size:
                    self.regions.append((int(block.Address), int(block.Size), int(block.Offset)))

    def read(self, address: int, size: int) -> bytes:
        for start, length, offset in self.regions:
            if start <= address and address + size <= start + length:
                data = self.source.read_at(offset + address - start, size)
                if len(data) != size:
                    raise BadDump(f"truncated: the small dump's copy of {address:#x} (file offset "
                                  f"{offset + address - start:#x}) runs past the end of the file")
                return data
        raise NotInDump(address, "not in the small dump (it keeps only the stack and a few data blocks)")

    def verify_marker(self, header: TriageHeader) -> None:
        marker = self.source.read_at(header.valid_offset, 4)
        if marker != TRIAGE_VALID:
            raise BadDump(
                f"corrupt or incomplete small dump: expected the 'TRGD' end marker at {header.valid_offset:#x}, "
                f"found {marker!r}",
            )
