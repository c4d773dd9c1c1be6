"""Writes 32-bit (x86) Windows kernel crash dumps with real page tables and a real module list.

`build_x86_memory_dump` lays out what a 32-bit kernel leaves in a complete memory dump (DumpType 1):
a DUMP_HEADER32 ('PAGEDUMP', 0x1000 bytes, 4-byte packing) whose run list says where each physical page
is, x86 page tables of either kind the header's PaeEnabled byte names -

- non-PAE: CR3 -> a page directory of 1024 4-byte PDEs -> page tables of 1024 4-byte PTEs, with
  ntoskrnl.exe on 4 MiB pages (PDE.PS);
- PAE: CR3 -> a 32-byte page-directory-pointer table of 4 8-byte PDPTEs -> page directories and page
  tables of 512 8-byte entries, ntoskrnl.exe on 2 MiB pages, NX set on data pages and the faulting
  driver's code page above 4 GiB (PAE's 36-bit physical addresses) -

a PsLoadedModuleList of x86 KLDR_DATA_TABLE_ENTRY records (4-byte pointers, UNICODE_STRING names in pool
pages, TimeDateStamp at +0x58), a PE32 header at each DllBase, and a stop 0x7E whose faulting address
falls inside a named driver. The offsets are written down from the public headers (mindumpdef.h, the PE
specification, the Intel SDM's paging chapter), not taken from crashcart's reader. Files are sparse.

`build_x86_bitmap_dump` writes the same machine as a kernel bitmap dump (DumpType 5, 'SDMP'): after the
DUMP_HEADER32, at 0x1000, the 0x38-byte summary header volatility3 reads for 32-bit dumps (crash_common.json
_SUMMARY_DUMP: 'SDMP', 'DUMP', DumpOptions at 0x08, HeaderSize at 0x20 = file offset of the first page, Pages
at 0x28 = pages stored, BitmapSize at 0x30 = bits), the bitmap (bit N = PFN N), then only the pages the kernel
used, in PFN order: the rest of RAM is left out, as a kernel dump leaves out user memory.

`build_x86_small_dump` writes the machine's small memory dump (DumpType 4): DUMP_HEADER32, a TRIAGE_DUMP32 at
0x1000 (mindumpdef.h: ULONG fields, DriverListOffset at 0x30, TopOfStack at 0x48, 0x68 bytes), the driver list
as DUMP_DRIVER_ENTRY32 records (ULONG DriverNameOffset + the 0x48-byte KLDR_DATA_TABLE_ENTRY32: DllBase
+0x18, SizeOfImage +0x20, TimeDateStamp +0x44; 0x4C bytes, packed), DUMP_STRING names (ULONG length in
characters, UTF-16LE, NUL), a page of the crashing thread's stack and 'TRGD' in the last 4 bytes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import random
import struct
from dataclasses import dataclass
from pathlib import Path

from scripts.devkit.dumpkernel import DEFAULT_TIME, Module
from scripts.devkit.dumpwriters import DUMP_TYPE_BITMAP_FULL, DUMP_TYPE_FULL, DUMP_TYPE_TRIAGE, MACHINE_I386, BuiltDump

PAGE = 0x1000
MiB = 1 << 20
_P, _RW, _A, _D, _PS = 0x1, 0x2, 0x20, 0x40, 0x80
_NX = 1 << 63  # PAE only
HIGH_RAM_PFN = 0x100000  # physical 4 GiB: reachable only through PAE
POOL = 0x8A400000  # "nonpaged pool" of the synthetic kernel
_FILETIME_EPOCH = _dt.datetime(1601, 1, 1, tzinfo=_dt.timezone.utc)

DEFAULT_MODULES_X86: tuple[Module, ...] = (
    Module("ntoskrnl.exe", 0x82000000, 0x00600000, 0x5B7E2A11),
    Module("hal.dll", 0x81C3A000, 0x00036000, 0x3E8C1A52),
    Module("CLFS.SYS", 0x8A81F000, 0x00051000, 0x9B2F4A05),
    Module("Ntfs.sys", 0x8AA2B000, 0x001B6000, 0x4E6F0A19),
    Module("contosoflt.sys", 0x8F3A0000, 0x00012000, 0x65A1F3C9,
           "\\??\\C:\\Program Files\\Contoso\\Agent\\contosoflt.sys"),
    Module("tcpip.sys", 0x8F3C0000, 0x0021A000, 0x0D4B8C66),
)


class _Machine:
    """Physical memory (scattered frames) and x86 page tables of either kind, built in its own pages."""

    def __init__(self, pae: bool, ram_pages: int, high_pages: int, seed: int):
        self.pae = pae
        self.rng = random.Random(seed)
        self.runs = [(0x1, 0x9F), (0x100, ram_pages - 0x100)] + ([(HIGH_RAM_PFN, high_pages)] if high_pages else [])
        self.pages: dict[int, bytearray] = {}
        self.reserved: set[int] = set()
        self.mapped: dict[int, int] = {}  # va page -> physical address
        self.large: list[tuple[int, int, int]] = []
        if pae:  # the PDPT: 4 entries, 32-byte aligned; put at offset 0x40 of its page to prove the alignment use
            self.pdpt = (self.alloc() << 12) + 0x40
            self.cr3 = self.pdpt
        else:
            self.cr3 = self.alloc() << 12

    def alloc(self, high: bool = False) -> int:
        runs = [r for r in self.runs if (r[0] >= HIGH_RAM_PFN) == high and r[0] != 0x1]
        for _ in range(10_000):
            base, count = self.rng.choice(runs)
            pfn = base + self.rng.randrange(count)
            if pfn not in self.pages and pfn not in self.reserved:
                self.pages[pfn] = bytearray(PAGE)
                return pfn
        raise RuntimeError("the synthetic x86 machine ran out of physical memory")

    def _word(self, pa: int, size: int) -> int:
        return int.from_bytes(self.pages[pa >> 12][pa & 0xFFF:(pa & 0xFFF) + size], "little")

    def _set(self, pa: int, size: int, value: int) -> None:
        self.pages.setdefault(pa >> 12, bytearray(PAGE))[pa & 0xFFF:(pa & 0xFFF) + size] = value.to_bytes(size, "little")

    def _table(self, entry_pa: int, size: int) -> int:
        """The table an entry points to, created (and the entry written) if it is not there yet."""
        entry = self._word(entry_pa, size)
        if entry & _P:
            return entry & 0x000F_FFFF_FFFF_F000
        child = self.alloc() << 12
        self._set(entry_pa, size, child | (_P if size == 8 and entry_pa - self.cr3 < 32 else _P | _RW | _A | _D))
        return child

    def map_4k(self, va: int, pfn: int, nx: bool = True) -> None:
        if self.pae:
            pd = self._table(self.pdpt + (va >> 30) * 8, 8)
            pt = self._table(pd + ((va >> 21) & 0x1FF) * 8, 8)
            self._set(pt + ((va >> 12) & 0x1FF) * 8, 8, (pfn << 12) | _P | _RW | _A | _D | (_NX if nx else 0))
        else:
            pt = self._table(self.cr3 + (va >> 22) * 4, 4)
            self._set(pt + ((va >> 12) & 0x3FF) * 4, 4, (pfn << 12) | _P | _RW | _A | _D)
        self.mapped[va & ~0xFFF] = pfn << 12

    def map_large(self, va: int, pa: int) -> None:
        """A 4 MiB page (non-PAE) or a 2 MiB page (PAE)."""
        if self.pae:
            pd = self._table(self.pdpt + (va >> 30) * 8, 8)
            self._set(pd + ((va >> 21) & 0x1FF) * 8, 8, pa | _P | _RW | _A | _D | _PS)
        else:
            self._set(self.cr3 + (va >> 22) * 4, 4, pa | _P | _RW | _A | _D | _PS)

    def pa(self, va: int) -> int:
        if va & ~0xFFF in self.mapped:
            return self.mapped[va & ~0xFFF] | (va & 0xFFF)
        for base, size, pa in self.large:
            if base <= va < base + size:
                return pa + va - base
        raise KeyError(f"{va:#x} is not mapped")

    def write(self, va: int, data: bytes) -> None:
        while data:
            pa = self.pa(va)
            chunk = min(len(data), PAGE - (pa & 0xFFF))
            self.pages.setdefault(pa >> 12, bytearray(PAGE))[pa & 0xFFF:(pa & 0xFFF) + chunk] = data[:chunk]
            va, data = va + chunk, data[chunk:]


@dataclass
class X86Crash:
    """The 32-bit machine that crashed (see the module docstring); every option has a working default."""

    pae: bool = True
    modules: tuple[Module, ...] = DEFAULT_MODULES_X86
    faulting_module: str = "contosoflt.sys"
    fault_offset: int = 0x1A2B
    bugcheck_code: int = 0x7E
    memory_size: int = 32 * MiB
    processors: int = 2
    build: int = 19041
    system_time: _dt.datetime = DEFAULT_TIME
    seed: int = 11

    def build_image(self) -> tuple[_Machine, int, int, Module]:
        """(machine, PsLoadedModuleList, faulting address, faulting module)."""
        high = 0x1000 if self.pae else 0  # 16 MiB of RAM above 4 GiB, for the PAE dump
        m = _Machine(self.pae, self.memory_size // PAGE, high, self.seed)
        rng = random.Random(self.seed)
        ntos = self.modules[0]
        large = 2 * MiB if self.pae else 4 * MiB
        ntos_pa = 8 * MiB  # large-page aligned for both kinds, physically contiguous
        m.reserved.update(range(ntos_pa >> 12, (ntos_pa + ntos.size + large) >> 12))
        for offset in range(0, -(-ntos.size // large) * large, large):
            m.map_large(ntos.base + offset, ntos_pa + offset)
        m.large.append((ntos.base, -(-ntos.size // large) * large, ntos_pa))
        flt = next(mod for mod in self.modules if mod.name == self.faulting_module)
        fault = flt.base + self.fault_offset
        for module in self.modules[1:]:
            m.map_4k(module.base, m.alloc(), nx=False)
            if module is flt and fault & ~0xFFF != module.base:
                m.map_4k(fault & ~0xFFF, m.alloc(high=self.pae), nx=False)  # above 4 GiB with PAE
                m.write(fault & ~0xFFF, rng.randbytes(PAGE))
        for module in self.modules:
            m.write(module.base, _pe32_header(module, rng))
        head = ntos.base + 0x1A3C40
        entries = [POOL + 0x1000 * (1 + i) + 0x80 + 0x10 * i for i in range(len(self.modules))]
        names_va = POOL + 0x1000 * (len(self.modules) + 2)
        for va in sorted({e & ~0xFFF for e in entries} | {names_va + PAGE * i for i in range(2)}):
            m.map_4k(va, m.alloc())
        cursor = names_va
        for i, module in enumerate(self.modules):
            full, base = module.full_name.encode("utf-16-le"), module.name.encode("utf-16-le")
            full_va, base_va = cursor, cursor + len(full) + 2
            cursor = (base_va + len(base) + 2 + 7) // 8 * 8
            m.write(full_va, full + b"\0\0")
            m.write(base_va, base + b"\0\0")
            flink = entries[i + 1] if i + 1 < len(entries) else head
            blink = entries[i - 1] if i else head
            m.write(entries[i], _kldr_entry32(module, flink, blink, (len(full), full_va), (len(base), base_va)))
        m.write(head, struct.pack("<II", entries[0], entries[-1]))
        return m, head, fault, flt

    def write(self, path: Path) -> BuiltDump:
        m, head, fault, flt = self.build_image()
        runs = m.runs
        total = sum(count for _, count in runs)
        size = PAGE + total * PAGE
        params = (0xC0000005, fault, 0x8C1F3A28, 0x8C1F3B40)
        header = _header32(self, m.cr3, head, params, runs, size, DUMP_TYPE_FULL)
        slot, before = {}, 0
        for base, count in runs:
            slot[base] = before
            before += count
        with open(path, "wb") as out:
            out.write(header)
            for pfn in sorted(m.pages):
                run = next((b for b, c in runs if b <= pfn < b + c), None)
                if run is None:
                    continue
                out.seek(PAGE + (slot[run] + pfn - run) * PAGE)
                out.write(bytes(m.pages[pfn]))
            out.truncate(size)
        return self._built(path, m, head, fault, flt, params, "x86-full", DUMP_TYPE_FULL, size, total * PAGE)

    def write_bitmap(self, path: Path) -> BuiltDump:
        """The kernel bitmap dump: BITMAP_DUMP32 at 0x1000, the bitmap, then the used pages in PFN order."""
        m, head, fault, flt = self.build_image()
        params = (0xC0000005, fault, 0x8C1F3A28, 0x8C1F3B40)
        bits = max(base + count for base, count in m.runs)
        stored = sorted(m.pages)
        bitmap = bytearray((bits + 7) // 8)
        for pfn in stored:
            bitmap[pfn >> 3] |= 1 << (pfn & 7)
        first = -(-(2 * PAGE + 0x38 + len(bitmap)) // PAGE) * PAGE
        size = first + len(stored) * PAGE
        summary = bytearray(b"PAGE" * (0x38 // 4 + 2))[:0x38]
        struct.pack_into("<4s4sI", summary, 0x00, b"SDMP", b"DUMP", 0)  # Signature, ValidDump, DumpOptions
        struct.pack_into("<QQQ", summary, 0x20, first, len(stored), bits)  # HeaderSize, Pages, BitmapSize
        with open(path, "wb") as out:
            out.write(_header32(self, m.cr3, head, params, m.runs, size, DUMP_TYPE_BITMAP_FULL))
            out.write(bytes(summary) + bytes(bitmap))
            out.seek(first)
            for pfn in stored:
                out.write(bytes(m.pages[pfn]))
        return self._built(path, m, head, fault, flt, params, "x86-bitmap", DUMP_TYPE_BITMAP_FULL, size,
                           len(stored) * PAGE)

    def write_small(self, path: Path) -> BuiltDump:
        """The small dump: TRIAGE_DUMP32 at 0x1000, the driver list, its names, a stack page, 'TRGD'."""
        m, head, fault, flt = self.build_image()
        params = (0xC0000005, fault, 0x8C1F3A28, 0x8C1F3B40)
        size, top = 0x10000, 0x8C1F4000
        body = bytearray(size - PAGE)  # the file from 0x1000 on
        drivers = PAGE + 0x68
        pool = drivers + len(self.modules) * 0x4C
        cursor = pool
        for i, module in enumerate(self.modules):
            name = module.full_name.encode("utf-16-le")
            entry = drivers + i * 0x4C - PAGE
            struct.pack_into("<I", body, entry, cursor)  # DriverNameOffset
            struct.pack_into("<III", body, entry + 4 + 0x18, module.base, module.base + 0x1010, module.size)
            struct.pack_into("<I", body, entry + 4 + 0x44, module.timestamp)  # TimeDateStamp
            struct.pack_into("<I", body, cursor - PAGE, len(name) // 2)
            body[cursor - PAGE + 4:cursor - PAGE + 4 + len(name)] = name  # the NUL is already there
            cursor = (cursor + 4 + len(name) + 2 + 7) // 8 * 8
        stack = (cursor + PAGE - 1) // PAGE * PAGE
        body[stack - PAGE:stack] = random.Random(self.seed).randbytes(PAGE)
        struct.pack_into("<19I", body, 0, 0, size, size - 4, 0x320, 0x7D0, 0, 0, 0, 0, 0, stack, PAGE, drivers,
                         len(self.modules), pool, cursor - pool, 0, 0, top)
        body[-4:] = b"TRGD"
        with open(path, "wb") as out:
            out.write(_header32(self, m.cr3, head, params, m.runs, size, DUMP_TYPE_TRIAGE))
            out.write(bytes(body))
        built = self._built(path, m, head, fault, flt, params, "x86-triage", DUMP_TYPE_TRIAGE, size, 0)
        stack_probe = {top - PAGE: bytes(body[stack - PAGE:stack - PAGE + 16])}
        return dataclasses.replace(built, probes=stack_probe)

    def _built(self, path, m, head, fault, flt, params, kind, dump_type, size, memory) -> BuiltDump:
        return BuiltDump(
            path=path, kind=kind, dump_type=dump_type, file_size=size, memory_size=memory,
            bugcheck_code=self.bugcheck_code, bugcheck_parameters=params, exception_code=0xC0000005,
            faulting_address=fault, faulting_module=flt, modules=tuple(self.modules), processors=self.processors,
            system_time=self.system_time, machine=MACHINE_I386, directory_table_base=m.cr3,
            ps_loaded_module_list=head, probes={va: bytes(_read(m, va, 16)) for va in (fault, flt.base, head)},
        )


def build_x86_memory_dump(path: str | Path, **options) -> BuiltDump:
    """A 32-bit complete memory dump with page tables (PAE by default; pae=False for two-level tables)."""
    return X86Crash(**options).write(Path(path))


def build_x86_small_dump(path: str | Path, **options) -> BuiltDump:
    """The same 32-bit machine's small memory dump (DumpType 4, TRIAGE_DUMP32 and DUMP_DRIVER_ENTRY32)."""
    return X86Crash(**options).write_small(Path(path))


