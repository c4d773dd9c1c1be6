"""The machine that crashed, as the dump builders lay it out in memory: its loaded modules (PE headers
at each DllBase), PsLoadedModuleList (KLDR_DATA_TABLE_ENTRY records with UNICODE_STRING names in pool
pages, part of them behind a 1 GiB page, or all on 2 MiB pages), ntoskrnl.exe on 2 MiB pages, and the
crashing thread's stack holding the EXCEPTION_RECORD of a stop 0x7E whose faulting address falls inside a
named driver.

The structures are written from the public headers (mindumpdef.h, ntiodump.h), not from crashcart's
reader, so that a misreading in one is not silently shared by the other. How the image is then stored
in a file (run list, bitmap, small dump) is dumpwriters.py.
"""

from __future__ import annotations

import datetime as _dt
import random
import struct
from dataclasses import dataclass

from scripts.devkit.dumppages import PAGE, AddressSpace, GiB, MiB, Physical, PoolPages, VirtualMemory
from scripts.devkit.dumpstack import Call, Image, StackLayout, context_record, lay_out_stack

MACHINE_AMD64 = 0x8664
STATUS_ACCESS_VIOLATION = 0xC0000005
BUGCHECK_SYSTEM_THREAD_EXCEPTION_NOT_HANDLED = 0x7E

# Virtual regions of the synthetic kernel (all canonical x64 kernel addresses)
POOL_BASE = 0xFFFFB88B4A200000  # "nonpaged pool": 4 KiB pages, 2 MiB pages in the "measured" layout
DIRECT_MAP_BASE = 0xFFFFC80000000000  # one 1 GiB page onto physical 0..1 GiB
STACK_BASE = 0xFFFFF20A3C7F0000  # the crashing thread's kernel stack, 4 KiB pages
NTOS_PHYSICAL = 16 * MiB  # ntoskrnl.exe is mapped with 2 MiB pages from here
KERNEL_PML4 = 0x1AD  # the System process's PML4 frame in real x64 dumps' headers (../shared/realdumps)

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
class MemoryImage:
    """What `CrashedMachine.image` built: physical memory with its page tables, and what a writer and
    the tests need to know about it."""

    physical: Physical
    space: AddressSpace
    memory: VirtualMemory
    module_list_head: int  # PsLoadedModuleList
    probes: dict[int, bytes]  # see BuiltDump.probes
    unmapped: tuple[int, ...]
    parameters: tuple[int, int, int, int]
    faulting_module: Module | None
    faulting_address: int
    header_context: bytes | None = None  # CONTEXT for DUMP_HEADER64.ContextRecord (None: the default one)
    stack: StackLayout | None = None


# --------------------------------------------------------------------------------------------------
# structures

def unicode_string(text: str, buffer_va: int) -> bytes:
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
    entry[0x48:0x58] = unicode_string(module.full_name, full_va)  # FullDllName
    entry[0x58:0x68] = unicode_string(module.name, base_va)  # BaseDllName
    struct.pack_into("<IHH", entry, 0x68, 0x49104000, 1, 0)  # Flags, LoadCount, u1
    struct.pack_into("<I", entry, 0x78, module.timestamp ^ 0x5A5A)  # CheckSum
    struct.pack_into("<I", entry, 0x98, module.size)  # SizeOfImageNotRounded
    struct.pack_into("<I", entry, 0x9C, module.timestamp)  # TimeDateStamp
    return bytes(entry)


def exception_record(code: int, address: int, write: bool, target: int) -> bytes:
    """EXCEPTION_RECORD64 (0x98 bytes); for an access violation ExceptionInformation[0] is the access
    (0 read, 1 write, 8 execute) and [1] the address that was accessed."""
    record = bytearray(0x98)
    struct.pack_into("<IIQQI", record, 0, code, 0, 0, address, 2)
    struct.pack_into("<QQ", record, 0x20, 1 if write else 0, target)
    return bytes(record)


