"""x64 address translation and physical page lookup (run list and bitmap)."""

from __future__ import annotations

import struct

import pytest

from scripts.dumpfile import NotInDump, open_dump
from scripts.dumpfile.paging import AddressSpace, AddressSpace32, AddressSpacePae, is_canonical
from scripts.dumpfile.physical import BitmapHeader, BitmapMemory, PhysicalRun, RunListMemory
from scripts.devkit.dump32 import build_x86_memory_dump
from scripts.devkit.dumpbuilder import DEFAULT_MODULES, GiB, MiB, build_bitmap_dump, build_full_dump

P, RW, PS, NX = 0x1, 0x2, 0x80, 1 << 63
PAT_LARGE = 1 << 12  # bit 12 of a large-page entry is PAT, not an address bit
SOFTWARE = (0x7FF << 52) | 0xE00  # bits Windows uses for itself


class Tables:
    """Hand-built page tables in a dict of physical 8-byte words."""

    def __init__(self):
        self.words: dict[int, int] = {}
        self.reads: list[int] = []

    def set(self, table_pa: int, index: int, value: int) -> None:
        self.words[table_pa + 8 * index] = value

    def read_u64(self, pa: int) -> int:
        self.reads.append(pa)
        if pa >= 0x7000_0000:  # "not in the dump"
            raise NotInDump(pa, "physical page not in the dump")
        return self.words.get(pa, 0)


def va(pml4: int, pdpt: int, pd: int, pt: int, offset: int = 0) -> int:
    address = (pml4 << 39) | (pdpt << 30) | (pd << 21) | (pt << 12) | offset
    return address | (0xFFFF << 48) if pml4 >= 256 else address


@pytest.fixture
def tables():
    t = Tables()
    t.set(0x1000, 0x1F0, 0x2000 | P | RW | SOFTWARE)  # PML4E -> PDPT
    t.set(0x2000, 0x10, 0x3000 | P | RW)  # PDPTE -> PD
    t.set(0x3000, 0x0E4, 0x4000 | P | RW | NX)  # PDE -> PT
    t.set(0x4000, 0x0A7, 0x00ABC000 | P | RW | NX | SOFTWARE)  # PTE -> 4 KiB page
    t.set(0x3000, 0x0E5, 0x0120_0000 | P | PS | PAT_LARGE | NX)  # PDE: 2 MiB page
    t.set(0x2000, 0x11, 0x4000_0000 | P | PS | PAT_LARGE)  # PDPTE: 1 GiB page
    t.set(0x2000, 0x12, 0x7100_0000 | P)  # PDPTE -> a page directory that is not in the dump
    return t


def test_4k_page_ignores_nx_software_bits_and_pcid(tables):
    space = AddressSpace(0x1000 | 0x002, tables.read_u64)  # PCID 2 in CR3
    assert space.translate(va(0x1F0, 0x10, 0xE4, 0xA7, 0x123)) == 0xABC123


def test_2mib_and_1gib_pages(tables):
    """Offsets with bit 12 clear: the PAT bit set in the entries must not leak into the address."""
    space = AddressSpace(0x1000, tables.read_u64)
    assert space.translate(va(0x1F0, 0x10, 0xE5, 0x1AA, 0x234)) == 0x0120_0000 + (0x1AA << 12) + 0x234
    inside = (0x3 << 21) | (0x44 << 12) | 0x678
    assert space.translate(va(0x1F0, 0x11, 0, 0) + inside) == 0x4000_0000 + inside


@pytest.mark.parametrize("address, level", [
    (va(0x1F1, 0, 0, 0), "PML4E"),
    (va(0x1F0, 0x13, 0, 0), "PDPTE"),
    (va(0x1F0, 0x10, 0xE6, 0), "PDE"),
    (va(0x1F0, 0x10, 0xE4, 0xA8), "PTE"),
])
def test_not_present_names_the_level(tables, address, level):
    with pytest.raises(NotInDump, match=f"not mapped \\({level} 0x0 is not present\\)"):
        AddressSpace(0x1000, tables.read_u64).translate(address)


