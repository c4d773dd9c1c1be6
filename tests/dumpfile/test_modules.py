"""Naming the module an address belongs to: PsLoadedModuleList walks, small-dump driver lists,
and the stop-code / exception-code tables that say which address to look up."""

from __future__ import annotations

import struct

import pytest

from scripts.dumpfile import BadDump, interpret, open_dump
from scripts.dumpfile.bugcheck import bugcheck_name, exception_name
from scripts.devkit.dumpbuilder import (
    DEFAULT_MODULES, Module, build_bitmap_dump, build_full_dump, build_triage_dump,
)

BUILDERS = {"full": build_full_dump, "bitmap": build_bitmap_dump, "triage": build_triage_dump}


@pytest.fixture(params=sorted(BUILDERS))
def built(request, tmp_path):
    return BUILDERS[request.param](tmp_path / f"{request.param}.dmp")


def test_faulting_module_is_named_with_base_size_and_timestamp(built):
    with open_dump(str(built.path)) as dump:
        lookup = dump.module_at(built.faulting_address)
    expected = built.faulting_module
    assert lookup.status == "found" and lookup.list_complete and lookup.problem is None
    assert (lookup.module.name, lookup.module.base, lookup.module.size) == (expected.name, expected.base, expected.size)
    assert lookup.module.timestamp == expected.timestamp
    assert lookup.module.symbol(built.faulting_address) == "contosoflt.sys+0x1a2b"
    assert lookup.modules_seen == len(DEFAULT_MODULES)


def test_all_modules_in_load_order(built):
    with open_dump(str(built.path)) as dump:
        modules = dump.loaded_modules()
    assert [(m.name, m.base, m.size, m.timestamp) for m in modules] == [
        (m.name, m.base, m.size, m.timestamp) for m in DEFAULT_MODULES
    ]


def test_full_paths_are_kept_and_names_are_file_names(built):
    """Full and bitmap dumps have FullDllName for every module; a small dump's string pool names some
    drivers by full path (the builder does so for hal.dll), which must still yield the file name."""
    with open_dump(str(built.path)) as dump:
        by_name = {m.name: m for m in dump.loaded_modules()}
    assert by_name["hal.dll"].path == "\\SystemRoot\\system32\\hal.dll"
    if built.kind != "triage":
        assert by_name["contosoflt.sys"].path == "\\??\\C:\\Program Files\\Contoso\\Agent\\contosoflt.sys"


def test_module_boundaries(tmp_path):
    built = build_full_dump(tmp_path / "d.dmp")
    flt = next(m for m in DEFAULT_MODULES if m.name == "contosoflt.sys")
    with open_dump(str(built.path)) as dump:
        assert dump.module_at(flt.base).module.name == "contosoflt.sys"
        assert dump.module_at(flt.base + flt.size - 1).module.name == "contosoflt.sys"
        end = dump.module_at(flt.base + flt.size)  # exclusive end: the gap before tcpip.sys
        assert end.module is None and end.status == "not-in-any-module"


def test_fault_in_ntoskrnl_large_page(tmp_path):
    built = build_bitmap_dump(tmp_path / "d.dmp", faulting_module="ntoskrnl.exe", fault_offset=0x3F6A20)
    with open_dump(str(built.path)) as dump:
        lookup = dump.module_at(built.faulting_address)
    assert lookup.module.symbol(built.faulting_address) == "ntoskrnl.exe+0x3f6a20"
    assert lookup.module.timestamp == DEFAULT_MODULES[0].timestamp


def test_timestamp_falls_back_to_the_list_entry_when_the_pe_header_is_gone(tmp_path):
    built = build_full_dump(tmp_path / "d.dmp")
    with open_dump(str(built.path)) as dump:
        flt = built.faulting_module
        offset = dump.physical.file_offset(dump.translate(flt.base) >> 12)
    with open(built.path, "r+b") as f:  # the image header page was discarded: zeros
        f.seek(offset)
        f.write(bytes(0x1000))
    with open_dump(str(built.path)) as dump:
        assert dump.module_at(built.faulting_address).module.timestamp == flt.timestamp  # KLDR +0x9C


def _entry_file_offset(dump, index: int) -> int:
    head = dump.header.ps_loaded_module_list
    entry = head
    for _ in range(index + 1):
        (entry,) = struct.unpack("<Q", dump.read_virtual(entry, 8))
    return dump.physical.file_offset(dump.translate(entry) >> 12) + (dump.translate(entry) & 0xFFF)


def test_broken_link_is_reported_not_fatal(tmp_path):
    built = build_full_dump(tmp_path / "d.dmp")
    with open_dump(str(built.path)) as dump:
        third = _entry_file_offset(dump, 2)
    with open(built.path, "r+b") as f:
        f.seek(third)
        f.write(struct.pack("<Q", 0xFFFFF80400001000))  # Flink into unmapped memory
    with open_dump(str(built.path)) as dump:
        lookup = dump.module_at(built.faulting_address)  # contosoflt.sys is the 9th entry: never reached
    assert lookup.module is None and lookup.status == "unavailable" and not lookup.list_complete
    assert lookup.modules_seen == 3
    assert "entry 3" in lookup.problem and "not mapped" in lookup.problem


