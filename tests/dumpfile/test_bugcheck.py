"""Every stop code has its documented name, and the parameters of the frequent ones say what they are.

The table is data (scripts/dumpfile/bugcheck_codes.json): these tests check that it is whole (the count
of Microsoft's "Bug check code reference" and codes that were missing before), that every entry is
well-formed, and that decoding picks the sub-code meaning parameter 1 selects.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from scripts.dumpfile import interpret
from scripts.dumpfile.bugcheck import BUGCHECK_NAMES, base_code, bugcheck_name, describe_parameters

DATA = json.loads((Path(__file__).resolve().parents[2] / "scripts" / "dumpfile" / "bugcheck_codes.json").read_text())
REAL_DUMPS = Path(__file__).resolve().parents[3] / "shared" / "realdumps"

# the 25 most frequent stop codes of the issue (the 0x1000007E/0x1000008E families share their base's entry)
FREQUENT = [0x0A, 0xD1, 0x50, 0x3B, 0x7E, 0x1E, 0x8E, 0x9F, 0x133, 0xEF, 0x139, 0x1A, 0xC2, 0x19, 0x7F, 0xFC,
            0x124, 0xA0, 0xBE, 0xC4, 0xC9, 0xCA, 0x101, 0x154, 0x1000007E, 0x1000008E]
SUBCODED = [0x1A, 0x133, 0x9F, 0x139, 0xC4, 0x19, 0x7F, 0xC2]
HEX = re.compile(r"^0x[0-9a-f]+$")


def test_every_code_of_the_reference_has_a_name():
    """405 codes in the reference's table, plus the 14 added since (0x1A2 ... 0x1F2)."""
    assert len(BUGCHECK_NAMES) == 419
    assert bugcheck_name(0x4A) == "IRQL_GT_ZERO_AT_SYSTEM_SERVICE"  # missing before #14
    assert bugcheck_name(0x1C8) == "MANUALLY_INITIATED_POWER_BUTTON_HOLD"  # missing before #14
    assert bugcheck_name(0x1F2) == "KASAN_ILLEGAL_ACCESS"
    assert bugcheck_name(0x1) == "APC_INDEX_MISMATCH" and bugcheck_name(0xDEADDEAD) == "MANUALLY_INITIATED_CRASH1"
    assert bugcheck_name(0x20001) == "HYPERVISOR_ERROR" and bugcheck_name(0x4000008A) == "THREAD_TERMINATE_HELD_MUTEX"


def test_the_m_variants_have_their_own_documented_name_and_share_the_parameters():
    """WinDbg prints SYSTEM_THREAD_EXCEPTION_NOT_HANDLED_M (1000007e); an undocumented 0x10000000 variant
    takes its base code's name."""
    assert bugcheck_name(0x1000007E) == "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED_M"
    assert bugcheck_name(0x1000008E) == "KERNEL_MODE_EXCEPTION_NOT_HANDLED_M"
    assert bugcheck_name(0x10000050) == "PAGE_FAULT_IN_NONPAGED_AREA"
    assert base_code(0x1000007E) == 0x7E and base_code(0x10000001) == 0x1 and base_code(0x10012345) == 0x10012345
    assert [p.meaning for p in describe_parameters(0x1000008E, (0xC0000005, 1, 2, 3))] == \
           [p.meaning for p in describe_parameters(0x8E, (0xC0000005, 1, 2, 3))]


def test_every_entry_is_well_formed():
    codes = DATA["codes"]
    assert all(HEX.match(code) for code in codes), "codes are lower-case hex strings"
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*[A-Z0-9]", name) for name in codes.values())
    assert len(set(codes.values())) == len(codes), "no name twice"
    assert [int(c, 16) for c in codes] == sorted(int(c, 16) for c in codes)
    for code, entry in DATA["parameters"].items():
        assert HEX.match(code) and code in codes, code
        assert set(entry) <= {"parameters", "subcodes", "values"}, code
        assert len(entry["parameters"]) == 4 and all(isinstance(p, str) and p for p in entry["parameters"]), code
        for index, table in entry.get("values", {}).items():
            assert index in {"1", "2", "3", "4"} and (table == "exception" or table in DATA["tables"]), code
        for sub, meaning in entry.get("subcodes", {}).items():
            assert HEX.match(sub), (code, sub)
            assert set(meaning) <= {"meaning", "parameters"} and meaning["meaning"], (code, sub)
            params = meaning.get("parameters")
            assert params is None or (len(params) == 3 and all(p is None or (isinstance(p, str) and p) for p in params))
    for table in DATA["tables"].values():
        assert all(HEX.match(value) and text for value, text in table.items())


@pytest.mark.parametrize("code", FREQUENT)
def test_the_frequent_codes_say_what_each_parameter_is(code):
    described = describe_parameters(code, (0x3, 0x2, 0x1, 0x0))
    assert [p.index for p in described] == [1, 2, 3, 4]
    assert all(p.meaning for p in described), code


@pytest.mark.parametrize("code", SUBCODED)
def test_parameter_1_selects_a_documented_sub_code_table(code):
    assert len(DATA["parameters"][f"{code:#x}"]["subcodes"]) >= 2


