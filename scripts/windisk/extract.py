"""Reading a Windows OS disk without mounting it: partition table -> NTFS -> SYSTEM hive -> dump files.

The snapshot-export strategy (scripts.collection.snapshot_export) never attaches the broken disk to a VM:
it reads the snapshot's export URL with HTTP range requests. This module is the part that understands
what it reads, over any seekable binary file object (a `scripts.base.rangeio` reader over the URL, or a
local image), one on-disk structure per module:

1. the disk and its Windows volume (scripts.windisk.disk): a fixed VHD's footer, MBR or GPT, the NTFS
   partition holding Windows\\System32\\config\\SYSTEM, BitLocker named as such;
2. the SYSTEM hive (scripts.windisk.hive): CrashControl of the current control set;
3. the dumps (here): the configured DumpFile, every *.dmp in MinidumpDir, and a dump still sitting at the
   start of pagefile.sys or the DedicatedDumpFile (Windows writes the crash there first and only turns it
   into MEMORY.DMP on the next successful boot, which a VM stuck on a blue screen never has). Their
   Windows paths become paths on the volume by the one rule, scripts.remote.winpaths;
4. for each dump, where its bytes are on the disk (scripts.windisk.ntfs): its NTFS data runs as extents
   of disk byte offsets, sparse runs and everything past the valid data length marked as zeros. That map
   is what the server-side copy consumes; the dump's bytes themselves are never read here (only its header).
   A BitLocker volume (Azure Disk Encryption) is read through its decrypting view when its key is given
   (`bek`, scripts.windisk.bitlocker): the extents then name plaintext the disk does not hold, so the export
   reads each dump through `volume.reader` and uploads it (see scripts.collection.server_copy).

Nothing here writes anything, talks to Azure or imports the storage SDK. Read costs are whatever the
given file object fetches; with a rangeio reader that is a few MiB for a disk of any size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from scripts.remote.winpaths import DEFAULT_DUMP_FILE, DEFAULT_MINIDUMP_DIR, PAGEFILE, volume_path
from scripts.windisk.disk import Volume, disk_size, find_windows_volume
from scripts.windisk.errors import ExtractError
from scripts.windisk.hive import CrashSettings, read_crash_control
from scripts.windisk.ntfs import FileMap, NotExportable, list_dir, map_file

log = logging.getLogger("crashcart.extract")


@dataclass
class FoundDump:
    kind: str  # memory | minidump | pagefile | dedicated
    windows_path: str  # as Windows names it, e.g. %SystemRoot%\MEMORY.DMP
    blob_suffix: str  # under the run prefix: MEMORY.DMP, Minidump/<name>.dmp, PAGEFILE.DMP, DEDICATED.DMP
    file: FileMap
    header: Any  # scripts.dumpfile.header.DumpHeader

    def header_dict(self) -> dict[str, Any]:
        """The header as the rescue VM's script records it in a manifest (same keys)."""
        h = self.header
        return {"signature": "PAGEDU64" if h.bits == 64 else "PAGEDUMP", "dump_type": h.dump_type,
                "bugcheck_code": f"{h.bugcheck_code:#x}",
                "bugcheck_parameters": [f"{p:#x}" for p in h.bugcheck_parameters],
                "required_dump_space": h.required_dump_space, "kind": h.kind}


@dataclass
class DiskFindings:
    disk_size: int
    vhd_footer: bool
    scheme: str
    partitions: list[dict[str, Any]]
    volume: Volume
    crash_control: dict[str, Any]
    dumps: list[FoundDump]
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # dumps found but not exportable (compressed, EFS)
    looked_at: list[str] = field(default_factory=list)


