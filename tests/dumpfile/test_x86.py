"""x86 kernel bitmap and small dumps (issue #14, item 4): BITMAP_DUMP32 or TRIAGE_DUMP32 at 0x1000.

The dumps come from scripts.devkit.dump32, which writes the summary header from volatility3's layout, not
from crashcart's reader. Before this, a 32-bit bitmap dump was "reading memory from a 32-bit kernel ...
dump (dump type 5) is not supported": no module list, no faulting module.
"""

from __future__ import annotations

import struct

import pytest

from scripts.devkit.dump32 import build_x86_bitmap_dump, build_x86_small_dump
from scripts.dumpfile import open_dump
from scripts.dumpfile.errors import BadDump, NotInDump
from scripts.dumpfile.triage import triage

FAULTING = "contosoflt.sys+0x1a2b"


@pytest.mark.parametrize("pae", [True, False])
def test_x86_bitmap_dumps_name_the_faulting_module(tmp_path, pae):
    built = build_x86_bitmap_dump(tmp_path / "x86k.dmp", pae=pae)
    with open_dump(str(built.path)) as dump:
        assert (dump.header.bits, dump.header.dump_type, dump.memory_unavailable) == (32, 5, None)
        assert dump.header.bitmap.offset == 0x1000 and not dump.header.bitmap.complete
        lookup = dump.module_at(built.faulting_address)
        modules = dump.loaded_modules()
        for va, data in built.probes.items():
            assert dump.read_virtual(va, len(data)) == data
    assert lookup.status == "found" and lookup.list_complete and lookup.modules_seen == len(built.modules)
    assert lookup.module.symbol(built.faulting_address) == FAULTING
    assert [(m.name, m.base, m.size, m.timestamp) for m in modules] == \
           [(m.name, m.base, m.size, m.timestamp) for m in built.modules]
    verdict = triage(str(built.path))
    assert verdict.faulting_symbol == FAULTING


def test_x86_bitmap_dump_leaves_out_pages_the_kernel_did_not_use(tmp_path):
    """Only pages whose bit is set are in the file: a page of RAM with a clear bit is 'not in the dump'
    (a run-list reading of the same file would hand back some other page's bytes)."""
    built = build_x86_bitmap_dump(tmp_path / "x86k.dmp", pae=False)
    with open_dump(str(built.path)) as dump:
        bitmap = dump.source.read_at(dump.header.bitmap.bitmap_offset, dump.header.bitmap.bitmap_bytes)
        clear = next(pfn for pfn in range(0x100, 0x2000) if not bitmap[pfn >> 3] >> (pfn & 7) & 1)
        with pytest.raises(NotInDump):
            dump.read_physical(clear << 12, 16)
    assert built.file_size < 0x1000 + built.memory_size + 32 * 0x100000  # smaller than its 32 MiB of RAM


def _patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_x86_bitmap_dump_with_a_bad_summary_header_is_refused(tmp_path):
    built = build_x86_bitmap_dump(tmp_path / "x86k.dmp")
    _patch(built.path, 0x1000, b"XXXX")
    with pytest.raises(BadDump) as err:
        open_dump(str(built.path))
    assert "expected the bitmap header ('SDMP' or 'FDMP' then 'DUMP') at 0x1000" in err.value.message


def test_x86_bitmap_dump_whose_count_disagrees_is_partial_not_fatal(tmp_path):
    """Without PAE the 32 MiB machine's bitmap is one chunk, so the first read checks the count."""
    built = build_x86_bitmap_dump(tmp_path / "x86k.dmp", pae=False)
    with open(built.path, "rb") as f:
        f.seek(0x1028)
        (pages,) = struct.unpack("<Q", f.read(8))
    _patch(built.path, 0x1028, struct.pack("<Q", pages - 1))  # Pages: one fewer than the bits set
    with open_dump(str(built.path), allow_partial=True) as dump:
        lookup = dump.module_at(built.faulting_address)
        assert lookup.module is None and dump.partial is not None
        assert f"has {pages} bits set but its header counts {pages - 1}" in dump.partial


def test_x86_bitmap_dump_cut_inside_its_summary_header(tmp_path):
    built = build_x86_bitmap_dump(tmp_path / "x86k.dmp")
    with open(built.path, "r+b") as f:
        f.truncate(0x1020)
    with pytest.raises(BadDump) as err:
        open_dump(str(built.path))
    assert "truncated" in err.value.message
    with open_dump(str(built.path), allow_partial=True) as dump:
        assert dump.header.bugcheck_code == built.bugcheck_code
        assert "layout needs 4,152" in dump.memory_unavailable  # 0x1000 + the 0x38-byte summary header
        assert dump.module_at(built.faulting_address).status == "unavailable"


# -- x86 small dumps: TRIAGE_DUMP32 + DUMP_DRIVER_ENTRY32 ---------------------------------------------------


def test_x86_small_dump_names_the_faulting_driver(tmp_path):
    """Before: '32-bit small dumps: the driver list is not read (x64 only)' - no module, no faulting driver."""
    built = build_x86_small_dump(tmp_path / "Mini.dmp")
    with open_dump(str(built.path)) as dump:
        assert dump.triage is not None and dump.triage.driver_count == len(built.modules)
        lookup = dump.module_at(built.faulting_address)
        modules = dump.loaded_modules()
        for va, data in built.probes.items():  # the crashing thread's stack page
            assert dump.read_virtual(va, len(data)) == data
    assert lookup.status == "found" and lookup.list_complete
    assert lookup.module.symbol(built.faulting_address) == FAULTING
    assert lookup.module.path == "\\??\\C:\\Program Files\\Contoso\\Agent\\contosoflt.sys"
    assert [(m.name, m.base, m.size, m.timestamp) for m in modules] == \
           [(m.name, m.base, m.size, m.timestamp) for m in built.modules]
    assert triage(str(built.path)).faulting_symbol == FAULTING


def test_x86_small_dump_with_a_driver_list_past_the_end_is_refused(tmp_path):
    built = build_x86_small_dump(tmp_path / "Mini.dmp")
    _patch(built.path, 0x1000 + 0x34, struct.pack("<I", 5000))  # DriverCount: 5000 * 0x4C bytes
    with pytest.raises(BadDump) as err:
        open_dump(str(built.path))
    assert "the small dump's driver list (380000 bytes at 0x1068) lies outside" in err.value.message


def test_x86_small_dump_without_its_end_marker_is_refused(tmp_path):
    built = build_x86_small_dump(tmp_path / "Mini.dmp")
    _patch(built.path, built.file_size - 4, b"\0\0\0\0")
    with pytest.raises(BadDump) as err:
        open_dump(str(built.path))
    assert "'TRGD' end marker" in err.value.message