@pytest.mark.parametrize("code, parameters, first, second", [
    (0x1A, (0x41790, 0xFFFFFA8000123450, 0xFFFF, 0), "A page table page has been corrupted",
     "64-bit: the address of the PFN of the corrupted page table page"),
    (0x1A, (0x5200, 0xFFFFB88B4A201000, 0x41, 0x40), "A page on a free pool SLIST has been corrupted",
     "The address of the free pool block"),
    (0x133, (0x0, 0x501, 0x500, 0xFFFFF8041D3C8A60), "A single DPC or ISR exceeded its time allotment",
     "The DPC time count, in ticks"),
    (0x133, (0x1, 0x1E00, 0x1E00, 0xFFFFF8041D3C8A60), "cumulatively at IRQL DISPATCH_LEVEL", "The watchdog period time count"),
    (0x9F, (0x3, 0xFFFFB88B4A201000, 0xFFFFF8041D3C8A60, 0xFFFFB88B4A202000), "blocking a power IRP for too long",
     "The physical device object (PDO) of the stack"),
    (0x139, (0x3, 0xFFFFF20A3C7F2400, 0xFFFFF20A3C7F2358, 0), "A LIST_ENTRY was corrupted",
     "The address of the trap frame"),
    (0xC4, (0x62, 0xFFFFB88B4A201000, 0, 5), "unloading without first freeing its pool allocations", "The name of the driver"),
    (0x19, (0x21, 0xFFFFB88B4A201000, 0x40, 0x4141414141414141), "overran the block", "The pool pointer being freed"),
    (0x7F, (0x8, 0, 0, 0), "Double fault", "Reserved"),
    (0xC2, (0x7, 0x1097, 0x4A2F0001, 0xFFFFB88B4A201000), "free pool that was already freed", "Reserved"),
])
def test_sub_codes_are_decoded(code, parameters, first, second):
    meaning = interpret(code, parameters)
    one, two = meaning.described[0], meaning.described[1]
    assert first in one.decoded and second in two.meaning
    assert meaning.parameter_lines[0].startswith(f"parameter 1 = {parameters[0]:#x}: ") and first in meaning.parameter_lines[0]


def test_a_sub_code_the_reference_does_not_list_is_said_so():
    described = interpret(0x1A, (0x12345678, 1, 2, 3)).described
    assert described[0].decoded == "not a sub-code the reference lists"
    assert described[1].meaning == "Depends on parameter 1"


def test_values_are_decoded_irql_access_and_exception():
    d1 = interpret(0xD1, (0x28, 2, 1, 0xFFFFF8041FB41A2B)).described
    assert (d1[1].decoded, d1[2].decoded) == ("DISPATCH_LEVEL", "write")
    assert interpret(0x0A, (0x28, 0xC, 8, 0)).described[1].decoded == "IRQL 12"
    page_fault = interpret(0x50, (0xFFFF8000DEAD0000, 0x10, 0xFFFFF8041FB41A2B, 0)).described
    assert (page_fault[1].decoded, page_fault[3].decoded) == ("execute", "not-present page")
    seven_e = interpret(0x1000007E, (0xC0000005, 0xFFFFF8041FB41A2B, 0xFFFFF20A3C7F2E48, 0xFFFFF20A3C7F2690))
    assert seven_e.described[0].decoded.startswith("STATUS_ACCESS_VIOLATION")
    assert seven_e.described[2].meaning == "The address of the EXCEPTION_RECORD"
    assert interpret(0xEF, (0xFFFFB88B4A201000, 1, 0, 0)).described[1].decoded == "a thread died"


def test_to_dict_gives_each_parameter_with_its_meaning_and_keeps_the_fault():
    meaning = interpret(0x7E, (0xC0000005, 0xFFFFF8041FB41A2B, 0xFFFFF20A3C7F2E48, 0xFFFFF20A3C7F2690))
    document = meaning.to_dict()
    assert document["parameters"][1] == {"index": 2, "value": "0xfffff8041fb41a2b",
                                         "meaning": "The address where the exception occurred (the faulting instruction)",
                                         "decoded": None}
    assert document["faulting_address"] == "0xfffff8041fb41a2b" and document["faulting_address_parameter"] == 2
    assert document["exception"]["name"] == "STATUS_ACCESS_VIOLATION"
    json.dumps(document)
    unknown = interpret(0x12345, (1, 2, 3, 4)).to_dict()
    assert unknown["name"] is None and [p["meaning"] for p in unknown["parameters"]] == [None] * 4


@pytest.mark.skipif(not REAL_DUMPS.exists(), reason="../shared/realdumps is not here")
@pytest.mark.parametrize("name, code, expected", [
    ("eolaruhagen_083125-14875-01.dmp", 0x4A, "IRQL_GT_ZERO_AT_SYSTEM_SERVICE"),
    ("rizin_triage_arm64.dmp", 0x1C8, "MANUALLY_INITIATED_POWER_BUTTON_HOLD"),
    ("rizin_triage_x64.dmp", 0x1000007E, "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED_M"),
])
def test_real_dumps_have_their_windbg_names(name, code, expected):
    from scripts.dumpfile import read_header

    header = read_header(str(REAL_DUMPS / name))
    meaning = interpret(header.bugcheck_code, header.bugcheck_parameters, header.bits)
    assert (header.bugcheck_code, meaning.name) == (code, expected)
