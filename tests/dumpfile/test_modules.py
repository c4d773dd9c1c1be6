"""Naming the module an address belongs to: PsLoadedModuleList walks, small-dump driver lists,
and the stop-code / exception-code tables that say which address to look up."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from scripts.dumpfile import interpret, open_dump
from scripts.dumpfile.triage import triage
from scripts.dumpfile.bugcheck import bugcheck_name, exception_name
from scripts.devkit.dump32 import build_x86_memory_dump
from scripts.devkit.dumpbuilder import (
    DEFAULT_MODULES, Module, build_bitmap_dump, build_full_dump, build_triage_dump,
)

REAL_DUMPS = Path(__file__).resolve().parents[3] / "shared" / "realdumps"  # read in place, never copied
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


def test_small_dump_driver_name_outside_the_file_costs_only_that_name(tmp_path):
    """Issue #14: one corrupt name refused the whole small dump (BadDump, exit 20) although the stop code and the
    faulting driver were readable. Now the driver keeps its base and size under a placeholder, with a note."""
    built = build_triage_dump(tmp_path / "m.dmp")
    with open_dump(str(built.path)) as dump:
        first_entry = dump.triage.driver_list_offset
    with open(built.path, "r+b") as f:
        f.seek(first_entry)
        f.write(struct.pack("<I", built.file_size + 64))
    with open_dump(str(built.path)) as dump:
        lookup = dump.module_at(built.faulting_address)
        ntos = dump.module_at(DEFAULT_MODULES[0].base + 0x10).module
        modules = dump.loaded_modules()
    assert lookup.module.symbol(built.faulting_address) == "contosoflt.sys+0x1a2b" and lookup.problem is None
    assert ntos.name == f"<unnamed module at {DEFAULT_MODULES[0].base:#x}>" and ntos.size == DEFAULT_MODULES[0].size
    assert ntos.note == f"the name of driver 0 is not readable: it points outside the file ({built.file_size + 64:#x})"
    assert ntos.to_dict()["note"] == ntos.note and [m.name for m in modules[1:]] == [m.name for m in DEFAULT_MODULES[1:]]
    verdict = triage(str(built.path))
    assert verdict.faulting_symbol == "contosoflt.sys+0x1a2b"


@pytest.mark.parametrize("length, text, why", [
    (None, "evil.sys\n\x1b[2Kok.sys", r'not readable: "evil.sys\n\x1b[2Kok.sys"'),
    (None, "\udc00\udc00.sys", "not readable"),
    (0x7FFF, None, "not readable: it claims 32767 bytes"),
])
def test_a_corrupt_name_in_the_module_list_becomes_a_placeholder(tmp_path, length, text, why):
    """A BaseDllName that is implausible, undecodable or carries control characters (which could forge a line of
    the report) names no module: the module is found by its base and size, under a placeholder, with a note."""
    built = build_full_dump(tmp_path / "d.dmp")
    with open_dump(str(built.path)) as dump:
        entry = _entry_file_offset(dump, 8)  # contosoflt.sys
        raw = dump.read_virtual(_entry_address(dump, 8) + 0x58, 16)
        name_length, _, _, buffer = struct.unpack("<HHIQ", raw)
        name_at = dump.physical.file_offset(dump.translate(buffer) >> 12) + (dump.translate(buffer) & 0xFFF)
    with open(built.path, "r+b") as f:
        if text is not None:
            data = text.encode("utf-16-le", "surrogatepass")
            f.seek(name_at)
            f.write(data)
            f.seek(entry + 0x58)
            f.write(struct.pack("<H", len(data)))
        else:
            f.seek(entry + 0x58)
            f.write(struct.pack("<H", length))
    with open_dump(str(built.path)) as dump:
        lookup = dump.module_at(built.faulting_address)
    flt = built.faulting_module
    assert lookup.status == "found" and (lookup.module.base, lookup.module.size) == (flt.base, flt.size)
    assert lookup.module.name == f"<unnamed module at {flt.base:#x}>"
    assert why in lookup.module.note and lookup.problem == lookup.module.note
    assert lookup.module.timestamp == flt.timestamp


def _entry_address(dump, index: int) -> int:
    entry = dump.header.ps_loaded_module_list
    for _ in range(index + 1):
        (entry,) = struct.unpack("<Q", dump.read_virtual(entry, 8))
    return entry


def test_lookup_reads_one_name_not_all(tmp_path):
    """Only the matching entry's strings are read: the cheap path a 4 GiB triage relies on."""
    built = build_full_dump(tmp_path / "d.dmp")
    with open_dump(str(built.path)) as dump:
        dump.module_at(built.faulting_address)
        cheap = dump.bytes_read
        dump.loaded_modules()
        assert dump.bytes_read > cheap


