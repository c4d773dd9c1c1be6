"""server_copy's planning: the blocks that rebuild a file from its extents."""

from __future__ import annotations

from scripts.collection import server_copy
from scripts.windisk.ntfs import Extent, FileMap


def test_blocks_follow_the_extents_and_split_at_the_block_size():
    MiB = 1 << 20
    fmap = FileMap("f", 5 * MiB, 5 * MiB, 5 * MiB, [
        Extent(0, 2 * MiB + 512, 100 * MiB), Extent(2 * MiB + 512, 2 * MiB, None),
        Extent(4 * MiB + 512, MiB - 512, 300 * MiB)])
    blocks = server_copy.plan_blocks(fmap, MiB)
    assert [(b.kind, b.length, b.source_offset) for b in blocks] == [
        ("disk", MiB, 100 * MiB), ("disk", MiB, 101 * MiB), ("disk", 512, 102 * MiB),
        ("zero", MiB, 0), ("zero", MiB, 0), ("disk", MiB - 512, 300 * MiB)]
    assert sum(b.length for b in blocks) == fmap.size
    resident = FileMap("r", 3, 3, 3, [], resident=b"abc")
    assert server_copy.plan_blocks(resident) == [server_copy.Block("data", 3, data=b"abc")]
    # a file too big for 50,000 blocks of the default size gets bigger blocks
    assert server_copy.block_size_for(10 << 40, 100 * MiB) > 100 * MiB
    assert server_copy.block_size_for(16 << 30, 100 * MiB) == 100 * MiB


def test_block_ids_all_have_the_same_length():
    """Put Block List requires every block id of a blob to have the same length."""
    assert {len(server_copy.block_id(i)) for i in (0, 9, 10_000, 49_999)} == {len("crashcart-00000000")}
