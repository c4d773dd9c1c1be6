"""Where a physical page lives in the dump file: the run list (full dumps) or the bitmap (bitmap dumps).

A dump does not store physical memory as one flat image: RAM has holes (below 1 MiB, the MMIO window
under 4 GiB) and a kernel dump keeps only the kernel's pages. Windows therefore writes pages back to back
and records which physical page each one is, in one of two ways:

- DumpType 1 (full): the header's PHYSICAL_MEMORY_DESCRIPTOR lists runs (BasePage, PageCount); pages
  follow the header in run order. The file offset of a page is the header size plus the number of pages
  in earlier runs, plus its index inside its run. No extra read is needed.
- DumpType 5/6/7 (bitmap): right after the dump header (at 0x2000 for DUMP_HEADER64, at 0x1000 for
  DUMP_HEADER32) a bitmap header ('SDMP' for a kernel/automatic dump, 'FDMP' for a complete one) is followed
  by one bit per physical page; pages are stored in bit order from FirstPage.
  The file offset of a page is FirstPage plus 4 KiB times the number of set bits before it, so the bitmap
  has to be read up to that page - but no further: `BitmapMemory` reads it lazily, one chunk at a time,
  and keeps running totals, so finding a page near the start of RAM costs a few KiB, not the whole
  bitmap (128 KiB for 4 GiB of RAM, 32 MiB for 1 TiB).
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from typing import Protocol

from dissect.cstruct import cstruct

from scripts.dumpfile.errors import BadDump, NotInDump

PAGE_SIZE = 0x1000
PAGE_PATTERN = 0x45474150  # b"PAGE" read as a little-endian ULONG: the fill of a field never written

_LAYOUTS = cstruct().load("""
/* PHYSICAL_MEMORY_DESCRIPTOR: the head of the header's 700-byte PhysicalMemoryBlock, runs follow it */
struct PHYSICAL_MEMORY_DESCRIPTOR64 {
    uint32   NumberOfRuns;
    uint32   _pad;
    uint64   NumberOfPages;
};
struct PHYSICAL_MEMORY_RUN64 {
    uint64   BasePage;
    uint64   PageCount;
};
struct PHYSICAL_MEMORY_DESCRIPTOR32 {
    uint32   NumberOfRuns;
    uint32   NumberOfPages;
};
struct PHYSICAL_MEMORY_RUN32 {
    uint32   BasePage;
    uint32   PageCount;
};

/* at 0x2000 of a bitmap dump (kdmp-parser's BMP_HEADER64), then Pages bits of bitmap */
struct BMP_HEADER64 {
    char     Signature[4];              /* 0x00 'SDMP' kernel/automatic, 'FDMP' complete */
    char     ValidDump[4];              /* 0x04 'DUMP' */
    char     _reserved[24];
    uint64   FirstPage;                 /* 0x20 file offset of the first stored page */
    uint64   TotalPresentPages;         /* 0x28 bits set */
    uint64   Pages;                     /* 0x30 bits in the bitmap: highest PFN + 1, rounded up */
};

/* at 0x1000 of a 32-bit bitmap dump, right after DUMP_HEADER32: the same 0x38 bytes, 64-bit counts and all.
   volatility3 reads both with one _SUMMARY_DUMP (symbols/windows/crash_common.json: Signature 0, ValidDump 4,
   DumpOptions 8, HeaderSize 0x20, Pages 0x28, BitmapSize 0x30 in bits, the bitmap's ULONGs at 0x38; "the
   _SUMMARY_DUMP is shared between 32- and 64-bit") at 0x1000 * headerpages (layers/crash.py: 1 page for
   WindowsCrashDump32Layer, 2 for the 64-bit one, DumpType 5 accepted for both). A public reconstruction of
   mindumpdef.h agrees: BITMAP_DUMP "n = 1 for 32 and 2 for 64 dump", at n000 Signature, ValidDump, DumpOptions,
   unused[20], ULONG64 HeaderSize, Pages, BitmapSize, Bits[] at n038, in the union of both MEMORY_DUMP32 and
   MEMORY_DUMP64. Not to be confused with that header's SUMMARY_DUMP32 (DumpType 2, Windows 2000/XP: ULONG
   HeaderSize at 0x100C, BitmapSize 0x1010, Pages 0x1014, bits at 0x1020), which is not read here. Written out
   on its own, with volatility3's names, so a change to either is a visible decision; its size is asserted. */