class _DumpSearch:
    """One search of a volume for dumps: what was found, and the notes an operator reads about the rest."""

    def __init__(self, disk: Any, volume: Volume) -> None:
        self.disk = disk
        self.volume = volume
        self.dumps: list[FoundDump] = []
        self.notes: list[str] = []
        self.skipped: list[str] = []

    def header_of(self, fmap: FileMap) -> Any | None:
        """The kernel dump header at the start of the file, or None when it holds none."""
        from scripts.dumpfile.errors import BadDump
        from scripts.dumpfile.header import PROBE_SIZE, DumpHeader

        probe = fmap.read(self.disk, 0, min(PROBE_SIZE, fmap.size))
        try:
            return DumpHeader.parse(probe)
        except BadDump:
            return None

    def fetch_headers(self, maps: list[FileMap]) -> None:
        """The first bytes of every file, from a range reader in one batch (`header_of` then reads them cached)."""
        from scripts.dumpfile.header import PROBE_SIZE

        many = getattr(self.disk, "read_many", None)
        if many is not None and maps:
            many([part for fmap in maps for part in fmap.spans(0, PROBE_SIZE) if isinstance(part, tuple)])

    def mapped(self, windows_path: str, rel: str, *, primary: bool = False) -> FileMap | None:
        """The file's map, or None (absent, or not exportable: then said so in the notes). A damaged file
        record ends the search for the configured dump (ExtractError); for the others it is a note."""
        try:
            return map_file(self.volume, rel)
        except NotExportable as err:
            self.skipped.append(f"{windows_path}: {err}")
            self.notes.append(f"{windows_path} was found but cannot be copied server-side: {err.explanation}")
            return None
        except ExtractError as err:
            if primary:
                raise
            self.notes.append(f"{windows_path} is not collected: {err.message}")
            return None

    def whole(self, header: Any, size: int, windows_path: str) -> bool:
        """False (and a note saying why) when the file is shorter than its own header says it must be: a
        truncated dump is refused here by the same rule as triage refuses it (DumpHeader.check_size)."""
        from scripts.dumpfile.errors import BadDump

        try:
            header.check_size(size)
        except BadDump as err:
            self.notes.append(f"{windows_path} is not collected: {err.message} (the dump on the disk is incomplete: "
                              "capture a new one, see prepare-dump)")
            return False
        return True

    def configured(self, dump_file: str) -> None:
        """The dump CrashControl's DumpFile names."""
        rel = volume_path(dump_file)
        if rel is None:
            self.notes.append(f"DumpFile is {dump_file}, which is not on the OS disk: it cannot be collected from "
                              "the snapshot")
            return
        fmap = self.mapped(dump_file, rel, primary=True)
        if fmap is None:
            if not any(s.startswith(dump_file) for s in self.skipped):
                self.notes.append(f"no dump at {dump_file}")
            return
        header = self.header_of(fmap)
        if header is None:
            start = fmap.read(self.disk, 0, 8)
            self.notes.append(f"{dump_file} exists but is not a kernel dump (starts with "
                              f"{start.decode('ascii', 'replace')!r}): skipped")
            return
        if self.whole(header, fmap.size, dump_file):
            self.dumps.append(FoundDump("memory", dump_file, "MEMORY.DMP", fmap, header))

    def minidumps(self, minidump_dir: str) -> None:
        """Every *.dmp in MinidumpDir that is a whole kernel dump."""
        rel = volume_path(minidump_dir)
        if rel is None:
            self.notes.append(f"MinidumpDir is {minidump_dir}, not on the OS disk")
            return
        try:
            names = list_dir(self.volume, rel)
        except ExtractError as err:
            self.notes.append(f"the minidumps in {minidump_dir} are not collected: {err.message}")
            return
        found = []
        for name in names:
            if not name.lower().endswith(".dmp"):
                continue
            windows_path = f"{minidump_dir}\\{name}"
            fmap = self.mapped(windows_path, f"{rel}/{name}" if rel else name)
            if fmap is not None:
                found.append((name, windows_path, fmap))
        self.fetch_headers([fmap for _, _, fmap in found])
        for name, windows_path, fmap in found:
            header = self.header_of(fmap)
            if header is None:
                self.notes.append(f"{windows_path} is not a kernel dump: skipped")
                continue
            if self.whole(header, fmap.size, windows_path):
                self.dumps.append(FoundDump("minidump", windows_path, f"Minidump/{name}", fmap, header))

    def contained(self, kind: str, windows_path: str, suffix: str) -> None:
        """A dump Windows never turned into a dump file: the first RequiredDumpSpace bytes of the page
        file or the dedicated dump file, when they start with a dump header that fits."""
        rel = volume_path(windows_path)
        fmap = self.mapped(windows_path, rel) if rel is not None else None
        if fmap is None:
            return
        header = self.header_of(fmap)
        if header is None:
            log.debug("%s holds no crash dump", windows_path)
            return
        required = int(header.required_dump_space or 0)
        if not 8192 <= required <= fmap.size:
            self.notes.append(f"{windows_path} starts with a dump header but its RequiredDumpSpace ({required}) "
                              f"does not fit the file ({fmap.size} bytes): not collected")
            return
        if not self.whole(header, required, windows_path):
            return
        self.notes.append(f"{windows_path} holds a crash dump Windows never turned into a dump file (the VM did not "
                          f"boot again after the crash): collected as {suffix}")
        self.dumps.append(FoundDump(kind, windows_path, suffix, fmap.truncated(required), header))


def find_dumps(disk: Any, volume: Volume, settings: CrashSettings) -> tuple[list[FoundDump], list[str], list[str], list[str]]:
    """(dumps, notes, skipped, looked_at): every kernel dump on the volume that crashcart collects."""
    dump_file = settings.dump_file or DEFAULT_DUMP_FILE
    minidump_dir = settings.minidump_dir or DEFAULT_MINIDUMP_DIR
    looked_at = [dump_file, minidump_dir, PAGEFILE] + ([settings.dedicated_dump_file] if settings.dedicated_dump_file else [])
    search = _DumpSearch(disk, volume)
    search.configured(dump_file)
    search.minidumps(minidump_dir)
    search.contained("pagefile", PAGEFILE, "PAGEFILE.DMP")
    if settings.dedicated_dump_file:
        search.contained("dedicated", settings.dedicated_dump_file, "DEDICATED.DMP")
    return search.dumps, search.notes, search.skipped, looked_at


def inspect_disk(fh: BinaryIO | Any, bek: bytes | None = None) -> DiskFindings:
    """Everything the export needs to know about a disk: its Windows volume, CrashControl and the dumps
    with their extents. `bek`: the BitLocker key (.BEK file) that unlocks an encrypted Windows volume; the
    dumps' bytes are then read through the volume's decrypting view (`volume.reader`). Raises ExtractError
    (scripts.windisk.errors) for a disk without a readable Windows volume."""
    size, footer = disk_size(fh)
    volume, scheme, partitions, notes = find_windows_volume(fh, size, bek=bek)
    settings, hive_notes = read_crash_control(volume)
    dumps, dump_notes, skipped, looked_at = find_dumps(volume.reader or fh, volume, settings)
    return DiskFindings(disk_size=size, vhd_footer=footer, scheme=scheme, partitions=partitions, volume=volume,
                        crash_control=settings.to_dict(), dumps=dumps, notes=notes + hive_notes + dump_notes,
                        skipped=skipped, looked_at=looked_at)
