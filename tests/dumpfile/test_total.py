"""Every dump parser is total: for any bytes, a verdict or BadDump (exit 20), never another exception, never a hang.

The bytes are real structures, damaged: the dumps the devkit builds (complete, kernel and complete bitmap,
small, 32-bit full and small) and the real Windows dumps in ../shared/realdumps, with fields overwritten at
the offsets the readers follow, bits flipped and files cut short (tests/base/mutation.py). Hypothesis runs a
fixed, derandomized set of examples, so CI sees the same ones every time; a crash it ever found is kept
below as an explicit regression test.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scripts.base.rangereader import FileBackend, RangeReader
from scripts.cli.triage import rows
from scripts.devkit.dumpbuilder import MiB, build_bitmap_dump, build_full_dump, build_triage_dump, build_x86_dump
from scripts.dumpfile import BadDump, DumpHeader, open_dump, read_header
from scripts.dumpfile.header import PROBE_SIZE
from scripts.dumpfile.triage import triage
from tests.base.mutation import (
    Edit, Mutation, RecordingReader, Target, mutated_reader, mutations, time_limit, truncations,
)

REAL_DUMPS = Path(__file__).resolve().parents[3] / "shared" / "realdumps"  # read in place, never copied

# Field offsets written down from the public headers (mindumpdef.h, ntiodump.h), not taken from the reader.
HEADER64_FIELDS = [(0x008, 4), (0x00C, 4), (0x010, 8), (0x020, 8), (0x030, 4), (0x034, 4), (0x038, 4),
                   (0x040, 8), (0x048, 8), (0x050, 8), (0x058, 8), (0x080, 8), (0x088, 4), (0x090, 8),
                   (0x098, 8), (0x0A0, 8), (0x0A8, 8), (0x0B0, 8), (0xF98, 4), (0xFA0, 8), (0xFA8, 8),
                   (0x1030, 8), (0x1050, 4)]
HEADER32_FIELDS = [(0x008, 4), (0x00C, 4), (0x010, 4), (0x018, 4), (0x020, 4), (0x024, 4), (0x028, 4),
                   (0x02C, 4), (0x030, 4), (0x05C, 1), (0x064, 4), (0x068, 4), (0x06C, 4), (0x070, 4),
                   (0x8A0, 4), (0xF88, 4), (0xFA0, 8), (0xFB8, 8), (0xFC0, 8)]
TRIAGE64_FIELDS = [(0x2000 + at, 4) for at in range(0, 0x48, 4)] + [(0x2048, 8), (0x2060, 8)] + \
                  [(0x2000 + at, 4) for at in range(0x68, 0x80, 4)]
TRIAGE32_FIELDS = [(0x1000 + at, 4) for at in range(0, 0x40, 4)]
BITMAP_FIELDS = [(0x2000, 4), (0x2004, 4), (0x2020, 8), (0x2028, 8), (0x2030, 8)]
# fields that only mean something together: a region's address, file offset and size; a count and its table
TRIAGE64_GROUPS = [[(0x2060, 8, "address"), (0x2068, 4, "offset"), (0x206C, 4, "size")],  # DataPage
                   [(0x2048, 8, "address"), (0x2028, 4, "offset"), (0x202C, 4, "size")],  # the crashing stack
                   [(0x2030, 4, "offset"), (0x2034, 4, "count")], [(0x2038, 4, "offset"), (0x203C, 4, "size")],
                   [(0x2070, 4, "offset"), (0x2074, 4, "size")], [(0x2078, 4, "offset"), (0x207C, 4, "count")],
                   [(0x2004, 4, "size"), (0x2008, 4, "offset")]]
TRIAGE32_GROUPS = [[(0x1004, 4, "size"), (0x1008, 4, "offset")]]
BITMAP_GROUPS = [[(0x2020, 8, "offset"), (0x2028, 8, "count"), (0x2030, 8, "count")]]
RUN_LIST_GROUPS = [[(0x88, 4, "count"), (0x90, 8, "count"), (0x98, 8, "address"), (0xA0, 8, "count")],
                   [(0x90, 8, "count"), (0xA8, 8, "address"), (0xB0, 8, "count")]]
CUTS = [0, 7, 8, 0x1000 - 1, 0x1000, 0x1FFF, 0x2000, 0x2001, 0x2038, 0x2080, 0x3000]
LIMIT_SECONDS = 30  # per example; a triage of an intact dump takes milliseconds
EXAMPLES = int(os.environ.get("CRASHCART_PROPERTY_EXAMPLES", 150))  # more for a deeper local run


def _trace(path: Path) -> list[tuple[int, int]]:
    """The ranges a triage of the intact file reads: the structures worth damaging."""
    reader = RecordingReader(FileBackend(path))
    try:
        triage(reader)
    except BadDump:
        pass  # the truncated real dump: its header is still worth damaging
    finally:
        reader.close()
    return reader.spots


def _target(path: Path, fields: list[tuple[int, int]], groups: list[list[tuple[int, int, str]]]) -> Target:
    header = DumpHeader.parse(path.read_bytes()[:PROBE_SIZE])
    looked_up = list(header.bugcheck_parameters)  # the faulting address, the exception record
    target = Target(path, os.path.getsize(path), fields=fields, cuts=list(CUTS), groups=groups, addresses=looked_up)
    target.add_spots(_trace(path))
    return target


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> dict[str, Target]:
    """The dumps the devkit builds, once per module; the real dumps in place."""
    work = tmp_path_factory.mktemp("dumps")
    x64 = HEADER64_FIELDS
    found = {
        "full": _target(build_full_dump(work / "full.dmp", memory_size=32 * MiB).path,
                        x64 + [(0x88 + 16 + 16 * i + j, 8) for i in range(4) for j in (0, 8)], RUN_LIST_GROUPS),
        "bitmap": _target(build_bitmap_dump(work / "bitmap.dmp", memory_size=32 * MiB).path, x64 + BITMAP_FIELDS,
                          BITMAP_GROUPS),
        "bitmap-complete": _target(build_bitmap_dump(work / "complete.dmp", complete=True, memory_size=32 * MiB).path,
                                   x64 + BITMAP_FIELDS, BITMAP_GROUPS),
        "small": _target(build_triage_dump(work / "small.dmp").path, x64 + TRIAGE64_FIELDS, TRIAGE64_GROUPS),
        "x86": _target(build_x86_dump(work / "x86.dmp", memory_size=32 * MiB).path, HEADER32_FIELDS,
                       [[(0x064, 4, "count"), (0x068, 4, "count"), (0x06C, 4, "address"), (0x070, 4, "count")]]),
        "x86-small": _target(build_x86_dump(work / "x86-small.dmp", triage=True).path,
                             HEADER32_FIELDS + TRIAGE32_FIELDS, TRIAGE32_GROUPS),
    }
    for path in sorted(REAL_DUMPS.glob("*.dmp")):
        found[f"real:{path.name}"] = _target(path, x64 + TRIAGE64_FIELDS + BITMAP_FIELDS,
                                             TRIAGE64_GROUPS + BITMAP_GROUPS + RUN_LIST_GROUPS)
    return found


def _names() -> list[str]:
    real = [f"real:{p.name}" for p in sorted(REAL_DUMPS.glob("*.dmp"))]
    return ["full", "bitmap", "bitmap-complete", "small", "x86", "x86-small", *real]


def assert_total(path: Path, mutation: Mutation) -> None:
    """triage(), open_dump and the header parser on the damaged bytes: an answer or BadDump, nothing else,
    within a read budget and a time limit."""
    with time_limit(LIMIT_SECONDS), mutated_reader(path, mutation) as reader:
        probe = reader.read_at(0, PROBE_SIZE)
        try:
            header = DumpHeader.parse(probe)
            header.check_size(reader.size)
            json.dumps(header.to_dict())
        except BadDump as err:
            _one_line(err)
        try:
            read_header(reader)
        except BadDump as err:
            _one_line(err)
        try:
            with open_dump(reader) as dump:
                dump.loaded_modules()
        except BadDump as err:
            _one_line(err)
        _assert_partial_reads_never_fail(reader)
        try:
            verdict = triage(reader)
        except BadDump as err:
            _one_line(err)
            return
        json.dumps(verdict.to_dict())
        assert verdict.summary and verdict.next_step and rows(verdict)


def _assert_partial_reads_never_fail(reader) -> None:
    """Opened as partial, a dump whose header is whole answers every lookup: damage past the header is the
    lookup's problem (NotInDump), never BadDump or another exception (issue #14)."""
    try:
        dump = open_dump(reader, allow_partial=True)
    except BadDump as err:  # only the header itself (or encryption) can still refuse the dump
        _one_line(err)
        return
    with dump:
        modules = dump.loaded_modules()
        lookups = [dump.module_at(p) for p in dump.header.bugcheck_parameters]
        json.dumps([m.to_dict() for m in modules] + [lookup.problem for lookup in lookups])
        assert dump.partial is None or (dump.partial and "\n" not in dump.partial)


