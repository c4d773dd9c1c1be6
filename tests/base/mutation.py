"""Corrupt copies of real files, for the property tests that hold every parser to its contract.

A parser is total when, for any bytes it is given, it either answers or raises a CrashcartError (BadDump,
ExtractError) saying what is wrong: never another exception (exit 70), never a hang. These helpers make the
bytes. They start from a real structure (a dump or a disk image the devkit built, or a real dump from
../shared/realdumps) and change it the way damage does: a field overwritten with an edge value, a bit
flipped, the file cut short. Nothing is copied: `MutatedBackend` serves the original file through
scripts.base.rangereader with the edits applied on the fly, so a 32 MiB dump or a 56 MiB disk costs only
what the parser reads.

Where to aim: `RecordingReader` records every range a parser reads from the intact file. Those ranges are
exactly the structures it follows (headers, page-table entries, list entries, MFT records, hive cells), so
edits aimed there reach the code that trusts them, rather than bytes nobody looks at.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from scripts.base.rangereader import Backend, RangeReader

# values a damaged or hostile field tends to hold: zero, one, sign and width boundaries, the 'PAGE' fill
EDGE_VALUES = (
    0, 1, 2, 7, 0x7F, 0x80, 0xFF, 0x100, 0x1000, 0x2000, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFF_FFFF,
    0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000, 0x45474150, 0x4547415045474150, (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
)


class ReadBudgetExceeded(AssertionError):
    """The parser read far more than any structure it follows can need: a loop on corrupt data."""


class Hang(AssertionError):
    """The parser was still busy after the time limit (a loop over cached bytes reads nothing new)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raises Hang in the block if it runs longer than `seconds` (main thread, where hypothesis runs), and again
    every second after that: an exception raised while a gc callback runs is swallowed by the interpreter."""
    def expired(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s: the parser does not stop on these bytes")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True)
class Edit:
    offset: int
    data: bytes


@dataclass(frozen=True)
class Mutation:
    """What was done to the file: shown by hypothesis when an example fails, and kept in regression tests."""

    edits: tuple[Edit, ...] = ()
    length: int | None = None  # cut the file to this many bytes


class MutatedBackend(Backend):
    """`path` as scripts.base.rangereader reads it, with `mutation` applied and reads counted against a budget."""

    def __init__(self, path: Path, mutation: Mutation, *, budget: int = 256 << 20):
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        full = os.fstat(self._fd).st_size
        self.name = f"{Path(path).name} (mutated)"
        self.size = full if mutation.length is None else min(mutation.length, full)
        self._edits = mutation.edits
        self._budget = budget

    def fetch(self, offset: int, length: int) -> bytes:
        self.requests += 1
        self.bytes_read += length
        if self.bytes_read > self._budget or self.requests > 100_000:
            raise ReadBudgetExceeded(f"{self.bytes_read} bytes in {self.requests} reads: the parser does not stop")
        length = max(0, min(length, self.size - offset))
        data = bytearray(os.pread(self._fd, length, offset)) if length else bytearray()
        data.extend(bytes(length - len(data)))  # a sparse tail reads as zeros
        for edit in self._edits:
            lo, hi = max(offset, edit.offset), min(offset + length, edit.offset + len(edit.data))
            if lo < hi:
                data[lo - offset:hi - offset] = edit.data[lo - edit.offset:hi - edit.offset]
        return bytes(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def mutated_reader(path: Path, mutation: Mutation, *, block_size: int = 4096) -> RangeReader:
    return RangeReader(MutatedBackend(path, mutation), block_size=block_size)


class RecordingReader(RangeReader):
    """A RangeReader that remembers every (offset, size) a parser asked for."""

    def __init__(self, backend: Backend, **options):
        super().__init__(backend, **options)
        self.spots: list[tuple[int, int]] = []

    def read_at(self, offset: int, size: int) -> bytes:
        if size > 0:
            self.spots.append((offset, size))
        return super().read_at(offset, size)


@dataclass
class Target:
    """A real file and the structure offsets worth corrupting in it."""

    path: Path
    size: int
    fields: list[tuple[int, int]] = field(default_factory=list)  # (offset, width) of known fields
    spots: list[tuple[int, int]] = field(default_factory=list)  # (offset, size) ranges the parser read
    cuts: list[int] = field(default_factory=list)  # lengths worth cutting the file at
    # fields that only mean something together, (offset, width, role): a region's address, file offset and size
    groups: list[list[tuple[int, int, str]]] = field(default_factory=list)
    addresses: list[int] = field(default_factory=list)  # what the reader will look up (the faulting address...)
    values: list[int] = field(default_factory=list)  # what the file's own fields hold, and sizes around its end
    near_end: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        """The dictionary: every known field's intact value (and its page), and offsets around the end of the
        file, so that an edit can point one structure at another, or just past the end."""
        self.near_end = [self.size + delta for delta in (-0x1000, -8, -4, -1, 0, 1, 4, 0x1000) if self.size + delta >= 0]
        found = set(self.near_end)
        with open(self.path, "rb") as f:
            for offset, width in self.fields + [(o, w) for group in self.groups for o, w, _ in group]:
                raw = os.pread(f.fileno(), width, offset)
                if len(raw) == width:
                    value = int.from_bytes(raw, "little")
                    found |= {value, value & ~0xFFF, value + 0x1000}
        self.values = sorted(v for v in found if 0 <= v < 1 << 64)

    def add_spots(self, spots: list[tuple[int, int]], *, limit: int = 2000) -> None:
        """Keeps the distinct ranges, splitting big reads so a 64 KiB read does not hide its fields."""
        seen = set(self.spots)
        for offset, size in spots:
            for start in range(offset, offset + min(size, 1 << 16), 512):
                piece = (start, min(512, offset + size - start))
                if piece not in seen and start < self.size:
                    seen.add(piece)
                    self.spots.append(piece)
        self.spots = self.spots[:limit]


def _value(width: int, known: list[int]) -> st.SearchStrategy[bytes]:
    mask = (1 << (8 * width)) - 1
    values = st.one_of(st.sampled_from(EDGE_VALUES), st.integers(0, mask),
                       st.sampled_from(EDGE_VALUES).map(lambda v: (-v) & mask), st.sampled_from(known or [0]))
    return values.map(lambda v: (v & mask).to_bytes(width, "little"))


def _role_value(role: str, width: int, target: Target) -> st.SearchStrategy[bytes]:
    mask = (1 << (8 * width)) - 1
    if role == "address" and target.addresses:
        values = st.sampled_from(sorted({a for v in target.addresses for a in (v, v & ~0xFFF)}))
    elif role == "offset":
        values = st.one_of(st.sampled_from(target.near_end or [0]), st.sampled_from(target.values or [0]),
                           st.integers(0, 2 * target.size))
    elif role == "size":
        values = st.one_of(st.sampled_from((0, 1, 8, 0x90, 0x1000, 0x2000, 0x10000, 0xFFFF_FFFF)), st.integers(0, 0x10000))
    else:
        return _value(width, target.values)
    return values.map(lambda v: (v & mask).to_bytes(width, "little"))


@st.composite
def _edit(draw: st.DrawFn, target: Target) -> list[Edit]:
    kind = draw(st.sampled_from(("field", "group", "spot", "spot", "flip", "noise")))
    if kind == "group" and target.groups:
        group = draw(st.sampled_from(target.groups))
        return [Edit(offset, draw(_role_value(role, width, target))) for offset, width, role in group]
    if kind in ("field", "group") and target.fields:
        offset, width = draw(st.sampled_from(target.fields))
        return [Edit(offset, draw(_value(width, target.values)))]
    if kind in ("spot", "field") and target.spots:
        start, size = draw(st.sampled_from(target.spots))
        width = draw(st.sampled_from((1, 2, 4, 8)))
        slots = max(1, size // width)
        return [Edit(start + width * draw(st.integers(0, slots - 1)), draw(_value(width, target.values)))]
    if kind == "flip" or not target.spots:
        start, size = draw(st.sampled_from(target.spots or [(0, min(target.size, 0x4000))]))
        at = start + draw(st.integers(0, max(0, size - 1)))
        with open(target.path, "rb") as f:
            original = os.pread(f.fileno(), 1, at) or b"\0"
        return [Edit(at, bytes([original[0] ^ (1 << draw(st.integers(0, 7)))]))]
    start, size = draw(st.sampled_from(target.spots))
    return [Edit(start, draw(st.binary(min_size=1, max_size=min(64, size))))]


@st.composite
def mutations(draw: st.DrawFn, target: Target) -> Mutation:
    """One to four edits at the target's structure offsets, and sometimes a cut."""
    edits = tuple(edit for edits in draw(st.lists(_edit(target), min_size=1, max_size=4)) for edit in edits)
    length = None
    if draw(st.integers(0, 4)) == 0:
        cuts = target.cuts + [offset for offset, _ in target.spots[:200]]
        length = draw(st.one_of(st.sampled_from(cuts or [0]), st.integers(0, target.size)))
    return Mutation(edits, length)


@st.composite
def truncations(draw: st.DrawFn, target: Target) -> Mutation:
    """The intact file cut short, at a structure boundary or anywhere."""
    cuts = target.cuts + [offset for offset, _ in target.spots[:200]] + [offset + size for offset, size in target.spots[:200]]
    return Mutation((), draw(st.one_of(st.sampled_from(cuts or [0]), st.integers(0, max(0, target.size - 1)))))