def build_x86_bitmap_dump(path: str | Path, **options) -> BuiltDump:
    """The same 32-bit machine as a kernel bitmap dump (DumpType 5, 'SDMP' summary header at 0x1000)."""
    return X86Crash(**options).write_bitmap(Path(path))


def _read(m: _Machine, va: int, size: int) -> bytes:
    pa = m.pa(va)
    return bytes(m.pages.get(pa >> 12, bytearray(PAGE))[pa & 0xFFF:(pa & 0xFFF) + size])


def _pe32_header(module: Module, rng: random.Random) -> bytes:
    """DOS header, 'PE\\0\\0', IMAGE_FILE_HEADER (i386, TimeDateStamp at +8) and IMAGE_OPTIONAL_HEADER32
    (magic 0x10B, SizeOfImage at +0x38) with no data directories."""
    page = bytearray(rng.randbytes(PAGE))
    page[0:0x40] = bytes(0x40)
    page[0:2] = b"MZ"
    struct.pack_into("<I", page, 0x3C, 0xE8)
    struct.pack_into("<4sHHIIIHH", page, 0xE8, b"PE\0\0", MACHINE_I386, 0, module.timestamp, 0, 0, 0xE0, 0x2102)
    optional = 0xE8 + 24
    page[optional:optional + 0xE0] = bytes(0xE0)
    struct.pack_into("<H", page, optional, 0x10B)
    struct.pack_into("<I", page, optional + 0x38, module.size)
    struct.pack_into("<I", page, optional + 0x3C, 0x400)  # SizeOfHeaders
    return bytes(page)


