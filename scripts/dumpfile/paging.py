"""x64 virtual-to-physical translation: the 4-level page-table walk a CPU does, done on a dump.

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
"""

from __future__ import annotations

from collections.abc import Callable

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
    """Translates through one set of page tables; `read_u64(physical_address)` reads table entries."""

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

    def _walk(self, address: int) -> int:
        if not 0 <= address < 1 << 64 or not is_canonical(address):
            raise NotInDump(address, "not a canonical x64 address")
        table = self.dtb
        for level, shift in enumerate((39, 30, 21, 12)):
            index = (address >> shift) & 0x1FF
            entry_address = table + index * 8
            try:
                entry = self._read_u64(entry_address)
            except NotInDump:
                raise NotInDump(address, f"the page table holding its {_LEVELS[level]} "
                                         f"(physical {entry_address:#x}) is not in the dump") from None
            if not entry & PRESENT:
                raise NotInDump(address, f"not mapped ({_LEVELS[level]} {entry:#x} is not present)")
            if level == 1 and entry & LARGE:
                return (entry & ADDRESS_MASK_1G) | (address & 0x3FFF_FFFF)
            if level == 2 and entry & LARGE:
                return (entry & ADDRESS_MASK_2M) | (address & 0x1F_FFFF)
            table = entry & ADDRESS_MASK
        return table | (address & 0xFFF)