@dataclass
class CrashedMachine:
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
    images              real PE images (dumpstack.Image, built by pebuilder) mapped whole at their
                        module's base, instead of a header page only
    missing             names of modules none of whose pages are in the dump (not even the header)
    stack               the crashing thread's frames, outermost first (dumpstack.Call); the stack is
                        then laid out by executing their code, the header's ContextRecord holds the
                        innermost frame, the 0x7E CONTEXT (parameter 4) the frame that faulted, and
                        the faulting address is that frame's stop point (fault_offset is not used)
    module_layout       where the KLDR_DATA_TABLE_ENTRY records of PsLoadedModuleList are:
                        "scattered" (default, pessimistic): the first half on pool pages of their own,
                        the rest on random pages of a 1 GiB direct map, so every entry is a page apart;
                        "measured": as measured in a real Windows 10 (19041) dump's list (MEASURED_LAYOUT):
                        the boot-loaded 40 % packed in order on shared pool pages (entry and BaseDllName
                        in one allocation), the later ones two or so to a page on pages spread over
                        pool regions, each page shared by entries far apart in the list; the pool on
                        2 MiB pages and the PML4 at KERNEL_PML4, as a real kernel has them
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
    images: tuple[Image, ...] = ()
    missing: tuple[str, ...] = ()
    stack: tuple[Call, ...] = ()
    module_layout: str = "scattered"

    def __post_init__(self) -> None:
        if self.module_layout not in ("scattered", "measured"):
            raise ValueError(f"module_layout must be 'scattered' or 'measured', not {self.module_layout!r}")
        if self.memory_size < 32 * MiB or self.memory_size % (2 * MiB):
            raise ValueError("memory_size must be a multiple of 2 MiB, at least 32 MiB")
        if not self.modules or self.modules[0].name.lower() != "ntoskrnl.exe":
            raise ValueError("the first module must be ntoskrnl.exe (it holds PsLoadedModuleList)")
        names = [m.name for m in self.modules]
        if self.faulting_module is not None and self.faulting_module not in names:
            raise ValueError(f"faulting_module {self.faulting_module!r} is not one of {names}")

    # -- the crash --------------------------------------------------------------------------------

    def fault(self) -> tuple[Module | None, int]:
        if self.faulting_module is None:
            return None, 0xFFFFF80400001234  # in no module
        module = next(m for m in self.modules if m.name == self.faulting_module)
        if not 0 <= self.fault_offset < module.size:
            raise ValueError(f"fault_offset {self.fault_offset:#x} is outside {module.name} ({module.size:#x} bytes)")
        return module, module.base + self.fault_offset

    def parameters(self, fault_address: int) -> tuple[int, int, int, int]:
        if self.bugcheck_parameters is not None:
            return tuple(self.bugcheck_parameters)  # type: ignore[return-value]
        # parameter 3: the EXCEPTION_RECORD on the thread's stack, parameter 4: the CONTEXT record
        return (self.exception_code, fault_address, STACK_BASE + 0x2E48, STACK_BASE + 0x2690)

    # -- x64 memory image -------------------------------------------------------------------------

    def image(self) -> MemoryImage:
        """Builds physical memory: page tables, module images, the loaded-module list, the stack."""
        rng = random.Random(self.seed)
        phys = Physical(self.memory_size, self.seed)
        # ntoskrnl's large pages are physically contiguous: keep the allocator out of them.
        ntos = self.modules[0]
        ntos_span = -(-ntos.size // (2 * MiB)) * 2 * MiB
        if NTOS_PHYSICAL + ntos_span > self.memory_size:
            raise ValueError("memory_size too small for ntoskrnl.exe's large pages")
        phys.reserved.update(range(NTOS_PHYSICAL // PAGE, (NTOS_PHYSICAL + ntos_span) // PAGE))
        space = AddressSpace(phys, KERNEL_PML4 if self.module_layout == "measured" else None)
        mem = VirtualMemory(phys, space)

        # ntoskrnl.exe: 2 MiB pages
        for offset in range(0, ntos_span, 2 * MiB):
            space.map_2m(ntos.base + offset, NTOS_PHYSICAL + offset)
        mem.large.append((ntos.base, ntos_span, NTOS_PHYSICAL))
        # a 1 GiB page mapping physical 0..1 GiB (Windows maps large ranges like this, e.g. the PFN
        # database or a direct map); part of the module list lives there
        space.map_1g(DIRECT_MAP_BASE, 0)
        mem.large.append((DIRECT_MAP_BASE, GiB, 0))

        images = {image.name: image for image in self.images}
        fault_module, fault_address = self.fault() if not self.stack else (None, 0)
        probe_vas: list[int] = []
        for module in self.modules:
            if module.name in self.missing:
                continue
            if module.name in images:
                self._map_image(module, images[module.name], space, phys, mem, module is ntos)
                probe_vas.append(module.base)
                continue
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
        pool = PoolPages(phys, space, mem, large=self.module_layout == "measured")
        name_vas = self._place_names(pool)
        if self.module_layout == "measured":
            entry_vas = place_entries_measured(self.modules, pool, self.seed)
            name_vas = [(full, entry + MEASURED_LAYOUT["base_name_at"]) for (full, _), entry in zip(name_vas, entry_vas)]
        else:
            entry_vas = self._place_entries(phys, space, len(self.modules))
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
        layout = header_context = None
        if self.stack:
            layout = lay_out_stack(self.stack, images, mem.write, STACK_BASE + 0x5F00, self.seed)
            fault_address = layout.interrupted["rip"]
            fault_module = next((m for m in self.modules if m.contains(fault_address)), None)
            header_context = context_record(layout.innermost)
        params = self.parameters(fault_address)
        if layout is not None and STACK_BASE <= params[3] < STACK_BASE + 0x6000 - 0x4D0:
            mem.write(params[3], context_record(layout.interrupted))
        record = exception_record(self.exception_code, fault_address, write=True, target=0)
        if STACK_BASE <= params[2] < STACK_BASE + 0x6000 - 0x98:
            mem.write(params[2], record)
            probe_vas.append(params[2])
        probes = {va: mem.read(va, 16) for va in probe_vas}
        unmapped = (0xFFFFF80400001000, STACK_BASE + 0x8000, 0xFFFF800000000000 + 0x7000)
        return MemoryImage(phys, space, mem, head, probes, unmapped, params, fault_module, fault_address,
                           header_context, layout)

    @staticmethod
    def _map_image(module: Module, image: Image, space: AddressSpace, phys: Physical, mem: VirtualMemory,
                   large: bool) -> None:
        """Every page of a built image at its base (ntoskrnl's large pages are mapped already)."""
        if image.base != module.base:
            raise ValueError(f"{image.name} was linked at {image.base:#x}, not at {module.name}'s base {module.base:#x}")
        mapped = image.mapped()
        if len(mapped) > module.size:
            raise ValueError(f"{image.name} ({len(mapped):#x} bytes) is larger than {module.name}'s size {module.size:#x}")
        if not large:
            for offset in range(0, -(-len(mapped) // PAGE) * PAGE, PAGE):
                space.map_4k(module.base + offset, phys.alloc())
        mem.write(module.base, mapped)

    def _place_entries(self, phys: Physical, space: AddressSpace, count: int) -> list[int]:
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

    def _place_names(self, pool: PoolPages) -> list[tuple[int, int]]:
        """Name buffers in their own pool pages, away from the entries (which use one page each)."""
        base = POOL_BASE + 0x1000 * (len(self.modules) + 4)
        out = []
        cursor = base
        for module in self.modules:
            full_len = len(module.full_name.encode("utf-16-le")) + 2
            base_len = len(module.name.encode("utf-16-le")) + 2
            full_va = cursor
            base_va = (cursor + full_len + 15) // 16 * 16
            cursor = (base_va + base_len + 15) // 16 * 16
            for va in range(full_va & ~0xFFF, cursor, PAGE):
                pool.use(va)
            out.append((full_va, base_va))
        return out


# The module list of a real Windows 10 x64 kernel (build 19041, 156 modules), read from the links of the
# small dump ../shared/realdumps/eolaruhagen_083125-14875-01.dmp (its DUMP_DRIVER_ENTRY64 records keep
# InLoadOrderLinks, so each entry's virtual address is its predecessor's Flink; measured by
# bench/rangeread_bench.py's docstring figures): the 62 boot-loaded entries (ntoskrnl.exe to CLASSPNP.SYS)
# on 13 pool pages within 136 KiB, up to 9 to a page, 0x1B0-0x1D0 apart; the 94 loaded later on 42 pages
# over 88 MiB of pool (16 2-MiB regions), 59 of their 93 steps to an unrelated page; BaseDllName's buffer
# in the entry's own allocation at +0x148. The physical pages behind the pool cannot be read from a small
# dump: the pool is mapped with 2 MiB pages here (dumppages.PoolPages), as Windows maps its initial
# non-paged pool on machines with more than 2 GiB of RAM (Windows Internals, 7th ed., part 1, ch. 5).
MEASURED_LAYOUT = {"boot_share": 62 / 156, "later_pages_per_entry": 42 / 94, "pages_per_region": 42 / 15,
                   "later_span": 88 * MiB, "base_name_at": 0x148, "most_per_page": 7}


def place_entries_measured(modules: tuple[Module, ...], pool: PoolPages, seed: int) -> list[int]:
    """KLDR entries laid out as MEASURED_LAYOUT says; returns their addresses in list order. Each entry is a
    pool allocation (16-byte pool header, the 0xA0-byte entry grown to 0x148, then the base name) that
    never crosses a page."""
    rng = random.Random(seed * 7919 + len(modules))
    sizes = [(0x10 + MEASURED_LAYOUT["base_name_at"] + len(m.name.encode("utf-16-le")) + 2 + 15) // 16 * 16
             for m in modules]
    if max(sizes) > PAGE:
        raise ValueError("a module name too long for one pool page")
    boot = max(1, round(len(modules) * MEASURED_LAYOUT["boot_share"]))
    vas: list[int] = []
    mapped: set[int] = set()

    def use(page: int) -> None:
        pool.use(page)
        mapped.add(page)

    page = POOL_BASE + 2 * MiB  # a page table of its own, away from _place_names
    cursor = page + 0x10 * rng.randrange(1, 16)
    room = rng.randint(2, 9)
    for size in sizes[:boot]:  # in load order, packed, other allocations between some of them
        cursor += rng.choice((0, 0, 0, 0x40, 0x1B0))
        if cursor + size > page + PAGE or not room:
            page += PAGE * rng.choice((1, 1, 2, 3, 4, 4))
            cursor, room = page + 0x10 * rng.randrange(1, 16), rng.randint(2, 9)
        use(page)
        room -= 1
        vas.append(cursor + 0x10)
        cursor += size
    for gap in range(min(mapped), max(mapped), PAGE):  # the pool pages between them hold other allocations
        if gap not in mapped:
            pool.fill(gap, rng.randbytes(PAGE))
    later = sizes[boot:]
    if later:
        count = max(1, round(len(later) * MEASURED_LAYOUT["later_pages_per_entry"]))
        regions = max(1, round(count / MEASURED_LAYOUT["pages_per_region"]))
        step = MEASURED_LAYOUT["later_span"] // regions // (2 * MiB) * (2 * MiB)
        start = POOL_BASE + 4 * MiB
        pages = rng.sample([start + r * step + i * PAGE for r in range(regions) for i in range(512)], count)
        slot = max(later)
        free = {p: list(range(p + 0x10 * rng.randrange(1, 8), p + PAGE - slot + 1, slot))[:MEASURED_LAYOUT["most_per_page"]]
                for p in pages}
        # every page holds at least one entry; the others mostly go to a random page with room (list
        # neighbours on unrelated pages), at times to the page of the one before (15 of 93 steps)
        on: dict[int, int] = dict(zip(rng.sample(range(len(later)), count), pages))
        room = {p: len(free[p]) - 1 for p in pages}
        for i in range(len(later)):
            if i in on:
                continue
            before = on.get(i - 1)
            if before is None or not room[before] or rng.random() >= 0.16:
                before = rng.choice([p for p in pages if room[p]])
            on[i] = before
            room[before] -= 1
        for i in range(len(later)):
            use(on[i])
            vas.append(free[on[i]].pop(rng.randrange(len(free[on[i]]))) + 0x10)
    return vas
