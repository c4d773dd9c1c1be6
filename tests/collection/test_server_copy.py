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


# ---- the proof from the service's answers (#15) --------------------------------------------------------------
def test_the_blobs_crc64_is_composed_from_the_blocks_crcs_in_order():
    import random

    from scripts.evidence import crc64

    rng = random.Random(3)
    disk = rng.randbytes(300_000)
    blocks = [server_copy.Block("disk", 100_000, 0), server_copy.Block("zero", 50_000),
              server_copy.Block("disk", 150_000, 150_000)]
    contents = [disk[:100_000], bytes(50_000), disk[150_000:300_000]]
    crcs = [crc64.crc64(c) for c in contents]  # what the service answers for each block it wrote
    got = server_copy.compose_crc(blocks, crcs)
    assert got["crc64"] == crc64.to_hex(crc64.crc64(b"".join(contents)))
    assert got["crc64_blocks"] == {"service": 3, "kit": 0, "missing": 0} and got["crc64_problems"] == []
    # blocks answered in another order than the blob's do not give the blob's CRC
    assert server_copy.compose_crc(blocks, crcs[::-1])["crc64"] != got["crc64"]


def test_a_block_without_a_service_crc_leaves_the_blob_crc_unknown_and_a_wrong_zero_crc_is_a_problem():
    from scripts.evidence import crc64

    blocks = [server_copy.Block("disk", 4096, 0), server_copy.Block("zero", 8192), server_copy.Block("disk", 10, 0)]
    missing = server_copy.compose_crc(blocks, [crc64.crc64(b"x" * 4096), crc64.zeros_crc(8192), None])
    assert missing["crc64"] is None and missing["crc64_missing"] == [2]
    assert missing["crc64_blocks"] == {"service": 2, "kit": 0, "missing": 1}
    wrong = server_copy.compose_crc(blocks, [crc64.crc64(b"x" * 4096), crc64.crc64(b"not zeros"), crc64.crc64(b"y" * 10)])
    assert wrong["crc64_problems"] == [
        f"block 1: the service reports CRC-64 {crc64.to_hex(crc64.crc64(b'not zeros'))} for 8192 zero bytes, "
        f"expected {crc64.to_hex(crc64.zeros_crc(8192))}"]
    # a resident file: its one block is hashed by the kit, which holds the bytes
    resident = server_copy.compose_crc([server_copy.Block("data", 3, data=b"abc")], [crc64.crc64(b"abc")])
    assert resident["crc64_blocks"] == {"service": 0, "kit": 1, "missing": 0}
