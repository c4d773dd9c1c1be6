"""The GUID partition table (Generation 2 OS disks), read from its backup copy when the primary is damaged.

UEFI (specification 2.10, section 5.3) keeps two copies of the table: the primary header at LBA 1 with its
entry array after it, and the backup header at the disk's last LBA with its array just before it. Each
header carries a CRC32 of itself and of its entry array. A primary copy overwritten by a stray write to
the start of the disk (a boot loader, a tool pointed at the wrong device, a half-finished repartition) is
what the backup exists for: firmware and Windows both fall back to it, so an OS disk whose primary GPT is
damaged still boots and still holds its Windows volume. This reader checks the primary (signature, header
CRC, its own LBA, plausible entry fields, entry array CRC) and when any check fails reads the backup
(at the LBA the primary names as its alternate when that much of it is readable, else at the disk's last
LBA) and says so in a note. dissect.volume trusts the primary without a CRC and has no fallback.

The entry fields are bounded before any entry is read: a count of 2^32 would loop for hours over a big
disk, an entry size of 1 would read overlapping garbage as partitions (issue #13). A disk grown after it
was partitioned keeps its backup at the old end: the primary names it as its alternate LBA.
"""

from __future__ import annotations

import zlib
from uuid import UUID

from dissect.cstruct import cstruct

from scripts.windisk.mbr import SECTOR, Entry, Read, TableError, type_name

SIGNATURE = b"EFI PART"
HEADER_SIZE = 92
ENTRY_SIZE = 128  # UEFI: 128 * 2^n bytes; Windows writes 128
MAX_ENTRY_SIZE = 4096
MAX_ENTRIES = 16384  # Windows writes 128; the UEFI minimum array is 16 KiB
MAX_ARRAY = MAX_ENTRIES * ENTRY_SIZE  # 2 MiB: read in one piece, so bounded
UNUSED = b"\x00" * 16
LDM_METADATA = UUID("5808C8AA-7E8F-42E0-85D2-E1E90434CFB3")  # a dynamic disk's LDM database (ldm.py)
LDM_DATA = UUID("AF9B60A0-1431-4F62-BC68-3311714A69AD")  # the LDM volumes' space

c_gpt = cstruct().load("""
struct GPT_HEADER {
    char        signature[8];       // "EFI PART"
    uint32      revision;
    uint32      header_size;        // 92: the CRC covers this many bytes
    uint32      header_crc32;       // CRC32 of the header with this field zeroed
    uint32      reserved;
    uint64      my_lba;             // 1 for the primary, the last LBA for the backup
    uint64      alternate_lba;      // where the other copy's header is
    uint64      first_usable_lba;
    uint64      last_usable_lba;
    char        disk_guid[16];
    uint64      partition_entry_lba;
    uint32      number_of_entries;
    uint32      size_of_entry;
    uint32      entries_crc32;      // CRC32 of number_of_entries * size_of_entry bytes
};

struct GPT_ENTRY {
    char        type_guid[16];      // all zeros: an unused entry
    char        unique_guid[16];
    uint64      starting_lba;
    uint64      ending_lba;         // inclusive
    uint64      attributes;
    char        name[72];           // UTF-16LE, NUL-padded
};
""")


def _header(read: Read, lba: int, size: int, copy: str):
    """The header at `lba` and its entry array, checked; TableError saying what is wrong with it."""
    raw = read(lba * SECTOR, SECTOR)
    if len(raw) < HEADER_SIZE or raw[:8] != SIGNATURE:
        raise TableError(f"{copy} GPT (LBA {lba}): no 'EFI PART' signature")
    header = c_gpt.GPT_HEADER(raw[:HEADER_SIZE])
    if not HEADER_SIZE <= header.header_size <= SECTOR:
        raise TableError(f"{copy} GPT (LBA {lba}): the GPT header is corrupt: its size field is "
                         f"{header.header_size}")
    if header.my_lba != lba:
        raise TableError(f"{copy} GPT (LBA {lba}): the GPT header is corrupt: it says it is at LBA "
                         f"{header.my_lba}")
    try:
        check_entry_fields(header.partition_entry_lba, header.number_of_entries, header.size_of_entry, size)
    except TableError as err:
        raise TableError(f"{copy} GPT (LBA {lba}): {err}") from None
    zeroed = bytearray(raw[:header.header_size])
    zeroed[16:20] = bytes(4)
    if zlib.crc32(zeroed) != header.header_crc32:
        raise TableError(f"{copy} GPT (LBA {lba}): the GPT header is corrupt: its CRC32 does not match")
    array = read(header.partition_entry_lba * SECTOR, header.number_of_entries * header.size_of_entry)
    if zlib.crc32(array) != header.entries_crc32:
        raise TableError(f"{copy} GPT (LBA {lba}): its partition entry array (LBA {header.partition_entry_lba}) is "
                         f"corrupt: its CRC32 does not match the header's")
    return header, array