def test_missing_table_page_and_non_canonical_addresses(tables):
    space = AddressSpace(0x1000, tables.read_u64)
    with pytest.raises(NotInDump, match="page table holding its PDE .* is not in the dump"):
        space.translate(va(0x1F0, 0x12, 0, 0))
    with pytest.raises(NotInDump, match="not a canonical"):
        space.translate(0x0000_8000_0000_0000)
    assert is_canonical(0xFFFF_8000_0000_0000) and is_canonical(0x7FFF_FFFF_FFFF)
    assert not is_canonical(0xFFFE_8000_0000_0000)


def test_translations_are_cached_per_page(tables):
    space = AddressSpace(0x1000, tables.read_u64)
    base = va(0x1F0, 0x10, 0xE4, 0xA7)
    space.translate(base + 0x10)
    walked = len(tables.reads)
    assert space.translate(base + 0xFF0) == 0xABCFF0
    assert len(tables.reads) == walked == 4


# -- physical layouts -----------------------------------------------------------------------------


class Bytes:
    """A read_at source over bytes, counting reads."""

    name = "memory"

    def __init__(self, data: bytes):
        self.data, self.size, self.calls = data, len(data), []

    def read_at(self, offset: int, size: int) -> bytes:
        self.calls.append((offset, size))
        return self.data[offset:offset + size]


def test_a_walk_through_a_large_page_translates_its_neighbours_without_reads(tables):
    """One walk through a 2 MiB (or 1 GiB) page: every other address on that page is known with no read."""
    space = AddressSpace(0x1000, tables.read_u64)
    space.translate(va(0x1F0, 0x10, 0xE5, 0x000, 0x10))
    space.translate(va(0x1F0, 0x11, 0x000, 0x000, 0x10))
    reads = len(tables.reads)
    assert space.translated(va(0x1F0, 0x10, 0xE5, 0x1FF, 0x8)) == 0x0120_0000 + 0x1FF008
    assert space.translate(va(0x1F0, 0x11, 0x1FF, 0x1FF, 0xFFF)) == 0x4000_0000 + 0x3FFF_FFFF
    assert len(tables.reads) == reads
    assert space.in_large_page(va(0x1F0, 0x10, 0xE5, 0x100)) and space.in_large_page(va(0x1F0, 0x11, 7, 7))
    space.translate(va(0x1F0, 0x10, 0xE4, 0xA7))
    assert not space.in_large_page(va(0x1F0, 0x10, 0xE4, 0xA7))  # a 4 KiB page
    assert space.translated(va(0x1F0, 0x10, 0xE4, 0xA8)) is None  # its neighbour needs its own PTE


def test_a_batch_brings_the_kernel_halfs_upper_tables_whole(tables):
    """`prepare` fetches the PML4's kernel-half PDPT pages whole with the first walk's PDPTE, and the page
    directories they point to with its PDE (not 1 GiB pages, not the PML4 again): any kernel address after
    that costs its page table at most."""
    tables.set(0x1000, 0x100, 0x5000 | P)  # a second kernel PDPT
    tables.set(0x5000, 0x003, 0x6000 | P)  # -> its page directory
    tables.set(0x1000, 0x1ED, 0x1000 | P)  # the self-map entry: the PML4 itself
    tables.set(0x1000, 0x010, 0x8000 | P)  # a user-half PDPT: not fetched
    batches: list[list[tuple[int, int]]] = []

    def peek(address: int, size: int) -> bytes:
        return b"".join(tables.words.get(at, 0).to_bytes(8, "little") for at in range(address, address + size, 8))

    space = AddressSpace(0x1000, tables.read_u64)
    space.prepare([va(0x1F0, 0x10, 0xE4, 0xA7)], batches.append, peek)
    whole = [sorted(r for r in batch if r[1] == 0x1000) for batch in batches]
    assert whole == [[], [(0x2000, 0x1000), (0x5000, 0x1000)],
                     [(0x3000, 0x1000), (0x6000, 0x1000), (0x7100_0000, 0x1000)], []]
    assert space.translated(va(0x1F0, 0x10, 0xE4, 0xA7)) == 0xABC000
    space.prepare([va(0x1F0, 0x10, 0xE4, 0xA8)], batches.append, peek)
    assert all(size == 8 for _, size in batches[-1])  # the upper tables came once