def _kldr_entry32(module: Module, flink: int, blink: int, full: tuple[int, int], base: tuple[int, int]) -> bytes:
    """KLDR_DATA_TABLE_ENTRY of a 32-bit Windows 10 kernel (0x5C bytes used)."""
    entry = bytearray(0x60)
    struct.pack_into("<II", entry, 0x00, flink, blink)  # InLoadOrderLinks
    struct.pack_into("<III", entry, 0x18, module.base, module.base + 0x1010, module.size)  # DllBase, EntryPoint, Size
    struct.pack_into("<HHI", entry, 0x24, full[0], full[0] + 2, full[1])  # FullDllName
    struct.pack_into("<HHI", entry, 0x2C, base[0], base[0] + 2, base[1])  # BaseDllName
    struct.pack_into("<I", entry, 0x34, 0x49104000)  # Flags
    struct.pack_into("<I", entry, 0x58, module.timestamp)  # TimeDateStamp
    return bytes(entry)


def _header32(crash: X86Crash, cr3: int, head: int, params, runs, size: int, dump_type: int) -> bytes:
    """DUMP_HEADER32: fields at their mindumpdef.h offsets, the rest keeps Windows' 'PAGE' fill."""
    h = bytearray(b"PAGE" * (PAGE // 4))
    struct.pack_into("<4s4sIIIIIIIII", h, 0, b"PAGE", b"DUMP", 0xF, crash.build, cr3, 0x84000000, head,
                     0x821A1F18, MACHINE_I386, crash.processors, crash.bugcheck_code)
    struct.pack_into("<4I", h, 0x2C, *params)
    h[0x3C:0x5C] = bytes(32)
    struct.pack_into("<BB2sI", h, 0x5C, 1 if crash.pae else 0, 0x29, b"\0\0", 0x82176C28)
    struct.pack_into("<II", h, 0x64, len(runs), sum(c for _, c in runs))
    for i, (base, count) in enumerate(runs):
        struct.pack_into("<II", h, 0x6C + 8 * i, base, count)
    h[0x320:0x320 + 1200] = bytes(1200)
    struct.pack_into("<IIIII", h, 0x7D0, 0x80000003, 0, 0, crash.modules[0].base + 0x14A3C4, 0)
    h[0x820:0x8A0] = bytes(128)
    struct.pack_into("<II", h, 0x8A0, 0, 0)  # Attributes, BootId
    struct.pack_into("<IIIIII", h, 0xF88, dump_type, 0, 0, 1, 0x100, 0)
    struct.pack_into("<q", h, 0xFA0, size)
    h[0xFA8:0xFB8] = bytes(16)
    filetime = int((crash.system_time - _FILETIME_EPOCH).total_seconds() * 10_000_000)
    struct.pack_into("<qq", h, 0xFB8, 987654 * 10_000_000, filetime)
    return bytes(h)
