"""Writes structurally exact synthetic Windows kernel crash dumps for tests and benchmarks.

A real MEMORY.DMP cannot live in the repository (it is the RAM of a machine, secrets included), so the
tests build their own: a DUMP_HEADER64 with every field at its documented offset, real x64 page tables
(4-level, with 2 MiB and 1 GiB large pages, NX and Windows software bits set the way a live kernel sets
them), a PsLoadedModuleList of KLDR_DATA_TABLE_ENTRY records with UNICODE_STRING names in "pool" pages,
PE headers at each module's DllBase, and a stop 0x7E whose faulting address falls inside a named driver.
The same layout is written three ways, as Windows writes them:

- `build_full_dump`:   DumpType 1, pages follow the 0x2000-byte header in the order of the header's
                       PHYSICAL_MEMORY_DESCRIPTOR run list (holes in physical memory take no space);
- `build_bitmap_dump`: DumpType 5, a bitmap header ('SDMP' kernel/automatic or 'FDMP' complete) at 0x2000
                       with one bit per physical page, pages stored in bit order from FirstPage;
- `build_triage_dump`: DumpType 4, the small dump of \\Windows\\Minidump: a TRIAGE_DUMP64 at 0x2000, a driver
                       list of DUMP_DRIVER_ENTRY64 records naming modules through a DUMP_STRING pool, the
                       faulting thread's stack and the 'TRGD' end marker;
- `build_x86_dump`:    a 32-bit DUMP_HEADER32 ('PAGEDUMP') full or triage dump, header-level only.

Nothing here imports crashcart's reader: the offsets are written down again from the public headers
(mindumpdef.h, ntiodump.h) so that a misreading in one is not silently shared by the other, and the full
and bitmap outputs are cross-checked against kdmp-parser in tests/test_kdmp_agreement.py.

Files are written sparse (only pages with content are written, then the file is extended), so a 4 GiB
dump costs a few hundred KiB of disk.
"""

from __future__ import annotations

import datetime as _dt
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

PAGE = 0x1000
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# DumpType values (mindumpdef.h DUMP_TYPES)
DUMP_TYPE_FULL = 1
DUMP_TYPE_TRIAGE = 4
DUMP_TYPE_BITMAP_FULL = 5
DUMP_TYPE_BITMAP_KERNEL = 6

MACHINE_AMD64 = 0x8664
MACHINE_I386 = 0x014C

ATTRIBUTE_ENCRYPTED = 1 << 8  # DUMP_FILE_ATTRIBUTES.EncryptedDumpData

STATUS_ACCESS_VIOLATION = 0xC0000005
BUGCHECK_SYSTEM_THREAD_EXCEPTION_NOT_HANDLED = 0x7E

# x64 page-table entry bits
_P, _RW, _A, _D, _PS, _G = 0x1, 0x2, 0x20, 0x40, 0x80, 0x100
_SW_WRITE = 1 << 11  # Windows' software "Write" bit in MMPTE_HARDWARE
_NX = 1 << 63
_SW_HIGH = 1 << 57  # one of the software bits 52..62 Windows uses in valid PTEs
_TABLE_FLAGS = _P | _RW | _A | _D | _SW_WRITE
_DATA_FLAGS = _P | _RW | _A | _D | _G | _SW_WRITE | _NX | _SW_HIGH

# Virtual regions of the synthetic kernel (all canonical x64 kernel addresses)
POOL_BASE = 0xFFFFB88B4A200000  # "nonpaged pool", 4 KiB pages
DIRECT_MAP_BASE = 0xFFFFC80000000000  # one 1 GiB page onto physical 0..1 GiB
STACK_BASE = 0xFFFFF20A3C7F0000  # the crashing thread's kernel stack, 4 KiB pages
NTOS_PHYSICAL = 16 * MiB  # ntoskrnl.exe is mapped with 2 MiB pages from here

_FILETIME_EPOCH = _dt.datetime(1601, 1, 1, tzinfo=_dt.timezone.utc)
DEFAULT_TIME = _dt.datetime(2024, 5, 17, 3, 12, 45, tzinfo=_dt.timezone.utc)


@dataclass(frozen=True)
class Module:
    """One loaded kernel module as the dump records it."""

    name: str
    base: int
    size: int
    timestamp: int
    path: str = ""  # FullDllName; defaults to \SystemRoot\system32\drivers\<name>

    @property
    def full_name(self) -> str:
        return self.path or (
            f"\\SystemRoot\\system32\\{self.name}" if self.name.lower().endswith((".exe", ".dll"))
            else f"\\SystemRoot\\System32\\drivers\\{self.name}"
        )

    def contains(self, address: int) -> bool:
        return self.base <= address < self.base + self.size


