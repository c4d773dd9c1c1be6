"""How the dump builders store a crashed machine's memory in a file, the three ways Windows does:

- full (DumpType 1): pages follow the 0x2000-byte DUMP_HEADER64 in the order of the header's
  PHYSICAL_MEMORY_DESCRIPTOR run list (holes in physical memory take no space);
- bitmap (DumpType 5): a bitmap header ('SDMP' kernel/automatic or 'FDMP' complete) at 0x2000 with one
  bit per physical page, pages stored in bit order from FirstPage;
- small (DumpType 4): a TRIAGE_DUMP64 at 0x2000, a driver list of DUMP_DRIVER_ENTRY64 records naming
  modules through a DUMP_STRING pool, the faulting thread's stack and the 'TRGD' end marker;

and a 32-bit DUMP_HEADER32 ('PAGEDUMP') full or small dump, exact at the header level only. Files are
written sparse (only pages with content), so a 4 GiB dump costs a few hundred KiB of disk.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

from scripts.devkit.dumpkernel import (
    MACHINE_AMD64, STACK_BASE, CrashedMachine, MemoryImage, Module, exception_record, unicode_string,
)
from scripts.devkit.dumppages import PAGE
from scripts.devkit.dumpstack import StackLayout

# DumpType values (mindumpdef.h DUMP_TYPES)
DUMP_TYPE_FULL = 1
DUMP_TYPE_TRIAGE = 4
DUMP_TYPE_BITMAP_FULL = 5
DUMP_TYPE_BITMAP_KERNEL = 6

MACHINE_I386 = 0x014C
ATTRIBUTE_ENCRYPTED = 1 << 8  # DUMP_FILE_ATTRIBUTES.EncryptedDumpData

_FILETIME_EPOCH = _dt.datetime(1601, 1, 1, tzinfo=_dt.timezone.utc)


@dataclass(frozen=True)
class BuiltDump:
    """What a builder wrote: enough to assert on without re-parsing the file."""

    path: Path
    kind: str  # "full" | "bitmap-kernel" | "bitmap-complete" | "triage" | "x86-full" | "x86-triage"
    dump_type: int
    file_size: int
    memory_size: int
    bugcheck_code: int
    bugcheck_parameters: tuple[int, int, int, int]
    exception_code: int
    faulting_address: int
    faulting_module: Module | None
    modules: tuple[Module, ...]
    processors: int
    system_time: _dt.datetime
    machine: int = MACHINE_AMD64
    directory_table_base: int = 0
    ps_loaded_module_list: int = 0
    encrypted: bool = False
    # Virtual addresses whose page is in the dump, each with the 16 bytes the builder put there; they cover
    # 4 KiB, 2 MiB and 1 GiB mappings, list entries, names and the stack (for agreement tests).
    probes: dict[int, bytes] = field(default_factory=dict)
    # Canonical kernel addresses that are not mapped at all (translation must fail).
    unmapped: tuple[int, ...] = ()
    stack: StackLayout | None = None  # what a laid-out stack's frames really hold (dumpstack.py)

    @property
    def faulting_offset(self) -> int:
        assert self.faulting_module is not None
        return self.faulting_address - self.faulting_module.base

    @property
    def faulting_symbol(self) -> str:
        """How WinDbg and `triage` print the fault: `contosoflt.sys+0x1a2b`."""
        assert self.faulting_module is not None
        return f"{self.faulting_module.name}+{self.faulting_offset:#x}"


def _filetime(moment: _dt.datetime) -> int:
    return int((moment - _FILETIME_EPOCH).total_seconds() * 10_000_000)


def _header64(machine: CrashedMachine, dump_type: int, dtb: int, head: int, params, required: int,
              context: bytes | None = None) -> bytearray:
    """DUMP_HEADER64 (0x2000 bytes). Windows fills the buffer with 'PAGE' before setting fields, so
    fields a dump type does not use keep that pattern."""
    h = bytearray(b"PAGE" * (0x2000 // 4))
    struct.pack_into("<4s4sII", h, 0x00, b"PAGE", b"DU64", 0xF, machine.build)
    struct.pack_into("<QQQQ", h, 0x10, dtb, 0xFFFFE70000000000, head, 0xFFFFF8041D3C8A60)
    struct.pack_into("<III", h, 0x30, MACHINE_AMD64, machine.processors, machine.bugcheck_code)
    struct.pack_into("<I", h, 0x3C, 0)
    struct.pack_into("<4Q", h, 0x40, *params)
    h[0x60:0x80] = bytes(32)  # VersionUser
    struct.pack_into("<Q", h, 0x80, 0xFFFFF8041D200B20)  # KdDebuggerDataBlock
    # ContextRecord (CONTEXT at 0x348): zeroed, MxCsr and its FXSAVE copy equal, Rip/Rsp plausible
    h[0x348:0x348 + 3000] = bytes(3000)
    struct.pack_into("<II", h, 0x348 + 0x30, 0x10001F, 0x1F80)  # ContextFlags, MxCsr
    struct.pack_into("<HHHHHHI", h, 0x348 + 0x38, 0x10, 0x2B, 0x2B, 0x53, 0x2B, 0x18, 0x40246)
    struct.pack_into("<Q", h, 0x348 + 0x98, STACK_BASE + 0x2400)  # Rsp
    struct.pack_into("<Q", h, 0x348 + 0xF8, machine.modules[0].base + 0x3F6A20)  # Rip: KeBugCheckEx
    struct.pack_into("<I", h, 0x348 + 0x118, 0x1F80)  # MxCsr in the FXSAVE area
    if context is not None:  # the innermost frame of a laid-out stack (dumpstack.py)
        h[0x348:0x348 + len(context)] = context
    # Exception (EXCEPTION_RECORD64 at 0xF00): KeBugCheckEx's own breakpoint
    h[0xF00:0xF98] = exception_record(0x80000003, machine.modules[0].base + 0x3F6A20, False, 0)[:0x98]
    struct.pack_into("<II", h, 0xF98, dump_type, 0)
    struct.pack_into("<qq", h, 0xFA0, required, _filetime(machine.system_time))
    h[0xFB0:0x1030] = bytes(128)  # Comment
    struct.pack_into("<qIIIII", h, 0x1030, 1234567 * 10_000_000, 0, 0, 3, 0x110, 0)
    struct.pack_into("<BB2sII", h, 0x104C, 0, 0x29, b"\0\0", ATTRIBUTE_ENCRYPTED if machine.encrypted else 0, 0x2A)
    return h


def write_memory_dump(machine: CrashedMachine, path: Path, kind: str) -> BuiltDump:
    """The machine's memory as a full ("full"), bitmap ("bitmap-kernel", "bitmap-complete") or small
    ("triage") dump at `path`."""
    image = machine.image()
    phys, space, head, params = image.physical, image.space, image.module_list_head, image.parameters
    dtb = (space.pml4 << 12) | 0x002  # PCID bits in CR3 must be ignored by readers
    if kind == "triage":
        return _write_triage(machine, path, image, dtb)

    if kind == "full":
        runs = phys.runs
        total = sum(count for _, count in runs)
        data_start = 0x2000
        file_size = data_start + total * PAGE
        header = _header64(machine, DUMP_TYPE_FULL, dtb, head, params, file_size, image.header_context)
        struct.pack_into("<IIQ", header, 0x88, len(runs), 0, total)
        for i, (base, count) in enumerate(runs):
            struct.pack_into("<QQ", header, 0x98 + 16 * i, base, count)
        present = runs
        prefix = b""
        dump_type = DUMP_TYPE_FULL
    else:
        complete = kind == "bitmap-complete"
        present = phys.runs if complete else _runs_of(sorted(phys.pages))
        total = sum(count for _, count in present)
        max_pfn = max(base + count for base, count in phys.runs)
        bits = -(-max_pfn // 64) * 64
        bitmap = _bitmap(present, bits)
        first_page = -(-(0x2038 + len(bitmap)) // PAGE) * PAGE
        file_size = first_page + total * PAGE
        header = _header64(machine, DUMP_TYPE_BITMAP_FULL, dtb, head, params, file_size, image.header_context)
        prefix = (b"FDMP" if complete else b"SDMP") + b"DUMP" + bytes(0x18)
        prefix += struct.pack("<QQQ", first_page, total, bits) + bitmap
        prefix += bytes(first_page - 0x2000 - len(prefix))
        data_start = first_page
        dump_type = DUMP_TYPE_BITMAP_FULL

    index = _RunIndex(present)
    scramble = random.Random(machine.seed + 1)
    with open(path, "wb") as out:
        out.write(bytes(header))
        out.write(prefix)
        for pfn in sorted(phys.pages):
            slot = index.slot(pfn)
            if slot is None:  # page outside the dump (not RAM, or not in a kernel dump)
                continue
            out.seek(data_start + slot * PAGE)
            out.write(scramble.randbytes(PAGE) if machine.encrypted else bytes(phys.pages[pfn]))
        out.truncate(file_size)
    return BuiltDump(
        path=path, kind=kind, dump_type=dump_type, file_size=file_size, memory_size=machine.memory_size,
        bugcheck_code=machine.bugcheck_code, bugcheck_parameters=params, exception_code=machine.exception_code,
        faulting_address=image.faulting_address, faulting_module=image.faulting_module, modules=tuple(machine.modules),
        processors=machine.processors, system_time=machine.system_time, directory_table_base=dtb,
        ps_loaded_module_list=head, encrypted=machine.encrypted, probes=image.probes, unmapped=image.unmapped,
        stack=image.stack,
    )


def _write_triage(machine: CrashedMachine, path: Path, image: MemoryImage, dtb: int) -> BuiltDump:
    """TRIAGE_DUMP64 at 0x2000 followed by its sections; every offset is from the start of the file."""
    mem, head, params = image.memory, image.module_list_head, image.parameters
    fault_module, fault_address = image.faulting_module, image.faulting_address
    body = bytearray()

    def place(data: bytes, align: int = 16) -> int:
        nonlocal body
        pad = (-(0x2080 + len(body))) % align
        body += bytes(pad)
        at = 0x2080 + len(body)
        body += data
        return at

    mm = place(struct.pack("<IIIIII7Q", 1, 0x48, 0, 0, 0, 0, *(0,) * 7))
    unloaded = place(struct.pack("<I", 0) + bytes(4))
    prcb = place(bytes(0x700), PAGE // 4)
    process = place(bytes(0xA40))
    thread = place(bytes(0x800))
    # the stack: [TopOfStack - size, TopOfStack) holds the exception record parameter 3 points at
    top_of_stack = STACK_BASE + 0x6000
    stack_low = STACK_BASE + 0x2000
    stack = mem.read(stack_low, top_of_stack - stack_low)
    call_stack = place(stack)
    # string pool: DUMP_STRING = ULONG length in characters, UTF-16 text, a terminating NUL
    pool_start = None
    name_offsets = []
    pool = bytearray()
    for i, module in enumerate(machine.modules):
        text = module.full_name if i % 3 == 1 else module.name  # some full paths, as real dumps have
        name_offsets.append(len(pool))
        pool += struct.pack("<I", len(text)) + text.encode("utf-16-le") + b"\0\0"
        pool += bytes((-len(pool)) % 8)
    entries = bytearray()
    driver_list_size = 0x90 * len(machine.modules)
    driver_list = place(bytes(driver_list_size), 8)
    pool_start = place(bytes(pool), 8)
    for i, module in enumerate(machine.modules):
        # DUMP_DRIVER_ENTRY64: DriverNameOffset, alignment, then KLDR_DATA_TABLE_ENTRY64 (dump layout)
        e = bytearray(0x90)
        struct.pack_into("<I", e, 0, pool_start + name_offsets[i])
        struct.pack_into("<QQ", e, 0x08, 0, 0)  # list links are not meaningful in a triage dump
        struct.pack_into("<QQI", e, 0x08 + 0x30, module.base, module.base + 0x1010, module.size)
        e[0x08 + 0x48:0x08 + 0x58] = unicode_string(module.full_name, 0)
        e[0x08 + 0x58:0x08 + 0x68] = unicode_string(module.name, 0)
        struct.pack_into("<IHH", e, 0x08 + 0x68, 0x49104000, 1, 0)
        struct.pack_into("<I", e, 0x08 + 0x78, module.timestamp ^ 0x5A5A)  # CheckSum
        struct.pack_into("<I", e, 0x08 + 0x80, module.timestamp)  # TimeDateStamp
        entries += e
    body[driver_list - 0x2080:driver_list - 0x2080 + driver_list_size] = entries
    debugger_data = place(bytes(0x368), 8)
    # TRGD at ValidOffset closes the dump
    size = 0x2080 + len(body) + 4
    size = -(-size // PAGE) * PAGE
    body += bytes(size - 4 - (0x2080 + len(body)))
    valid = 0x2080 + len(body)
    body += b"TRGD"
    triage = struct.pack(
        "<18IQ16sQIIIIII",
        0x1000, size, valid, 0x348, 0xF00, mm, unloaded, prcb, process, thread, call_stack, len(stack),
        driver_list, len(machine.modules), pool_start, len(pool), 0, 0x6F,
        top_of_stack, bytes(16), 0, 0, 0, debugger_data, 0x368, 0, 0,
    )
    assert len(triage) == 0x80, len(triage)
    header = _header64(machine, DUMP_TYPE_TRIAGE, dtb, head, params, size, image.header_context)
    data = bytes(header) + triage + bytes(body)
    assert len(data) == size
    if machine.encrypted:
        data = data[:0x2000] + random.Random(machine.seed + 1).randbytes(size - 0x2000)
    path.write_bytes(data)
    return BuiltDump(
        path=path, kind="triage", dump_type=DUMP_TYPE_TRIAGE, file_size=size, memory_size=machine.memory_size,
        bugcheck_code=machine.bugcheck_code, bugcheck_parameters=params, exception_code=machine.exception_code,
        faulting_address=fault_address, faulting_module=fault_module, modules=tuple(machine.modules),
        processors=machine.processors, system_time=machine.system_time, directory_table_base=dtb,
        ps_loaded_module_list=head, encrypted=machine.encrypted, stack=image.stack,
    )


def write_x86_dump(machine: CrashedMachine, path: Path, triage: bool) -> BuiltDump:
    """DUMP_HEADER32 (0x1000 bytes, 4-byte packing): DumpType at 0xF88, RequiredDumpSpace at 0xFA0,
    SystemTime at 0xFC0, run list at 0x64 with 32-bit entries; memory follows at 0x1000."""
    fault_module, fault_address = machine.fault()
    fault_address &= 0xFFFFFFFF
    params = tuple(p & 0xFFFFFFFF for p in machine.parameters(fault_address))
    runs = [(0x1, 0x9F), (0x100, 0x1F00)]
    total = sum(c for _, c in runs)
    size = 0x1000 + (0x10000 if triage else total * PAGE)
    h = bytearray(b"PAGE" * (0x1000 // 4))
    struct.pack_into("<4s4sIIIIIIIII", h, 0, b"PAGE", b"DUMP", 0xF, machine.build, 0x185000, 0x82F7A000,
                     0x8297CE10, 0x82983F18, MACHINE_I386, machine.processors, machine.bugcheck_code)
    struct.pack_into("<4I", h, 0x2C, *params)
    h[0x3C:0x5C] = bytes(32)
    struct.pack_into("<BB2sI", h, 0x5C, 1, 0x29, b"\0\0", 0x82976C28)  # PaeEnabled, ..., KdDebuggerDataBlock
    if not triage:
        struct.pack_into("<II", h, 0x64, len(runs), total)
        for i, (base, count) in enumerate(runs):
            struct.pack_into("<II", h, 0x6C + 8 * i, base, count)
    h[0x320:0x320 + 1200] = bytes(1200)
    struct.pack_into("<IIIII", h, 0x7D0, 0x80000003, 0, 0, 0x82A1B3C4, 0)
    h[0x820:0x8A0] = bytes(128)
    struct.pack_into("<II", h, 0x8A0, ATTRIBUTE_ENCRYPTED if machine.encrypted else 0, 0)
    struct.pack_into("<IIIIII", h, 0xF88, DUMP_TYPE_TRIAGE if triage else DUMP_TYPE_FULL, 0, 0, 1, 0x100, 0)
    struct.pack_into("<q", h, 0xFA0, size)
    h[0xFA8:0xFB8] = bytes(16)
    struct.pack_into("<qq", h, 0xFB8, 987654 * 10_000_000, _filetime(machine.system_time))
    with open(path, "wb") as out:
        out.write(bytes(h))
        if triage:
            body = bytearray(0x10000)
            struct.pack_into("<III", body, 0, 0x1000, size, size - 4)
            body[-4:] = b"TRGD"
            out.write(bytes(body))
        out.truncate(size)
    return BuiltDump(
        path=path, kind="x86-triage" if triage else "x86-full",
        dump_type=DUMP_TYPE_TRIAGE if triage else DUMP_TYPE_FULL, file_size=size,
        memory_size=total * PAGE, bugcheck_code=machine.bugcheck_code, bugcheck_parameters=params,  # type: ignore[arg-type]
        exception_code=machine.exception_code, faulting_address=fault_address, faulting_module=None,
        modules=(), processors=machine.processors, system_time=machine.system_time, machine=MACHINE_I386,
        directory_table_base=0x185000, encrypted=machine.encrypted,
    )


def _runs_of(pfns: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for pfn in pfns:
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pfn, 1))
    return runs


def _bitmap(runs: list[tuple[int, int]], bits: int) -> bytes:
    """One bit per PFN, least significant bit first (RTL_BITMAP), whole bytes filled at once."""
    out = bytearray(bits // 8)
    for base, count in runs:
        start, end = base, base + count
        while start < end and start % 8:
            out[start // 8] |= 1 << (start % 8)
            start += 1
        full = (end - start) // 8
        out[start // 8:start // 8 + full] = b"\xff" * full
        start += full * 8
        while start < end:
            out[start // 8] |= 1 << (start % 8)
            start += 1
    return bytes(out)


class _RunIndex:
    """PFN -> index of its page among the dump's pages (the order both layouts store them in)."""

    def __init__(self, runs: list[tuple[int, int]]):
        self.runs = sorted(runs)
        self.before = []
        total = 0
        for _, count in self.runs:
            self.before.append(total)
            total += count

    def slot(self, pfn: int) -> int | None:
        i = bisect.bisect_right([b for b, _ in self.runs], pfn) - 1
        if i < 0:
            return None
        base, count = self.runs[i]
        return self.before[i] + pfn - base if pfn < base + count else None
