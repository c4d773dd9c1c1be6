"""A loaded module's PE image, read from the dump's memory only as far as unwinding needs it.

Unwinding a kernel stack needs, per module on the stack, three things the image itself carries: its
headers (where the exception directory is), the RUNTIME_FUNCTION entry covering an address (a binary
search over the sorted .pdata table) and that entry's UNWIND_INFO (with the chained entries it points
to). A 4 GiB dump must not cost more than a few MiB of reads, so nothing is read whole: the headers are
one page, a lookup is log2(n) 12-byte probes, an UNWIND_INFO is its own few bytes, all through a page
cache (`PageCache`) that also serves the stack and the call checks.

Parsing is pefile's (headers, RUNTIME_FUNCTION, UNWIND_INFO and its unwind codes), fed with the bytes
read here; no PE structure is decoded by hand. Pages a kernel dump left out (discardable or paged-out
sections, a small dump that has no image at all) raise NotInDump: the caller falls back to a scan.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pefile

from scripts.dumpfile.errors import NotInDump

PAGE = 0x1000
RUNTIME_FUNCTION_SIZE = 12
MAX_CHAIN = 32  # a chain longer than this is a loop in corrupt data
IMAGE_DIRECTORY_ENTRY_EXCEPTION = 3
PROBE_LEVELS = 3  # levels of a .pdata binary search fetched together: at most 7 pages, one round trip


class PageCache:
    """Reads virtual memory a page at a time and keeps what it read, so the walk's repeated probes (the
    top of a binary search, the stack, code before a return address) cost one read each. With a `batch`
    (scripts.dumpfile.readahead), `prefetch(ranges)` brings pages the walk is about to read in one round trip."""

    def __init__(self, read_virtual: Callable[[int, int], bytes], batch: Any = None):
        self._read = read_virtual
        self._batch = batch
        self._pages: dict[int, bytes | NotInDump] = {}

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        if self._batch is None:
            return
        wanted = [(page, PAGE) for address, size in ranges if size > 0
                  for page in range(address & ~(PAGE - 1), address + size, PAGE) if page not in self._pages]
        if wanted:
            self._batch.fetch(wanted)

    def page(self, address: int) -> bytes:
        base = address & ~(PAGE - 1)
        cached = self._pages.get(base)
        if cached is None:
            try:
                cached = self._read(base, PAGE)
            except NotInDump as err:
                cached = err
            self._pages[base] = cached
        if isinstance(cached, NotInDump):
            raise NotInDump(address, cached.reason)
        return cached

    def read(self, address: int, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            at = address + len(out)
            page = self.page(at)
            offset = at & (PAGE - 1)
            out += page[offset:offset + size - len(out)]
        return bytes(out)

    def u64(self, address: int) -> int:
        return struct.unpack("<Q", self.read(address, 8))[0]


@dataclass(frozen=True)
class RuntimeFunction:
    """RUNTIME_FUNCTION: [begin, end) RVAs of a function (or a fragment of one) and its UNWIND_INFO."""

    begin: int
    end: int
    unwind: int

    def contains(self, rva: int) -> bool:
        return self.begin <= rva < self.end


def _probes(low: int, high: int, levels: int) -> list[int]:
    """The entries a binary search over [low, high] may look at in its next `levels` steps (2^levels - 1)."""
    out, spans = [], [(low, high)]
    for _ in range(levels):
        following = []
        for lo, hi in spans:
            if lo <= hi:
                middle = (lo + hi) // 2
                out.append(middle)
                following += [(lo, middle - 1), (middle + 1, hi)]
        spans = following
    return out


class BadImage(ValueError):
    """The module's headers or tables are not a usable x64 PE image (corrupt, or not what they say)."""


