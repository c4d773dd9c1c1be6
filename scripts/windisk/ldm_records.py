"""The LDM database's structures, and its VBLK records (disks, disk group, volumes, components, partitions).

A dynamic disk's LDM database is big-endian throughout. Its fixed headers are cstruct definitions: TOCBLOCK,
VMDB and the VBLK entry header are dissect.volume's (dissect/volume/ldm.py: they match libldm and Linux's
fs/partitions/ldm.c field for field). Its PRIVHEAD is defined here: dissect.volume's (marked work in progress)
names the fields at 0x12B/0x133 as TOC offsets where they are the database's start and size, and misplaces
everything from 0x13B on (counts of TOCs are 64-bit, not 32-bit); the layout below is the one libldm reads and
Windows writes (PRIVHEAD version 2.11 on MBR disks, 2.12 on GPT disks).

The VBLK records cannot be fixed structs: most of their fields are variable-length, a length byte followed by
that many bytes (a name, or a big-endian number of 1 to 8 bytes), with fixed runs between them. dissect.volume's
VBLK_* structs try to say that but reference lengths that do not exist, so `Fields` walks a record here: `VAR`
(the length-prefixed field) and the fixed runs are cstruct definitions, the order is libldm's parser's
(src/ldm.c, `_parse_vblk_*`), which Windows' own databases were read with. A record longer than one VBLK
entry (128 bytes) is split over several entries with the same record id; they are joined before parsing.
Every read is bounded: a damaged record raises `RecordError` naming the record and the field, never an
IndexError from deep inside. The states libldm skips are kept: the volume record's (a fixed 14-byte field) and
each component's (a length-prefixed string), "ACTIVE" as Windows writes them; ldm.py reads a mirror's plex by them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import UUID

from dissect.cstruct import cstruct
from dissect.volume.ldm import c_ldm  # TOCBLOCK, VMDB, VBLK_HEADER

c_rec = cstruct(endian=">").load("""
struct PRIVHEAD {
    char        magic[8];               // "PRIVHEAD"
    uint32      checksum;
    uint16      version_major;          // 2
    uint16      version_minor;          // 11: MBR disk, 12: GPT disk
    uint64      last_update;
    uint64      update_sequence_number;
    uint64      unknown_size1;
    uint64      unknown_size2;
    char        disk_guid[64];          // ASCII, NUL-padded: this disk's id in the disk group
    char        host_guid[64];
    char        disk_group_guid[64];
    char        disk_group_name[32];
    uint16      unknown1;
    char        padding1[9];
    uint64      logical_disk_start;     // sector where the volumes' space (the "data area") starts
    uint64      logical_disk_size;      // its size in sectors; partition records are relative to its start
    uint64      config_start;           // sector where the 1 MiB database starts
    uint64      config_size;            // its size in sectors (2048)
    uint64      number_of_tocs;
    uint64      toc_size;
    uint32      number_of_configs;
    uint32      number_of_logs;
    uint64      config_region_size;
    uint64      log_region_size;
    uint32      disk_signature;
    char        disk_set_guid[16];
    char        disk_set_guid_copy[16];
};

struct VBLK_RECORD {
    uint16      status;
    uint8       flags;                  // which optional fields the record has (per record type)
    uint8       type;                   // low nibble: record kind; high nibble: its revision
    uint32      size;                   // bytes of the record's fields after this header
};

struct VAR {                            // a variable-length field: a name, or a big-endian number
    uint8       length;
    char        data[length];
};