def _one_line(err: BadDump) -> None:
    assert err.message and "\n" not in err.message and err.exit_code == 20


@pytest.mark.parametrize("name", _names())
def test_intact_dumps_still_get_their_verdict(targets, name):
    target = targets[name]
    if name == "real:imhex_dmp64_fulldump_first16k.dmp":  # 16 KiB of a 2 GiB dump: refused whole, read as partial
        with pytest.raises(BadDump, match="truncated"):
            open_dump(str(target.path))
        with open_dump(str(target.path), allow_partial=True) as dump:
            assert dump.partial.startswith("truncated: the file is 16,384 bytes but its complete memory dump")
            assert dump.header.bugcheck_code == 0x5454414D and dump.loaded_modules() == []
            assert "the dump is incomplete: " in dump.module_list_problem
        return
    verdict = triage(str(target.path))
    assert verdict.summary
    assert target.spots, "the trace recorded what the triage read"


@pytest.mark.parametrize("name", _names())
def test_damaged_dumps_give_a_verdict_or_bad_dump(targets, name):
    target = targets[name]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutation=mutations(target))
    def check(mutation: Mutation) -> None:
        assert_total(target.path, mutation)

    check()


@pytest.mark.parametrize("name", _names())
def test_truncated_dumps_give_a_verdict_or_bad_dump(targets, name):
    target = targets[name]

    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(mutation=truncations(target))
    def check(mutation: Mutation) -> None:
        assert_total(target.path, mutation)

    check()


