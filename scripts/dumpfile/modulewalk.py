"""Walking PsLoadedModuleList (the x64 and x86 KLDR_DATA_TABLE_ENTRY lists of full and bitmap dumps; the
structures and what is read of them are modules.py's).

The walk follows InLoadOrderLinks one entry at a time, each address found in the entry before. With a
`batch` (readahead.py's `ListAhead`) the pages of the entries are fetched ahead of it: the pages every
known entry's links point to, together, and the pages each fetched page shows to hold more entries
(`_ListLayout.looks_like_entry`); with `wanted` (the address whose module the caller will name), that
module's names and image header come along as soon as its entry is seen. What the walk reads, and its
answer, are the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scripts.dumpfile.errors import NotInDump
from scripts.dumpfile.modules import LAYOUTS, MAX_MODULES, ReadVirtual, describe_ranges
from scripts.dumpfile.readahead import Batch, ListAhead


@dataclass
class ListWalk:
    """The outcome of walking PsLoadedModuleList: how far it got and why it stopped early, if it did."""

    count: int = 0
    complete: bool = False
    problem: str | None = None
    entries: list[tuple[int, int, int]] = field(default_factory=list)  # (entry address, DllBase, SizeOfImage)


def walk_loaded_modules(read: ReadVirtual, head: int, bits: int = 64, batch: Batch | None = None,
                        wanted: int | None = None) -> ListWalk:
    """Follows InLoadOrderLinks from `head`, recording each entry's base and size. Stops at the head, a
    loop, an unreadable entry or MAX_MODULES entries, and says which. With a `batch` (readahead.py) the
    entries are fetched ahead of the walk, page by page along the links of every entry found so far, and
    the names and image header of the module holding `wanted` (an address) and of the kernel (the first
    entry) as soon as their entries are seen; what is read is the same."""
    layout = LAYOUTS[bits]
    walk = ListWalk()
    seen = {head}
    width = bits // 8
    try:
        current = int.from_bytes(read(head, width), "little")
    except NotInDump as err:
        walk.problem = f"PsLoadedModuleList ({head:#x}) is not readable: {err.reason}"
        return walk
    along = None
    if wanted is not None:
        first = current  # the kernel's entry: its frames are in nearly every stack a triage names

        def along(entry: int, raw: bytes) -> list[tuple[int, int]]:
            if len(raw) < len(layout.head):
                return []
            fields = layout.head(raw[:len(layout.head)])
            base = int(fields.DllBase)
            if entry != first and not base <= wanted < base + int(fields.SizeOfImage):
                return []
            return describe_ranges(batch, layout, entry, base, raw)
    ahead = (ListAhead(batch, head, len(layout.head), width, layout.pointer_ok, layout.looks_like_entry, along)
             if batch is not None else None)
    if ahead is not None:
        ahead.start(int.from_bytes(batch.peek(head + width, width) or bytes(width), "little"))
    while current != head:
        if current in seen:
            walk.problem = f"the module list loops back to {current:#x} without returning to its head"
            return walk
        if not layout.pointer_ok(current):
            walk.problem = f"the module list has a broken link ({current:#x}) after {walk.count} entries"
            return walk
        if walk.count >= MAX_MODULES:
            walk.problem = f"the module list has more than {MAX_MODULES} entries; stopped"
            return walk
        seen.add(current)
        if ahead is not None:
            ahead.before(current)
        try:
            entry = layout.head(read(current, len(layout.head)))
        except NotInDump as err:
            walk.problem = f"module list entry {walk.count} ({current:#x}) is not in the dump: {err.reason}"
            return walk
        walk.entries.append((current, int(entry.DllBase), int(entry.SizeOfImage)))
        walk.count += 1
        current = int(entry.InLoadOrderLinks.Flink)
    walk.complete = True
    return walk