struct BITMAP_DUMP32 {
    char     Signature[4];              /* 0x00 'SDMP' kernel/automatic, 'FDMP' complete */
    char     ValidDump[4];              /* 0x04 'DUMP' */
    uint32   DumpOptions;               /* 0x08 */
    char     _reserved[20];
    uint64   HeaderSize;                /* 0x20 file offset of the first stored page */
    uint64   Pages;                     /* 0x28 bits set (pages stored) */
    uint64   BitmapSize;                /* 0x30 bits in the bitmap */
};
""")
# Where the bitmap header sits (right after the dump header) and which layout it has, by pointer width.
BITMAP_HEADERS = {64: (0x2000, _LAYOUTS.BMP_HEADER64), 32: (0x1000, _LAYOUTS.BITMAP_DUMP32)}
assert len(_LAYOUTS.BITMAP_DUMP32) == len(_LAYOUTS.BMP_HEADER64) == 0x38
_RUN_LISTS = {
    64: (_LAYOUTS.PHYSICAL_MEMORY_DESCRIPTOR64, _LAYOUTS.PHYSICAL_MEMORY_RUN64),
    32: (_LAYOUTS.PHYSICAL_MEMORY_DESCRIPTOR32, _LAYOUTS.PHYSICAL_MEMORY_RUN32),
}


class Source(Protocol):
    """What the dump readers need from a file: random reads and a size (scripts.base.rangereader.RangeReader)."""

    name: str
    size: int

    def read_at(self, offset: int, size: int) -> bytes: ...


@dataclass(frozen=True)
class PhysicalRun:
    base_page: int
    page_count: int


def parse_run_list(block: bytes, bits: int) -> tuple[tuple[PhysicalRun, ...], int]:
    """The runs and page count of a full dump's PhysicalMemoryBlock (the header's 700 bytes), checked:
    as many runs as fit, adding up to NumberOfPages, none overlapping."""
    descriptor_type, run_type = _RUN_LISTS[bits]
    descriptor = descriptor_type(block)
    count, pages = int(descriptor.NumberOfRuns), int(descriptor.NumberOfPages)
    capacity = (len(block) - len(descriptor_type)) // len(run_type)
    if count == PAGE_PATTERN or not 0 < count <= capacity:
        raise BadDump(f"corrupt: the physical memory descriptor has {count:#x} runs (at most {capacity} fit)")
    listed = run_type[count](block[len(descriptor_type):])
    runs = tuple(PhysicalRun(int(r.BasePage), int(r.PageCount)) for r in listed)
    if sum(r.page_count for r in runs) != pages:
        raise BadDump(
            f"corrupt: the physical memory runs add up to {sum(r.page_count for r in runs)} pages, "
            f"the descriptor says {pages}"
        )
    ordered = sorted(runs, key=lambda r: r.base_page)
    for a, b in zip(ordered, ordered[1:]):
        if a.base_page + a.page_count > b.base_page:
            raise BadDump(f"corrupt: physical memory runs overlap at page {b.base_page:#x}")
    return runs, pages


class PhysicalMemory:
    """Maps physical addresses to file offsets; `read` follows pages wherever the dump put them."""

    def __init__(self, source: Source):
        self.source = source

    def file_offset(self, pfn: int) -> int | None:  # pragma: no cover - interface
        raise NotImplementedError

    def read(self, physical_address: int, size: int) -> bytes:
        out = bytearray()
        address = physical_address
        while len(out) < size:
            offset = self.file_offset(address // PAGE_SIZE)
            if offset is None:
                raise NotInDump(address, "physical page not in the dump")
            chunk = min(size - len(out), PAGE_SIZE - address % PAGE_SIZE)
            data = self.source.read_at(offset + address % PAGE_SIZE, chunk)
            if len(data) != chunk:
                raise BadDump(f"{self.source.name}: the page of physical address {address:#x} is past the end of the file")
            out += data
            address += chunk
        return bytes(out)

    def read_u64(self, physical_address: int) -> int:
        return struct.unpack("<Q", self.read(physical_address, 8))[0]

    def read_u32(self, physical_address: int) -> int:
        return struct.unpack("<I", self.read(physical_address, 4))[0]

    # -- batching (advisory: nothing here raises, changes what a read returns, or marks a dump partial) --

    def known_offset(self, pfn: int) -> int | None:
        """`file_offset` for a batch: None also where finding the page would mean a check that can fail."""
        return self.file_offset(pfn)

    def file_spans(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (file offset, size) pieces of physical (address, size) ranges whose pages are known to be in
        the dump; the others are left out (their real read will say why)."""
        spans = []
        for address, size in ranges:
            end = address + size
            while address < end:
                chunk = min(end - address, PAGE_SIZE - address % PAGE_SIZE)
                offset = self.known_offset(address // PAGE_SIZE)
                if offset is not None:
                    spans.append((offset + address % PAGE_SIZE, chunk))
                address += chunk
        return spans

    def fetch(self, ranges: list[tuple[int, int]]) -> None:
        """Brings the file bytes of physical ranges into the source's cache together, one round trip for all
        of them when the source has `read_many` (scripts.base.rangereader.RangeReader); a source without it
        is left alone, its reads stay one by one. Later `read`s of them cost nothing."""
        spans = self.file_spans(ranges)
        many = getattr(self.source, "read_many", None)
        if spans and many is not None:
            many(spans)

    def cached(self, ranges: list[tuple[int, int]]) -> bool:
        """Whether `fetch(ranges)` would cost no wait (the source says its cache holds them; False if it cannot)."""
        is_cached = getattr(self.source, "cached", None)
        return is_cached is not None and is_cached(self.file_spans(ranges))

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Starts fetching the file bytes of physical ranges (the source's `prefetch`) and returns at once."""
        spans = self.file_spans(ranges)
        start = getattr(self.source, "prefetch", None)
        if spans and start is not None:
            start(spans)

    def peek(self, physical_address: int, size: int) -> bytes | None:
        """`read` for a batch: None instead of an error (and instead of a check that can fail)."""
        spans = self.file_spans([(physical_address, size)])
        if sum(n for _, n in spans) != size:
            return None
        data = b"".join(self.source.read_at(offset, n) for offset, n in spans)
        return data if len(data) == size else None


class RunListMemory(PhysicalMemory):
    """DumpType 1: pages in the order of the header's run list, right after the header."""

    def __init__(self, source: Source, runs: tuple[PhysicalRun, ...], data_start: int):
        super().__init__(source)
        self.runs = tuple(sorted(runs, key=lambda r: r.base_page))
        self.data_start = data_start
        self._bases = [r.base_page for r in self.runs]
        # file order is the header's order, not sorted order: index each run by its position in the file
        self._first_slot: dict[int, int] = {}
        slot = 0
        for run in runs:
            self._first_slot[run.base_page] = slot
            slot += run.page_count

    def file_offset(self, pfn: int) -> int | None:
        i = bisect.bisect_right(self._bases, pfn) - 1
        if i < 0:
            return None
        run = self.runs[i]
        if pfn >= run.base_page + run.page_count:
            return None
        return self.data_start + (self._first_slot[run.base_page] + pfn - run.base_page) * PAGE_SIZE


@dataclass(frozen=True)
class BitmapHeader:
    """BMP_HEADER64 at 0x2000 (x64), BITMAP_DUMP32 at 0x1000 (x86): the 0x38-byte header of a bitmap dump;
    the bitmap itself follows it."""

    signature: str
    first_page: int
    present_pages: int
    pages: int
    offset: int = 0x2000
    SIZE = len(_LAYOUTS.BMP_HEADER64)

    @classmethod
    def parse(cls, data: bytes, offset: int = 0x2000, bits: int = 64) -> "BitmapHeader":
        if len(data) < cls.SIZE:
            raise BadDump(f"truncated: the bitmap header at {offset:#x} is incomplete")
        raw = BITMAP_HEADERS[bits][1](data)
        if raw.Signature not in (b"SDMP", b"FDMP") or raw.ValidDump != b"DUMP":
            raise BadDump(
                f"corrupt: expected the bitmap header ('SDMP' or 'FDMP' then 'DUMP') at {offset:#x}, "
                f"found {bytes(data[0:8])!r}"
            )
        if bits == 64:
            first_page, present, pages = int(raw.FirstPage), int(raw.TotalPresentPages), int(raw.Pages)
        else:
            first_page, present, pages = int(raw.HeaderSize), int(raw.Pages), int(raw.BitmapSize)
        header = cls(raw.Signature.decode(), first_page, present, pages, offset)
        bitmap_end = offset + cls.SIZE + header.bitmap_bytes
        if first_page < bitmap_end:
            raise BadDump(
                f"corrupt: the bitmap header says pages start at {first_page:#x}, inside its own "
                f"{header.bitmap_bytes}-byte bitmap (which ends at {bitmap_end:#x})"
            )
        if present > pages:
            raise BadDump(f"corrupt: the bitmap header counts {present} present pages out of {pages}")
        return header

    @property
    def complete(self) -> bool:
        return self.signature == "FDMP"

    @property
    def bitmap_offset(self) -> int:
        return self.offset + self.SIZE

    @property
    def bitmap_bytes(self) -> int:
        return (self.pages + 7) // 8

    @property
    def minimum_file_size(self) -> int:
        return self.first_page + self.present_pages * PAGE_SIZE


WHOLE_BITMAP = 4 << 20  # a bitmap up to this size (128 GiB of RAM) is read whole by the first batch


class BitmapMemory(PhysicalMemory):
    """DumpType 5/6/7: page N of the file is the N-th set bit of the bitmap."""

    CHUNK = 0x1000  # bytes of bitmap per chunk = 32768 pages = 128 MiB of RAM

    def __init__(self, source: Source, header: BitmapHeader):
        super().__init__(source)
        self.header = header
        self._chunks: list[int] = []  # each chunk's bits as an int (bit i = PFN chunk*CHUNK*8 + i)
        self._before: list[int] = []  # set bits in all earlier chunks
        self._unreported: BadDump | None = None  # found by a batch, for the read of a page in the last chunk

    @property
    def chunks_read(self) -> int:
        return len(self._chunks)

    def _load_through(self, chunk: int) -> None:
        """Reads the bitmap from the first unread chunk through `chunk`, in one read."""
        if chunk < len(self._chunks):
            return
        start = len(self._chunks) * self.CHUNK
        end = min((chunk + 1) * self.CHUNK, self.header.bitmap_bytes)
        data = self.source.read_at(self.header.bitmap_offset + start, end - start)
        if len(data) != end - start:
            raise BadDump(f"truncated: the file ends inside the page bitmap (at {self.header.bitmap_offset + start + len(data):#x})")
        total = self._before[-1] + self._chunks[-1].bit_count() if self._chunks else 0
        for at in range(0, len(data), self.CHUNK):
            value = int.from_bytes(data[at:at + self.CHUNK], "little")
            self._before.append(total)
            self._chunks.append(value)
            total += value.bit_count()
        if len(self._chunks) * self.CHUNK >= self.header.bitmap_bytes:
            valid_bits = self.header.pages
            last_chunk_bits = valid_bits - (len(self._chunks) - 1) * self.CHUNK * 8
            counted = self._before[-1] + (self._chunks[-1] & ((1 << last_chunk_bits) - 1)).bit_count()
            if counted != self.header.present_pages:
                raise BadDump(
                    f"corrupt: the page bitmap has {counted} bits set but its header counts "
                    f"{self.header.present_pages} present pages"
                )

    def known_offset(self, pfn: int) -> int | None:
        """`file_offset` for a batch: loads the bitmap as far as needed, but an error in it is left to the
        read that really needs the page (the same read as without batches)."""
        if pfn < 0 or pfn >= self.header.pages:
            return None
        chunk = pfn // (self.CHUNK * 8)
        if chunk >= len(self._chunks):
            early = self._cached_offset(pfn)
            if early is not None:
                return early
            whole = self._whole  # a batch's pages are all over RAM
            try:
                self._load_through((self.header.bitmap_bytes - 1) // self.CHUNK if whole else chunk)
            except BadDump as err:
                if len(self._chunks) * self.CHUNK >= self.header.bitmap_bytes:
                    self._unreported = err  # the count check of the last chunk: kept for its first real read
                return None  # (cut short: nothing was kept, the real read finds that again)
        if self._unreported is not None and self._last(chunk):
            return None
        return self.file_offset(pfn)

    @property
    def _whole(self) -> bool:
        return self.header.bitmap_bytes <= WHOLE_BITMAP

    def _cached_offset(self, pfn: int) -> int | None:
        """The file offset of a page whose bits of the bitmap (from its start) the source has cached already,
        e.g. in the bytes of its first read: a low page (a kernel's PML4 sits at 0x1ad000) is found without
        waiting for the rest of the bitmap. None otherwise, or if its bit is clear."""
        is_cached = getattr(self.source, "cached", None)
        span = (self.header.bitmap_offset, pfn // 8 + 1)
        if is_cached is None or self._chunks or not is_cached([span]):
            return None
        if self._whole and is_cached([(self.header.bitmap_offset, self.header.bitmap_bytes)]):
            return None  # all of it is here: counted once into chunks by the caller, not again for every page
        data = self.source.read_at(*span)
        bits = int.from_bytes(data, "little")
        if len(data) != span[1] or not bits >> pfn & 1:
            return None
        return self.header.first_page + (bits & ((1 << pfn) - 1)).bit_count() * PAGE_SIZE

    def fetch(self, ranges: list[tuple[int, int]]) -> None:
        """`PhysicalMemory.fetch`; the first batch brings the whole bitmap too (when it is not big), so the
        pages of the next batches are found without a wait of their own."""
        spans = self.file_spans(ranges)
        many = getattr(self.source, "read_many", None)
        if spans and self._whole and len(self._chunks) * self.CHUNK < self.header.bitmap_bytes:
            spans.append((self.header.bitmap_offset, self.header.bitmap_bytes))
        if spans and many is not None:
            many(spans)

    def _last(self, chunk: int) -> bool:
        return (chunk + 1) * self.CHUNK >= self.header.bitmap_bytes

    def file_offset(self, pfn: int) -> int | None:
        if pfn < 0 or pfn >= self.header.pages:
            return None
        chunk, bit = divmod(pfn, self.CHUNK * 8)
        if self._unreported is not None and self._last(chunk):
            error, self._unreported = self._unreported, None
            raise error
        self._load_through(chunk)
        value = self._chunks[chunk]
        if not value >> bit & 1:
            return None
        rank = self._before[chunk] + (value & ((1 << bit) - 1)).bit_count()
        return self.header.first_page + rank * PAGE_SIZE
