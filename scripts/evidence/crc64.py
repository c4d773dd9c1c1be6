"""CRC-64 as Azure Storage computes it (`x-ms-content-crc64`), and the math that composes per-block CRCs.

The parameters, from Microsoft's SDKs: polynomial 0x9A6C9329AC4BC9B5 in the reflected (LSB-first) form
(0xAD93D23594C93659 written MSB-first), register starting at all ones and inverted at the end, input and
output reflected: the catalogued CRC-64/NVME, check value crc64(b"123456789") == 0xAE8B14860A799888.
azure-sdk-for-go builds its table with `crc64.MakeTable(0x9A6C9329AC4BC9B5)` and `crc64.Update`;
azure-storage-blob (Python) sends and reads the header as the 8 bytes of the value, little-endian,
base64-encoded (`_shared/validation.calculate_crc64_bytes`: `.to_bytes(8, "little")`).

Composition. A CRC is affine over GF(2): the CRC of A+B follows from crc(A), crc(B) and len(B) alone,
by feeding len(B) zero bytes through crc(A)'s register with a 64x64 bit matrix raised to that power by
repeated squaring (zlib's crc32_combine, the same for CRC-32). So the service's CRC-64 of every block
(the response header of each Put Block From URL / Put Block) composes into the CRC-64 of the committed
blob without anyone reading the blob back: `compose([(crc, length), ...])`.

Speed. Microsoft's C implementation (`azure.storage.extensions.checksums`, pip azure-storage-extensions)
is used when it is installed. Otherwise the pure-Python path runs the table over many lanes of the data at
once with bytes.translate (one translate per register byte and step), then folds the lanes' CRCs together
with the same zero-shift matrices: tens of MB/s instead of a few.
"""

from __future__ import annotations

import base64
import binascii
import functools
import sys
from array import array
from collections.abc import Iterable
from typing import Any

POLY = 0x9A6C9329AC4BC9B5  # reflected form of 0xAD93D23594C93659
MASK = 0xFFFFFFFFFFFFFFFF
CHECK = 0xAE8B14860A799888  # crc64(b"123456789"), the catalogue's check value
LENGTH = 8  # bytes of the header value


def _table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        table.append(c)
    return table


TABLE = _table()
_PLANES = [bytes((TABLE[i] >> (8 * k)) & 0xFF for i in range(256)) for k in range(8)]
_LANES, _LANE_BYTES = 4096, 256  # one vectorised pass: 1 MiB as 4096 lanes of 256 bytes


def _native() -> Any:
    try:
        from azure.storage.extensions import checksums  # type: ignore[import-not-found]
    except ImportError:
        return None
    return checksums.crc64


_NATIVE = _native()