def test_run_list_skips_holes_and_follows_file_order():
    runs = (PhysicalRun(0x100, 2), PhysicalRun(0x1, 1))  # file order is not address order
    pages = b"".join(bytes([tag]) * 0x1000 for tag in (0xA, 0xB, 0xC))
    memory = RunListMemory(Bytes(bytes(0x2000) + pages), runs, 0x2000)
    assert memory.file_offset(0x100) == 0x2000 and memory.file_offset(0x101) == 0x3000
    assert memory.file_offset(0x1) == 0x4000
    assert memory.file_offset(0x0) is None and memory.file_offset(0x102) is None and memory.file_offset(0x50) is None
    assert memory.read(0x100FFE, 4) == b"\x0a\x0a\x0b\x0b"  # across two file pages
    with pytest.raises(NotInDump):
        memory.read(0x2000, 1)


def test_bitmap_rank_and_lazy_reading():
    chunk_bits = BitmapMemory.CHUNK * 8
    present = [0, 3, chunk_bits - 1, chunk_bits + 5, 3 * chunk_bits + 1]
    bits = 4 * chunk_bits
    bitmap = bytearray(bits // 8)
    for pfn in present:
        bitmap[pfn // 8] |= 1 << (pfn % 8)
    header = BitmapHeader("SDMP", first_page=0x2000 + 0x38 + len(bitmap) + 0x1000 - 0x38, present_pages=len(present), pages=bits)
    data = bytes(0x2000) + b"SDMP" + bytes(0x34) + bytes(bitmap)
    source = Bytes(data + bytes(header.first_page - len(data)))
    memory = BitmapMemory(source, header)
    assert memory.file_offset(3) == header.first_page + 0x1000
    assert memory.chunks_read == 1  # a page at the start of RAM reads only the first chunk of bitmap
    assert memory.file_offset(1) is None
    assert memory.file_offset(chunk_bits + 5) == header.first_page + 3 * 0x1000
    assert memory.file_offset(3 * chunk_bits + 1) == header.first_page + 4 * 0x1000
    assert memory.chunks_read == 4
    assert memory.file_offset(bits + 10) is None


# -- against the builder's real tables ------------------------------------------------------------


@pytest.mark.parametrize("builder", [build_full_dump, build_bitmap_dump])
def test_probes_read_back_through_the_page_tables(tmp_path, builder):
    built = builder(tmp_path / "d.dmp")
    with open_dump(str(built.path)) as dump:
        for address, expected in built.probes.items():
            assert dump.read_virtual(address, 16) == expected, hex(address)
        for address in built.unmapped:
            with pytest.raises(NotInDump):
                dump.read_virtual(address, 1)


def test_read_across_two_physically_distant_pages(tmp_path):
    """The builder puts the second KLDR entry across a page boundary (at page offset 0xFC0); its
    SizeOfImage at +0x40 is on the next virtual page, which is elsewhere in physical memory."""
    built = build_full_dump(tmp_path / "d.dmp")
    with open_dump(str(built.path)) as dump:
        (first,) = struct.unpack("<Q", dump.read_virtual(built.ps_loaded_module_list, 8))
        (second,) = struct.unpack("<Q", dump.read_virtual(first, 8))
        assert second & 0xFFF == 0xFC0
        assert dump.translate(second + 0x40) - dump.translate(second) != 0x40
        entry = dump.read_virtual(second, 0xA0)
        assert struct.unpack_from("<Q", entry, 0x30)[0] == DEFAULT_MODULES[1].base  # DllBase, first page
        assert struct.unpack_from("<I", entry, 0x40)[0] == DEFAULT_MODULES[1].size  # SizeOfImage, second page


def test_large_pages_in_the_built_dump(tmp_path):
    built = build_full_dump(tmp_path / "d.dmp")
    ntos = DEFAULT_MODULES[0]
    with open_dump(str(built.path)) as dump:
        # ntoskrnl.exe: 2 MiB pages, physically contiguous
        assert dump.translate(ntos.base + 2 * MiB + 0x1234) - dump.translate(ntos.base) == 2 * MiB + 0x1234
        # half of the module list lives in the 1 GiB direct map: virtual = 0xFFFFC800_00000000 + physical
        inside_direct_map = [a for a in built.probes if 0xFFFFC80000000000 <= a < 0xFFFFC80000000000 + GiB]
        assert inside_direct_map
        for address in inside_direct_map:
            assert dump.translate(address) == address - 0xFFFFC80000000000


# -- x86: two-level (non-PAE) and PAE tables --------------------------------------------------------------


class Words32:
    """Hand-built x86 tables: 4-byte entries (non-PAE) in a dict of physical words."""

    def __init__(self, width: int):
        self.words: dict[int, int] = {}
        self.width = width

    def set(self, table_pa: int, index: int, value: int) -> None:
        self.words[table_pa + self.width * index] = value

    def read(self, pa: int) -> int:
        if pa >= 0x7000_0000 and pa < 1 << 32:
            raise NotInDump(pa, "physical page not in the dump")
        return self.words.get(pa, 0)


def test_x86_two_level_4k_and_4m_pages():
    t = Words32(4)
    t.set(0x5000, 0x220, 0x6000 | P | RW | 0xE00)  # PDE for 0x88000000 -> page table (software bits 11..9)
    t.set(0x6000, 0x1A3, 0x0123_4000 | P | RW)  # PTE -> 4 KiB page
    t.set(0x5000, 0x208, 0x0080_0000 | P | PS | PAT_LARGE)  # PDE for 0x82000000: a 4 MiB page
    t.set(0x5000, 0x221, 0x7100_0000 | P)  # a page table that is not in the dump
    space = AddressSpace32(0x5000 | 0x18, t.read)  # CR3's low bits (PWT/PCD) are not address bits
    assert space.translate(0x881A3ABC) == 0x1234ABC
    assert space.translate(0x82000000 + 0x3F_1234) == 0x0080_0000 + 0x3F_1234  # PAT bit 12 is no address bit
    with pytest.raises(NotInDump, match=r"not mapped \(PTE 0x0 is not present\)"):
        space.translate(0x881A4000)
    with pytest.raises(NotInDump, match=r"not mapped \(PDE 0x0 is not present\)"):
        space.translate(0x90000000)
    with pytest.raises(NotInDump, match="page table holding its PTE .* is not in the dump"):
        space.translate(0x88400000)
    with pytest.raises(NotInDump, match="not a 32-bit address"):
        space.translate(0xFFFFF80400000000)


def test_x86_pae_pages_above_4gib_2m_pages_and_nx():
    t = Words32(8)
    cr3 = 0x5040  # the PDPT is 32-byte aligned, not page aligned
    t.set(cr3, 2, 0x6000 | P)  # PDPTE 2 (0x80000000..0xBFFFFFFF) -> page directory
    t.set(0x6000, 0x010, 0x7000 | P | RW | NX)  # PDE for 0x82000000 -> page table
    t.set(0x7000, 0x1A3, 0x1_0012_3000 | P | RW | NX | SOFTWARE)  # PTE -> a page above 4 GiB
    t.set(0x6000, 0x011, 0x0120_0000 | P | PS | PAT_LARGE | NX)  # PDE for 0x82200000: a 2 MiB page
    t.set(cr3, 3, 0x7100_0000 | P)  # PDPTE 3 -> a page directory that is not in the dump
    space = AddressSpacePae(cr3, t.read)
    assert space.translate(0x821A3ABC) == 0x1_0012_3ABC
    assert space.translate(0x82200000 + 0x1F_0123) == 0x0120_0000 + 0x1F_0123
    with pytest.raises(NotInDump, match=r"not mapped \(PDPTE 0x0 is not present\)"):
        space.translate(0x12345678)
    with pytest.raises(NotInDump, match=r"not mapped \(PDE 0x0 is not present\)"):
        space.translate(0x82400000)
    with pytest.raises(NotInDump, match="page table holding its PDE .* is not in the dump"):
        space.translate(0xC0001000)


@pytest.mark.parametrize("pae", [True, False])
def test_x86_dump_probes_read_back_through_its_page_tables(tmp_path, pae):
    """A 32-bit complete dump (devkit dump32): the header's PaeEnabled picks the tables; the faulting driver's code
    page of the PAE dump is above 4 GiB."""
    built = build_x86_memory_dump(tmp_path / "x86.dmp", pae=pae)
    with open_dump(str(built.path)) as dump:
        assert type(dump.space) is (AddressSpacePae if pae else AddressSpace32) and dump.memory_unavailable is None
        for address, expected in built.probes.items():
            assert dump.read_virtual(address, 16) == expected, hex(address)
        assert (dump.translate(built.faulting_address) >= 1 << 32) == pae
        ntos = built.modules[0]
        assert dump.translate(ntos.base + 0x40_1234) - dump.translate(ntos.base) == 0x40_1234  # large pages
        with pytest.raises(NotInDump):
            dump.read_virtual(0x90000000, 1)