def check_entry_fields(array_lba: int, count: int, entry_size: int, size: int) -> None:
    """TableError for entry fields no disk has (before a single entry is read)."""
    if entry_size < ENTRY_SIZE or entry_size % ENTRY_SIZE or entry_size > MAX_ENTRY_SIZE:
        raise TableError(f"the GPT header is corrupt: its partition entry size is {entry_size} (expected a "
                         f"multiple of {ENTRY_SIZE} bytes, at most {MAX_ENTRY_SIZE})")
    if count > MAX_ENTRIES:
        raise TableError(f"the GPT header is corrupt: it lists {count} partition entries (at most "
                         f"{MAX_ENTRIES} are plausible)")
    if count * entry_size > MAX_ARRAY:
        raise TableError(f"the GPT header is corrupt: its partition entry array would be {count * entry_size} bytes "
                         f"(at most {MAX_ARRAY} are plausible)")
    if array_lba * SECTOR + count * entry_size > size:
        raise TableError(f"the GPT header is corrupt: its partition entry array (LBA {array_lba}, {count} "
                         f"entries) ends past the end of the {size}-byte disk")


def _alternate(read: Read) -> int | None:
    """The backup's LBA as the primary header names it, when the primary has at least its signature."""
    raw = read(SECTOR, HEADER_SIZE)
    if len(raw) < HEADER_SIZE or raw[:8] != SIGNATURE:
        return None
    return c_gpt.GPT_HEADER(raw).alternate_lba


def read_gpt(read: Read, size: int) -> tuple[list[Entry], list[str], tuple[int, int] | None]:
    """(partitions, notes, (offset, size) of the LDM metadata partition or None) of a GPT disk: from the primary
    table, or from the backup when the primary fails a check (noted). TableError when neither copy is valid,
    naming what is wrong with the primary first."""
    notes: list[str] = []
    last_lba = size // SECTOR - 1
    try:
        header, array = _header(read, 1, size, "primary")
    except TableError as primary:
        candidates = [last_lba]
        alternate = _alternate(read)
        if alternate is not None and alternate != last_lba and 1 < alternate <= last_lba:
            candidates.insert(0, alternate)
        backup_errors = []
        for lba in candidates:
            try:
                header, array = _header(read, lba, size, "backup")
                break
            except TableError as err:
                backup_errors.append(str(err))
        else:
            raise TableError(f"{primary}; and no valid backup: {backup_errors[-1]}") from None
        notes.append(f"{primary}: the partitions were read from the backup GPT at LBA {header.my_lba} (Windows "
                     f"does the same; `sgdisk -v` on the disk copy shows the damage, and Windows rewrites the primary "
                     f"from the backup on its next boot)")
    parts: list[Entry] = []
    ldm = None
    for index in range(header.number_of_entries):
        raw = array[index * header.size_of_entry:index * header.size_of_entry + ENTRY_SIZE]
        if raw[:16] == UNUSED:
            continue
        entry = c_gpt.GPT_ENTRY(raw)
        if entry.ending_lba < entry.starting_lba:
            notes.append(f"GPT entry {index + 1} ends (LBA {entry.ending_lba}) before it starts "
                         f"(LBA {entry.starting_lba}): ignored")
            continue
        kind = UUID(bytes_le=entry.type_guid)
        offset, length = entry.starting_lba * SECTOR, (entry.ending_lba - entry.starting_lba + 1) * SECTOR
        if kind == LDM_METADATA and ldm is None:
            ldm = (offset, length)
        name = entry.name.decode("utf-16-le", "replace").split("\x00")[0]
        parts.append(Entry(index + 1, offset, length, type_name(kind), name))
    return parts, notes, ldm
