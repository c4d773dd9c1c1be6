"""Reading a damaged disk is total: inspect_disk answers or raises ExtractError, never another exception (exit
70), never a hang.

The disks are the devkit's (gptdisk: GPT and MBR layouts, NTFS written by ntfs-3g, a SYSTEM hive from
hivebuilder, a fragmented or sparse dump and a minidump), built once per process, and damaged in memory by
tests/base/mutation.py: the partition tables' fields, the NTFS boot sector, MFT records, directory indexes,
the hive's cells and the dump headers, wherever the clean inspection read. Hypothesis runs a fixed,
derandomized set of examples; crashes it found are kept below as explicit regression tests.
"""

from __future__ import annotations

import io
import os
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from scripts.base.errors import ExitCode
from scripts.base.rangeio import open_source
from scripts.base.rangereader import FileBackend
from scripts.devkit import gptdisk
from scripts.windisk import extract
from scripts.windisk.disk import SYSTEM_HIVE
from scripts.windisk.errors import ExtractError
from scripts.windisk.ntfs import map_file
from tests.base.mutation import Edit, Mutation, RecordingReader, Target, mutated_reader, mutations, time_limit

pytestmark = [pytest.mark.slow, pytest.mark.skipif(gptdisk.can_build() is not None, reason=str(gptdisk.can_build()))]

BLOCK = 64 * 1024  # as the export reads a snapshot
LIMIT_SECONDS = 30  # per example; inspecting an intact disk takes a fraction of a second
EXAMPLES = int(os.environ.get("CRASHCART_PROPERTY_EXAMPLES", 150))  # more for a deeper local run
RECIPES = ("gpt-small", "mbr-sparse", "gpt-fragmented")  # GPT and MBR, bitmap and full dumps, an $ATTRIBUTE_LIST

MBR_FIELDS = [(446 + 16 * i + at, width) for i in range(4) for at, width in ((4, 1), (8, 4), (12, 4))]
GPT_FIELDS = [(512 + at, width) for at, width in ((8, 4), (12, 4), (24, 8), (32, 8), (40, 8), (48, 8), (72, 8),
                                                  (80, 4), (84, 4))] + \
             [(1024 + 128 * i + at, 8) for i in range(4) for at in (32, 40, 48)]
GPT_GROUPS = [[(512 + 72, 8, "offset"), (512 + 80, 4, "count"), (512 + 84, 4, "size")]]
# NTFS boot sector (BPB): bytes per sector, sectors per cluster, total sectors, $MFT and $MFTMirr cluster, record sizes
NTFS_BPB = [(0x0B, 2), (0x0D, 1), (0x28, 8), (0x30, 8), (0x38, 8), (0x40, 1), (0x44, 1)]
# regf base block: sequence numbers, root cell, hive bins size; the first hbin's header
HIVE_FIELDS = [(0x04, 4), (0x08, 4), (0x24, 4), (0x28, 4), (0x1004, 4), (0x1008, 4)]


def _disk_target(recipe: str) -> Target:
    disk = gptdisk.shared_disk(recipe)
    path = Path(disk.image.path)
    reader = RecordingReader(FileBackend(path), block_size=BLOCK)
    with reader:
        found = extract.inspect_disk(reader)
        volume = found.volume.offset
        hive = map_file(found.volume, SYSTEM_HIVE)
        hive_at = [e.disk_offset for e in hive.extents if not e.zero][0]
        fields = (MBR_FIELDS + (GPT_FIELDS if found.scheme == "gpt" else []) +
                  [(volume + at, width) for at, width in NTFS_BPB] +
                  [(hive_at + at, width) for at, width in HIVE_FIELDS] +
                  [(hive_at + at, 4) for at in range(0x1020, min(hive.size, 0x2000), 4)])
        target = Target(path, path.stat().st_size, fields=fields, groups=GPT_GROUPS if found.scheme == "gpt" else [],
                        cuts=[0, 512, 1024, volume, volume + 512, hive_at])
        target.add_spots(reader.spots)
    return target


