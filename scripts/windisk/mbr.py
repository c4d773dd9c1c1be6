"""The MBR partition table (Generation 1 OS disks), with the logical partitions of an extended partition.

A Generation 1 Azure VM boots from an MBR disk: four primary entries in sector 0. A disk that was ever
given more than four partitions (a data or recovery partition added by hand, an image converted from an
on-premises machine) holds the rest as logical partitions inside an extended partition (type 0x05, 0x0F
or Linux's 0x85): a chain of EBRs (extended boot records), each a sector with the MBR's layout whose
first entry is one logical partition (its start relative to that EBR) and whose second entry links the
next EBR (its start relative to the extended partition's first sector). dissect.volume follows that chain
recursively and without a bound, so an EBR that links back to itself (a damaged disk) never ends; this
reader walks it iteratively, remembers every EBR it has read, stops at MAX_LOGICAL, and says in a note why
it stopped. Logical partitions are numbered from 5, as Windows' and Linux's tools number them.

Type 0x42 marks a dynamic disk (LDM, ldm.py): its volumes are in the LDM database, not in this table.
Type 0xEE is the protective MBR of a GPT disk (gpt.py). Everything reads through `read(offset, length)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from dissect.cstruct import cstruct

SECTOR = 512
EXTENDED = (0x05, 0x0F, 0x85)
GPT_PROTECTIVE = 0xEE
LDM_DYNAMIC = 0x42
MAX_LOGICAL = 128  # Windows allows far fewer in practice; a longer chain is a damaged one

Read = Callable[[int, int], bytes]

c_mbr = cstruct().load("""
struct MBR_ENTRY {
    uint8   boot_indicator;     // 0x80: active
    char    start_chs[3];       // ignored: CHS addresses do not reach past 8 GiB; the LBA fields are used
    uint8   type;
    char    end_chs[3];
    uint32  start_lba;          // relative: to the disk (MBR), the EBR (logical) or the extended partition (link)
    uint32  sectors;
};

struct MBR {
    char        boot_code[440];
    uint32      disk_signature;
    uint16      reserved;
    MBR_ENTRY   entries[4];
    uint16      boot_signature;  // 0xAA55
};
""")


class TableError(ValueError):
    """The bytes are not the partition table they should be (the message says which field and why)."""


class Entry(NamedTuple):
    """A partition as the disk reader lists it: number (1-based), byte offset and size on the disk, type name,
    partition name (GPT and LDM have one)."""

    number: int
    offset: int
    size: int
    type: str
    name: str


def type_name(kind: object) -> str:
    """A readable name for an MBR type byte or a GPT type GUID (dissect.volume's table of them)."""
    from dissect.volume.disk.partition import translate_partition_type

    name = translate_partition_type(kind, False)
    return name if name != "Unknown" else translate_partition_type(kind)


def parse(sector: bytes):
    """The MBR (or EBR) in `sector`; TableError when it does not end with the 0x55AA signature."""
    if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa":
        raise TableError("sector 0 does not end with the MBR signature 0x55AA")
    return c_mbr.MBR(sector[:SECTOR])


def read_mbr(read: Read, size: int) -> tuple[list[Entry], list[str], int | None]:
    """(partitions, notes, start LBA of an LDM partition (type 0x42) or None) of an MBR disk. Empty entries and
    the extended container are left out; each logical partition of the extended one is listed."""
    mbr = parse(read(0, SECTOR))
    parts: list[Entry] = []
    notes: list[str] = []
    ldm_start = None
    for index, entry in enumerate(mbr.entries):
        if entry.type == 0 or entry.sectors == 0:
            continue
        if entry.type in EXTENDED:
            logical, logical_notes = _logical(read, size, entry.start_lba, entry.sectors)
            parts += logical
            notes += logical_notes
            continue
        if entry.type == LDM_DYNAMIC and ldm_start is None:
            ldm_start = entry.start_lba
        parts.append(Entry(index + 1, entry.start_lba * SECTOR, entry.sectors * SECTOR, type_name(entry.type), ""))
    return parts, notes, ldm_start


def _logical(read: Read, size: int, ext_lba: int, ext_sectors: int) -> tuple[list[Entry], list[str]]:
    """The logical partitions in the extended partition at `ext_lba`: its EBR chain, read iteratively, each EBR
    once, at most MAX_LOGICAL of them, every EBR inside the extended partition and the disk."""
    parts: list[Entry] = []
    notes: list[str] = []
    ext_end = min(ext_lba + ext_sectors, size // SECTOR)
    ebr_lba = ext_lba
    seen: set[int] = set()
    while True:
        if ebr_lba in seen:
            notes.append(f"the extended partition's EBR chain links back to the EBR at sector {ebr_lba}: "
                         f"read {len(parts)} logical partition(s) and stopped")
            break
        if len(seen) >= MAX_LOGICAL:
            notes.append(f"the extended partition's EBR chain is longer than {MAX_LOGICAL}: stopped there")
            break
        if not ext_lba <= ebr_lba < ext_end:
            notes.append(f"an EBR link points at sector {ebr_lba}, outside the extended partition (sectors "
                         f"{ext_lba}-{ext_end - 1}): the logical partitions after it are not read")
            break
        seen.add(ebr_lba)
        try:
            ebr = parse(read(ebr_lba * SECTOR, SECTOR))
        except TableError:
            notes.append(f"the EBR at sector {ebr_lba} has no 0x55AA signature: the logical partitions from "
                         f"there on are not read")
            break
        first, link = ebr.entries[0], ebr.entries[1]
        if first.type != 0 and first.sectors != 0 and first.type not in EXTENDED:
            parts.append(Entry(5 + len(parts), (ebr_lba + first.start_lba) * SECTOR, first.sectors * SECTOR,
                               type_name(first.type), ""))
        if link.type not in EXTENDED:
            break
        ebr_lba = ext_lba + link.start_lba
    return parts, notes