# -- stop codes and exception codes ---------------------------------------------------------------


@pytest.mark.parametrize("code, name", [(0x7E, "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED"),
                                        (0x1000007E, "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED_M")])
def test_0x7e_parameters(code, name):
    meaning = interpret(code, (0xC0000005, 0xFFFFF8041FB41A2B, 0xFFFFF20A3C7F2E48, 0xFFFFF20A3C7F2690))
    assert meaning.name == name  # the _M variant has its own documented name (issue #14), as WinDbg prints it
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
    assert bugcheck_name(0x1000008E) == "KERNEL_MODE_EXCEPTION_NOT_HANDLED_M"  # documented name (issue #14)
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


# -- TimeDateStamp: a build date, or a reproducible-build hash ---------------------------------------------


def _pe_header_page(timestamp: int, debug_types: tuple[int, ...]) -> bytes:
    """A PE32+ header page (written from the PE/COFF specification, not from the reader) whose debug directory,
    at RVA 0x400 inside the page, holds one IMAGE_DEBUG_DIRECTORY per type."""
    page = bytearray(0x1000)
    page[0:2] = b"MZ"
    struct.pack_into("<I", page, 0x3C, 0x100)
    struct.pack_into("<4sHHIIIHH", page, 0x100, b"PE\0\0", 0x8664, 0, timestamp, 0, 0, 0xF0, 0x22)
    optional = 0x118
    struct.pack_into("<H", page, optional, 0x20B)
    struct.pack_into("<I", page, optional + 0x38, 0x12000)  # SizeOfImage
    struct.pack_into("<I", page, optional + 0x3C, 0x400)  # SizeOfHeaders
    struct.pack_into("<I", page, optional + 0x6C, 16)  # NumberOfRvaAndSizes
    struct.pack_into("<II", page, optional + 0x70 + 6 * 8, 0x400, 28 * len(debug_types))  # DataDirectory[DEBUG]
    for i, kind in enumerate(debug_types):  # Characteristics, TimeDateStamp, Major, Minor, Type, SizeOfData, ...
        struct.pack_into("<IIHHIIII", page, 0x400 + 28 * i, 0, timestamp, 0, 0, kind, 0, 0, 0)
    return bytes(page)


@pytest.mark.parametrize("debug_types, kind, utc", [
    ((2, 16), "reproducible-build hash", None),  # CodeView + REPRO: linked with /Brepro
    ((2,), "date", "2024-01-13T02:22:01+00:00"),  # CodeView only: a real link time
])
def test_a_reproducible_build_timestamp_is_not_shown_as_a_date(tmp_path, debug_types, kind, utc):
    """Inbox drivers are linked with /Brepro: their TimeDateStamp is a hash that looks like a date (here one
    before the crash). The image's debug directory says so with an IMAGE_DEBUG_TYPE_REPRO entry."""
    built = build_full_dump(tmp_path / "d.dmp")
    flt = built.faulting_module
    with open_dump(str(built.path)) as dump:
        offset = dump.physical.file_offset(dump.translate(flt.base) >> 12)
    with open(built.path, "r+b") as f:
        f.seek(offset)
        f.write(_pe_header_page(flt.timestamp, debug_types))
    with open_dump(str(built.path)) as dump:
        module = dump.module_at(built.faulting_address).module
    assert module.timestamp == flt.timestamp and module.timestamp_kind == kind
    assert module.to_dict()["timestamp"] == f"{flt.timestamp:#010x}" and module.to_dict()["timestamp_utc"] == utc
    if utc is None:
        assert module.timestamp_utc is None
        assert module.timestamp_text == f"{flt.timestamp:#010x} (a reproducible-build hash, not a date)"
    else:
        assert module.timestamp_text == f"{flt.timestamp:#010x} (2024-01-13 02:22:01 UTC)"