# A plausible Azure Windows Server 2022 module list. ntoskrnl.exe is 2 MiB aligned (mapped with large
# pages); the faulting third-party filter driver sits between two others.
DEFAULT_MODULES: tuple[Module, ...] = (
    Module("ntoskrnl.exe", 0xFFFFF8041C800000, 0x00A00000, 0x6F3A1C22),
    Module("hal.dll", 0xFFFFF8041C1F0000, 0x00103000, 0x2C8D1E53),
    Module("kd.dll", 0xFFFFF80419A70000, 0x0000B000, 0x5E0B7A11),
    Module("CLFS.SYS", 0xFFFFF8041D8F0000, 0x0006E000, 0x8B2F4A05),
    Module("vmbus.sys", 0xFFFFF8041DFA0000, 0x0002D000, 0x1A7C9E40),
    Module("storvsc.sys", 0xFFFFF8041E1C0000, 0x0001F000, 0x9D3E2B77),
    Module("Ntfs.sys", 0xFFFFF8041E800000, 0x002FC000, 0x4E6F0A19),
    Module("netvsc.sys", 0xFFFFF8041F020000, 0x0003F000, 0x73C51D2A),
    Module("contosoflt.sys", 0xFFFFF8041FB40000, 0x00012000, 0x65A1F3C9,
           "\\??\\C:\\Program Files\\Contoso\\Agent\\contosoflt.sys"),
    Module("tcpip.sys", 0xFFFFF8041FB60000, 0x0032A000, 0x0D4B8C66),
)
DEFAULT_FAULTING_MODULE = "contosoflt.sys"
DEFAULT_FAULT_OFFSET = 0x1A2B


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

    @property
    def faulting_offset(self) -> int:
        assert self.faulting_module is not None
        return self.faulting_address - self.faulting_module.base

    @property
    def faulting_symbol(self) -> str:
        """How WinDbg and `triage` print the fault: `contosoflt.sys+0x1a2b`."""
        assert self.faulting_module is not None
        return f"{self.faulting_module.name}+{self.faulting_offset:#x}"


# --------------------------------------------------------------------------------------------------
# public builders


def build_full_dump(path: str | Path, **options) -> BuiltDump:
    """A complete memory dump with a run list (DumpType 1). See `_Kernel` for the options."""
    return _Kernel(**options).write(Path(path), "full")


def build_bitmap_dump(path: str | Path, *, complete: bool = False, **options) -> BuiltDump:
    """A bitmap dump (DumpType 5): kernel/automatic ('SDMP', only the kernel's pages) by default,
    complete ('FDMP', every page of RAM) with complete=True."""
    return _Kernel(**options).write(Path(path), "bitmap-complete" if complete else "bitmap-kernel")


def build_triage_dump(path: str | Path, **options) -> BuiltDump:
    """A small memory dump (DumpType 4) as written to \\Windows\\Minidump."""
    return _Kernel(**options).write(Path(path), "triage")


def build_x86_dump(path: str | Path, *, triage: bool = False, **options) -> BuiltDump:
    """A 32-bit ('PAGEDUMP') full or triage dump: the header is exact, the body is filler."""
    return _Kernel(**options).write_x86(Path(path), triage)


# --------------------------------------------------------------------------------------------------
# physical memory and page tables


def ram_runs(memory_size: int) -> list[tuple[int, int]]:
    """Physical memory of a Hyper-V VM as Windows describes it: (base PFN, page count) runs, no page 0,
    a hole below 1 MiB and the MMIO hole below 4 GiB."""
    pages = memory_size // PAGE
    runs = [(0x1, 0x9F)]
    low_end = min(pages, 0xF8000)  # RAM up to 3.875 GiB, then MMIO
    runs.append((0x100, low_end - 0x100))
    rest = pages - low_end
    if rest > 0:
        runs.append((0x100000, rest))
    return runs


