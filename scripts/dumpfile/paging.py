"""Virtual-to-physical translation: the page-table walk a CPU does, done on a dump (x64, and x86 with and
without PAE).

The loaded-module list, its names and the exception record are at kernel virtual addresses; a full or
bitmap dump stores physical pages. The header's DirectoryTableBase (CR3 of the crashing context) is the
physical address of the PML4, and from there each level indexes 9 bits of the address:

    bits 47..39 -> PML4E -> PDPT    bits 38..30 -> PDPTE -> page directory (or a 1 GiB page if PS)
    bits 29..21 -> PDE   -> page table (or a 2 MiB page if PS)    bits 20..12 -> PTE -> 4 KiB page

An entry is used only if its Present bit (0) is set. The physical address in an entry is bits 51..12;
bits 63 (NX) and 62..52 are not part of it, and Windows keeps its own bookkeeping there (and in bits
11..9), so they are masked off. A large page's frame is aligned to its size: bits 51..30 for 1 GiB,
51..21 for 2 MiB (bit 12 of a large-page entry is the PAT bit, not an address bit). The low 12 bits of
CR3 carry the PCID and are ignored too.

Not-present entries that Windows would still resolve (transition or prototype PTEs of pageable memory)
are reported as not mapped: the structures a triage needs live in non-paged memory.

x86 (DUMP_HEADER32; its PaeEnabled byte says which of the two):

    non-PAE (`AddressSpace32`): CR3 bits 31..12 -> page directory of 1024 4-byte entries
        bits 31..22 -> PDE -> page table (or a 4 MiB page if PS: frame bits 31..22)
        bits 21..12 -> PTE -> 4 KiB page (frame bits 31..12)
    PAE (`AddressSpacePae`): CR3 bits 31..5 -> page-directory-pointer table of 4 8-byte entries
        bits 31..30 -> PDPTE -> page directory    bits 29..21 -> PDE -> page table (or a 2 MiB page if PS)
        bits 20..12 -> PTE -> 4 KiB page; entries are 8 bytes with the x64 address bits (51..12) and NX
"""

from __future__ import annotations

from collections.abc import Callable, Generator

from scripts.dumpfile.errors import NotInDump

PRESENT = 1 << 0
LARGE = 1 << 7  # PS: this entry maps a page instead of pointing to a table
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000  # bits 51..12
ADDRESS_MASK_2M = 0x000F_FFFF_FFE0_0000  # bits 51..21
ADDRESS_MASK_1G = 0x000F_FFFF_C000_0000  # bits 51..30
_LEVELS = ("PML4E", "PDPTE", "PDE", "PTE")
TABLES_AHEAD = 12  # tables of one upper level fetched whole ahead of the walks, at most


def is_canonical(address: int) -> bool:
    """x64 addresses have 48 significant bits; bits 63..48 must copy bit 47."""
    top = address >> 47
    return top == 0 or top == 0x1FFFF