class ModuleImage:
    """One module's image at `base`, read lazily through `memory` (a PageCache)."""

    def __init__(self, memory: PageCache, base: int, size: int):
        self.memory, self.base, self.size = memory, base, size
        self._table: tuple[int, int] | None = None  # (RVA, entry count) of the exception directory

    def _exception_table(self) -> tuple[int, int]:
        if self._table is None:
            headers = self.memory.read(self.base, PAGE)
            try:
                pe = pefile.PE(data=headers, fast_load=True)
            except pefile.PEFormatError as err:
                raise BadImage(f"no PE image at {self.base:#x}: {err}") from None
            if pe.FILE_HEADER.Machine != pefile.MACHINE_TYPE["IMAGE_FILE_MACHINE_AMD64"]:
                raise BadImage(f"the image at {self.base:#x} is not x64")
            directories = pe.OPTIONAL_HEADER.DATA_DIRECTORY
            if len(directories) <= IMAGE_DIRECTORY_ENTRY_EXCEPTION:
                raise BadImage(f"the image at {self.base:#x} has no exception directory")
            entry = directories[IMAGE_DIRECTORY_ENTRY_EXCEPTION]
            if entry.VirtualAddress + entry.Size > self.size:
                raise BadImage(f"the exception directory of the image at {self.base:#x} lies outside it")
            self._table = (entry.VirtualAddress, entry.Size // RUNTIME_FUNCTION_SIZE)
        return self._table

    def _entry(self, rva: int) -> RuntimeFunction:
        raw = self.memory.read(self.base + rva, RUNTIME_FUNCTION_SIZE)
        rf = pefile.Structure(pefile.PE.__RUNTIME_FUNCTION_format__)
        rf.__unpack__(raw)
        return RuntimeFunction(rf.BeginAddress, rf.EndAddress, rf.UnwindData)

    def function_at(self, rva: int) -> RuntimeFunction | None:
        """The RUNTIME_FUNCTION covering `rva` (None: a leaf function, which has none). NotInDump if the
        table is not in the dump; BadImage if the headers are not a PE image."""
        table, count = self._exception_table()
        low, high = 0, count - 1
        depth = 0
        while low <= high:
            if depth % PROBE_LEVELS == 0:  # the pages the next levels of the search may probe, in one batch
                self.memory.prefetch([(self.base + table + i * RUNTIME_FUNCTION_SIZE, RUNTIME_FUNCTION_SIZE)
                                      for i in _probes(low, high, PROBE_LEVELS)])
            depth += 1
            middle = (low + high) // 2
            entry = self._entry(table + middle * RUNTIME_FUNCTION_SIZE)
            if rva < entry.begin:
                high = middle - 1
            elif rva >= entry.end:
                low = middle + 1
            else:
                return self.primary_entry(self._innermost(table, count, middle, entry, rva))
        return None

    def _innermost(self, table: int, count: int, index: int, entry: RuntimeFunction, rva: int) -> RuntimeFunction:
        """lld/LLVM give a chained fragment its own entry inside its parent's range (MSVC never overlaps
        entries): the entry that begins last and still covers `rva` is the fragment's."""
        while index + 1 < count:
            following = self._entry(table + (index + 1) * RUNTIME_FUNCTION_SIZE)
            if following.begin > rva:
                break
            index += 1
            if following.contains(rva):
                entry = following
        return entry

    def primary_entry(self, entry: RuntimeFunction) -> RuntimeFunction:
        """An entry whose UnwindData has bit 0 set points at another RUNTIME_FUNCTION, not UNWIND_INFO."""
        for _ in range(MAX_CHAIN):
            if not entry.unwind & 1:
                return entry
            entry = self._entry(entry.unwind & ~1)
        raise BadImage(f"RUNTIME_FUNCTION indirections loop in the image at {self.base:#x}")

    def unwind_info(self, rva: int) -> tuple[pefile.UnwindInfo, RuntimeFunction | None]:
        """The UNWIND_INFO at `rva`, and the RUNTIME_FUNCTION it chains to (UNW_FLAG_CHAININFO)."""
        head = self.memory.read(self.base + rva, 4)
        codes = (head[2] + 1) & ~1
        raw = self.memory.read(self.base + rva, 4 + 2 * codes + RUNTIME_FUNCTION_SIZE)
        info = pefile.UnwindInfo(file_offset=rva)
        problem = info.unpack_in_stages(raw) or info.unpack_in_stages(raw)
        if problem or not getattr(info, "UnwindCodes", None) and info.CountOfCodes:
            raise BadImage(f"unreadable UNWIND_INFO at {self.base + rva:#x}: {problem or 'truncated'}")
        chained = None
        if info.UNW_FLAG_CHAININFO:
            begin, end, unwind = struct.unpack_from("<III", raw, 4 + 2 * codes)
            chained = RuntimeFunction(begin, end, unwind)
        return info, chained

    def code(self, address: int, size: int) -> bytes:
        return self.memory.read(address, size)