def test_without_the_image_a_stamp_after_the_crash_or_before_nt_is_a_hash(tmp_path):
    """A small dump carries no images: the heuristic decides. A 'date' after the crash (2024-05-17) or before
    Windows NT 3.1 cannot be a build date."""
    modules = (DEFAULT_MODULES[0], Module("late.sys", 0xFFFFF80422000000, 0x20000, 0xC9C03000),
               Module("early.sys", 0xFFFFF80422040000, 0x20000, 0x0D4B8C66),
               Module("contosoflt.sys", 0xFFFFF8041FB40000, 0x12000, 0x65A1F3C9))
    built = build_triage_dump(tmp_path / "m.dmp", modules=modules)
    with open_dump(str(built.path)) as dump:
        kinds = {m.name: (m.timestamp_kind, m.to_dict()["timestamp_utc"]) for m in dump.loaded_modules()}
    assert kinds["late.sys"] == ("reproducible-build hash", None)  # 2077
    assert kinds["early.sys"] == ("reproducible-build hash", None)  # 1977
    assert kinds["contosoflt.sys"] == ("date (unverified)", "2024-01-13T02:22:01+00:00")


@pytest.mark.skipif(not (REAL_DUMPS / "rizin_triage_x64.dmp").exists(), reason="../shared/realdumps is not here")
def test_the_real_small_dump_keeps_its_answer_and_amdppm_has_a_hash_not_2077():
    with open_dump(str(REAL_DUMPS / "rizin_triage_x64.dmp")) as dump:
        lookup = dump.module_at(dump.header.bugcheck_parameters[1])
    module = lookup.module
    assert module.symbol(dump.header.bugcheck_parameters[1]) == "amdppm.sys+0x334c"
    assert module.timestamp == 0xC9C03000 and module.timestamp_kind == "reproducible-build hash"
    assert module.to_dict()["timestamp_utc"] is None  # was "2077-04-05T02:33:36+00:00"


# -- x86 kernels ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pae", [True, False])
def test_x86_dumps_get_the_module_list_and_the_faulting_module(tmp_path, pae):
    """Issue #14: a 32-bit dump was 'x86 page tables are not supported'. Its list has 4-byte pointers and
    UNICODE_STRING32 names; both kinds of x86 page tables lead there."""
    built = build_x86_memory_dump(tmp_path / "x86.dmp", pae=pae)
    with open_dump(str(built.path)) as dump:
        lookup = dump.module_at(built.faulting_address)
        modules = dump.loaded_modules()
    assert lookup.status == "found" and lookup.list_complete and lookup.modules_seen == len(built.modules)
    assert lookup.module.symbol(built.faulting_address) == "contosoflt.sys+0x1a2b"
    assert lookup.module.path == "\\??\\C:\\Program Files\\Contoso\\Agent\\contosoflt.sys"
    assert [(m.name, m.base, m.size, m.timestamp) for m in modules] == \
           [(m.name, m.base, m.size, m.timestamp) for m in built.modules]
    verdict = triage(str(built.path))
    assert verdict.faulting_symbol == "contosoflt.sys+0x1a2b" and verdict.bugcheck.faulting_address_parameter == 2


def test_x86_broken_link_is_reported_not_fatal(tmp_path):
    built = build_x86_memory_dump(tmp_path / "x86.dmp")
    with open_dump(str(built.path)) as dump:
        head = dump.header.ps_loaded_module_list
        (first,) = struct.unpack("<I", dump.read_virtual(head, 4))
        at = dump.translate(first)
        offset = dump.physical.file_offset(at >> 12) + (at & 0xFFF)
    with open(built.path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<I", 0))  # the first entry's Flink
    with open_dump(str(built.path)) as dump:
        lookup = dump.module_at(built.faulting_address)
    assert lookup.status == "unavailable" and lookup.modules_seen == 1
    assert lookup.problem == "the module list has a broken link (0x0) after 1 entries"