class AddressSpace:
    """Translates through one set of x64 page tables; `read_u64(physical_address)` reads table entries.

    Each walk is written once, as a generator (`_steps`) that yields the table entry it needs next and is
    sent its value: `translate` drives one walk a read at a time, `prepare` drives many walks in lockstep,
    fetching each level's entries for all of them together (one round trip per level, not per address)."""

    bits = 64
    width = 8  # bytes of a table entry

    def __init__(self, directory_table_base: int, read_u64: Callable[[int], int]):
        self.dtb = directory_table_base & ADDRESS_MASK
        self._read_u64 = read_u64
        self._pages: dict[int, int] = {}  # virtual page -> physical page (a walk per page, not per read)
        self._large: dict[tuple[int, int], int] = {}  # (virtual base, size) of an x64 large page -> physical base
        # the upper levels fetched whole by `prepare` (`_tables_ahead`): levels left, and the tables whose
        # entries point to the next one (x86 tables have too few levels for it to pay)
        self._ahead_levels = 2 if self.bits == 64 else 0
        self._ahead_from = [self.dtb]
        self._ahead_asked = False  # whether the tables in _ahead_from were in a batch already

    def translate(self, address: int) -> int:
        """The physical address of `address`; NotInDump says which level stopped the walk."""
        cached = self.translated(address)
        if cached is not None:
            return cached
        physical = self._walk(address)
        self._pages[address & ~0xFFF] = physical & ~0xFFF
        return physical

    def translated(self, address: int) -> int | None:
        """The physical address of `address` if its page has been translated already, or lies in a large page
        a walk went through (no read)."""
        cached = self._pages.get(address & ~0xFFF)
        if cached is not None:
            return cached | (address & 0xFFF)
        for size in (0x20_0000, 0x4000_0000):
            base = self._large.get((address & ~(size - 1), size))
            if base is not None:
                return base | (address & (size - 1))
        return None

    def in_large_page(self, address: int) -> bool:
        """Whether `address` is in a 2 MiB or 1 GiB page a walk went through: its neighbours in that page are
        physically contiguous with it and translated without a read."""
        return any((address & ~(size - 1), size) in self._large for size in (0x20_0000, 0x4000_0000))

    def _walk(self, address: int) -> int:
        steps = self._steps(address)
        try:
            entry_address, level = next(steps)
            while True:
                try:
                    value = self._read_u64(entry_address)
                except NotInDump:
                    raise NotInDump(address, f"the page table holding its {level} (physical {entry_address:#x}) "
                                             "is not in the dump") from None
                entry_address, level = steps.send(value)
        except StopIteration as done:
            return done.value

    def prepare(self, addresses: list[int], fetch: Callable[[list[tuple[int, int]]], None],
                peek: Callable[[int, int], bytes | None],
                along: Callable[[list[tuple[int, int]]], list[tuple[int, int]]] | None = None,
                upper: bool = True) -> None:
        """Translates the pages of `addresses` together: `fetch(ranges)` brings one level's table entries of
        every walk in one batch, `peek(address, size)` reads one of them (None: not available). Advisory:
        a walk that cannot go on is dropped, and its `translate` later says why. `along(ranges)`, asked before each
        batch, gives more (physical) ranges for it: the bytes of the pages translated so far come with the
        next level's entries instead of after the last. The first batches also bring the upper levels of the
        kernel half's tables whole (`_tables_ahead`; not with `upper=False`: a `fetch` that fetches nothing)."""
        walks: dict[int, Generator[tuple[int, str], int, int]] = {}
        pending: dict[int, tuple[int, str]] = {}
        for page in dict.fromkeys(address & ~0xFFF for address in addresses):
            if self.translated(page) is None:
                walks[page] = self._steps(page)
                self._advance(page, walks[page], None, pending)
        while pending:
            ranges = [(entry_address, self.width) for entry_address, _ in pending.values()]
            ahead = self._tables_ahead(peek) if upper and self._ahead_asked else []  # (the PML4 comes first)
            fetch(ranges + ahead + (along(ranges + ahead) if along is not None else []))
            self._ahead_asked = self._ahead_asked or upper
            for page, (entry_address, _) in list(pending.items()):
                raw = peek(entry_address, self.width)
                del pending[page]
                if raw is not None:
                    self._advance(page, walks[page], int.from_bytes(raw, "little"), pending)

    def _tables_ahead(self, peek: Callable[[int, int], bytes | None]) -> list[tuple[int, int]]:
        """The next upper level of the kernel half's page tables, whole pages, once each: the page-directory-
        pointer tables its PML4 entries point to (fetched with the first walks' PDPTEs), then the page
        directories those point to (with their PDEs). Any kernel address after that costs at most its page
        table and its bytes, and only its bytes under a 2 MiB or 1 GiB page (Windows maps the kernel image
        and the initial non-paged pool with large pages where it can). A kernel has a handful of PDPTs and
        a few dozen page directories; TABLES_AHEAD of them at most, per level. Advisory: an entry that
        does not look like a table (not present, a large page, past the tables fetched) is skipped."""
        if not self._ahead_levels:
            return []
        entries = []
        for table in self._ahead_from:
            data = peek(table, 0x1000)
            if data is None:
                continue  # (it was in the batch before: not in the dump)
            first = 256 if table == self.dtb else 0  # the PML4's kernel half
            entries += [int.from_bytes(data[i * 8:i * 8 + 8], "little") for i in range(first, 512)]
        below = [entry & ADDRESS_MASK for entry in entries if entry & PRESENT and not entry & LARGE]
        self._ahead_from = [table for table in dict.fromkeys(below) if table != self.dtb][:TABLES_AHEAD]
        self._ahead_levels -= 1
        return [(table, 0x1000) for table in self._ahead_from]

    def _advance(self, page: int, steps: Generator[tuple[int, str], int, int], value: int | None,
                 pending: dict[int, tuple[int, str]]) -> None:
        try:
            pending[page] = next(steps) if value is None else steps.send(value)
        except StopIteration as done:
            self._pages[page] = done.value & ~0xFFF
        except NotInDump:
            pass

    def _steps(self, address: int) -> Generator[tuple[int, str], int, int]:
        if not 0 <= address < 1 << 64 or not is_canonical(address):
            raise NotInDump(address, "not a canonical x64 address")
        table = self.dtb
        for level, shift in enumerate((39, 30, 21, 12)):
            index = (address >> shift) & 0x1FF
            entry = yield table + index * 8, _LEVELS[level]
            if not entry & PRESENT:
                raise NotInDump(address, f"not mapped ({_LEVELS[level]} {entry:#x} is not present)")
            if level == 1 and entry & LARGE:
                self._large[(address & ~0x3FFF_FFFF, 0x4000_0000)] = entry & ADDRESS_MASK_1G
                return (entry & ADDRESS_MASK_1G) | (address & 0x3FFF_FFFF)
            if level == 2 and entry & LARGE:
                self._large[(address & ~0x1F_FFFF, 0x20_0000)] = entry & ADDRESS_MASK_2M
                return (entry & ADDRESS_MASK_2M) | (address & 0x1F_FFFF)
            table = entry & ADDRESS_MASK
        return table | (address & 0xFFF)