struct VOLUME_FIXED {                   // after a volume record's four leading VAR fields
    char        state[14];              // "ACTIVE", NUL-padded
    uint8       volume_type;            // 3: gen (simple, spanned, striped, mirrored), 4: raid5
    uint8       unknown;
    uint8       volume_number;
    char        zeroes[3];
    uint8       volume_flags;
};
""")

# record kinds (the VBLK_RECORD type's low nibble) and the revisions libldm and Windows use
VOLUME, COMPONENT, PARTITION, DISK, DISK_GROUP = 1, 2, 3, 4, 5
KIND_NAMES = {VOLUME: "volume", COMPONENT: "component", PARTITION: "partition", DISK: "disk", DISK_GROUP: "disk group"}
REVISIONS = {VOLUME: (5,), COMPONENT: (3,), PARTITION: (3,), DISK: (3, 4), DISK_GROUP: (3, 4)}
# a component's type: how its partitions make up the volume
STRIPED, CONCATENATED, RAID = 1, 2, 3
GEN, RAID5 = 3, 4  # a volume's type
# optional fields, by the record header's flags
VOLUME_ID1, VOLUME_ID2, VOLUME_SIZE2, VOLUME_HINT = 0x08, 0x20, 0x80, 0x02
COMPONENT_STRIPES = 0x10
PARTITION_INDEX = 0x08


class RecordError(ValueError):
    """A VBLK record (or the entries it is made of) is not what the format allows; the message says which."""


class Fields:
    """A walk over one record's fields, in order, each read bounded by the record's length."""

    def __init__(self, data: bytes, what: str):
        self.data, self.at, self.what = data, 0, what

    def _take(self, length: int, name: str) -> bytes:
        if self.at + length > len(self.data):
            raise RecordError(f"{self.what} is cut short at its {name} (byte {self.at} of {len(self.data)})")
        out = self.data[self.at:self.at + length]
        self.at += length
        return out

    def var(self, name: str) -> bytes:
        length = self._take(1, name)[0]
        self.at -= 1
        return c_rec.VAR(self._take(1 + length, name)).data

    def number(self, name: str, limit: int = 8) -> int:
        raw = self.var(name)
        if len(raw) > limit:
            raise RecordError(f"{self.what} has a {len(raw)}-byte number for its {name} (at most {limit})")
        return int.from_bytes(raw, "big")

    def text(self, name: str) -> str:
        """A name, as a report may show it: printable, one line (a damaged one is not a control sequence)."""
        return "".join(ch for ch in self.var(name).decode("utf-8", "replace") if ch.isprintable())

    def skip(self, length: int, name: str) -> None:
        self._take(length, name)

    def u8(self, name: str) -> int:
        return self._take(1, name)[0]

    def u64(self, name: str) -> int:
        return int.from_bytes(self._take(8, name), "big")

    def raw(self, length: int, name: str) -> bytes:
        return self._take(length, name)


@dataclass
class Volume:
    id: int
    name: str
    volume_type: int  # GEN or RAID5
    components: int  # how many components the record says it has
    size: int  # sectors
    partition_type: int  # the MBR type byte Windows reports for it (0x07: NTFS)
    guid: UUID
    hint: str = ""  # the drive letter Windows gave it ("C:")
    state: str = ""  # the volume's state ("ACTIVE" on a volume Windows has in use; see ldm.py on mirrors)
    flags: int = 0  # the volume record's flags byte (kept, not interpreted: no reader documents it)


@dataclass
class Component:
    id: int
    name: str
    type: int  # STRIPED, CONCATENATED or RAID
    partitions: int
    volume_id: int
    chunk_size: int = 0  # sectors per stripe
    columns: int = 0
    state: str = ""  # the component's state ("ACTIVE"); of a mirrored volume's plex, whether it is current


@dataclass
class Partition:
    id: int
    name: str
    start: int  # sectors from the start of its disk's data area
    volume_offset: int  # sectors from the start of the volume (concatenated: where this piece goes)
    size: int  # sectors
    component_id: int
    disk_id: int
    index: int = 0  # its place in the component (striped, RAID-5 columns)


@dataclass
class Disk:
    id: int
    name: str
    guid: UUID | None


@dataclass
class Records:
    """Everything the VBLKs of one database say, as the record ids link it."""

    group_name: str = ""
    volumes: list[Volume] = field(default_factory=list)
    components: list[Component] = field(default_factory=list)
    partitions: list[Partition] = field(default_factory=list)
    disks: list[Disk] = field(default_factory=list)


def _volume(f: Fields, flags: int) -> Volume:
    vid, name = f.number("id", 4), f.text("name")
    f.var("type name")  # "gen" or "raid5": the fixed type byte below says the same
    f.var("unknown field")
    fixed = c_rec.VOLUME_FIXED(f.raw(len(c_rec.VOLUME_FIXED), "state"))
    if fixed.volume_type not in (GEN, RAID5):
        raise RecordError(f"{f.what} has volume type {fixed.volume_type} (3: simple/spanned/striped/mirrored, "
                          f"4: RAID-5 are known)")
    components = f.number("component count", 4)
    f.skip(16, "commit id")
    size = f.number("size")
    f.skip(4, "zeroes")
    part_type = f.u8("partition type")
    guid = UUID(bytes=f.raw(16, "volume GUID"))
    hint = ""
    if flags & VOLUME_ID1:
        f.var("id1")
    if flags & VOLUME_ID2:
        f.var("id2")
    if flags & VOLUME_SIZE2:
        f.number("size2")
    if flags & VOLUME_HINT:
        hint = f.text("drive hint")
    state = "".join(ch for ch in fixed.state.split(b"\x00")[0].decode("ascii", "replace") if ch.isprintable())
    return Volume(vid, name, fixed.volume_type, components, size, part_type, guid, hint, state, fixed.volume_flags)


def _component(f: Fields, flags: int) -> Component:
    cid, name = f.number("id", 4), f.text("name")
    state = f.text("state")
    kind = f.u8("component type")
    if kind not in (STRIPED, CONCATENATED, RAID):
        raise RecordError(f"{f.what} has component type {kind} (1: striped, 2: concatenated, 3: RAID are known)")
    f.skip(4, "zeroes")
    parts = f.number("partition count", 4)
    f.skip(16, "commit id")
    parent = f.number("parent volume id", 4)
    f.skip(1, "zero")
    chunk = columns = 0
    if flags & COMPONENT_STRIPES:
        chunk, columns = f.number("stripe size"), f.number("column count", 4)
    return Component(cid, name, kind, parts, parent, chunk, columns, state)


def _partition(f: Fields, flags: int) -> Partition:
    pid, name = f.number("id", 4), f.text("name")
    f.skip(12, "commit id")
    start, volume_offset = f.u64("start"), f.u64("volume offset")
    size = f.number("size")
    parent, disk = f.number("parent component id", 4), f.number("disk id", 4)
    index = f.number("index", 4) if flags & PARTITION_INDEX else 0
    return Partition(pid, name, start, volume_offset, size, parent, disk, index)


def _disk(f: Fields, revision: int) -> Disk:
    did, name = f.number("id", 4), f.text("name")
    if revision == 3:  # the GUID as text
        text = f.text("disk GUID")
        try:
            return Disk(did, name, UUID(text))
        except ValueError:
            raise RecordError(f"{f.what} has an invalid disk GUID {text[:40]!r}") from None
    return Disk(did, name, UUID(bytes=f.raw(16, "disk GUID")))


def parse_record(data: bytes, where: str, records: Records) -> None:
    """Adds the record in `data` (its VBLK_RECORD header and fields, entries already joined) to `records`."""
    if len(data) < len(c_rec.VBLK_RECORD):
        raise RecordError(f"{where} is shorter than a record header")
    head = c_rec.VBLK_RECORD(data[:len(c_rec.VBLK_RECORD)])
    kind, revision = head.type & 0x0F, head.type >> 4
    if kind == 0:  # a free entry
        return
    if kind not in KIND_NAMES:
        raise RecordError(f"{where} is of an unknown kind {kind} (type byte {head.type:#04x})")
    what = f"the {KIND_NAMES[kind]} record in {where}"
    if revision not in REVISIONS[kind]:
        raise RecordError(f"{what} has revision {revision} (known: {', '.join(map(str, REVISIONS[kind]))})")
    f = Fields(data[len(c_rec.VBLK_RECORD):], what)
    if kind == VOLUME:
        records.volumes.append(_volume(f, head.flags))
    elif kind == COMPONENT:
        records.components.append(_component(f, head.flags))
    elif kind == PARTITION:
        records.partitions.append(_partition(f, head.flags))
    elif kind == DISK:
        records.disks.append(_disk(f, revision))
    else:
        f.number("id", 4)
        records.group_name = f.text("name")


def parse_vblks(area: bytes, vblk_size: int, first_sequence: int = 0) -> Records:
    """The records in the VBLK area `area` (`vblk_size`-byte entries, up to the first that is not a VBLK, as
    Windows and libldm end the list), multi-entry records joined by record id."""
    records = Records()
    pieces: dict[int, dict[int, bytes]] = {}
    totals: dict[int, tuple[int, str]] = {}
    header_size = len(c_ldm.VBLK_HEADER)
    for at in range(0, len(area) - vblk_size + 1, vblk_size):
        entry = area[at:at + vblk_size]
        head = c_ldm.VBLK_HEADER(entry[:header_size])
        if head.magic != b"VBLK":
            break
        where = f"VBLK {head.sequence_number} (entry {at // vblk_size + first_sequence})"
        body = entry[header_size:]
        if head.num_records <= 1:
            parse_record(body, where, records)
            continue
        if head.record_number >= head.num_records:
            raise RecordError(f"{where} is part {head.record_number} of a record of {head.num_records} parts")
        pieces.setdefault(head.group_number, {})[head.record_number] = body
        totals.setdefault(head.group_number, (head.num_records, where))
    for group, parts in pieces.items():
        total, where = totals[group]
        if len(parts) != total:
            raise RecordError(f"{where} is one of {total} parts of record {group}, but {len(parts)} were found")
        parse_record(b"".join(parts[i] for i in range(total)), where, records)
    return records