class _Physical:
    """Physical pages with content, and an allocator that scatters frames over RAM (so a reader must
    really look them up, not assume anything is contiguous)."""

    def __init__(self, memory_size: int, seed: int):
        self.runs = ram_runs(memory_size)
        self.pages: dict[int, bytearray] = {}
        self.rng = random.Random(seed)
        self.reserved: set[int] = set()

    def in_ram(self, pfn: int) -> bool:
        return any(base <= pfn < base + count for base, count in self.runs)

    def alloc(self, below: int | None = None) -> int:
        limit = (below or 1 << 62) // PAGE
        for _ in range(10_000):
            base, count = self.rng.choice(self.runs[1:] if len(self.runs) > 1 else self.runs)
            pfn = base + self.rng.randrange(count)
            if pfn < limit and pfn not in self.pages and pfn not in self.reserved:
                self.pages[pfn] = bytearray(PAGE)
                return pfn
        raise RuntimeError("the synthetic machine ran out of physical memory: use a larger memory_size")

    def page(self, pfn: int) -> bytearray:
        if not self.in_ram(pfn):
            raise ValueError(f"PFN {pfn:#x} is not RAM")
        return self.pages.setdefault(pfn, bytearray(PAGE))


class _AddressSpace:
    """x64 4-level page tables built in `_Physical` pages."""

    def __init__(self, phys: _Physical):
        self.phys = phys
        self.pml4 = phys.alloc()
        self.mapped: dict[int, tuple[int, int]] = {}  # va page -> (physical address, page size)

    def _entry(self, table_pfn: int, index: int, create: bool = True) -> int:
        table = self.phys.page(table_pfn)
        (value,) = struct.unpack_from("<Q", table, index * 8)
        if value & _P:
            if value & _PS:
                raise ValueError("address already covered by a large page")
            return (value & 0x000FFFFFFFFFF000) >> 12
        child = self.phys.alloc()
        struct.pack_into("<Q", table, index * 8, (child << 12) | _TABLE_FLAGS)
        return child

    @staticmethod
    def _indexes(va: int) -> tuple[int, int, int, int]:
        return (va >> 39) & 0x1FF, (va >> 30) & 0x1FF, (va >> 21) & 0x1FF, (va >> 12) & 0x1FF

    def map_4k(self, va: int, pfn: int) -> None:
        if va & ~0xFFF in self.mapped:
            raise ValueError(f"{va:#x} is already mapped: two builder regions overlap")
        i4, i3, i2, i1 = self._indexes(va)
        pt = self._entry(self._entry(self._entry(self.pml4, i4), i3), i2)
        struct.pack_into("<Q", self.phys.page(pt), i1 * 8, (pfn << 12) | _DATA_FLAGS)
        self.mapped[va & ~0xFFF] = (pfn << 12, PAGE)

    def map_2m(self, va: int, pa: int) -> None:
        assert va % (2 * MiB) == 0 and pa % (2 * MiB) == 0
        i4, i3, i2, _ = self._indexes(va)
        pd = self._entry(self._entry(self.pml4, i4), i3)
        struct.pack_into("<Q", self.phys.page(pd), i2 * 8, pa | _DATA_FLAGS | _PS)

    def map_1g(self, va: int, pa: int) -> None:
        assert va % GiB == 0 and pa % GiB == 0
        i4, i3, _, _ = self._indexes(va)
        pdpt = self._entry(self.pml4, i4)
        struct.pack_into("<Q", self.phys.page(pdpt), i3 * 8, pa | _DATA_FLAGS | _PS)


class _Memory:
    """Virtual memory writes through the builder's own page tables (so what it writes is where a
    page-table walk will find it)."""

    def __init__(self, phys: _Physical, space: _AddressSpace):
        self.phys, self.space = phys, space
        self.large: list[tuple[int, int, int]] = []  # (va, size, pa) of 2 MiB / 1 GiB mappings

    def pa(self, va: int) -> int:
        page = self.space.mapped.get(va & ~0xFFF)
        if page is not None:
            return page[0] + (va & 0xFFF)
        for base, size, pa in self.large:
            if base <= va < base + size:
                return pa + (va - base)
        raise KeyError(f"{va:#x} is not mapped")

    def write(self, va: int, data: bytes) -> None:
        while data:
            pa = self.pa(va)
            chunk = min(len(data), PAGE - (pa & 0xFFF))
            page = self.phys.page(pa >> 12)
            page[pa & 0xFFF:(pa & 0xFFF) + chunk] = data[:chunk]
            va, data = va + chunk, data[chunk:]

    def read(self, va: int, size: int) -> bytes:
        out = b""
        while size:
            pa = self.pa(va)
            chunk = min(size, PAGE - (pa & 0xFFF))
            out += bytes(self.phys.page(pa >> 12)[pa & 0xFFF:(pa & 0xFFF) + chunk])
            va, size = va + chunk, size - chunk
        return out


# --------------------------------------------------------------------------------------------------
# structures


def _filetime(moment: _dt.datetime) -> int:
    return int((moment - _FILETIME_EPOCH).total_seconds() * 10_000_000)