# -- what the property tests found, and the defects of issue #13, kept as explicit examples ----------------


@pytest.mark.skipif(not (REAL_DUMPS / "rizin_triage_x64.dmp").exists(), reason="../shared/realdumps is not here")
def test_found_small_dump_whose_data_page_is_past_the_end():
    """Found by test_damaged_dumps_give_a_verdict_or_bad_dump on the real x64 small dump: DataPage moved onto the
    exception record's page (parameter 3) with its file offset past the end. triage() raised EOFError (exit 70)."""
    mutation = Mutation((Edit(0x2060, b"\x00\x10\x89)\x04\x85\xff\xff"),  # DataPageAddress
                         Edit(0x2068, b"\xac\n\x16\x00"),  # DataPageOffset: 0x160aac, the file is 0x160ab4 long
                         Edit(0x206C, b"\x00\x10\x00\x00")))  # DataPageSize
    with mutated_reader(REAL_DUMPS / "rizin_triage_x64.dmp", mutation) as reader:
        with pytest.raises(BadDump, match="the small dump's data page .* lies outside the"):
            open_dump(reader)
        with open_dump(reader, allow_partial=True) as dump:  # issue #14: the stop code is still there
            assert dump.partial.startswith("corrupt: the small dump's data page") and dump.header.bugcheck_code == 0x1000007E
            assert dump.module_at(dump.header.bugcheck_parameters[1]).status == "unavailable"


