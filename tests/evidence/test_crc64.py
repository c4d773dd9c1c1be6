"""scripts/evidence/crc64.py: Azure Storage's CRC-64, and composing per-block CRCs into a blob's.

Checked against the catalogue's check value, values from Microsoft's own SDK conventions (the header is
the value's 8 bytes, little-endian, base64), and a byte-by-byte reference written here from the definition
(reflected polynomial 0x9A6C9329AC4BC9B5, register all ones, inverted at the end)."""

from __future__ import annotations

import base64
import os
import random

import pytest

from scripts.evidence import crc64


def reference(data: bytes, crc: int = 0) -> int:
    """Bit by bit, straight from the definition: no table, no lanes, no composition."""
    c = crc ^ 0xFFFFFFFFFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ 0x9A6C9329AC4BC9B5 if c & 1 else c >> 1
    return c ^ 0xFFFFFFFFFFFFFFFF


def _bytewise_table() -> list[int]:
    """The register after one byte i from zero: reference() started where its inversion leaves zero."""
    return [reference(bytes([i]), 0xFFFFFFFFFFFFFFFF) ^ 0xFFFFFFFFFFFFFFFF for i in range(256)]


_TABLE = _bytewise_table()


def table_reference(data: bytes) -> str:
    """Byte by byte with a table made from `reference` (fast enough for a dump of tens of MiB): no lanes, no
    composition. Returned as the manifests write it (16 hex digits)."""
    table = _TABLE
    c = 0xFFFFFFFFFFFFFFFF
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return f"{c ^ 0xFFFFFFFFFFFFFFFF:016x}"


@pytest.mark.parametrize("data, value", [
    (b"", 0),
    (b"123456789", 0xAE8B14860A799888),  # CRC-64/NVME's check value: the parameters are Azure Storage's
    (b"a", reference(b"a")),
    (bytes(32), reference(bytes(32))),
])
def test_known_vectors(data, value):
    assert crc64.crc64(data) == value == reference(data)
    assert table_reference(data) == f"{value:016x}"


def test_the_fast_path_over_many_lanes_equals_the_definition():
    data = random.Random(7).randbytes(crc64._LANES * crc64._LANE_BYTES * 2 + 4099)  # two vectorised passes + a tail
    table_only = crc64._raw(data, crc64.MASK) ^ crc64.MASK
    assert crc64.crc64(data) == table_only
    assert crc64.crc64(data[:5000]) == reference(data[:5000])


def test_continuing_a_crc_like_zlib_crc32():
    data = os.urandom(3000)
    assert crc64.crc64(data[1234:], crc64.crc64(data[:1234])) == crc64.crc64(data)
    running = crc64.Crc64()
    for i in range(0, 3000, 700):
        running.update(data[i:i + 700])
    assert running.value == crc64.crc64(data) and running.length == 3000 and running.hexdigest() == crc64.to_hex(running.value)


@pytest.mark.parametrize("seed", range(6))
def test_random_data_split_into_random_blocks_composes_to_the_direct_crc(seed):
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(1, 600_000))
    parts, offset = [], 0
    while offset < len(data):
        n = rng.choice([0, 1, 7, 512, rng.randrange(1, 200_000)])
        block = data[offset:offset + n]
        parts.append((crc64.crc64(block), len(block)))
        offset += n
    assert crc64.compose(parts) == crc64.crc64(data)


def test_combine_of_two_and_of_zero_length():
    a, b = os.urandom(1000), os.urandom(333)
    assert crc64.combine(crc64.crc64(a), crc64.crc64(b), len(b)) == crc64.crc64(a + b) == reference(a + b)
    assert crc64.combine(crc64.crc64(a), 0, 0) == crc64.crc64(a)
    # blocks out of order, or one missing, do not compose to the blob's CRC
    parts = [(crc64.crc64(a), len(a)), (crc64.crc64(b), len(b))]
    assert crc64.compose(parts[::-1]) != crc64.crc64(a + b) and crc64.compose(parts[:1]) != crc64.crc64(a + b)
    assert crc64.compose([]) == 0 == crc64.crc64(b"")
    with pytest.raises(ValueError):
        crc64.combine(1, 2, -1)


def test_zeros_without_the_bytes():
    for n in (0, 1, 511, 4096, 1 << 20):
        assert crc64.zeros_crc(n) == crc64.crc64(bytes(n))
    # a block of 100 MiB of zeros (a sparse dump's hole): computed from its length alone
    assert crc64.zeros_crc(100 << 20) == crc64.combine(crc64.zeros_crc(50 << 20), crc64.zeros_crc(50 << 20), 50 << 20)


def test_the_header_form_is_8_little_endian_bytes_in_base64():
    value = crc64.crc64(b"123456789")
    header = crc64.to_header(value)
    assert base64.b64decode(header) == bytes.fromhex("889879 0a86148bae".replace(" ", ""))
    assert crc64.from_header(header) == value
    assert crc64.from_header(base64.b64decode(header)) == value  # the SDK hands back the decoded bytes
    assert crc64.from_header(bytearray(base64.b64decode(header))) == value
    for bad in (None, "", b"", "not base64!", base64.b64encode(b"1234567").decode()):
        assert crc64.from_header(bad) is None
    assert crc64.to_hex(value) == "ae8b14860a799888" and crc64.from_hex("ae8b14860a799888") == value
    assert crc64.from_hex("xyz") is None and crc64.from_hex(None) is None
