"""Fetching ahead of the dump readers' dependent walks, so that a triage over a blob waits for the network a
few dozen times instead of once per address (issue 15).

The readers (paging.py, modules.py, pe.py) go one address at a time, each one found in the bytes of the one
before: a module-list entry holds the address of the next, a page-table entry the address of the next
table. Over a 25 ms link that is 25 ms per address. What can be known before it is needed is fetched
together here, through the source's `read_many`/`prefetch` (scripts.base.rangereader.RangeReader), and
the readers then read it from the cache exactly as before: same bytes, same errors, same answers. A source
without them (a plain file object) is read one address at a time, as before.

`Batch` is what a dump offers the readers: `fetch(ranges)` brings virtual (address, size) ranges in one
round trip (plus one per page-table level not cached yet, shared by all of them: paging.py's `prepare`),
`peek(address, size)` reads what was fetched without raising and without touching the dump's state (no
bitmap check, no partial mark: physical.py's `known_offset`). Its users:

- `ListAhead`, for the module list: its entries are linked both ways, so while the walk follows Flink from
  the head, the tail is read by Blink in the same round trips (the walk finds those entries cached when it
  gets there: half the waits); and once the walk is seen going from page to neighbouring page (Windows
  allocates the entries from the same pool pages), the pages after the entry come in the same batch.
- modules.py's `describe_entry`: a module's names, timestamp and image header together.
- pe.py and stackwalk.py: the stack pages a frame's unwinding and scan read, the pages the next levels of
  a .pdata binary search may probe, the code before candidate return addresses.

The floor is the list's own dependent chain: entries on unrelated pages, each one's address only in its
neighbours' links, cost a round trip per two entries (one from each end) whatever the reader does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from scripts.base.rangeio import HTTP_CONCURRENCY

PAGE = 0x1000
REGION = 0x20_0000  # one page table maps 2 MiB: neighbours inside it are translated from cached tables
NEAR_PAGES = 16  # the next entry within this many pages after the current one: the walk is "local"
# pages fetched ahead of a local walk at most: with the entry itself and the tail's next one, a batch is as
# many requests as the reader keeps in flight over HTTP, so each batch is one round trip
MAX_WINDOW = HTTP_CONCURRENCY - 2


class Batch(Protocol):
    def fetch(self, ranges: list[tuple[int, int]]) -> None: ...

    def peek(self, address: int, size: int) -> bytes | None: ...


class ListAhead:
    """Read-ahead for a walk of a circular doubly linked list from `head` (LIST_ENTRY at offset 0 of each
    `size`-byte entry, pointers of `width` bytes). Call `before(current)` before the walk reads the entry
    at `current`: when that entry is not fetched yet, one batch brings it, the next entry from the tail,
    and (once the walk is seen to go from page to neighbouring page) the pages after it. Advisory only:
    whatever it finds odd (a loop, a broken link, an entry not in the dump) ends its own work, never the
    walk's."""

    def __init__(self, batch: Batch, head: int, size: int, width: int, pointer_ok: Callable[[int], bool]):
        self._batch, self._head, self._size, self._width, self._ok = batch, head, size, width, pointer_ok
        self._back: int | None = None  # the next entry to read from the tail (by Blink), None when done
        self._seen: set[int] = set()  # entries read either way
        self._pages: set[int] = set()  # pages fetched ahead of the walk
        self._previous: int | None = None
        self._streak = 0  # steps in a row to a neighbouring page

    def start(self, tail: int) -> None:
        """The head's Blink: the last entry, where the backward reads begin."""
        self._back = tail if tail != self._head and self._ok(tail) else None

    def before(self, current: int) -> None:
        previous, self._previous = self._previous, current
        step = (current - previous) // PAGE if previous is not None else -1
        self._streak = self._streak + 1 if 0 <= step <= NEAR_PAGES else 0
        fetched = current in self._seen or all(page in self._pages for page in _pages_of(current, self._size))
        self._seen.add(current)
        if self._back is not None and self._back in self._seen:
            self._back = None  # the two ends met: the rest of the walk is cached
        if fetched:
            return
        ranges = [(current, self._size)]
        ahead = self._neighbours(current)
        ranges += [(page, PAGE) for page in ahead]
        if self._back is not None:
            ranges.append((self._back, self._size))
        self._batch.fetch(ranges)
        self._pages.update(ahead)
        self._step_back()

    def _neighbours(self, current: int) -> range:
        """The pages after `current`'s, in the same page table (translated from cached tables), while the
        walk keeps going to neighbouring pages: a window that doubles, up to MAX_WINDOW pages."""
        if not self._streak:
            return range(0)
        page = (current + self._size - 1) & ~(PAGE - 1)
        window = min(2 << self._streak, MAX_WINDOW)
        return range(page + PAGE, min(page + (window + 1) * PAGE, (page | (REGION - 1)) + 1), PAGE)

    def _step_back(self) -> None:
        back = self._back
        if back is None:
            return
        raw = self._batch.peek(back, 2 * self._width)
        self._seen.add(back)
        blink = int.from_bytes(raw[self._width:], "little") if raw is not None else None
        ok = blink is not None and blink != self._head and blink not in self._seen and self._ok(blink)
        self._back = blink if ok else None


class VirtualBatch:
    """`Batch` over a dump's page tables (`space`, scripts.dumpfile.paging) and physical memory (`physical`,
    scripts.dumpfile.physical): translations of all the ranges' pages level by level, then their bytes, each
    step one `read_many` of the source."""

    def __init__(self, space, physical):
        self.space, self.physical = space, physical

    def fetch(self, ranges: list[tuple[int, int]]) -> None:
        pieces = list(_pieces(ranges))
        self.space.prepare([address for address, _ in pieces], self.physical.fetch, self.physical.peek)
        spans = []
        for address, size in pieces:
            physical = self.space.translated(address)
            if physical is not None:
                spans.append((physical, size))
        self.physical.fetch(spans)

    def peek(self, address: int, size: int) -> bytes | None:
        out = []
        for at, chunk in _pieces([(address, size)]):
            physical = self.space.translated(at)
            data = None if physical is None else self.physical.peek(physical, chunk)
            if data is None:
                return None
            out.append(data)
        return b"".join(out)


def _pages_of(address: int, size: int) -> range:
    return range(address & ~(PAGE - 1), address + size, PAGE)


def _pieces(ranges: list[tuple[int, int]]):
    """(address, size) pieces of the ranges that do not cross a page."""
    for address, size in ranges:
        end = address + max(0, size)
        while address < end:
            chunk = min(end - address, PAGE - address % PAGE)
            yield address, chunk
            address += chunk
