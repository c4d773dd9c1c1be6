"""An independent reader agrees with ours: kdmp-parser (0vercl0k's C++ parser, from PyPI) opens the
builder's full and bitmap dumps and finds the same physical pages, the same translations and the same
bytes at the same virtual addresses. If the builder and our reader shared a misunderstanding of the
format, kdmp-parser would not share it."""

from __future__ import annotations

import random

import pytest

kdmp_parser = pytest.importorskip("kdmp_parser")

from scripts.dumpfile import NotInDump, open_dump  # noqa: E402
from scripts.devkit.dumpbuilder import build_bitmap_dump, build_full_dump  # noqa: E402

KINDS = {
    "full": lambda path: build_full_dump(path),
    "bitmap-kernel": lambda path: build_bitmap_dump(path),
    "bitmap-complete": lambda path: build_bitmap_dump(path, complete=True),
}


@pytest.fixture(scope="module", params=sorted(KINDS))
def pair(request, tmp_path_factory):
    built = KINDS[request.param](tmp_path_factory.mktemp(request.param) / "MEMORY.DMP")
    theirs = kdmp_parser.KernelDumpParser(built.path)
    with open_dump(str(built.path)) as ours:
        yield built, theirs, ours


def test_headers_agree(pair):
    built, theirs, ours = pair
    assert int(theirs.type) == ours.header.dump_type
    assert theirs.directory_table_base == ours.header.directory_table_base & ~0xFFF
    assert theirs.header.BugCheckCode == ours.header.bugcheck_code
    assert tuple(theirs.header.BugCheckCodeParameter) == ours.header.bugcheck_parameters
    assert theirs.header.PsLoadedModuleList == ours.header.ps_loaded_module_list
    assert theirs.header.NumberProcessors == ours.header.processors


def test_same_physical_pages_present(pair):
    built, theirs, ours = pair
    their_pages = set(theirs.pages.keys())
    highest = max(their_pages) // 0x1000 + 2
    our_pages = {pfn * 0x1000 for pfn in range(highest) if ours.physical.file_offset(pfn) is not None}
    assert our_pages == their_pages
    assert len(our_pages) > 40  # not a vacuous comparison


def test_same_bytes_in_physical_pages(pair):
    built, theirs, ours = pair
    pages = sorted(theirs.pages.keys())
    sample = random.Random(5).sample(pages, min(64, len(pages)))
    # plus every page the builder gave content to (the interesting ones are not zero)
    for address in built.probes:
        sample.append(ours.translate(address) & ~0xFFF)
    for page in sample:
        assert bytes(theirs.read_physical_page(page)) == ours.read_physical(page, 0x1000), hex(page)


def test_same_translations_and_virtual_pages(pair):
    built, theirs, ours = pair
    assert len(built.probes) > 20
    for address in built.probes:
        assert theirs.translate_virtual(address) == ours.translate(address), hex(address)
        page = address & ~0xFFF
        assert bytes(theirs.read_virtual_page(page)) == ours.read_virtual(page, 0x1000), hex(address)


def test_both_refuse_unmapped_addresses(pair):
    built, theirs, ours = pair
    for address in built.unmapped:
        assert theirs.translate_virtual(address) is None
        with pytest.raises(NotInDump):
            ours.translate(address)