def _unicode_string(text: str, buffer_va: int) -> bytes:
    """UNICODE_STRING (x64): Length and MaximumLength in bytes, 4 bytes padding, Buffer pointer."""
    raw = len(text.encode("utf-16-le"))
    return struct.pack("<HHIQ", raw, raw + 2, 0, buffer_va)


def _pe_header(module: Module, rng: random.Random) -> bytes:
    """The first page of a loaded image: DOS header, 'PE\\0\\0', IMAGE_FILE_HEADER (TimeDateStamp at +8
    from the signature) and the start of IMAGE_OPTIONAL_HEADER64 (SizeOfImage at +0x38)."""
    page = bytearray(rng.randbytes(PAGE))
    page[0:0x40] = bytes(0x40)
    page[0:2] = b"MZ"
    e_lfanew = 0xF0 + 8 * rng.randrange(4)
    struct.pack_into("<I", page, 0x3C, e_lfanew)
    struct.pack_into("<4sHHIIIHH", page, e_lfanew, b"PE\0\0", MACHINE_AMD64, 6, module.timestamp, 0, 0, 0xF0, 0x22)
    optional = e_lfanew + 24
    struct.pack_into("<H", page, optional, 0x20B)  # PE32+
    struct.pack_into("<I", page, optional + 0x38, module.size)
    return bytes(page)


def _kldr_entry(module: Module, flink: int, blink: int, full_va: int, base_va: int) -> bytes:
    """KLDR_DATA_TABLE_ENTRY as laid out by Windows 10/11 x64 kernels (0xA0 bytes)."""
    entry = bytearray(0xA0)
    struct.pack_into("<QQ", entry, 0x00, flink, blink)  # InLoadOrderLinks
    struct.pack_into("<Q", entry, 0x10, module.base + 0x2000)  # ExceptionTable
    struct.pack_into("<I", entry, 0x18, 0x30)  # ExceptionTableSize
    struct.pack_into("<Q", entry, 0x30, module.base)  # DllBase
    struct.pack_into("<Q", entry, 0x38, module.base + 0x1010)  # EntryPoint
    struct.pack_into("<I", entry, 0x40, module.size)  # SizeOfImage
    entry[0x48:0x58] = _unicode_string(module.full_name, full_va)  # FullDllName
    entry[0x58:0x68] = _unicode_string(module.name, base_va)  # BaseDllName
    struct.pack_into("<IHH", entry, 0x68, 0x49104000, 1, 0)  # Flags, LoadCount, u1
    struct.pack_into("<I", entry, 0x78, module.timestamp ^ 0x5A5A)  # CheckSum
    struct.pack_into("<I", entry, 0x98, module.size)  # SizeOfImageNotRounded
    struct.pack_into("<I", entry, 0x9C, module.timestamp)  # TimeDateStamp
    return bytes(entry)


def _exception_record(code: int, address: int, write: bool, target: int) -> bytes:
    """EXCEPTION_RECORD64 (0x98 bytes); for an access violation ExceptionInformation[0] is the access
    (0 read, 1 write, 8 execute) and [1] the address that was accessed."""
    record = bytearray(0x98)
    struct.pack_into("<IIQQI", record, 0, code, 0, 0, address, 2)
    struct.pack_into("<QQ", record, 0x20, 1 if write else 0, target)
    return bytes(record)


