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

- `ListAhead`, for the module list (modulewalk.py): each fetched page is scanned for entry-shaped records
  (Windows allocates the entries from shared pool pages: a real kernel's 156 entries sit on 54 pages, up to
  9 to a page, see dumpkernel.MEASURED_LAYOUT), and the next batch brings the pages that the links of every
  entry known so far point to, both ways: the list is read breadth-first, page by page, instead of entry by
  entry. While the walk goes from page to neighbouring page (the boot-loaded entries, packed in load order)
  the pages after it come too (LARGE_WINDOW pages from the first entry on, when they are on a large page:
  one request). The module the caller will name (and the kernel) comes along: its names and image
  header are fetched in the background of the batch after its entry is seen.
- modules.py's `describe_entry`: a module's names, timestamp and image header together.
- pe.py and stackwalk.py: the stack pages a frame's unwinding and scan read, the pages the next levels of
  a .pdata binary search may probe, the code before candidate return addresses; dump.py fetches the stack
  above the bug check's records with the list's head.

What is left is the dependent chain and the reader's bound on requests in flight: the header, the PML4
(with the bitmap: physical.py), the kernel half's upper page tables whole (paging.py), the list's head,
its first and last entries, then per breadth-first step one round trip for the pages (and one for the
page tables of newly reached 2 MiB regions on 4 KiB pages; none on large pages). On a list laid out as
measured, on a pool mapped with large pages, that is 12 waits for 200 modules (bench/rangeread_bench.py);
on entries each a page apart with no other entry on their pages (the builder's "scattered" layout) a
round trip per few entries, whatever the reader does.
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
# on a large page the pages after the entry are physically contiguous with it: one request brings this many
LARGE_WINDOW = 32
MAX_BATCH_PAGES = 4 * HTTP_CONCURRENCY  # pages one batch of the list's read-ahead asks for at most


class Batch(Protocol):
    def fetch(self, ranges: list[tuple[int, int]], background: list[tuple[int, int]] | None = None) -> None: ...

    def peek(self, address: int, size: int) -> bytes | None: ...

    def in_large_page(self, address: int) -> bool: ...


class ListAhead:
    """Read-ahead for a walk of a circular doubly linked list from `head` (LIST_ENTRY at offset 0 of each
    `size`-byte entry, pointers of `width` bytes). Call `before(current)` before the walk reads the entry
    at `current`: when that entry is not fetched yet, one batch brings its page together with the pages of
    every entry the walk will need and whose address is already known: the links of every entry found so
    far, in whole pages fetched before. `shape(raw)` says whether the `size` bytes at an address look like
    an entry (e.g. KLDR_DATA_TABLE_ENTRY: a kernel DllBase, a plausible SizeOfImage and name): each fetched
    page is scanned for such entries, so a page holding entries from all over the list (Windows allocates
    them from shared pool pages) leads to all of their neighbours at once. Pages after the current entry's
    come in the same batch while the walk goes from page to neighbouring page (packed boot-time entries).
    Advisory only: whatever it finds odd (a loop, a broken link, an entry not in the dump, a record that
    only looks like an entry) ends or wastes its own work, never the walk's."""

    def __init__(self, batch: Batch, head: int, size: int, width: int, pointer_ok: Callable[[int], bool],
                 shape: Callable[[bytes], bool] | None = None,
                 along: Callable[[int, bytes], list[tuple[int, int]]] | None = None):
        self._batch, self._head, self._size, self._width, self._ok = batch, head, size, width, pointer_ok
        self._shape = shape
        # `along(address, raw)`: what else to fetch once an entry is known (the bytes from the entry to the end
        # of its page): the names and image header of the module the caller is looking for
        self._along = along
        self._extra: list[tuple[int, int]] = []
        self._links: dict[int, tuple[int, int]] = {}  # entry -> (Flink, Blink), read or found in a fetched page
        self._pages: set[int] = set()  # pages fetched (or asked for) ahead of the walk
        self._previous: int | None = None
        self._streak = 0  # steps in a row to a neighbouring page

    def start(self, tail: int) -> None:
        """The head's Blink: the last entry, whose page comes in the first batch."""
        if tail != self._head and self._ok(tail):
            self._links[self._head] = (self._head, tail)

    def before(self, current: int) -> None:
        previous, self._previous = self._previous, current
        step = (current - previous) // PAGE if previous is not None else -1
        self._streak = self._streak + 1 if 0 <= step <= NEAR_PAGES else 0
        if all(page in self._pages for page in _pages_of(current, self._size)):
            return
        wanted = list(_pages_of(current, self._size))
        for target in self._frontier():
            wanted += _pages_of(target, self._size)
        wanted += self._neighbours(current, first=previous is None)
        pages = [page for page in dict.fromkeys(wanted) if page not in self._pages][:MAX_BATCH_PAGES]
        extra, self._extra = self._extra, []
        self._batch.fetch([(page, PAGE) for page in pages], background=extra)  # (wanted after the walk)
        self._pages.update(pages)
        for page in pages:
            self._scan(page)
        if current not in self._links:  # the entry the walk reads next is one whatever its shape
            raw = self._batch.peek(current, max(self._size, PAGE - current % PAGE))
            if raw is not None:
                self._found(current, raw)

    def _frontier(self) -> list[int]:
        """Entries linked from known ones whose pages are not fetched yet, nearest first."""
        out = []
        for flink, blink in list(self._links.values()):
            for target in (flink, blink):
                if target != self._head and target not in self._links and self._ok(target) \
                        and not all(page in self._pages for page in _pages_of(target, self._size)):
                    out.append(target)
        return list(dict.fromkeys(out))

    def _scan(self, page: int) -> None:
        """Records the entries a fetched page holds (entries crossing into a page not fetched are skipped)."""
        if self._shape is None:
            return
        data = self._batch.peek(page, PAGE)
        if data is None:
            return
        align = 2 * self._width
        for offset in range(0, PAGE - self._size + 1, align):
            if page + offset in self._links or not self._shape(data[offset:offset + self._size]):
                continue
            flink, blink = self._split(data[offset:offset + align])
            if self._ok(flink) and self._ok(blink):
                self._found(page + offset, data[offset:])

    def _found(self, address: int, raw: bytes) -> None:
        self._links[address] = self._split(raw)
        if self._along is not None:
            self._extra += self._along(address, raw)

    def _split(self, raw: bytes) -> tuple[int, int]:
        w = self._width
        return int.from_bytes(raw[:w], "little"), int.from_bytes(raw[w:2 * w], "little")

    def _neighbours(self, current: int, first: bool = False) -> range:
        """The pages after `current`'s, in the same page table (translated from cached tables), while the
        walk keeps going to neighbouring pages: a window that doubles, up to MAX_WINDOW pages (a request
        each); LARGE_WINDOW pages when they are on the same large page (one request), from the `first` entry
        on (a list starts with the boot-loaded entries, packed in load order)."""
        large = (self._streak or first) and self._batch.in_large_page(current)
        if not self._streak and not large:
            return range(0)
        page = (current + self._size - 1) & ~(PAGE - 1)
        window = LARGE_WINDOW if large else min(2 << self._streak, MAX_WINDOW)
        return range(page + PAGE, min(page + (window + 1) * PAGE, (page | (REGION - 1)) + 1), PAGE)


class VirtualBatch:
    """`Batch` over a dump's page tables (`space`, scripts.dumpfile.paging) and physical memory (`physical`,
    scripts.dumpfile.physical): translations of all the ranges' pages level by level, then their bytes, each
    step one `read_many` of the source."""

    def __init__(self, space, physical):
        self.space, self.physical = space, physical

    def fetch(self, ranges: list[tuple[int, int]], background: list[tuple[int, int]] | None = None) -> None:
        """`Batch.fetch`; `background`: ranges translated together with them (their table levels in the same
        batches) whose bytes are only started (the source's `prefetch`), not waited for: what the reader
        needs soon, but not next. The bytes of each range go out as soon as its pages are translated."""
        wanted = list(_pieces(ranges))
        later = list(_pieces(background or []))
        left, left_later = dict(enumerate(wanted)), dict(enumerate(later))

        def translated(tables: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
            self.physical.prefetch(self._translated(left_later))
            if tables is not None and self.physical.cached(tables):
                return []  # the tables are here: no wait to share, the bytes wait for the ones they reach
            return self._translated(left)

        self.space.prepare([address for address, _ in wanted + later], self.physical.fetch, self.physical.peek,
                           translated)
        spans = translated()
        if spans:
            self.physical.fetch(spans)

    def _translated(self, pieces: dict[int, tuple[int, int]]) -> list[tuple[int, int]]:
        """The physical spans of the pieces whose pages are translated, taken out of `pieces`."""
        spans = []
        for index, (address, size) in list(pieces.items()):
            physical = self.space.translated(address)
            if physical is not None:
                spans.append((physical, size))
                del pieces[index]
        return spans

    def in_large_page(self, address: int) -> bool:
        """Whether `address` is on a large page, as far as the tables already fetched say (no read)."""
        def cached(address: int, size: int) -> bytes | None:
            return self.physical.peek(address, size) if self.physical.cached([(address, size)]) else None

        self.space.prepare([address], lambda ranges: None, cached, upper=False)
        return self.space.in_large_page(address)

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
