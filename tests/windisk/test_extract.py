"""scripts.windisk.extract over real disk images: MBR and GPT layouts, NTFS written by ntfs-3g (fragmented with an
$ATTRIBUTE_LIST, sparse, a dump inside pagefile.sys), SYSTEM hives from hivebuilder, BitLocker volumes.

The images are read through scripts.base.rangeio exactly as the export reads a SAS URL (here a local file), and
every dump is read back through its extent map and compared with the file that was written."""

from __future__ import annotations

import hashlib
import io

import pytest

from scripts.windisk import extract
from scripts.windisk.errors import ExtractError
from scripts.base.errors import ExitCode
from scripts.base.rangeio import open_source
from scripts.devkit import gptdisk

pytestmark = pytest.mark.skipif(gptdisk.can_build() is not None, reason=str(gptdisk.can_build()))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _inspect(recipe: str):
    disk = gptdisk.shared_disk(recipe)
    reader = open_source(str(disk.image.path), block_size=64 * 1024)
    return disk, reader, extract.inspect_disk(reader)


def test_generation2_gpt_disk_fragmented_dump_current_control_set():
    disk, reader, found = _inspect("gpt-fragmented")
    metadata_bytes = reader.bytes_read
    assert found.scheme == "gpt" and not found.vhd_footer
    names = [p["name"] for p in found.partitions]
    assert names[:3] == ["EFI system partition", "Microsoft reserved partition", "Basic data partition"]
    assert found.volume.number == 3 and found.volume.offset == disk.image.windows_offset
    # Select\Current = 2: ControlSet001 holds decoy values that must not be used
    assert found.crash_control["control_set"] == "ControlSet002"
    assert found.crash_control["DumpFile"] == r"%SystemRoot%\MEMORY.DMP"
    assert found.crash_control["CrashDumpEnabled"] == 1
    kinds = {d.kind: d for d in found.dumps}
    assert set(kinds) == {"memory", "minidump"}
    memory = kinds["memory"]
    assert memory.blob_suffix == "MEMORY.DMP" and memory.header.bugcheck_code == 0x7E
    assert memory.file.fragments > 200  # one run per 128 KiB hole: the runlist spills into an $ATTRIBUTE_LIST
    from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE

    assert ATTRIBUTE_TYPE_CODE.ATTRIBUTE_LIST in found.volume.ntfs.mft.get("Windows/MEMORY.DMP").attributes
    # finding everything cost a few hundred KiB, not the dump
    assert metadata_bytes < 1 << 20
    original = disk.originals["Windows/MEMORY.DMP"].read_bytes()
    assert _sha(memory.file.read(reader, 0, memory.file.size)) == _sha(original)
    mini = kinds["minidump"]
    assert mini.blob_suffix == "Minidump/051724-21453-01.dmp" and mini.header.dump_type == 4
    assert mini.file.read(reader, 0, mini.file.size) == disk.originals["Windows/Minidump/051724-21453-01.dmp"].read_bytes()
    # readme.txt in the Minidump folder is not a .dmp: ignored; nothing was skipped
    assert found.skipped == []


def test_generation1_mbr_disk_sparse_dump_at_a_non_default_path():
    disk, reader, found = _inspect("mbr-sparse")
    assert found.scheme == "mbr"
    assert [p["filesystem"] for p in found.partitions] == ["NTFS", "NTFS"]
    assert found.partitions[0].get("windows") is False  # System Reserved: NTFS without Windows
    assert found.volume.number == 2
    assert found.crash_control["DumpFile"] == r"C:\CrashDumps\web-01.dmp"
    (memory,) = found.dumps
    assert memory.kind == "memory" and memory.windows_path == r"C:\CrashDumps\web-01.dmp"
    assert memory.file.path == "CrashDumps/web-01.dmp"
    fmap = memory.file
    assert fmap.sparse and fmap.zero_bytes > fmap.size // 2
    assert fmap.valid_data_length < fmap.size  # the file was extended past its last write
    assert fmap.extents[-1].zero
    assert _sha(fmap.read(reader, 0, fmap.size)) == _sha(disk.originals["CrashDumps/web-01.dmp"].read_bytes())


def test_a_dump_still_in_the_page_file_is_found_and_cut_to_its_size():
    disk, reader, found = _inspect("gpt-pagefile")
    (dump,) = found.dumps
    assert dump.kind == "pagefile" and dump.blob_suffix == "PAGEFILE.DMP"
    assert dump.file.size == dump.header.required_dump_space == disk.dump.file_size < dump.file.file_size
    assert dump.file.read(reader, 0, dump.file.size) == disk.dump.path.read_bytes()
    assert any("never turned into a dump file" in n for n in found.notes)


def test_a_disk_without_a_dump_says_where_it_looked():
    _, _, found = _inspect("gpt-no-dump")
    assert found.dumps == []
    assert found.looked_at[:2] == [r"%SystemRoot%\MEMORY.DMP", r"%SystemRoot%\Minidump"]
    assert r"no dump at %SystemRoot%\MEMORY.DMP" in found.notes