@pytest.fixture(scope="module")
def disks() -> dict[str, Target]:
    return {recipe: _disk_target(recipe) for recipe in RECIPES}


def assert_total(target: Target, mutation: Mutation) -> None:
    """inspect_disk on the damaged disk: findings whose every extent lies on the disk, or ExtractError, within a
    read budget and a time limit."""
    with time_limit(LIMIT_SECONDS), mutated_reader(target.path, mutation, block_size=BLOCK) as reader:
        try:
            found = extract.inspect_disk(reader)
        except ExtractError as err:
            assert err.message and "\n" not in err.message
            return
        for dump in found.dumps:
            for extent in dump.file.extents:
                assert extent.zero or 0 <= extent.disk_offset and extent.disk_offset + extent.length <= found.disk_size
            assert dump.file.read(reader, 0, 0x2000)[:4] == b"PAGE"
            dump.header_dict()


def test_intact_disks_are_read(disks):
    for recipe, target in disks.items():
        assert_total(target, Mutation())
        with mutated_reader(target.path, Mutation(), block_size=BLOCK) as reader:
            assert extract.inspect_disk(reader).dumps, recipe


@pytest.mark.parametrize("recipe", RECIPES)
def test_damaged_disks_are_read_or_refused(disks, recipe):
    target = disks[recipe]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutation=mutations(target))
    def check(mutation: Mutation) -> None:
        assert_total(target, mutation)

    check()


# -- what the property tests found, and the defects of issue #13, kept as explicit examples ----------------


def _records(image: bytes, name: str) -> list[int]:
    """The 1 KiB MFT records (b'FILE') that hold `name` in UTF-16."""
    needle, at, found = name.encode("utf-16-le"), 0, []
    while (i := image.find(needle, at)) >= 0:
        record = i - i % 1024
        if image[record:record + 4] == b"FILE" and record not in found:
            found.append(record)
        at = i + 1
    return found


def _attributes(image: bytes, record: int):
    """(type, offset) of each attribute of an MFT record."""
    at = record + struct.unpack_from("<H", image, record + 0x14)[0]
    while True:
        kind, length = struct.unpack_from("<II", image, at)
        if kind == 0xFFFFFFFF or length == 0:
            return
        yield kind, at
        at += length


def _attribute(image: bytes, name: str, kind: int) -> int:
    """The disk offset of attribute `kind` in the MFT record of the file or folder called `name`."""
    for record in _records(image, name):
        attributes = dict(_attributes(image, record))
        filename = attributes.get(0x30)
        if filename is None:
            continue
        value = filename + struct.unpack_from("<H", image, filename + 0x14)[0]
        length = image[value + 0x40]
        if image[value + 0x42:value + 0x42 + 2 * length].decode("utf-16-le") == name and kind in attributes:
            return attributes[kind]
    raise LookupError(name)


@pytest.fixture(scope="module")
def gpt_image(disks) -> bytes:
    return disks["gpt-small"].path.read_bytes()


@pytest.fixture(scope="module")
def sparse_image(disks) -> bytes:
    return disks["mbr-sparse"].path.read_bytes()


@pytest.mark.parametrize("damage, expected", [
    ("runlist offset", "its NTFS record cannot be read"),  # IndexError from dissect: exit 70 before #13
    ("run header", "its NTFS record cannot be read"),  # struct.error
    ("attribute length", "its NTFS record cannot be read"),  # BrokenMftError
    ("run far away", "lies outside the volume"),  # mapped to bytes past the disk, silently
])
def test_a_damaged_mft_record_of_the_dump_is_an_extract_error(disks, sparse_image, damage, expected):
    data = _attribute(sparse_image, "web-01.dmp", 0x80)  # C:\CrashDumps\web-01.dmp's $DATA
    runs = data + struct.unpack_from("<H", sparse_image, data + 0x20)[0]
    edit = {"runlist offset": Edit(data + 0x20, b"\xff\xff"), "run header": Edit(runs, b"\xff"),
            "attribute length": Edit(data + 4, bytes(4)), "run far away": Edit(runs, b"\x48")}[damage]
    with mutated_reader(disks["mbr-sparse"].path, Mutation((edit,)), block_size=BLOCK) as reader:
        with pytest.raises(ExtractError) as caught:
            extract.inspect_disk(reader)
    err = caught.value
    assert err.exit_code == ExitCode.COLLECT_FAILED and "CrashDumps/web-01.dmp is damaged" in err.message
    assert expected in err.message and "rescue-vm" in err.hint