@pytest.mark.parametrize("field, name", [
    (0x200C, "context"), (0x2024, "thread"), (0x2070, "debugger data"), (0x2078, "data block table"),
    (0x2068, "data page"),
])
def test_any_small_dump_offset_past_the_end_is_refused(targets, field, name):
    """Every offset TRIAGE_DUMP64 records must lie in the file (before #13 only three were checked)."""
    target = targets["small"]
    mutation = Mutation((Edit(field, struct.pack("<I", target.size + 0x10)),
                         Edit(0x206C, struct.pack("<I", 0x1000))))  # DataPageSize, so that the data page counts
    with mutated_reader(target.path, mutation) as reader:
        with pytest.raises(BadDump, match=f"small dump's {name} .*past the end|small dump's {name} .*outside"):
            open_dump(reader)


@pytest.mark.parametrize("name, length", [("bitmap", 0x2000), ("bitmap", 0x2010), ("small", 0x2000),
                                          ("small", 0x2040), ("x86-small", 0x1000)])
def test_a_dump_cut_before_its_second_header_ends_is_refused_by_its_own_size_fields(targets, name, length):
    """The header alone said nothing about the size of a bitmap or small dump whose second header was cut off:
    check_size let an 8 KiB MEMORY.DMP through (snapshot-export collected it, exit 0, while triage refused it)."""
    with mutated_reader(targets[name].path, Mutation((), length)) as reader:
        header = DumpHeader.parse(reader.read_at(0, PROBE_SIZE))
        with pytest.raises(BadDump, match=f"truncated: the file is {length:,} bytes"):
            header.check_size(reader.size)
        with pytest.raises(BadDump, match="truncated"):
            read_header(reader)


# -- partial dumps (issue #14): a whole header still gives its stop code ---------------------------------------


def _cut_copy(target: Target, tmp_path: Path, length: int) -> Path:
    path = tmp_path / f"cut-{length}.dmp"
    with open(target.path, "rb") as source:
        path.write_bytes(source.read(length))
    return path