def test_looping_list_stops(tmp_path):
    built = build_full_dump(tmp_path / "d.dmp")
    with open_dump(str(built.path)) as dump:
        (first,) = struct.unpack("<Q", dump.read_virtual(dump.header.ps_loaded_module_list, 8))
        second = _entry_file_offset(dump, 1)
    with open(built.path, "r+b") as f:
        f.seek(second)
        f.write(struct.pack("<Q", first))  # entry 2 points back to entry 1
    with open_dump(str(built.path)) as dump:
        lookup = dump.module_at(built.faulting_address)
    assert lookup.module is None and "loops back" in lookup.problem


def test_small_dump_driver_name_outside_the_file(tmp_path):
    built = build_triage_dump(tmp_path / "m.dmp")
    with open_dump(str(built.path)) as dump:
        first_entry = dump.triage.driver_list_offset
    with open(built.path, "r+b") as f:
        f.seek(first_entry)
        f.write(struct.pack("<I", built.file_size + 64))
    with open_dump(str(built.path)) as dump, pytest.raises(BadDump, match="name of driver 0 points outside"):
        dump.module_at(built.faulting_address)


def test_lookup_reads_one_name_not_all(tmp_path):
    """Only the matching entry's strings are read: the cheap path a 4 GiB triage relies on."""
    built = build_full_dump(tmp_path / "d.dmp")
    with open_dump(str(built.path)) as dump:
        dump.module_at(built.faulting_address)
        cheap = dump.bytes_read
        dump.loaded_modules()
        assert dump.bytes_read > cheap


# -- stop codes and exception codes ---------------------------------------------------------------


@pytest.mark.parametrize("code", [0x7E, 0x1000007E])
def test_0x7e_parameters(code):
    meaning = interpret(code, (0xC0000005, 0xFFFFF8041FB41A2B, 0xFFFFF20A3C7F2E48, 0xFFFFF20A3C7F2690))
    assert meaning.name == "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED"
    assert meaning.exception_code == 0xC0000005 and meaning.exception_symbol == "STATUS_ACCESS_VIOLATION"
    assert meaning.faulting_address == 0xFFFFF8041FB41A2B and meaning.faulting_address_parameter == 2
    assert meaning.exception_record_address == 0xFFFFF20A3C7F2E48


@pytest.mark.parametrize("code, symbol, words", [
    (0xC0000005, "STATUS_ACCESS_VIOLATION", "access violation"),
    (0x80000003, "STATUS_BREAKPOINT", "breakpoint"),
    (0x80000002, "STATUS_DATATYPE_MISALIGNMENT", "misaligned"),
    (0xC0000094, "STATUS_INTEGER_DIVIDE_BY_ZERO", "division by zero"),
])
def test_exception_names(code, symbol, words):
    assert exception_name(code)[0] == symbol and words in exception_name(code)[1]


def test_other_stop_codes_pick_the_right_parameter():
    d1 = interpret(0xD1, (0x10, 2, 0, 0xFFFFF8041FB41A2B))
    assert d1.name == "DRIVER_IRQL_NOT_LESS_OR_EQUAL" and d1.faulting_address_parameter == 4
    assert d1.exception_code is None and d1.accessed_address == 0x10
    km = interpret(0x1E, (0xC0000005, 0xFFFFF8041FB41A2B, 1, 0x28))
    assert (km.access, km.accessed_address, km.faulting_address) == ("write", 0x28, 0xFFFFF8041FB41A2B)
    nmi = interpret(0x80, (0x4F4454, 0, 0, 0))
    assert nmi.name == "NMI_HARDWARE_FAILURE" and nmi.faulting_address is None
    unknown = interpret(0x12345, (0, 0, 0, 0))
    assert unknown.name is None and unknown.faulting_address is None
    assert bugcheck_name(0x1000008E) == "KERNEL_MODE_EXCEPTION_NOT_HANDLED"
    assert bugcheck_name(0x10000001) == "APC_INDEX_MISMATCH" and bugcheck_name(0xDEADDEAD) == "MANUALLY_INITIATED_CRASH1"
    assert interpret(0x7E, (0xC0000005, 0x8A1B2C3D, 0, 0), pointer_bits=32).faulting_address == 0x8A1B2C3D


def test_long_module_list_with_the_culprit_last(tmp_path):
    """A real VM loads ~200 modules; the walk must reach the end of the list and stay cheap."""
    culprit = next(m for m in DEFAULT_MODULES if m.name == "contosoflt.sys")
    fillers = [Module(f"drv{i:03}.sys", 0xFFFFF80422000000 + i * 0x40000, 0x20000, 0x60000000 + i) for i in range(150)]
    modules = (*[m for m in DEFAULT_MODULES if m is not culprit], *fillers, culprit)
    built = build_bitmap_dump(tmp_path / "d.dmp", modules=modules)
    with open_dump(str(built.path)) as dump:
        lookup = dump.module_at(built.faulting_address)
        assert lookup.module.symbol(built.faulting_address) == "contosoflt.sys+0x1a2b"
        assert lookup.modules_seen == len(modules) and lookup.list_complete
        assert dump.module_at(fillers[77].base + 0x10).module.name == "drv077.sys"
        assert dump.bytes_read < 2 * 1024 * 1024