# ---- the CRC ----------------------------------------------------------------------------------------
def crc64(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The CRC-64 of `data`, continuing from `crc` (the CRC of what came before; 0 to start), like
    zlib.crc32(data, crc)."""
    if _NATIVE is not None:
        return int(_NATIVE.compute(bytes(data), crc))
    return _python(bytes(data), crc)


def _python(data: bytes, crc: int) -> int:
    state = crc ^ MASK
    chunk = _LANES * _LANE_BYTES
    done = 0
    if len(data) >= chunk:
        shift = _shift_tables(_LANE_BYTES)
        while len(data) - done >= chunk:
            for lane in _lane_crcs(data, done, _LANES, _LANE_BYTES):
                state = _apply(shift, state) ^ lane
            done += chunk
    return _raw(data, state, done) ^ MASK


def _raw(data: bytes, state: int, start: int = 0) -> int:
    """The bare register update (no inversions), byte by byte."""
    table = TABLE
    for b in data[start:] if start else data:
        state = table[(state ^ b) & 0xFF] ^ (state >> 8)
    return state


def _lane_crcs(data: bytes, start: int, lanes: int, lane_bytes: int) -> array:
    """The register (zero start, no inversions) after each of `lanes` consecutive runs of `lane_bytes` bytes
    from `start`: every lane advanced at once, a register byte per bytes object ("plane")."""
    fb = int.from_bytes
    t0, t1, t2, t3, t4, t5, t6, t7 = _PLANES
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = 0
    end = start + lanes * lane_bytes
    for j in range(lane_bytes):
        idx = (p0 ^ fb(data[start + j:end:lane_bytes], "little")).to_bytes(lanes, "little")
        p0 = fb(idx.translate(t0), "little") ^ p1
        p1 = fb(idx.translate(t1), "little") ^ p2
        p2 = fb(idx.translate(t2), "little") ^ p3
        p3 = fb(idx.translate(t3), "little") ^ p4
        p4 = fb(idx.translate(t4), "little") ^ p5
        p5 = fb(idx.translate(t5), "little") ^ p6
        p6 = fb(idx.translate(t6), "little") ^ p7
        p7 = fb(idx.translate(t7), "little")
    packed = bytearray(8 * lanes)
    for k, plane in enumerate((p0, p1, p2, p3, p4, p5, p6, p7)):
        packed[k::8] = plane.to_bytes(lanes, "little")
    out = array("Q")
    out.frombytes(bytes(packed))
    if sys.byteorder != "little":
        out.byteswap()
    return out


# ---- composition (zlib's crc32_combine, for 64 bits) --------------------------------------------------
def _times(matrix: list[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _square(matrix: list[int]) -> list[int]:
    return [_times(matrix, row) for row in matrix]


def _one_zero_bit() -> list[int]:
    """The operator (its 64 columns) that feeds one zero bit through the (reflected) register."""
    return [POLY] + [1 << (n - 1) for n in range(1, 64)]


@functools.lru_cache(maxsize=1)
def _byte_powers() -> tuple[tuple[int, ...], ...]:
    """The operators that feed 2**k zero bytes through the register, k = 0..63: each the square of the one
    before (zlib's gf2_matrix_square), starting from one zero bit squared three times."""
    op = _one_zero_bit()
    for _ in range(3):
        op = _square(op)
    powers = []
    for _ in range(64):
        powers.append(tuple(op))
        op = _square(op)
    return tuple(powers)


def _shift(state: int, nbytes: int) -> int:
    """The register `state` after `nbytes` zero bytes."""
    powers = _byte_powers()
    k = 0
    while nbytes:
        if nbytes & 1:
            state = _times(powers[k], state)  # type: ignore[arg-type]
        nbytes >>= 1
        k += 1
    return state


@functools.lru_cache(maxsize=16)
def _shift_tables(nbytes: int) -> tuple[tuple[int, ...], ...]:
    """_shift(., nbytes) as 8 byte-indexed tables: applying it costs 8 look-ups."""
    cols = [_shift(1 << n, nbytes) for n in range(64)]
    return tuple(tuple(_times(cols, v << (8 * k)) for v in range(256)) for k in range(8))


def _apply(tables: tuple[tuple[int, ...], ...], state: int) -> int:
    t0, t1, t2, t3, t4, t5, t6, t7 = tables
    return (t0[state & 0xFF] ^ t1[(state >> 8) & 0xFF] ^ t2[(state >> 16) & 0xFF] ^ t3[(state >> 24) & 0xFF]
            ^ t4[(state >> 32) & 0xFF] ^ t5[(state >> 40) & 0xFF] ^ t6[(state >> 48) & 0xFF] ^ t7[state >> 56])


def combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-64 of A followed by B, from crc1 = crc64(A), crc2 = crc64(B) and len2 = len(B): crc1 moved
    past len2 zero bytes, then crc2 added (the inversions at both ends cancel, as in crc32_combine)."""
    if len2 < 0:
        raise ValueError("a length is never negative")
    return _shift(crc1, len2) ^ crc2


def zeros_crc(nbytes: int) -> int:
    """crc64(bytes(nbytes)), without the bytes."""
    return _shift(MASK, nbytes) ^ MASK


def compose(parts: Iterable[tuple[int, int]]) -> int:
    """The CRC-64 of the concatenation of parts given as (crc64, length), in order; 0 for none."""
    total = 0
    for crc, length in parts:
        total = combine(total, crc, length)
    return total


# ---- the header's form, and ours --------------------------------------------------------------------
def to_header(crc: int) -> str:
    """The value as `x-ms-content-crc64` carries it: base64 of its 8 bytes, little-endian."""
    return base64.b64encode((crc & MASK).to_bytes(LENGTH, "little")).decode("ascii")


def from_header(value: bytes | bytearray | str | None) -> int | None:
    """The value of an `x-ms-content-crc64` (the header's base64 text, or the 8 bytes the SDK decodes it to);
    None when absent or not 8 bytes."""
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
    if len(value) != LENGTH:
        return None
    return int.from_bytes(bytes(value), "little")


def to_hex(crc: int) -> str:
    """How manifests write it: 16 hex digits, the number as the catalogue prints it."""
    return f"{crc & MASK:016x}"


def from_hex(text: Any) -> int | None:
    if not isinstance(text, str) or len(text) != 16:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


class Crc64:
    """A running CRC-64 (`update`, `value`, `hexdigest`), with the length it covers."""

    def __init__(self) -> None:
        self.value = 0
        self.length = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self.value = crc64(data, self.value)
        self.length += len(data)

    def hexdigest(self) -> str:
        return to_hex(self.value)