@dataclass
class _Kernel:
    """The machine that crashed. Every builder takes these keyword options:

    modules             loaded modules (DEFAULT_MODULES); ntoskrnl.exe must be first
    faulting_module     name of the module the faulting address is in (None: an address in no module)
    fault_offset        offset of the faulting instruction in that module
    bugcheck_code       0x7E by default; 0x1000007E, 0x8E... work the same way
    exception_code      bugcheck parameter 1 (0xC0000005 access violation by default)
    bugcheck_parameters override all four parameters (then faulting_module only places the module)
    memory_size         RAM of the machine (64 MiB default; sparse, 4 GiB is cheap)
    processors          NumberProcessors
    system_time         crash time (UTC)
    build               MinorVersion (Windows build number)
    encrypted           set DUMP_FILE_ATTRIBUTES.EncryptedDumpData and scramble everything after the header
    seed                seeds the scattering of physical pages and the filler bytes
    """

    modules: tuple[Module, ...] = DEFAULT_MODULES
    faulting_module: str | None = DEFAULT_FAULTING_MODULE
    fault_offset: int = DEFAULT_FAULT_OFFSET
    bugcheck_code: int = BUGCHECK_SYSTEM_THREAD_EXCEPTION_NOT_HANDLED
    exception_code: int = STATUS_ACCESS_VIOLATION
    bugcheck_parameters: tuple[int, int, int, int] | None = None
    memory_size: int = 64 * MiB
    processors: int = 2
    system_time: _dt.datetime = DEFAULT_TIME
    build: int = 20348
    encrypted: bool = False
    seed: int = 7

    def __post_init__(self) -> None:
        if self.memory_size < 32 * MiB or self.memory_size % (2 * MiB):
            raise ValueError("memory_size must be a multiple of 2 MiB, at least 32 MiB")
        if not self.modules or self.modules[0].name.lower() != "ntoskrnl.exe":
            raise ValueError("the first module must be ntoskrnl.exe (it holds PsLoadedModuleList)")
        names = [m.name for m in self.modules]
        if self.faulting_module is not None and self.faulting_module not in names:
            raise ValueError(f"faulting_module {self.faulting_module!r} is not one of {names}")

    # -- the crash --------------------------------------------------------------------------------

    def _fault(self) -> tuple[Module | None, int]:
        if self.faulting_module is None:
            return None, 0xFFFFF80400001234  # in no module
        module = next(m for m in self.modules if m.name == self.faulting_module)
        if not 0 <= self.fault_offset < module.size:
            raise ValueError(f"fault_offset {self.fault_offset:#x} is outside {module.name} ({module.size:#x} bytes)")
        return module, module.base + self.fault_offset

    def _parameters(self, fault_address: int) -> tuple[int, int, int, int]:
        if self.bugcheck_parameters is not None:
            return tuple(self.bugcheck_parameters)  # type: ignore[return-value]
        # parameter 3: the EXCEPTION_RECORD on the thread's stack, parameter 4: the CONTEXT record
        return (self.exception_code, fault_address, STACK_BASE + 0x2E48, STACK_BASE + 0x2690)

    # -- x64 memory image -------------------------------------------------------------------------

    def _image(self):
        """Builds physical memory: page tables, module images, the loaded-module list, the stack."""
        rng = random.Random(self.seed)
        phys = _Physical(self.memory_size, self.seed)
        # ntoskrnl's large pages are physically contiguous: keep the allocator out of them.
        ntos = self.modules[0]
        ntos_span = -(-ntos.size // (2 * MiB)) * 2 * MiB
        if NTOS_PHYSICAL + ntos_span > self.memory_size:
            raise ValueError("memory_size too small for ntoskrnl.exe's large pages")
        phys.reserved.update(range(NTOS_PHYSICAL // PAGE, (NTOS_PHYSICAL + ntos_span) // PAGE))
        space = _AddressSpace(phys)
        mem = _Memory(phys, space)

        # ntoskrnl.exe: 2 MiB pages
        for offset in range(0, ntos_span, 2 * MiB):
            space.map_2m(ntos.base + offset, NTOS_PHYSICAL + offset)
        mem.large.append((ntos.base, ntos_span, NTOS_PHYSICAL))
        # a 1 GiB page mapping physical 0..1 GiB (Windows maps large ranges like this, e.g. the PFN
        # database or a direct map); part of the module list lives there
        space.map_1g(DIRECT_MAP_BASE, 0)
        mem.large.append((DIRECT_MAP_BASE, GiB, 0))

        fault_module, fault_address = self._fault()
        probe_vas: list[int] = []
        for module in self.modules:
            if module is not ntos:
                # 4 KiB pages: the PE header page and the page of the faulting instruction are resident;
                # the rest of the image is paged out (PTE zero), as discardable sections are
                space.map_4k(module.base, phys.alloc())
                if module is fault_module and fault_address & ~0xFFF != module.base:
                    space.map_4k(fault_address & ~0xFFF, phys.alloc())
                    mem.write(fault_address & ~0xFFF, rng.randbytes(PAGE))
            mem.write(module.base, _pe_header(module, rng))
            probe_vas.append(module.base)
        if fault_module is not None:
            probe_vas.append(fault_address)
        # a probe deep inside the second large page of ntoskrnl
        if ntos.size > 2 * MiB + 0x20000:
            deep = ntos.base + 2 * MiB + 0x1F3A0
            mem.write(deep, rng.randbytes(64))
            probe_vas.append(deep)

        # PsLoadedModuleList: a LIST_ENTRY in ntoskrnl's data (a large page)
        head = ntos.base + min(0x22A3F0, ntos.size - 0x10) // 16 * 16
        entry_vas = self._place_entries(phys, space, len(self.modules))
        name_vas = self._place_names(phys, space)
        count = len(self.modules)
        for i, module in enumerate(self.modules):
            flink = entry_vas[i + 1] if i + 1 < count else head
            blink = entry_vas[i - 1] if i > 0 else head
            full_va, base_va = name_vas[i]
            mem.write(full_va, module.full_name.encode("utf-16-le") + b"\0\0")
            mem.write(base_va, module.name.encode("utf-16-le") + b"\0\0")
            mem.write(entry_vas[i], _kldr_entry(module, flink, blink, full_va, base_va))
            probe_vas += [entry_vas[i], base_va]
        mem.write(head, struct.pack("<QQ", entry_vas[0], entry_vas[-1]))
        probe_vas.append(head)

        # the crashing thread's stack: the exception record (parameter 3) and context (parameter 4)
        for offset in range(0, 0x6000, PAGE):
            space.map_4k(STACK_BASE + offset, phys.alloc())
            mem.write(STACK_BASE + offset, rng.randbytes(PAGE))
        params = self._parameters(fault_address)
        record = _exception_record(self.exception_code, fault_address, write=True, target=0)
        if STACK_BASE <= params[2] < STACK_BASE + 0x6000 - 0x98:
            mem.write(params[2], record)
            probe_vas.append(params[2])
        probes = {va: mem.read(va, 16) for va in probe_vas}
        unmapped = (0xFFFFF80400001000, STACK_BASE + 0x8000, 0xFFFF800000000000 + 0x7000)
        return phys, space, mem, head, probes, unmapped, params, fault_module, fault_address

    def _place_entries(self, phys: _Physical, space: _AddressSpace, count: int) -> list[int]:
        """KLDR entries: the first half in 4 KiB pool pages (one of them straddling two pages that are
        not physically adjacent), the rest in the 1 GiB-mapped region."""
        vas: list[int] = []
        half = (count + 1) // 2
        for i in range(half):
            vas.append(POOL_BASE + 0x1000 * (1 + i) + (0xFC0 if i == 1 else 0x100 + 0x40 * (i % 3)))
        needed = {va & ~0xFFF for va in vas} | {(va + 0x9F) & ~0xFFF for va in vas}
        for page_va in sorted(needed):
            space.map_4k(page_va, phys.alloc())
        for i in range(half, count):
            pfn = phys.alloc(below=GiB)
            vas.append(DIRECT_MAP_BASE + (pfn << 12) + 0x80)
        return vas

    def _place_names(self, phys: _Physical, space: _AddressSpace) -> list[tuple[int, int]]:
        """Name buffers in their own pool pages, away from the entries (which use one page each)."""
        base = POOL_BASE + 0x1000 * (len(self.modules) + 4)
        out = []
        cursor = base
        mapped: set[int] = set()
        for module in self.modules:
            full_len = len(module.full_name.encode("utf-16-le")) + 2
            base_len = len(module.name.encode("utf-16-le")) + 2
            full_va = cursor
            base_va = (cursor + full_len + 15) // 16 * 16
            cursor = (base_va + base_len + 15) // 16 * 16
            for va in range(full_va & ~0xFFF, cursor, PAGE):
                if va not in mapped:
                    space.map_4k(va, phys.alloc())
                    mapped.add(va)
            out.append((full_va, base_va))
        return out

    # -- writers ----------------------------------------------------------------------------------

    def _header64(self, dump_type: int, dtb: int, head: int, params, required: int) -> bytearray:
        """DUMP_HEADER64 (0x2000 bytes). Windows fills the buffer with 'PAGE' before setting fields, so
        fields a dump type does not use keep that pattern."""
        h = bytearray(b"PAGE" * (0x2000 // 4))
        struct.pack_into("<4s4sII", h, 0x00, b"PAGE", b"DU64", 0xF, self.build)
        struct.pack_into("<QQQQ", h, 0x10, dtb, 0xFFFFE70000000000, head, 0xFFFFF8041D3C8A60)
        struct.pack_into("<III", h, 0x30, MACHINE_AMD64, self.processors, self.bugcheck_code)
        struct.pack_into("<I", h, 0x3C, 0)
        struct.pack_into("<4Q", h, 0x40, *params)
        h[0x60:0x80] = bytes(32)  # VersionUser
        struct.pack_into("<Q", h, 0x80, 0xFFFFF8041D200B20)  # KdDebuggerDataBlock
        # ContextRecord (CONTEXT at 0x348): zeroed, MxCsr and its FXSAVE copy equal, Rip/Rsp plausible
        h[0x348:0x348 + 3000] = bytes(3000)
        struct.pack_into("<II", h, 0x348 + 0x30, 0x10001F, 0x1F80)  # ContextFlags, MxCsr
        struct.pack_into("<HHHHHHI", h, 0x348 + 0x38, 0x10, 0x2B, 0x2B, 0x53, 0x2B, 0x18, 0x40246)
        struct.pack_into("<Q", h, 0x348 + 0x98, STACK_BASE + 0x2400)  # Rsp
        struct.pack_into("<Q", h, 0x348 + 0xF8, self.modules[0].base + 0x3F6A20)  # Rip: KeBugCheckEx
        struct.pack_into("<I", h, 0x348 + 0x118, 0x1F80)  # MxCsr in the FXSAVE area
        # Exception (EXCEPTION_RECORD64 at 0xF00): KeBugCheckEx's own breakpoint
        h[0xF00:0xF98] = _exception_record(0x80000003, self.modules[0].base + 0x3F6A20, False, 0)[:0x98]
        struct.pack_into("<II", h, 0xF98, dump_type, 0)
        struct.pack_into("<qq", h, 0xFA0, required, _filetime(self.system_time))
        h[0xFB0:0x1030] = bytes(128)  # Comment
        struct.pack_into("<qIIIII", h, 0x1030, 1234567 * 10_000_000, 0, 0, 3, 0x110, 0)
        struct.pack_into("<BB2sII", h, 0x104C, 0, 0x29, b"\0\0", ATTRIBUTE_ENCRYPTED if self.encrypted else 0, 0x2A)
        return h

    def write(self, path: Path, kind: str) -> BuiltDump:
        phys, space, mem, head, probes, unmapped, params, fault_module, fault_address = self._image()
        dtb = (space.pml4 << 12) | 0x002  # PCID bits in CR3 must be ignored by readers
        if kind == "triage":
            return self._write_triage(path, params, fault_module, fault_address, mem, head, dtb)

        if kind == "full":
            runs = phys.runs
            total = sum(count for _, count in runs)
            data_start = 0x2000
            file_size = data_start + total * PAGE
            header = self._header64(DUMP_TYPE_FULL, dtb, head, params, file_size)
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
            header = self._header64(DUMP_TYPE_BITMAP_FULL, dtb, head, params, file_size)
            prefix = (b"FDMP" if complete else b"SDMP") + b"DUMP" + bytes(0x18)
            prefix += struct.pack("<QQQ", first_page, total, bits) + bitmap
            prefix += bytes(first_page - 0x2000 - len(prefix))
            data_start = first_page
            dump_type = DUMP_TYPE_BITMAP_FULL

        index = _RunIndex(present)
        scramble = random.Random(self.seed + 1)
        with open(path, "wb") as out:
            out.write(bytes(header))
            out.write(prefix)
            for pfn in sorted(phys.pages):
                slot = index.slot(pfn)
                if slot is None:  # page outside the dump (not RAM, or not in a kernel dump)
                    continue
                out.seek(data_start + slot * PAGE)
                out.write(scramble.randbytes(PAGE) if self.encrypted else bytes(phys.pages[pfn]))
            out.truncate(file_size)
        return BuiltDump(
            path=path, kind=kind, dump_type=dump_type, file_size=file_size, memory_size=self.memory_size,
            bugcheck_code=self.bugcheck_code, bugcheck_parameters=params, exception_code=self.exception_code,
            faulting_address=fault_address, faulting_module=fault_module, modules=tuple(self.modules),
            processors=self.processors, system_time=self.system_time, directory_table_base=dtb,
            ps_loaded_module_list=head, encrypted=self.encrypted, probes=probes, unmapped=unmapped,
        )

    def _write_triage(self, path, params, fault_module, fault_address, mem: _Memory, head: int, dtb: int) -> BuiltDump:
        """TRIAGE_DUMP64 at 0x2000 followed by its sections; every offset is from the start of the file."""
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
        for i, module in enumerate(self.modules):
            text = module.full_name if i % 3 == 1 else module.name  # some full paths, as real dumps have
            name_offsets.append(len(pool))
            pool += struct.pack("<I", len(text)) + text.encode("utf-16-le") + b"\0\0"
            pool += bytes((-len(pool)) % 8)
        entries = bytearray()
        driver_list_size = 0x90 * len(self.modules)
        driver_list = place(bytes(driver_list_size), 8)
        pool_start = place(bytes(pool), 8)
        for i, module in enumerate(self.modules):
            # DUMP_DRIVER_ENTRY64: DriverNameOffset, alignment, then KLDR_DATA_TABLE_ENTRY64 (dump layout)
            e = bytearray(0x90)
            struct.pack_into("<I", e, 0, pool_start + name_offsets[i])
            struct.pack_into("<QQ", e, 0x08, 0, 0)  # list links are not meaningful in a triage dump
            struct.pack_into("<QQI", e, 0x08 + 0x30, module.base, module.base + 0x1010, module.size)
            e[0x08 + 0x48:0x08 + 0x58] = _unicode_string(module.full_name, 0)
            e[0x08 + 0x58:0x08 + 0x68] = _unicode_string(module.name, 0)
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
            driver_list, len(self.modules), pool_start, len(pool), 0, 0x6F,
            top_of_stack, bytes(16), 0, 0, 0, debugger_data, 0x368, 0, 0,
        )
        assert len(triage) == 0x80, len(triage)
        header = self._header64(DUMP_TYPE_TRIAGE, dtb, head, params, size)
        data = bytes(header) + triage + bytes(body)
        assert len(data) == size
        if self.encrypted:
            data = data[:0x2000] + random.Random(self.seed + 1).randbytes(size - 0x2000)
        path.write_bytes(data)
        return BuiltDump(
            path=path, kind="triage", dump_type=DUMP_TYPE_TRIAGE, file_size=size, memory_size=self.memory_size,
            bugcheck_code=self.bugcheck_code, bugcheck_parameters=params, exception_code=self.exception_code,
            faulting_address=fault_address, faulting_module=fault_module, modules=tuple(self.modules),
            processors=self.processors, system_time=self.system_time, directory_table_base=dtb,
            ps_loaded_module_list=head, encrypted=self.encrypted,
        )

    def write_x86(self, path: Path, triage: bool) -> BuiltDump:
        """DUMP_HEADER32 (0x1000 bytes, 4-byte packing): DumpType at 0xF88, RequiredDumpSpace at 0xFA0,
        SystemTime at 0xFC0, run list at 0x64 with 32-bit entries; memory follows at 0x1000."""
        fault_module, fault_address = self._fault()
        fault_address &= 0xFFFFFFFF
        params = tuple(p & 0xFFFFFFFF for p in self._parameters(fault_address))
        runs = [(0x1, 0x9F), (0x100, 0x1F00)]
        total = sum(c for _, c in runs)
        size = 0x1000 + (0x10000 if triage else total * PAGE)
        h = bytearray(b"PAGE" * (0x1000 // 4))
        struct.pack_into("<4s4sIIIIIIIII", h, 0, b"PAGE", b"DUMP", 0xF, self.build, 0x185000, 0x82F7A000,
                         0x8297CE10, 0x82983F18, MACHINE_I386, self.processors, self.bugcheck_code)
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
        struct.pack_into("<II", h, 0x8A0, ATTRIBUTE_ENCRYPTED if self.encrypted else 0, 0)
        struct.pack_into("<IIIIII", h, 0xF88, DUMP_TYPE_TRIAGE if triage else DUMP_TYPE_FULL, 0, 0, 1, 0x100, 0)
        struct.pack_into("<q", h, 0xFA0, size)
        h[0xFA8:0xFB8] = bytes(16)
        struct.pack_into("<qq", h, 0xFB8, 987654 * 10_000_000, _filetime(self.system_time))
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
            memory_size=total * PAGE, bugcheck_code=self.bugcheck_code, bugcheck_parameters=params,  # type: ignore[arg-type]
            exception_code=self.exception_code, faulting_address=fault_address, faulting_module=None,
            modules=(), processors=self.processors, system_time=self.system_time, machine=MACHINE_I386,
            directory_table_base=0x185000, encrypted=self.encrypted,
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
        import bisect

        i = bisect.bisect_right([b for b, _ in self.runs], pfn) - 1
        if i < 0:
            return None
        base, count = self.runs[i]
        return self.before[i] + pfn - base if pfn < base + count else None


__all__ = [
    "BuiltDump", "Module", "DEFAULT_MODULES", "DEFAULT_FAULTING_MODULE", "DEFAULT_FAULT_OFFSET",
    "build_full_dump", "build_bitmap_dump", "build_triage_dump", "build_x86_dump", "ram_runs",
    "DUMP_TYPE_FULL", "DUMP_TYPE_TRIAGE", "DUMP_TYPE_BITMAP_FULL", "ATTRIBUTE_ENCRYPTED",
    "MACHINE_AMD64", "MACHINE_I386", "STACK_BASE", "KiB", "MiB", "GiB",
]
