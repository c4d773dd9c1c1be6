"""`open_dump`: one object over a dump file that knows its header, its memory and its modules.

It ties the structures together in the order a reader must trust them: the header first (signature,
type, encryption, size against the file), then the layout that says where memory is (run list, bitmap
or small-dump table of contents), then the page tables, then the module list. Each step refuses a
broken file with BadDump before the next one follows an offset out of it.

What a dump cannot answer (a page a kernel dump left out, page tables of an architecture not handled
here) is not an error: `memory_unavailable` says why, and lookups return their reason.

A dump cut short or damaged after a whole header still has its stop code: `open_dump(..., allow_partial=True)`
opens it anyway and `Dump.partial` says what is wrong (BadDump's message). Everything past the damage reads
as "not in the dump" (NotInDump) instead of failing, so the verdict is made from what is there. Damage found
only while reading (a page past the end of the file, a bitmap whose count disagrees) sets `partial` too:
read it after the lookups. Without allow_partial every such defect is BadDump, as before.

x86 dumps (DUMP_HEADER32) with a run list or a bitmap (BITMAP_DUMP32 at 0x1000, physical.py) are read
like x64 ones, through two-level or PAE page tables (the header's PaeEnabled decides); x86 small dumps
through their TRIAGE_DUMP32 and DUMP_DRIVER_ENTRY32 list (smalldump.py, modules.py).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

from scripts.dumpfile.errors import BadDump, NotInDump
from scripts.dumpfile.header import (
    BITMAP_TYPES, HEADER_SIZE_32, HEADER_SIZE_64, PROBE_SIZE, DumpHeader, DumpType,
)
from scripts.dumpfile.modules import LoadedModule, describe_entry, find_module, placeholder, read_driver_list
from scripts.dumpfile.modulewalk import ListWalk, walk_loaded_modules
from scripts.dumpfile.paging import AddressSpace, AddressSpace32, AddressSpacePae
from scripts.dumpfile.physical import BitmapMemory, PhysicalMemory, RunListMemory
from scripts.dumpfile.readahead import VirtualBatch
from scripts.dumpfile.smalldump import TriageHeader, TriageHeader32, TriageMemory

RECORD_BYTES = 0x4D0  # CONTEXT (x64), the largest record a bug check parameter points at
# the stack above a record: a record on the crashing thread's stack was pushed below the frames the
# unwinding then reads (stackwalk.py scans up to SCAN_BYTES above a frame's Rsp), so they come along
STACK_AHEAD = 0x2000

ENCRYPTED_HINT = (
    "decrypt it first on a machine that holds the private key of the dump-encryption certificate "
    "(CrashControl\\EncryptionCertificates), or turn dump encryption off on the disk copy and capture a new dump"
)


@dataclass(frozen=True)
class ModuleLookup:
    """The answer to "which module contains this address", with how it was reached."""

    address: int
    module: LoadedModule | None
    modules_seen: int
    list_complete: bool
    problem: str | None = None  # why the answer may be missing or partial

    @property
    def status(self) -> str:
        if self.module is not None:
            return "found"
        return "not-in-any-module" if self.list_complete else "unavailable"


class Dump:
    """An opened, validated dump. Use `open_dump()`; close it (or use `with`) when done."""

    def __init__(self, source: Any, header: DumpHeader, owned: bool, partial: str | None = None,
                 allow_partial: bool = False):
        self.source = source
        self.header = header
        self._owned = owned
        self.partial = partial  # why the dump is incomplete (truncated or damaged past its header), if it is
        self._tolerant = allow_partial or partial is not None
        self.physical: PhysicalMemory | None = None
        self.space: AddressSpace | None = None
        self.triage: TriageHeader | None = None
        self._triage_memory: TriageMemory | None = None
        self.memory_unavailable: str | None = None
        self._walk: ListWalk | None = None
        self._driver_list: list[LoadedModule] | None = None
        self._driver_problem: str | None = None
        self.batch: VirtualBatch | None = None  # fetches ahead of the readers (readahead.py), when the source can
        try:
            self._setup()
        except BadDump as err:
            if not self._tolerant:
                raise
            self.memory_unavailable = self._damaged(err)
        if self.space is not None and self.physical is not None and hasattr(source, "read_many"):
            self.batch = VirtualBatch(self.space, self.physical)
            if hasattr(source, "fetching_ahead"):  # the batches know where the walks go: no blind read-ahead
                source.fetching_ahead()

    def _damaged(self, err: BadDump) -> str:
        """Records damage found in a dump opened as partial; returns the reason to give for what it hides."""
        if self.partial is None:
            self.partial = err.message
        return f"the dump is incomplete: {err.message}"

    # -- layout -----------------------------------------------------------------------------------

    def _setup(self) -> None:
        h = self.header
        t = h.dump_type
        if t == DumpType.FULL:
            assert h.physical_runs is not None
            self.physical = RunListMemory(self.source, h.physical_runs, h.header_size)
        elif t in BITMAP_TYPES:
            if h.bitmap is None:  # cut before it, or (partial) unreadable: the reason is the open's
                raise BadDump(self.partial or f"truncated: the file ends before the bitmap header at {h.header_size:#x}")
            self.physical = BitmapMemory(self.source, h.bitmap)
        elif t == DumpType.TRIAGE:
            self._setup_triage()
            return
        else:
            bits = " 32-bit" if h.bits == 32 else ""
            self.memory_unavailable = f"reading memory from a{bits} {h.kind} (dump type {t}) is not supported"
            return
        if h.machine == "x64":
            self.space = AddressSpace(h.directory_table_base, self.physical.read_u64)
        elif h.machine == "x86" and h.pae_enabled is not None:
            self.space = (AddressSpacePae(h.directory_table_base, self.physical.read_u64) if h.pae_enabled
                          else AddressSpace32(h.directory_table_base, self.physical.read_u32))
        elif h.machine == "x86":
            self.memory_unavailable = "the header's PaeEnabled is neither 0 nor 1: which x86 page tables apply is unknown"
        else:
            self.memory_unavailable = f"{h.machine} page tables are not supported (x64 and x86 only)"

    def _setup_triage(self) -> None:
        h = self.header
        if h.triage is None:
            contents = TriageHeader if h.bits == 64 else TriageHeader32
            raise BadDump(f"truncated: the file ends before the small dump's {contents.NAME} at {contents.OFFSET:#x}")
        try:
            h.triage.check(self.source.size)
        except BadDump as err:
            # a truncated small dump whose table of contents is sound for the size it claims: read what is there
            if not self._tolerant or self.source.size >= h.triage.size_of_dump:
                raise
            try:
                h.triage.check(h.triage.size_of_dump)
            except BadDump:
                raise err from None
            self._damaged(err)
        self.triage = h.triage  # only a table of contents that passed its checks is followed
        self._triage_memory = TriageMemory(self.source, self.triage)
        try:
            self._triage_memory.verify_marker(self.triage)
        except BadDump as err:
            if not self._tolerant:
                raise
            self._damaged(err)

    # -- memory -----------------------------------------------------------------------------------

    def translate(self, address: int) -> int:
        """Physical address of a virtual one (full and bitmap x64 dumps)."""
        if self.space is None:
            raise NotInDump(address, self.memory_unavailable or "this dump has no page tables")
        return self.space.translate(address)

    def read_virtual(self, address: int, size: int) -> bytes:
        """Bytes at a kernel virtual address; NotInDump if any of them is not in the dump (in a partial dump,
        also if they are past its damage)."""
        try:
            if self._triage_memory is not None:
                return self._triage_memory.read(address, size)
            if self.space is None or self.physical is None:
                raise NotInDump(address, self.memory_unavailable or "this dump has no virtual memory")
            out = bytearray()
            while len(out) < size:
                chunk = min(size - len(out), 0x1000 - (address + len(out)) % 0x1000)
                physical = self.space.translate(address + len(out))
                out += self.physical.read(physical, chunk)
            return bytes(out)
        except BadDump as err:
            if not self._tolerant:
                raise
            raise NotInDump(address, self._damaged(err)) from None

    def read_physical(self, address: int, size: int) -> bytes:
        if self.physical is None:
            raise NotInDump(address, self.memory_unavailable or "this dump has no physical memory")
        try:
            return self.physical.read(address, size)
        except BadDump as err:
            if not self._tolerant:
                raise
            raise NotInDump(address, self._damaged(err)) from None

    # -- modules ----------------------------------------------------------------------------------

    def module_at(self, address: int) -> ModuleLookup:
        """The loaded module containing `address`; reads only the list's bases and sizes, and the
        names and timestamp of the module found."""
        if self.triage is not None:
            modules, problem = self._drivers()
            return ModuleLookup(address, find_module(modules, address), len(modules), problem is None, problem)
        if self.space is None:
            return ModuleLookup(address, None, 0, False, self.memory_unavailable)
        walk = self._module_walk(address)
        for entry, base, size in walk.entries:
            if base <= address < base + size:
                module = self._describe(entry, base, size)
                return ModuleLookup(address, module, walk.count, walk.complete, module.note or walk.problem)
        return ModuleLookup(address, None, walk.count, walk.complete, walk.problem)

    def loaded_modules(self) -> list[LoadedModule]:
        """Every module with its name (reads every entry's strings: more bytes than `module_at`)."""
        if self.triage is not None:
            return list(self._drivers()[0])
        if self.space is None:
            return []
        return [self._describe(entry, base, size) for entry, base, size in self._module_walk().entries]

    @property
    def module_list_problem(self) -> str | None:
        if self.triage is not None:
            return self._drivers()[1]
        if self.space is None:
            return self.memory_unavailable
        return self._module_walk().problem

    def _describe(self, entry: int, base: int, size: int) -> LoadedModule:
        h = self.header
        try:
            return describe_entry(self.read_virtual, entry, base, size, h.minor_version, self.space.bits,
                                  h.system_time, self.batch)
        except NotInDump as err:
            return LoadedModule(name=placeholder(base), base=base, size=size, entry_address=entry,
                                note=f"the module's entry is not in the dump: {err.reason}")

    def _module_walk(self, wanted: int | None = None) -> ListWalk:
        """The list's walk (once); `wanted`, an address whose module the caller will describe, lets the
        read-ahead bring that module's names and header along with the list."""
        if self._walk is None:
            assert self.space is not None
            if self.batch is not None:  # the bug check's records: translated with the head, fetched behind it
                self.batch.fetch([(self.header.ps_loaded_module_list, 16)], background=self._records())
            self._walk = walk_loaded_modules(self.read_virtual, self.header.ps_loaded_module_list, self.space.bits,
                                             self.batch, wanted)
        return self._walk

    def _records(self) -> list[tuple[int, int]]:
        """The bug check parameters that are kernel addresses, as ranges of a CONTEXT's size and the stack
        above it: the exception record, CONTEXT or trap frame a triage reads right after the module list
        (scripts.dumpfile.context), and where the unwinding from it goes."""
        low = 0xFFFF_8000_0000_0000 if self.space.bits == 64 else 0x8000_0000
        return [(p, RECORD_BYTES + STACK_AHEAD) for p in self.header.bugcheck_parameters if low <= p < 1 << self.space.bits]

    def _drivers(self) -> tuple[list[LoadedModule], str | None]:
        """The small dump's driver list, and why it is missing (a partial dump cut before it)."""
        if self._driver_list is None:
            assert self.triage is not None
            try:
                self._driver_list = read_driver_list(self.source, self.triage.driver_list_offset,
                                                     self.triage.driver_count, self.header.system_time,
                                                     self.triage.DRIVER_ENTRY)
            except BadDump as err:
                if not self._tolerant:
                    raise
                self._driver_problem = self._damaged(err)
                self._driver_list = []
        return self._driver_list, self._driver_problem

    # -- bookkeeping ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def size(self) -> int:
        return self.source.size

    @property
    def bytes_read(self) -> int:
        return getattr(self.source, "bytes_read", 0)

    @property
    def requests(self) -> int:
        return getattr(self.source, "requests", 0)

    def close(self) -> None:
        if self._owned:
            self.source.close()

    def __enter__(self) -> "Dump":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_dump(source: Any, credential: Any = None, *, allow_partial: bool = False) -> Dump:
    """Opens a dump from a path, a blob URL, a `scripts.base.rangereader.RangeReader`, or any seekable binary file
    object; validates it (BadDump if it is not a usable kernel dump, including encrypted ones). With
    `allow_partial`, a dump whose header is whole but which is truncated or damaged after it is opened
    anyway, with `Dump.partial` saying what is wrong."""
    from scripts.base.rangeio import open_source

    owned = False
    if hasattr(source, "read_at") and hasattr(source, "size"):
        reader = source
    elif isinstance(source, (str, os.PathLike)):
        reader = open_source(source, credential)
        owned = True
    elif hasattr(source, "read") and hasattr(source, "seek"):
        reader = _FileObject(source)
    else:
        raise TypeError(f"cannot read a dump from {type(source).__name__}")
    try:
        probe = reader.read_at(0, PROBE_SIZE)
        partial = None
        try:
            header = DumpHeader.parse(probe)
        except BadDump as err:
            if not allow_partial:
                raise
            header, partial = _header_alone(probe, err), err.message
        if header.encrypted:
            raise BadDump("the dump is encrypted (DUMP_FILE_ATTRIBUTES.EncryptedDumpData is set): its memory "
                          "cannot be read without the key", ENCRYPTED_HINT)
        try:
            header.check_size(reader.size)
        except BadDump as err:
            if not allow_partial or reader.size < header.header_size:
                raise
            partial = partial or err.message
        return Dump(reader, header, owned, partial, allow_partial)
    except BaseException:
        if owned:
            reader.close()
        raise


def _header_alone(probe: bytes, err: BadDump) -> DumpHeader:
    """The dump header parsed without what follows it (the bitmap or small-dump header that `err` is about);
    `err` itself when the header proper is what is broken."""
    size = HEADER_SIZE_64 if probe[4:8] == b"DU64" else HEADER_SIZE_32
    if len(probe) <= size:
        raise err
    try:
        return DumpHeader.parse(probe[:size])
    except BadDump:
        raise err from None


class _FileObject:
    """`read_at`/`size` over an ordinary seekable file object, counting what it reads."""

    def __init__(self, handle: Any):
        self._handle = handle
        self.name = str(getattr(handle, "name", "<file object>"))
        self.size = handle.seek(0, io.SEEK_END)
        self.bytes_read = 0
        self.requests = 0

    def read_at(self, offset: int, size: int) -> bytes:
        self._handle.seek(offset)
        data = self._handle.read(size)
        self.bytes_read += len(data)
        self.requests += 1
        return data

    def close(self) -> None:
        pass