@pytest.mark.parametrize("name, length", [
    ("full", None), ("bitmap", None), ("bitmap-complete", None), ("small", None),
    ("bitmap", 0x2000), ("small", 0x2000), ("full", 0x2000 + 0x3000),
])
def test_a_truncated_dump_with_a_whole_header_opens_as_partial(targets, tmp_path, name, length):
    """Refused whole (BadDump, exit 20) before; opened as partial the header's stop code and parameters are there,
    and every lookup answers (found, or unavailable with its reason) instead of failing."""
    target = targets[name]
    path = _cut_copy(target, tmp_path, length or target.size // 2)
    header = DumpHeader.parse(target.path.read_bytes()[:PROBE_SIZE])
    with pytest.raises(BadDump, match="truncated"):
        open_dump(str(path))
    with open_dump(str(path), allow_partial=True) as dump:
        assert dump.partial.startswith("truncated") and "\n" not in dump.partial
        assert (dump.header.bugcheck_code, dump.header.bugcheck_parameters) == (header.bugcheck_code,
                                                                                 header.bugcheck_parameters)
        lookup = dump.module_at(header.bugcheck_parameters[1])
        assert lookup.status in ("found", "unavailable")
        if lookup.status == "unavailable":
            assert lookup.problem
        dump.loaded_modules()


def test_a_bitmap_dump_cut_after_its_header_has_no_memory_but_says_why(targets, tmp_path):
    path = _cut_copy(targets["bitmap"], tmp_path, 0x2000)
    with open_dump(str(path), allow_partial=True) as dump:
        assert dump.memory_unavailable == ("the dump is incomplete: truncated: the file is 8,192 bytes but its kernel or "
                                           "automatic memory dump (bitmap) layout needs 8,248 (56 bytes missing)")
        lookup = dump.module_at(dump.header.bugcheck_parameters[1])
    assert lookup.status == "unavailable" and lookup.problem == dump.memory_unavailable


def test_a_small_dump_without_its_end_marker_still_names_the_driver(targets, tmp_path):
    """Windows writes 'TRGD' last: without it the small dump is incomplete, yet its driver list may be whole."""
    target = targets["small"]
    data = bytearray(target.path.read_bytes())
    data[-4:] = b"\0\0\0\0"
    path = tmp_path / "no-marker.dmp"
    path.write_bytes(bytes(data))
    with pytest.raises(BadDump, match="'TRGD' end marker"):
        open_dump(str(path))
    with open_dump(str(path), allow_partial=True) as dump:
        assert dump.partial.startswith("corrupt or incomplete small dump: expected the 'TRGD' end marker")
        lookup = dump.module_at(dump.header.bugcheck_parameters[1])
    assert lookup.module.name == "contosoflt.sys"


def test_a_full_dump_whose_module_pages_are_cut_off_reports_them_missing(tmp_path):
    """A complete dump cut right after its first pages: the list head (in ntoskrnl, high in physical memory) is
    past the end, which is the lookup's problem, not an error."""
    built = build_full_dump(tmp_path / "d.dmp", memory_size=32 * MiB)
    with open(built.path, "r+b") as f:
        f.truncate(0x2000 + 0x10 * 0x1000)
    with open_dump(str(built.path), allow_partial=True) as dump:
        lookup = dump.module_at(built.faulting_address)
        assert lookup.status == "unavailable" and "the dump is incomplete: " in lookup.problem
        assert "past the end of the file" in lookup.problem
        assert dump.partial.startswith("truncated: the file is 73,728 bytes")


@pytest.mark.parametrize("length", [0, 0x800, 0x1FFF])
def test_a_dump_cut_inside_its_header_is_still_refused(targets, tmp_path, length):
    path = _cut_copy(targets["full"], tmp_path, length)
    with pytest.raises(BadDump):
        open_dump(str(path), allow_partial=True)


def test_a_bitmap_dump_with_a_damaged_bitmap_header_keeps_its_stop_code(targets, tmp_path):
    """Damaged past the DUMP_HEADER64 (the 'SDMP' header at 0x2000), whole in size: partial, with the reason."""
    data = bytearray(targets["bitmap"].path.read_bytes())
    data[0x2000:0x2008] = b"XXXXXXXX"
    path = tmp_path / "bad-bitmap.dmp"
    path.write_bytes(bytes(data))
    with pytest.raises(BadDump, match="expected the bitmap header"):
        open_dump(str(path))
    with open_dump(str(path), allow_partial=True) as dump:
        assert dump.partial.startswith("corrupt: expected the bitmap header ('SDMP' or 'FDMP' then 'DUMP') at 0x2000")
        assert dump.header.bugcheck_code == 0x7E and dump.memory_unavailable == f"the dump is incomplete: {dump.partial}"
        assert dump.module_at(dump.header.bugcheck_parameters[1]).problem == dump.memory_unavailable


@pytest.mark.skipif(not (REAL_DUMPS / "rizin_triage_x64.dmp").exists(), reason="../shared/realdumps is not here")
def test_a_culprit_without_a_name_gets_no_vendor_advice():
    """The real x64 small dump cut at 100,000 bytes (found by the CLI review): the faulting module's name is past
    the cut, so the culprit is `<unnamed module at ...>`; the next step said "install its vendor's fixed version,
    or disable it", which nobody can do for a module without a name."""
    with mutated_reader(REAL_DUMPS / "rizin_triage_x64.dmp", Mutation((), 100_000)) as reader:
        verdict = triage(reader)
    assert verdict.culprit.frame.module.name.startswith("<unnamed module at ")
    assert "vendor" not in verdict.next_step and "disable it" not in verdict.next_step
    assert f"lm a {verdict.culprit.frame.module.base:#x}" in verdict.next_step
