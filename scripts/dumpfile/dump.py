"""`open_dump`: one object over a dump file that knows its header, its memory and its modules.

It ties the structures together in the order a reader must trust them: the header first (signature,
type, encryption, size against the file), then the layout that says where memory is (run list, bitmap
or small-dump table of contents), then the page tables, then the module list. Each step refuses a
broken file with BadDump before the next one follows an offset out of it.

What a dump cannot answer (a page a kernel dump left out, page tables of an architecture not handled
here) is not an error: `memory_unavailable` says why, and lookups return their reason.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

from scripts.dumpfile.errors import BadDump, NotInDump
from scripts.dumpfile.header import BITMAP_TYPES, HEADER_SIZE_32, PROBE_SIZE, TRIAGE32_HEAD, DumpHeader, DumpType
from scripts.dumpfile.modules import (
    LoadedModule, ListWalk, describe_entry, find_module, read_driver_list, walk_loaded_modules,
)
from scripts.dumpfile.paging import AddressSpace
from scripts.dumpfile.physical import BitmapMemory, PhysicalMemory, RunListMemory
from scripts.dumpfile.smalldump import TRIAGE_VALID, TriageHeader, TriageMemory

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

    def __init__(self, source: Any, header: DumpHeader, owned: bool):
        self.source = source
        self.header = header
        self._owned = owned
        self.physical: PhysicalMemory | None = None
        self.space: AddressSpace | None = None
        self.triage: TriageHeader | None = None
        self._triage_memory: TriageMemory | None = None
        self.memory_unavailable: str | None = None
        self._walk: ListWalk | None = None
        self._driver_list: list[LoadedModule] | None = None
        self._setup()

    # -- layout -----------------------------------------------------------------------------------

    def _setup(self) -> None:
        h = self.header
        t = h.dump_type
        if t == DumpType.FULL:
            assert h.physical_runs is not None
            self.physical = RunListMemory(self.source, h.physical_runs, h.header_size)
        elif t in BITMAP_TYPES and h.bits == 64:
            if h.bitmap is None:
                raise BadDump("truncated: the file ends before the bitmap header at 0x2000")
            self.physical = BitmapMemory(self.source, h.bitmap)
        elif t == DumpType.TRIAGE:
            self._setup_triage()
            return
        else:
            bits = " 32-bit" if h.bits == 32 else ""
            self.memory_unavailable = f"reading memory from a{bits} {h.kind} (dump type {t}) is not supported"
            return
        if h.machine != "x64":
            self.memory_unavailable = f"{h.machine} page tables are not supported (x64 only)"
            return
        self.space = AddressSpace(h.directory_table_base, self.physical.read_u64)

    def _setup_triage(self) -> None:
        h = self.header
        if h.bits == 32:
            # TRIAGE_DUMP32 at 0x1000: ServicePackBuild, SizeOfDump, ValidOffset
            raw = self.source.read_at(HEADER_SIZE_32, TRIAGE32_HEAD)
            if len(raw) == TRIAGE32_HEAD:
                valid = int.from_bytes(raw[8:12], "little")
                if self.source.read_at(valid, 4) != TRIAGE_VALID:
                    raise BadDump(f"corrupt or incomplete small dump: no 'TRGD' end marker at {valid:#x}")
            self.memory_unavailable = "32-bit small dumps: the driver list is not read (x64 only)"
            return
        if h.triage is None:
            raise BadDump("truncated: the file ends before the small dump's TRIAGE_DUMP64 at 0x2000")
        self.triage = h.triage
        self.triage.check(self.source.size)
        self._triage_memory = TriageMemory(self.source, self.triage)
        self._triage_memory.verify_marker(self.triage)

    # -- memory -----------------------------------------------------------------------------------

    def translate(self, address: int) -> int:
        """Physical address of a virtual one (full and bitmap x64 dumps)."""
        if self.space is None:
            raise NotInDump(address, self.memory_unavailable or "this dump has no page tables")
        return self.space.translate(address)

    def read_virtual(self, address: int, size: int) -> bytes:
        """Bytes at a kernel virtual address; NotInDump if any of them is not in the dump."""
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

    def read_physical(self, address: int, size: int) -> bytes:
        if self.physical is None:
            raise NotInDump(address, self.memory_unavailable or "this dump has no physical memory")
        return self.physical.read(address, size)

    # -- modules ----------------------------------------------------------------------------------

    def module_at(self, address: int) -> ModuleLookup:
        """The loaded module containing `address`; reads only the list's bases and sizes, and the
        names and timestamp of the module found."""
        if self.triage is not None:
            modules = self._drivers()
            return ModuleLookup(address, find_module(modules, address), len(modules), True)
        if self.space is None:
            return ModuleLookup(address, None, 0, False, self.memory_unavailable)
        walk = self._module_walk()
        for entry, base, size in walk.entries:
            if base <= address < base + size:
                try:
                    module = describe_entry(self.read_virtual, entry, base, size, self.header.minor_version)
                except NotInDump as err:
                    module = LoadedModule(name=f"<unnamed module at {base:#x}>", base=base, size=size,
                                          entry_address=entry)
                    return ModuleLookup(address, module, walk.count, walk.complete,
                                        f"the module's name is not in the dump: {err.reason}")
                return ModuleLookup(address, module, walk.count, walk.complete, walk.problem)
        return ModuleLookup(address, None, walk.count, walk.complete, walk.problem)

    def loaded_modules(self) -> list[LoadedModule]:
        """Every module with its name (reads every entry's strings: more bytes than `module_at`)."""
        if self.triage is not None:
            return list(self._drivers())
        if self.space is None:
            return []
        out = []
        for entry, base, size in self._module_walk().entries:
            try:
                out.append(describe_entry(self.read_virtual, entry, base, size, self.header.minor_version))
            except NotInDump:
                out.append(LoadedModule(name=f"<unnamed module at {base:#x}>", base=base, size=size, entry_address=entry))
        return out

    @property
    def module_list_problem(self) -> str | None:
        if self.triage is not None:
            return None
        if self.space is None:
            return self.memory_unavailable
        return self._module_walk().problem

    def _module_walk(self) -> ListWalk:
        if self._walk is None:
            self._walk = walk_loaded_modules(self.read_virtual, self.header.ps_loaded_module_list)
        return self._walk

    def _drivers(self) -> list[LoadedModule]:
        if self._driver_list is None:
            assert self.triage is not None
            self._driver_list = read_driver_list(self.source, self.triage.driver_list_offset, self.triage.driver_count)
        return self._driver_list

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


def open_dump(source: Any, credential: Any = None) -> Dump:
    """Opens a dump from a path, a blob URL, a `scripts.base.rangereader.RangeReader`, or any seekable binary file
    object; validates it (BadDump if it is not a usable kernel dump, including encrypted ones)."""
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
        header = DumpHeader.parse(reader.read_at(0, PROBE_SIZE))
        if header.encrypted:
            raise BadDump("the dump is encrypted (DUMP_FILE_ATTRIBUTES.EncryptedDumpData is set): its memory "
                          "cannot be read without the key", ENCRYPTED_HINT)
        header.check_size(reader.size)
        return Dump(reader, header, owned)
    except BaseException:
        if owned:
            reader.close()
        raise


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
