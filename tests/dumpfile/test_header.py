"""Dump headers: every field an operator sees, and every way a file can fail to be a usable dump."""

from __future__ import annotations

import struct

import pytest

from scripts.dumpfile import BadDump, DumpHeader, DumpType, open_dump, read_header
from scripts.base.errors import ExitCode
from scripts.base.rangeio import open_source
from scripts.devkit.dumpbuilder import (
    DEFAULT_TIME, MiB, build_bitmap_dump, build_full_dump, build_triage_dump, build_x86_dump,
)


def patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def bad_dump_message(path) -> str:
    with pytest.raises(BadDump) as caught:
        open_dump(str(path)).close()
    assert caught.value.exit_code == ExitCode.BAD_DUMP
    return caught.value.message


@pytest.fixture
def full(tmp_path):
    return build_full_dump(tmp_path / "MEMORY.DMP", processors=4, bugcheck_code=0x1000007E, build=17763)


# -- fields ---------------------------------------------------------------------------------------


def test_x64_full_dump_header_fields(full):
    h = read_header(str(full.path))
    assert (h.bits, h.machine, h.processors, h.minor_version) == (64, "x64", 4, 17763)
    assert h.type == DumpType.FULL and h.kind == "complete memory dump"
    assert h.bugcheck_code == 0x1000007E
    assert h.bugcheck_parameters == full.bugcheck_parameters
    assert h.system_time == DEFAULT_TIME
    assert h.required_dump_space == full.file_size
    assert h.directory_table_base == full.directory_table_base
    assert h.ps_loaded_module_list == full.ps_loaded_module_list
    # the run list describes the VM's RAM with its holes: page 0 and 0xA0..0xFF are not RAM
    assert [(r.base_page, r.page_count) for r in h.physical_runs] == [(0x1, 0x9F), (0x100, 64 * MiB // 0x1000 - 0x100)]
    assert h.minimum_file_size == full.file_size
    assert not h.encrypted


def test_bitmap_and_small_dump_kinds(tmp_path):
    kernel = read_header(str(build_bitmap_dump(tmp_path / "k.dmp").path))
    complete = read_header(str(build_bitmap_dump(tmp_path / "c.dmp", complete=True).path))
    small = read_header(str(build_triage_dump(tmp_path / "m.dmp").path))
    assert kernel.type == complete.type == DumpType.BITMAP_FULL
    assert kernel.kind == "kernel or automatic memory dump (bitmap)" and kernel.bitmap.signature == "SDMP"
    assert complete.kind == "complete memory dump (bitmap)" and complete.bitmap.signature == "FDMP"
    assert small.type == DumpType.TRIAGE and small.kind == "small memory dump (minidump)"
    assert small.triage is not None and small.triage.driver_count == 10


def test_x86_header_fields(tmp_path):
    built = build_x86_dump(tmp_path / "x86.dmp", bugcheck_code=0x8E, processors=1, exception_code=0x80000003)
    h = read_header(str(built.path))
    assert (h.bits, h.machine, h.processors, h.header_size) == (32, "x86", 1, 0x1000)
    assert h.type == DumpType.FULL and h.pae_enabled is True
    assert h.bugcheck_code == 0x8E and h.bugcheck_parameters[0] == 0x80000003
    assert h.system_time == DEFAULT_TIME and h.required_dump_space == built.file_size
    small = read_header(str(build_x86_dump(tmp_path / "x86m.dmp", triage=True).path))
    assert small.type == DumpType.TRIAGE and small.bits == 32


def test_parse_accepts_just_the_header_bytes(full):
    """Another component verifies uploads from the first bytes of a blob."""
    data = full.path.read_bytes()[:0x2000]
    h = DumpHeader.parse(data)
    assert h.bugcheck_code == 0x1000007E and h.minimum_file_size == full.file_size
    with pytest.raises(BadDump, match="truncated"):
        h.check_size(full.file_size - 0x1000)


# -- encryption -----------------------------------------------------------------------------------


def test_encrypted_dump_is_reported_and_refused(tmp_path):
    built = build_full_dump(tmp_path / "enc.dmp", encrypted=True)
    assert read_header(str(built.path)).encrypted  # the header itself is readable...
    message = bad_dump_message(built.path)  # ...the memory is not
    assert "encrypted" in message


def test_encrypted_x86_and_small_dumps_are_refused(tmp_path):
    assert "encrypted" in bad_dump_message(build_x86_dump(tmp_path / "x.dmp", encrypted=True).path)
    assert "encrypted" in bad_dump_message(build_triage_dump(tmp_path / "m.dmp", encrypted=True).path)


def test_page_fill_in_attributes_is_not_encryption(full):
    """Older kernels leave DUMP_FILE_ATTRIBUTES as 'PAGE' filler, whose bit 8 happens to be set."""
    patch(full.path, 0x1050, b"PAGE")
    assert not read_header(str(full.path)).encrypted
    open_dump(str(full.path)).close()


# -- not a dump -----------------------------------------------------------------------------------


@pytest.mark.parametrize("content, expected", [
    (b"", "only 0 bytes"),
    (bytes(0x3000), "starts with zeros"),
    (b"MDMP\x93\xa7" + bytes(0x3000), "user-mode minidump"),
    (b"MZ\x90\x00" + bytes(0x3000), "not a Windows kernel dump"),
    (b"PAGEPAGE" * 0x600, "never completed"),
    (b"PAGEXXXX" + bytes(0x3000), "unknown header flavour"),
    (b"PAGEDU64" + bytes(0x100), "shorter than the 8192-byte"),
    (b"PAGEDUMP" + bytes(0x100), "shorter than the 4096-byte"),
])
def test_files_that_are_not_dumps(tmp_path, content, expected):
    path = tmp_path / "x.dmp"
    path.write_bytes(content)
    assert expected in bad_dump_message(path)


@pytest.mark.parametrize("offset, data, expected", [
    (0xF98, b"PAGE", "never completed"),  # DumpType still the fill pattern
    (0xF98, struct.pack("<I", 99), "unknown dump type 99"),
    (0x30, struct.pack("<I", 0x14C), "machine type 0x14c (x86) in a 64-bit"),
    (0x34, struct.pack("<I", 0), "0 processors"),
    (0x88, b"PAGE", "runs"),  # run count never written
    (0x90, struct.pack("<Q", 12345), "add up to"),  # NumberOfPages disagrees with the runs
    (0xA8, struct.pack("<Q", 0x50), "overlap"),  # run 2 starts inside run 1
])
def test_corrupt_header_fields(full, offset, data, expected):
    patch(full.path, offset, data)
    message = bad_dump_message(full.path)
    assert expected in message
    assert message.startswith(("corrupt", "the dump header"))


def test_corrupt_bitmap_header(tmp_path):
    built = build_bitmap_dump(tmp_path / "k.dmp")
    patch(built.path, 0x2000, b"XDMP")
    assert "expected the bitmap header" in bad_dump_message(built.path)
    built = build_bitmap_dump(tmp_path / "k2.dmp")
    patch(built.path, 0x2020, struct.pack("<Q", 0x2040))  # FirstPage inside the bitmap
    assert "inside its own" in bad_dump_message(built.path)


def test_bitmap_whose_bits_disagree_with_its_count(tmp_path):
    built = build_bitmap_dump(tmp_path / "k.dmp")
    with open(built.path, "r+b") as f:
        f.seek(0x2028)
        present = struct.unpack("<Q", f.read(8))[0]
        f.seek(0x2028)
        f.write(struct.pack("<Q", present - 1))  # still fits the file, but not the bitmap
    with pytest.raises(BadDump, match="bits set but its header counts"):
        with open_dump(str(built.path)) as dump:
            dump.loaded_modules()


# -- truncated ------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", [build_full_dump, build_bitmap_dump, build_triage_dump])
def test_truncated_dumps_say_how_much_is_missing(tmp_path, builder):
    built = builder(tmp_path / "t.dmp")
    cut = built.file_size - 3 * 0x1000
    with open(built.path, "r+b") as f:
        f.truncate(cut)
    message = bad_dump_message(built.path)
    assert message.startswith("truncated")
    assert f"{cut:,} bytes" in message and f"needs {built.file_size:,}" in message
    assert "12.0 KiB missing" in message


def test_small_dump_without_its_end_marker(tmp_path):
    built = build_triage_dump(tmp_path / "m.dmp")
    patch(built.path, built.file_size - 4, b"\0\0\0\0")
    assert "'TRGD' end marker" in bad_dump_message(built.path)


def test_small_dump_with_offsets_outside_the_file(tmp_path):
    built = build_triage_dump(tmp_path / "m.dmp")
    patch(built.path, 0x2000 + 0x30, struct.pack("<I", built.file_size + 0x1000))  # DriverListOffset
    assert "driver list" in bad_dump_message(built.path)


def test_read_header_on_an_open_reader_does_not_close_it(full):
    with open_source(str(full.path)) as reader:
        assert read_header(reader).bugcheck_code == 0x1000007E
        assert not reader.closed
        assert reader.bytes_read <= 0x3000  # the header, not the dump


def test_readme_exit_code_table_is_exit_code():
    """README's "Exit codes" table and ExitCode are one contract: every code documented, nothing undocumented
    (exit 21, a partial dump's verdict, came with issue #14)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", section, re.MULTILINE)}
    assert documented == {int(code) for code in ExitCode}
    assert ExitCode.DUMP_PARTIAL == 21 and "partial" in re.search(r"^\| 21 \|(.*)$", section, re.MULTILINE).group(1)