class AddressSpace32(AddressSpace):
    """x86 without PAE: two levels of 4-byte entries; `read_u32(physical_address)` reads them."""

    bits = 32
    width = 4

    def __init__(self, directory_table_base: int, read_u32: Callable[[int], int]):
        super().__init__(directory_table_base, read_u32)
        self.dtb = directory_table_base & 0xFFFF_F000

    def _steps(self, address: int) -> Generator[tuple[int, str], int, int]:
        if not 0 <= address < 1 << 32:
            raise NotInDump(address, "not a 32-bit address")
        pde = yield self.dtb + (address >> 22) * 4, "PDE"
        if not pde & PRESENT:
            raise NotInDump(address, f"not mapped (PDE {pde:#x} is not present)")
        if pde & LARGE:
            return (pde & 0xFFC0_0000) | (address & 0x3F_FFFF)
        pte = yield (pde & 0xFFFF_F000) + ((address >> 12) & 0x3FF) * 4, "PTE"
        if not pte & PRESENT:
            raise NotInDump(address, f"not mapped (PTE {pte:#x} is not present)")
        return (pte & 0xFFFF_F000) | (address & 0xFFF)


class AddressSpacePae(AddressSpace):
    """x86 with PAE: a 4-entry PDPT, then page directory and page table of 8-byte entries."""

    bits = 32

    def __init__(self, directory_table_base: int, read_u64: Callable[[int], int]):
        super().__init__(directory_table_base, read_u64)
        self.dtb = directory_table_base & 0xFFFF_FFE0

    def _steps(self, address: int) -> Generator[tuple[int, str], int, int]:
        if not 0 <= address < 1 << 32:
            raise NotInDump(address, "not a 32-bit address")
        table = self.dtb + (address >> 30) * 8
        for level, (name, shift) in enumerate((("PDPTE", 21), ("PDE", 12), ("PTE", None))):
            entry = yield table, name
            if not entry & PRESENT:
                raise NotInDump(address, f"not mapped ({name} {entry:#x} is not present)")
            if level == 1 and entry & LARGE:
                return (entry & ADDRESS_MASK_2M) | (address & 0x1F_FFFF)
            if shift is None:
                return (entry & ADDRESS_MASK) | (address & 0xFFF)
            table = (entry & ADDRESS_MASK) + ((address >> shift) & 0x1FF) * 8
        raise AssertionError("unreachable")  # pragma: no cover
