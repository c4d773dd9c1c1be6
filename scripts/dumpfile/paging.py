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

    def translate(self, address: int) -> int:
        """The physical address of `address`; NotInDump says which level stopped the walk."""
        page = address & ~0xFFF
        cached = self._pages.get(page)
        if cached is not None:
            return cached | (address & 0xFFF)
        physical = self._walk(address)
        self._pages[page] = physical & ~0xFFF
        return physical

    def translated(self, address: int) -> int | None:
        """The physical address of `address` if its page has been translated already (no read)."""
        cached = self._pages.get(address & ~0xFFF)
        return None if cached is None else cached | (address & 0xFFF)

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
                peek: Callable[[int, int], bytes | None]) -> None:
        """Translates the pages of `addresses` together: `fetch(ranges)` brings one level's table entries of
        every walk in one batch, `peek(address, size)` reads one of them (None: not available). Advisory:
        a walk that cannot go on is dropped, and its `translate` later says why."""
        walks: dict[int, Generator[tuple[int, str], int, int]] = {}
        pending: dict[int, tuple[int, str]] = {}
        for page in dict.fromkeys(address & ~0xFFF for address in addresses):
            if page not in self._pages:
                walks[page] = self._steps(page)
                self._advance(page, walks[page], None, pending)
        while pending:
            fetch([(entry_address, self.width) for entry_address, _ in pending.values()])
            for page, (entry_address, _) in list(pending.items()):
                raw = peek(entry_address, self.width)
                del pending[page]
                if raw is not None:
                    self._advance(page, walks[page], int.from_bytes(raw, "little"), pending)

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
                return (entry & ADDRESS_MASK_1G) | (address & 0x3FFF_FFFF)
            if level == 2 and entry & LARGE:
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
