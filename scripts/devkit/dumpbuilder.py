"""Writes structurally exact synthetic Windows kernel crash dumps for tests and benchmarks.

A real MEMORY.DMP cannot live in the repository (it is the RAM of a machine, secrets included), so the
tests build their own: a DUMP_HEADER64 with every field at its documented offset, real x64 page tables
(4-level, with 2 MiB and 1 GiB large pages, NX and Windows software bits set the way a live kernel sets
them), a PsLoadedModuleList of KLDR_DATA_TABLE_ENTRY records with UNICODE_STRING names in "pool" pages,
PE headers at each module's DllBase, and a stop 0x7E whose faulting address falls inside a named driver.
The same layout is written three ways, as Windows writes them:

- `build_full_dump`:   DumpType 1, pages follow the 0x2000-byte header in the order of the header's
                       PHYSICAL_MEMORY_DESCRIPTOR run list (holes in physical memory take no space);
- `build_bitmap_dump`: DumpType 5, a bitmap header ('SDMP' kernel/automatic or 'FDMP' complete) at 0x2000
                       with one bit per physical page, pages stored in bit order from FirstPage;
- `build_triage_dump`: DumpType 4, the small dump of \\Windows\\Minidump: a TRIAGE_DUMP64 at 0x2000, a driver
                       list of DUMP_DRIVER_ENTRY64 records naming modules through a DUMP_STRING pool, the
                       faulting thread's stack and the 'TRGD' end marker;
- `build_x86_dump`:    a 32-bit DUMP_HEADER32 ('PAGEDUMP') full or triage dump, header-level only.

The work is split along what is built: dumppages.py (physical memory and page tables), dumpkernel.py
(the crashed machine: modules, module list, stack; `CrashedMachine` documents every builder option),
dumpstack.py (a crashing thread's frames laid out by executing real compiled code from pebuilder.py)
and dumpwriters.py (the file layouts). Nothing here imports crashcart's reader: the offsets are written down
again from the public headers (mindumpdef.h, ntiodump.h) so that a misreading in one is not silently
shared by the other, and the full and bitmap outputs are cross-checked against kdmp-parser in
tests/dumpfile/test_kdmp_agreement.py.

Files are written sparse (only pages with content are written, then the file is extended), so a 4 GiB
dump costs a few hundred KiB of disk.
"""

from __future__ import annotations

from pathlib import Path

from scripts.devkit.dumpkernel import (
    DEFAULT_FAULT_OFFSET, DEFAULT_FAULTING_MODULE, DEFAULT_MODULES, DEFAULT_TIME, MACHINE_AMD64, STACK_BASE,
    CrashedMachine, Module,
)
from scripts.devkit.dumppages import GiB, KiB, MiB, ram_runs
from scripts.devkit.dumpstack import Call, Image
from scripts.devkit.dumpwriters import (
    ATTRIBUTE_ENCRYPTED, DUMP_TYPE_BITMAP_FULL, DUMP_TYPE_FULL, DUMP_TYPE_TRIAGE, MACHINE_I386, BuiltDump,
    write_memory_dump, write_x86_dump,
)


def build_full_dump(path: str | Path, **options) -> BuiltDump:
    """A complete memory dump with a run list (DumpType 1). See `CrashedMachine` for the options."""
    return write_memory_dump(CrashedMachine(**options), Path(path), "full")


def build_bitmap_dump(path: str | Path, *, complete: bool = False, **options) -> BuiltDump:
    """A bitmap dump (DumpType 5): kernel/automatic ('SDMP', only the kernel's pages) by default,
    complete ('FDMP', every page of RAM) with complete=True."""
    return write_memory_dump(CrashedMachine(**options), Path(path), "bitmap-complete" if complete else "bitmap-kernel")


def build_triage_dump(path: str | Path, **options) -> BuiltDump:
    """A small memory dump (DumpType 4) as written to \\Windows\\Minidump."""
    return write_memory_dump(CrashedMachine(**options), Path(path), "triage")


def build_x86_dump(path: str | Path, *, triage: bool = False, **options) -> BuiltDump:
    """A 32-bit ('PAGEDUMP') full or triage dump: the header is exact, the body is filler."""
    return write_x86_dump(CrashedMachine(**options), Path(path), triage)


__all__ = [
    "BuiltDump", "Call", "Image", "Module", "DEFAULT_MODULES", "DEFAULT_FAULTING_MODULE", "DEFAULT_FAULT_OFFSET", "DEFAULT_TIME",
    "build_full_dump", "build_bitmap_dump", "build_triage_dump", "build_x86_dump", "ram_runs",
    "DUMP_TYPE_FULL", "DUMP_TYPE_TRIAGE", "DUMP_TYPE_BITMAP_FULL", "ATTRIBUTE_ENCRYPTED",
    "MACHINE_AMD64", "MACHINE_I386", "STACK_BASE", "KiB", "MiB", "GiB",
]
