"""Physical memory and x64 page tables of the synthetic machine the dump builders write.

RAM is described the way Hyper-V VMs have it (holes below 1 MiB and under 4 GiB); frames are handed out
at random over it so that a reader must really look each page up. The page tables are real 4-level x64
tables (4 KiB, 2 MiB and 1 GiB pages, NX and the software bits Windows sets in valid PTEs), and
`VirtualMemory` writes through them, so what a builder writes is where a page-table walk finds it.
"""

from __future__ import annotations

import random
import struct

PAGE = 0x1000
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# x64 page-table entry bits
_P, _RW, _A, _D, _PS, _G = 0x1, 0x2, 0x20, 0x40, 0x80, 0x100
_SW_WRITE = 1 << 11  # Windows' software "Write" bit in MMPTE_HARDWARE
_NX = 1 << 63
_SW_HIGH = 1 << 57  # one of the software bits 52..62 Windows uses in valid PTEs
_TABLE_FLAGS = _P | _RW | _A | _D | _SW_WRITE
_DATA_FLAGS = _P | _RW | _A | _D | _G | _SW_WRITE | _NX | _SW_HIGH


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


class Physical:
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

    def alloc_2m(self) -> int:
        """A free, 2 MiB-aligned, physically contiguous 2 MiB of RAM for a large page (its frames reserved);
        returns its physical address."""
        chunks = [base for start, count in self.runs
                  for base in range(-(-start // 512) * 512, start + count - 511, 512)]
        for _ in range(10_000):
            base = self.rng.choice(chunks)
            frames = range(base, base + 512)
            if not any(pfn in self.pages or pfn in self.reserved for pfn in frames):
                self.reserved.update(frames)
                return base * PAGE
        raise RuntimeError("the synthetic machine has no free 2 MiB of physical memory: use a larger memory_size")

    def page(self, pfn: int) -> bytearray:
        if not self.in_ram(pfn):
            raise ValueError(f"PFN {pfn:#x} is not RAM")
        return self.pages.setdefault(pfn, bytearray(PAGE))


class AddressSpace:
    """x64 4-level page tables built in `Physical` pages."""

    def __init__(self, phys: Physical, pml4: int | None = None):
        self.phys = phys
        if pml4 is not None:  # a given frame (PFN)
            phys.page(pml4)
        self.pml4 = phys.alloc() if pml4 is None else pml4
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


class VirtualMemory:
    """Virtual memory writes through the builder's own page tables (so what it writes is where a
    page-table walk will find it)."""

    def __init__(self, phys: Physical, space: AddressSpace):
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


class PoolPages:
    """Maps the pages of pool allocations, once each: on 4 KiB pages of scattered frames, or (`large`) by
    mapping the 2 MiB region around each page with one 2 MiB page, as Windows maps its initial non-paged
    pool on machines with more than 2 GiB of RAM (Windows Internals, 7th ed., part 1, ch. 5, "Large and
    small pages")."""

    def __init__(self, phys: Physical, space: AddressSpace, mem: VirtualMemory, large: bool):
        self.phys, self.space, self.mem, self.large = phys, space, mem, large
        self.mapped: set[int] = set()
        self._regions: set[int] = set()

    def use(self, page_va: int) -> None:
        if page_va in self.mapped:
            return
        self.mapped.add(page_va)
        if not self.large:
            self.space.map_4k(page_va, self.phys.alloc())
            return
        region = page_va & ~(2 * MiB - 1)
        if region not in self._regions:
            pa = self.phys.alloc_2m()
            self.space.map_2m(region, pa)
            self.mem.large.append((region, 2 * MiB, pa))
            self._regions.add(region)
        self.phys.page(self.mem.pa(page_va) >> 12)  # in the dump (a kernel dump writes the pages in use)

    def fill(self, page_va: int, data: bytes) -> None:
        self.use(page_va)
        self.mem.write(page_va, data)