def test_an_ntfs_compressed_dump_is_reported_not_exportable():
    disk, reader, found = _inspect("gpt-compressed")
    assert [d.kind for d in found.dumps] == ["minidump"]
    assert found.skipped == [r"%SystemRoot%\MEMORY.DMP: Windows/MEMORY.DMP is NTFS-compressed"]
    assert any("cannot be copied server-side" in n and "rescue-vm" in n for n in found.notes)


def test_a_bitlocker_volume_is_named_with_the_ways_to_unlock_it():
    disk = gptdisk.shared_disk("gpt-bitlocker")
    with open_source(str(disk.image.path)) as reader, pytest.raises(ExtractError) as caught:
        extract.inspect_disk(reader)
    err = caught.value
    assert err.exit_code == ExitCode.DISK_NOT_FOUND
    assert "BitLocker" in err.message and "-FVE-FS-" in err.message and "partition 3" in err.message
    for way in ("Key Vault", "Key Vault Secrets User", "recovery password", "manage-bde", "rescue-vm"):  # #18: the kit reads the BEK itself
        assert way in err.hint


def test_a_disk_with_no_partition_table_and_no_ntfs_is_not_a_windows_disk():
    with pytest.raises(ExtractError, match="no partition table") as caught:
        extract.inspect_disk(io.BytesIO(bytes(1 << 20)))
    assert caught.value.exit_code == ExitCode.DISK_NOT_FOUND


# -- damaged files on an intact volume (issue #13) -------------------------------------------------------


def _disk(work, hive: bytes, files: dict[str, bytes]):
    def populate(mount):
        gptdisk.write_file(mount, "Windows/System32/config/SYSTEM", hive)
        for rel, data in files.items():
            gptdisk.write_file(mount, rel, data)

    return gptdisk.build_windows_disk(work / "disk.img", populate=populate, windows_mib=40)


@pytest.fixture(scope="module")
def truncated_dump_disk(tmp_path_factory):
    """MEMORY.DMP is the first 8 KiB of a kernel (bitmap) dump: its header and nothing after it, as a copy cut
    short leaves it; the Minidump folder holds one whole small dump."""
    from scripts.devkit import dumpbuilder, hivebuilder

    work = tmp_path_factory.mktemp("truncated")
    memory = dumpbuilder.build_bitmap_dump(work / "memory.dmp").path.read_bytes()
    mini = dumpbuilder.build_triage_dump(work / "mini.dmp").path.read_bytes()
    return _disk(work, hivebuilder.system_hive(), {"Windows/MEMORY.DMP": memory[:0x2000],
                                                   "Windows/Minidump/051724-21453-01.dmp": mini})


def test_a_truncated_memory_dmp_is_refused_by_its_own_size_fields(truncated_dump_disk):
    """Before #13 the 8 KiB MEMORY.DMP was collected (exit 0) while triage refused it."""
    with open_source(str(truncated_dump_disk.path)) as reader:
        found = extract.inspect_disk(reader)
    assert [d.kind for d in found.dumps] == ["minidump"]
    (note,) = [n for n in found.notes if n.startswith("%SystemRoot%\\MEMORY.DMP")]
    assert "is not collected" in note and "truncated" in note and "8,192 bytes" in note


@pytest.fixture(scope="module")
def odd_hive_disk(tmp_path_factory):
    """A SYSTEM hive whose values have the wrong types (PagingFiles a DWORD, DumpFile a DWORD, CrashDumpEnabled a
    string), as a damaged or hand-edited hive may hold them; MEMORY.DMP at the default path."""
    from scripts.devkit import dumpbuilder, hivebuilder

    work = tmp_path_factory.mktemp("hive")
    hive = hivebuilder.HiveBuilder()
    hive.set("Select", "Current", 1, hivebuilder.REG_DWORD)
    hive.set(r"ControlSet001\Control\CrashControl", "CrashDumpEnabled", "two", hivebuilder.REG_SZ)
    hive.set(r"ControlSet001\Control\CrashControl", "DumpFile", 7, hivebuilder.REG_DWORD)
    hive.set(r"ControlSet001\Control\Session Manager\Memory Management", "PagingFiles", 5, hivebuilder.REG_DWORD)
    memory = dumpbuilder.build_bitmap_dump(work / "memory.dmp").path.read_bytes()
    return _disk(work, hive.to_bytes(), {"Windows/MEMORY.DMP": memory})


def test_hive_values_of_the_wrong_type_are_ignored(odd_hive_disk):
    """Before #13 a PagingFiles DWORD raised TypeError (exit 70)."""
    with open_source(str(odd_hive_disk.path)) as reader:
        found = extract.inspect_disk(reader)
    assert found.crash_control["PagingFiles"] == "" and found.crash_control["CrashDumpEnabled"] is None
    assert found.crash_control["DumpFile"] == ""  # not a string: the default path is used
    assert [d.kind for d in found.dumps] == ["memory"]