@pytest.mark.parametrize("damage", ["minidump record", "folder index root", "folder index entry"])
def test_a_damaged_minidump_or_folder_is_a_note_and_memory_dmp_is_still_found(disks, gpt_image, damage):
    if damage == "minidump record":
        data = _attribute(gpt_image, "051724-21453-01.dmp", 0x80)
        edit = Edit(data + 0x20, b"\xff\xff")  # the runlist offset: IndexError from dissect before #13
    else:
        root = _attribute(gpt_image, "Minidump", 0x90)
        value = root + struct.unpack_from("<H", gpt_image, root + 0x14)[0]
        first_entry = value + 0x10 + struct.unpack_from("<I", gpt_image, value + 0x10)[0]
        edit = (Edit(root + 0x14, b"\xf0\x03") if damage == "folder index root"  # EOFError before #13
                else Edit(first_entry + 8, b"\0\0"))  # an index entry of length 0: ValueError before #13
    with mutated_reader(disks["gpt-small"].path, Mutation((edit,)), block_size=BLOCK) as reader:
        found = extract.inspect_disk(reader)
    assert [d.kind for d in found.dumps] == ["memory"]
    assert any("Minidump" in note and "is damaged" in note and "not collected" in note for note in found.notes)


@pytest.mark.parametrize("field, value, expected", [
    (84, 1, "partition entry size is 1 "),  # OverflowError before #13 (issue #13, defect 5)
    (84, 0, "partition entry size is 0 "),
    (84, 129, "partition entry size is 129 "),
    (84, 1 << 31, "partition entry size is 2147483648 "),
    (80, 1 << 20, "1048576 partition entries"),
    (72, 1 << 40, "ends past the end"),
])
def test_a_gpt_header_with_impossible_entry_fields_is_refused(gpt_image, field, value, expected):
    image = bytearray(gpt_image)
    backup = (len(image) // 512 - 1) * 512
    for header in (512, backup):  # both copies: a damaged primary alone is now read from the backup (#15)
        struct.pack_into("<Q" if field == 72 else "<I", image, header + field, value)
    with pytest.raises(ExtractError) as caught:
        extract.inspect_disk(io.BytesIO(bytes(image)))
    assert "no partition table crashcart can read" in caught.value.message
    assert "the GPT header is corrupt" in caught.value.message and expected in caught.value.message
    assert caught.value.exit_code == ExitCode.DISK_NOT_FOUND


def test_a_gpt_with_four_billion_entries_on_a_big_disk_is_refused_at_once(gpt_image, tmp_path):
    """dissect.volume loops over every entry the header counts: 2^32 of them on a 64 GiB (sparse) disk would take
    hours. The count is refused before dissect sees it."""
    path = tmp_path / "big.img"
    image = bytearray(gpt_image[:1 << 20])
    struct.pack_into("<I", image, 512 + 80, 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(image)
        f.truncate(64 << 30)
    outcome: list[BaseException | None] = []

    def inspect() -> None:
        try:
            with open_source(str(path), block_size=BLOCK) as reader:
                extract.inspect_disk(reader)
            outcome.append(None)
        except BaseException as err:  # what happened is asserted below, in the test's thread
            outcome.append(err)

    worker = threading.Thread(target=inspect, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert outcome, "inspect_disk was still reading the partition table after 30 s"
    assert isinstance(outcome[0], ExtractError) and "4294967295 partition entries" in outcome[0].message


def test_a_partition_past_the_end_of_the_disk_is_left_out(gpt_image):
    """The Microsoft reserved partition (GPT entry 2, read before the Windows one) moved to LBA 2^62: reading its
    boot sector from a file object raised OverflowError before #13."""
    image = bytearray(gpt_image)
    _edit_gpt_entry(image, 1, 32, struct.pack("<QQ", 1 << 62, (1 << 62) + 2047))
    found = extract.inspect_disk(io.BytesIO(bytes(image)))
    assert found.volume.number == 3 and [d.kind for d in found.dumps] == ["memory", "minidump"]
    assert any("partition 2 starts at byte" in note and "past the end" in note for note in found.notes)


def _edit_gpt_entry(image: bytearray, index: int, offset: int, data: bytes) -> None:
    """Changes partition entry `index` in both GPT copies and keeps every checksum right: the damage a tool
    that writes a consistent table would leave (the primary alone would be read from the backup since #15)."""
    import zlib

    for header in (512, (len(image) // 512 - 1) * 512):
        entries_lba, count, size = struct.unpack_from("<QII", image, header + 72)
        start = entries_lba * 512
        image[start + index * size + offset:start + index * size + offset + len(data)] = data
        struct.pack_into("<I", image, header + 88, zlib.crc32(bytes(image[start:start + count * size])))
        header_size = struct.unpack_from("<I", image, header + 12)[0]
        struct.pack_into("<I", image, header + 16, 0)
        struct.pack_into("<I", image, header + 16, zlib.crc32(bytes(image[header:header + header_size])))


def test_found_a_hive_value_claiming_big_data_is_read_as_absent(disks, sparse_image):
    """Found by test_damaged_disks_are_read_or_refused on mbr-sparse: DumpFile's value cell (vk) claims 0x3fd9
    bytes of data, which makes it a 'big data' value; dissect.regf then raises NotImplementedError for the cell it
    finds instead (the old catch-all hid it; a value read now catches what dissect raises on damaged cells)."""
    target = disks["mbr-sparse"]
    with open_source(str(target.path)) as reader:
        volume = extract.inspect_disk(reader).volume
        (hive,) = [e for e in map_file(volume, SYSTEM_HIVE).extents if not e.zero]
    cells = sparse_image[hive.disk_offset:hive.disk_offset + hive.length]
    names = [i for i in range(0x1000, len(cells) - 20, 8) if cells[i + 4:i + 6] == b"vk"
             and cells[i + 24:i + 24 + struct.unpack_from("<H", cells, i + 6)[0]] == b"DumpFile"]
    current = names[0]  # ControlSet001 is the current one on this disk
    edit = Edit(hive.disk_offset + current + 8, struct.pack("<I", 0x3FD9))  # vk.DataLength
    with mutated_reader(target.path, Mutation((edit,)), block_size=BLOCK) as reader:
        found = extract.inspect_disk(reader)
    assert found.crash_control["DumpFile"] == ""  # unreadable: the default path is looked at
    assert r"no dump at %SystemRoot%\MEMORY.DMP" in found.notes


def test_found_a_folder_index_of_no_attribute_is_a_note(disks):
    """Found by test_damaged_disks_are_read_or_refused on mbr-sparse: the Minidump folder's INDEX_ROOT indexes
    attribute type 0 instead of $FILE_NAME; dissect.ntfs's listing raised AttributeError (exit 70)."""
    target = disks["mbr-sparse"]
    image = target.path.read_bytes()
    root = _attribute(image, "Minidump", 0x90)
    value = root + struct.unpack_from("<H", image, root + 0x14)[0]
    with mutated_reader(target.path, Mutation((Edit(value, bytes(4)),)), block_size=BLOCK) as reader:
        found = extract.inspect_disk(reader)
    assert [d.kind for d in found.dumps] == ["memory"]
    assert any(note.startswith(r"the minidumps in %SystemRoot%\Minidump are not collected") for note in found.notes)


def test_found_a_subkey_list_pointing_at_a_key_is_read_as_absent(disks):
    """Found by test_damaged_disks_are_read_or_refused on gpt-fragmented: the root key's subkey list points at a
    key node; dissect.regf raised AttributeError (hidden by the old catch-all; a value read now catches what
    dissect raises on damaged cells, and nothing else)."""
    target = disks["gpt-small"]
    with open_source(str(target.path)) as reader:
        volume = extract.inspect_disk(reader).volume
        (hive,) = [e for e in map_file(volume, SYSTEM_HIVE).extents if not e.zero]
        root = struct.unpack("<I", reader.read_at(hive.disk_offset + 0x24, 4))[0]  # regf: the root key's cell
    edit = Edit(hive.disk_offset + 0x1000 + root + 0x20, struct.pack("<I", root))  # nk.SubKeyLists[stable]
    with mutated_reader(target.path, Mutation((edit,)), block_size=BLOCK) as reader:
        found = extract.inspect_disk(reader)
    assert found.crash_control["control_set"] == "ControlSet001"
    assert "SYSTEM hive has no Select\\Current; assuming ControlSet001" in found.notes


def _root_index_buffer(path: Path, partition: dict) -> int:
    """Where on the disk the root folder's first index buffer (VCN 0) of an intact NTFS partition is."""
    from dissect.ntfs import NTFS
    from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE
    from dissect.util.stream import RangeStream

    with open_source(str(path)) as reader:
        ntfs = NTFS(RangeStream(reader, partition["offset"], partition["size"]))
        allocation = ntfs.mft.root.attributes.find("$I30", ATTRIBUTE_TYPE_CODE.INDEX_ALLOCATION)[0]
        lcn = next(iter(allocation.header.dataruns()))[0]
        return partition["offset"] + lcn * ntfs.cluster_size


@pytest.mark.parametrize("partition, entry_name, outcome", [
    # Found by test_damaged_disks_are_read_or_refused on mbr-sparse (a hang it stopped after 30 s): in the Windows
    # volume's root folder; dissect.ntfs's path search went round the loop forever
    (2, "$Volume", "partition 2 is NTFS but could not be read: the folder's index loops back to its buffer at VCN 0"),
    # found the same way in the System Reserved volume: dissect.ntfs's own search for $Secure, made while it opens
    # a volume, went round it
    (1, "$MFTMirr", "partition 1 is NTFS but could not be read: the folder's index loops back to its buffer at VCN 0"),
])
def test_found_a_folder_index_that_loops_is_refused_not_followed_forever(disks, sparse_image, partition, entry_name,
                                                                         outcome):
    """An entry of a root folder's index buffer made an end-and-node entry whose child is VCN 0, the buffer it sits
    in. The buffers are cached, so not even a read marks such a loop."""
    target = disks["mbr-sparse"]
    with open_source(str(target.path)) as reader:
        partitions = extract.inspect_disk(reader).partitions
    indx = _root_index_buffer(target.path, next(p for p in partitions if p["partition"] == partition))
    name = entry_name.encode("utf-16-le")
    assert sparse_image[indx:indx + 4] == b"INDX" and name in sparse_image[indx:indx + 4096]
    entry = indx + sparse_image[indx:indx + 4096].find(name) - 16 - 0x42  # INDEX_ENTRY, then its $FILE_NAME key
    length = struct.unpack_from("<H", sparse_image, entry + 8)[0]
    edits = (Edit(entry + 12, struct.pack("<I", 3)),  # INDEX_ENTRY.Flags: a node, and the last entry
             Edit(entry + length - 8, bytes(8)))  # its child: VCN 0, this very buffer
    outcome_: list[object] = []

    def inspect() -> None:
        try:
            with mutated_reader(target.path, Mutation(edits), block_size=BLOCK) as reader:
                outcome_.append(extract.inspect_disk(reader))
        except BaseException as err:  # asserted below, in the test's thread
            outcome_.append(err)

    worker = threading.Thread(target=inspect, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert outcome_, "inspect_disk was still walking a root folder's index after 30 s"
    (result,) = outcome_
    if partition == 2:  # the Windows volume: nothing else holds the hive
        assert isinstance(result, ExtractError) and result.exit_code == ExitCode.DISK_NOT_FOUND
        assert outcome in result.message
    else:  # System Reserved: noted, and Windows is found on partition 2
        assert isinstance(result, extract.DiskFindings) and result.volume.number == 2, result
        assert outcome in result.notes and [d.kind for d in result.dumps] == ["memory"]
