"""FileMap.read over a range reader (issue 15): all of a fragmented file's extents in one batch, one wait
for the network instead of one per fragment; the bytes are the same as extent by extent. Counted in round
trips (RangeReader.round_trips), never in time."""

from __future__ import annotations

import random

from scripts.base.rangereader import Backend, RangeReader
from scripts.windisk.ntfs import Extent, FileMap

DISK = random.Random(3).randbytes(4 << 20)
BLOCK = 4096


class Disk(Backend):
    """DISK in memory, read by up to 8 requests in flight (as over HTTP)."""

    concurrency = 8

    def __init__(self):
        super().__init__()
        self.name, self.size = "disk", len(DISK)

    def fetch(self, offset: int, length: int) -> bytes:
        self.counted(requests=1, nbytes=length)
        return DISK[offset:offset + length]


def fragmented() -> tuple[FileMap, bytes]:
    """A 6-fragment file (scattered over the disk, backwards), a sparse run in the middle, zeros past the
    valid data length; and its content."""
    extents, content, at = [], b"", 0
    for i, disk_offset in enumerate((3 << 20, 2 << 20, 1 << 20, 5 * BLOCK, 40 * BLOCK, 90 * BLOCK)):
        length = (i + 1) * BLOCK
        extents.append(Extent(at, length, disk_offset))
        content += DISK[disk_offset:disk_offset + length]
        at += length
        if i == 2:
            extents.append(Extent(at, 2 * BLOCK, None))
            content += bytes(2 * BLOCK)
            at += 2 * BLOCK
    extents.append(Extent(at, BLOCK, None))
    content += bytes(BLOCK)
    return FileMap("Windows/MEMORY.DMP", len(content), len(content), at, extents), content


def test_a_fragmented_file_is_read_in_one_round_trip():
    fmap, content = fragmented()
    with RangeReader(Disk()) as disk:
        assert fmap.read(disk, 0, fmap.size) == content
        assert disk.round_trips == 1 and disk.requests == 6  # extent by extent: 6 waits
    with RangeReader(Disk()) as disk:
        assert fmap.read(disk, BLOCK // 2, 10 * BLOCK) == content[BLOCK // 2:BLOCK // 2 + 10 * BLOCK]
        assert disk.round_trips == 1


def test_many_ranges_at_once_and_the_edges():
    fmap, content = fragmented()
    spots = [(0, 512), (7 * BLOCK - 100, 300), (fmap.size - 10, 100), (fmap.size, 5), (12 * BLOCK, 0)]
    with RangeReader(Disk()) as disk:
        assert fmap.read_many(disk, spots) == [content[o:o + n] for o, n in spots]
        assert disk.round_trips == 1
    resident = FileMap("small.txt", 5, 5, 5, [], b"hello")
    assert resident.read_many(None, [(1, 3), (4, 9), (5, 1)]) == [b"ell", b"o", b""]


def test_a_plain_file_object_still_reads_extent_by_extent(tmp_path):
    fmap, content = fragmented()
    path = tmp_path / "disk.img"
    path.write_bytes(DISK)
    with open(path, "rb") as disk:
        assert fmap.read(disk, 0, fmap.size) == content


def test_the_headers_of_several_minidumps_come_in_one_round_trip():
    from scripts.dumpfile.header import PROBE_SIZE
    from scripts.windisk.extract import _DumpSearch

    fmap, content = fragmented()
    second = FileMap("Windows/Minidump/2.dmp", 3 * BLOCK, 3 * BLOCK, 3 * BLOCK, [Extent(0, 3 * BLOCK, 600 * BLOCK)])
    with RangeReader(Disk()) as disk:
        _DumpSearch(disk, None).fetch_headers([fmap, second])
        assert disk.round_trips == 1
        assert fmap.read(disk, 0, PROBE_SIZE) == content[:PROBE_SIZE]
        assert second.read(disk, 0, PROBE_SIZE) == DISK[600 * BLOCK:600 * BLOCK + PROBE_SIZE]
        assert disk.round_trips == 1  # `header_of` reads them cached
