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
    for way in ("Key Vault", "--unlock-encrypted-vm", "recovery password", "manage-bde", "rescue-vm"):
        assert way in err.hint


def test_a_disk_with_no_partition_table_and_no_ntfs_is_not_a_windows_disk():
    with pytest.raises(ExtractError, match="no partition table") as caught:
        extract.inspect_disk(io.BytesIO(bytes(1 << 20)))
    assert caught.value.exit_code == ExitCode.DISK_NOT_FOUND
