"""scripts.windisk.ntfs: a file's extents (the data runs of real NTFS volumes are mapped and read back in
test_extract.py)."""

from __future__ import annotations

from scripts.windisk import ntfs


def test_extents_merge_and_stop_at_the_valid_data_length():
    extents: list[ntfs.Extent] = []
    ntfs.add_extent(extents, 0, 4096, 1 << 20, vdl=10000)
    ntfs.add_extent(extents, 4096, 4096, (1 << 20) + 4096, vdl=10000)  # contiguous on disk: merged
    ntfs.add_extent(extents, 8192, 8192, 5 << 20, vdl=10000)  # crosses the valid data length: split
    ntfs.add_extent(extents, 16384, 4096, None, vdl=10000)  # sparse: merged with the zeros before it
    assert extents == [ntfs.Extent(0, 8192, 1 << 20), ntfs.Extent(8192, 1808, 5 << 20),
                       ntfs.Extent(10000, 10480, None)]
    fmap = ntfs.FileMap("f", 20480, 20480, 10000, extents)
    assert fmap.fragments == 2 and fmap.zero_bytes == 10480
    cut = fmap.truncated(9000)
    assert cut.size == 9000 and cut.extents[-1] == ntfs.Extent(8192, 808, 5 << 20)
