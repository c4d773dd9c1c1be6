"""Builds Windows dynamic disks (LDM) to the documented on-disk format: the disk images the LDM tests read.

A dynamic disk's volumes are listed in its LDM database, not in its partition table. What this module writes,
field by field, is what Windows writes and what the independent readers read (libldm, behind Debian's ldmtool,
and Linux's fs/partitions/ldm.c, both written from Richard Russon's LDM documentation): the offsets below are
theirs, packed with `struct` here rather than with the reader's cstruct definitions (scripts.windisk.ldm_records),
so that a mistake in the reader is not repeated by the builder; ldmtool reading the image is the check.

- MBR (Generation 1): one partition of type 0x42 from sector 63 to the end of the disk; the PRIVHEAD in sector 6;
  the 1 MiB database in the disk's last MiB; the data area (the volumes' space) from sector 63 up to it.
- GPT (Generation 2): an EFI system partition, a Microsoft reserved partition, the "LDM metadata" partition
  (the 1 MiB database, its PRIVHEAD in its last sector) and the "LDM data" partition (the data area).
- The database: PRIVHEAD copies at sectors 1856 and 2047 of it (MBR) / 1856 (GPT, where 2047 is the primary);
  TOCBLOCKs at sectors 1, 2, 2045, 2046 naming the config region (sector 17, 1481 sectors) and the log region;
  the VMDB at sector 17 (version 4.10, 128-byte VBLKs from its offset 512, the record counts); then one VBLK per
  record: the disk group, its disks, and per volume a volume, its component(s) and their partitions. A record
  longer than a VBLK's 112 bytes of room is split over several VBLKs with the same record id.

Each volume is a list of `Piece`s (a run of MiB on one of the group's disks: disk 0 is the disk this image is;
the others are named in the database only, as a disk group whose other members are elsewhere). Its layout is
"concatenated" (one component whose pieces follow each other: Windows' simple volume, also when extended with
a second piece on the same disk; spanned when the pieces are on several disks), "striped", "mirrored" (one
component per copy, a "plex": per piece, or the pieces of each `Piece.plex`) or "raid5". A concatenated volume's
`content` (an NTFS volume's bytes) is written into its pieces on this disk, in order; a mirrored volume's into
each of its plexes' pieces on this disk. The states Windows writes ("ACTIVE") can be set per volume and plex.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from scripts.devkit import diskimage

SECTOR = 512
MiB = 1 << 20
DB_SECTORS = 2048  # the database: 1 MiB
CONFIG_AT, CONFIG_SECTORS, LOG_SECTORS = 17, 1481, 224  # the config region (VMDB, VBLKs) and the log region
VBLK_SIZE, VBLK_FIRST = 128, 512
MBR_DATA_START = 63
LDM_METADATA = uuid.UUID("5808C8AA-7E8F-42E0-85D2-E1E90434CFB3")
LDM_DATA = uuid.UUID("AF9B60A0-1431-4F62-BC68-3311714A69AD")
LAYOUTS = ("concatenated", "striped", "mirrored", "raid5")


@dataclass(frozen=True)
class Piece:
    """A run of the data area of one of the group's disks. MiB, in whole sectors: Windows aligns a volume's
    first piece to 1 MiB, but the piece an extension adds ends wherever the extension does."""

    start_mib: float  # from the start of its disk's data area
    size_mib: float
    disk: int = 0  # index in the disk group's disks: 0 is the disk this image is
    plex: int | None = None  # a mirrored volume's copy this piece belongs to (None: each piece a copy of its own)

    @property
    def start(self) -> int:
        return _sectors(self.start_mib)

    @property
    def sectors(self) -> int:
        return _sectors(self.size_mib)


def _sectors(mib: float) -> int:
    sectors = mib * MiB / SECTOR
    if sectors != int(sectors):
        raise ValueError(f"{mib} MiB is not a whole number of sectors")
    return int(sectors)


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    pieces: tuple[Piece, ...]
    layout: str = "concatenated"
    content: bytes | Path | None = None  # a concatenated volume's bytes (an NTFS volume); zeros past its end
    hint: str = ""  # the drive letter Windows gave it ("C:")
    stripe_kib: int = 64
    state: str = "ACTIVE"  # the volume record's state (14 bytes)
    plex_states: tuple[str, ...] = ()  # each component's state, in order ("ACTIVE" when not given)

    def groups(self) -> list[list[Piece]]:
        """The pieces of each component: a mirror's plexes (by `Piece.plex`, else one per piece), else one."""
        if self.layout != "mirrored":
            return [list(self.pieces)]
        if all(p.plex is None for p in self.pieces):
            return [[p] for p in self.pieces]
        plexes = sorted({p.plex for p in self.pieces if p.plex is not None})
        return [[p for p in self.pieces if p.plex == plex] for plex in plexes]


@dataclass(frozen=True)
class DynamicDisk:
    path: Path
    scheme: str
    size: int
    group_name: str
    group_guid: uuid.UUID
    disk_guids: tuple[uuid.UUID, ...]  # the disk group's disks; [0] is this image
    disk_names: tuple[str, ...]
    data_start: int  # sector
    config_start: int  # sector
    volumes: dict[str, tuple[tuple[int, int], ...]]  # name -> (byte offset, bytes) of its pieces on this disk
    volume_guids: dict[str, uuid.UUID]


def _num(value: int) -> bytes:
    """A variable-length number: its length, then its big-endian bytes (at least one)."""
    raw = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    return bytes([len(raw)]) + raw


def _text(value: str) -> bytes:
    raw = value.encode()
    return bytes([len(raw)]) + raw


def _guid_text(value: uuid.UUID, width: int = 64) -> bytes:
    return str(value).encode().ljust(width, b"\0")


class _Records:
    """The VBLK records of a database, in order: each (type byte, flags, fields)."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int, bytes]] = []
        self.counts = {"volume": 0, "component": 0, "partition": 0, "disk": 0}
        self.next_id = 1

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def add(self, kind: str | None, type_byte: int, flags: int, fields: bytes) -> None:
        self.items.append((type_byte, flags, fields))
        if kind:
            self.counts[kind] += 1


def _database_records(group: str, group_guid: uuid.UUID, disks: list[tuple[str, uuid.UUID]], volumes: list[VolumeSpec],
                      data_sectors: int, shift: int) -> tuple[_Records, dict[str, uuid.UUID]]:
    """The records; a piece's partition starts `shift` + its MiB in sectors into the data area."""
    recs = _Records()
    commit = struct.pack(">Q", 1)
    recs.add(None, 0x45, 0, _num(recs.new_id()) + _text(group) + group_guid.bytes
             + uuid.uuid5(group_guid, "disk set").bytes + bytes(4) + commit)  # disk group, revision 4
    disk_ids = []
    for name, guid in disks:
        disk_ids.append(recs.new_id())  # disk, revision 4: its GUID binary (RFC 4122 order)
        recs.add("disk", 0x44, 0, _num(disk_ids[-1]) + _text(name) + guid.bytes + bytes(16) + bytes(5) + commit)
    per_disk = [0] * len(disks)
    guids = {}
    for number, vol in enumerate(volumes, 1):
        if vol.layout not in LAYOUTS:
            raise ValueError(f"layout {vol.layout!r}: one of {LAYOUTS}")
        sizes = [p.sectors for p in vol.pieces]
        if any(shift + p.start + s > data_sectors for p, s in zip(vol.pieces, sizes) if p.disk == 0):
            raise ValueError(f"volume {vol.name}: a piece runs past the data area ({data_sectors} sectors)")
        groups = vol.groups()
        size = (sum(p.sectors for p in groups[0]) if vol.layout == "mirrored"
                else sum(sizes) - (sizes[0] if vol.layout == "raid5" else 0))
        vid = recs.new_id()
        guids[vol.name] = uuid.uuid5(group_guid, vol.name)
        raid = vol.layout == "raid5"
        ncomps = len(groups)
        fields = (_num(vid) + _text(vol.name) + _text("raid5" if raid else "gen") + _text("")
                  + vol.state.encode()[:14].ljust(14, b"\0") + bytes([4 if raid else 3, 1, number]) + bytes(3) + b"\0"
                  + _num(ncomps) + commit + bytes(8) + _num(size) + bytes(4) + b"\x07" + guids[vol.name].bytes
                  + (_text(vol.hint) if vol.hint else b""))
        recs.add("volume", 0x51, 0x02 if vol.hint else 0, fields)
        for c, pieces in enumerate(groups, 1):
            state = vol.plex_states[c - 1] if c <= len(vol.plex_states) else "ACTIVE"
            cid = recs.new_id()
            kind = {"striped": 1, "raid5": 3}.get(vol.layout, 2)
            stripes = _num(vol.stripe_kib * 1024 // SECTOR) + _num(len(pieces)) if kind != 2 else b""
            recs.add("component", 0x32, 0x10 if stripes else 0,
                     _num(cid) + _text(f"{vol.name}-{c:02d}") + _text(state) + bytes([kind]) + bytes(4)
                     + _num(len(pieces)) + commit + bytes(8) + _num(vid) + b"\0" + stripes)
            at = 0
            for index, piece in enumerate(pieces):
                per_disk[piece.disk] += 1
                psize = piece.sectors
                offset = at if kind == 2 else 0  # a concatenation's pieces follow each other; columns all start at 0
                recs.add("partition", 0x33, 0x08,
                         _num(recs.new_id()) + _text(f"{disks[piece.disk][0]}-{per_disk[piece.disk]:02d}") + bytes(4)
                         + commit + struct.pack(">QQ", shift + piece.start, offset) + _num(psize) + _num(cid)
                         + _num(disk_ids[piece.disk]) + _num(index))
                at += psize
    return recs, guids


def _vblks(recs: _Records) -> tuple[bytes, int]:
    """The VBLK entries (from the VMDB's offset 512: sequence numbers from 4), and the last sequence number."""
    out, seq, room = bytearray(), 4, VBLK_SIZE - 16
    for record_id, (type_byte, flags, fields) in enumerate(recs.items, 1):
        record = struct.pack(">HBBI", 0, flags, type_byte, len(fields)) + fields
        parts = [record[i:i + room] for i in range(0, len(record), room)]
        for entry, part in enumerate(parts):
            out += struct.pack(">4sIIHH", b"VBLK", seq, record_id, entry, len(parts)) + part.ljust(room, b"\0")
            seq += 1
    return bytes(out), seq - 1


def _vmdb(group: str, group_guid: uuid.UUID, recs: _Records, last_seq: int) -> bytes:
    c = recs.counts
    counts = struct.pack(">IIII", c["volume"], c["component"], c["partition"], c["disk"])
    raw = (b"VMDB" + struct.pack(">IIIHHH", last_seq, VBLK_SIZE, VBLK_FIRST, 1, 4, 10)
           + group.encode()[:31].ljust(31, b"\0") + _guid_text(group_guid) + struct.pack(">QQ", 1, 1)
           + counts + bytes(12) + counts + bytes(12) + struct.pack(">Q", 0))
    return raw.ljust(VBLK_FIRST, b"\0")


def _tocblock() -> bytes:
    def region(name: bytes, start: int, size: int) -> bytes:
        return name.ljust(8, b"\0") + struct.pack(">HQQQ", 0, start, size, 0)

    raw = (b"TOCBLOCK" + struct.pack(">I4sI16s", 1, bytes(4), 0, bytes(16))
           + region(b"config", CONFIG_AT, CONFIG_SECTORS) + region(b"log", CONFIG_AT + CONFIG_SECTORS, LOG_SECTORS))
    return raw.ljust(SECTOR, b"\0")


def _privhead(scheme: str, disk_guid: uuid.UUID, group: str, group_guid: uuid.UUID, data_start: int,
              data_sectors: int, config_start: int) -> bytes:
    raw = bytearray(SECTOR)
    struct.pack_into(">8sIHHQQQQ", raw, 0, b"PRIVHEAD", 0, 2, 12 if scheme == "gpt" else 11, 0, 1, 0, 0)
    raw[0x30:0x70] = _guid_text(disk_guid)
    raw[0x70:0xB0] = _guid_text(uuid.uuid5(group_guid, "host"))
    raw[0xB0:0xF0] = _guid_text(group_guid)
    raw[0xF0:0x110] = group.encode()[:31].ljust(32, b"\0")
    struct.pack_into(">QQQQQQIIQQI", raw, 0x11B, data_start, data_sectors, config_start, DB_SECTORS, 2, 1, 1, 1,
                     CONFIG_SECTORS, LOG_SECTORS, 0x5EC7C0DE)
    return bytes(raw)


def build_dynamic_disk(path: Path, volumes: list[VolumeSpec], *, scheme: str = "mbr", data_mib: int = 64,
                       disks: tuple[str, ...] = ("Disk1",), group: str = "CRASHCART-Dg0",
                       vhd_footer: bool = False) -> DynamicDisk:
    """A dynamic disk image (sparse) holding `volumes` in a data area of `data_mib` MiB; `disks` names the disk
    group's disks (the first is this one). With `vhd_footer` the image is a fixed VHD, as Azure exports one."""
    group_guid = uuid.uuid5(uuid.NAMESPACE_OID, f"crashcart-ldm-{group}")
    guids = tuple(uuid.uuid5(group_guid, f"disk-{name}") for name in disks)
    data_sectors = data_mib * MiB // SECTOR
    if scheme == "gpt":
        layout = [diskimage.Partition(4, diskimage.EFI_SYSTEM, 0xEF, "EFI system partition"),
                  diskimage.Partition(2, diskimage.MS_RESERVED, 0, "Microsoft reserved partition"),
                  diskimage.Partition(DB_SECTORS * SECTOR // MiB, LDM_METADATA, 0, "LDM metadata partition"),
                  diskimage.Partition(data_mib, LDM_DATA, 0, "LDM data partition")]
        diskimage.build_disk(path, layout, "gpt")
        config_start, data_start = diskimage.partition_starts(layout)[2:]
        privheads = [config_start + DB_SECTORS - 1, config_start + 1856]
    else:
        total = MiB // SECTOR + data_sectors + DB_SECTORS
        config_start, data_start = total - DB_SECTORS, MBR_DATA_START
        data_sectors = config_start - data_start
        with open(path, "wb") as disk:
            disk.truncate(total * SECTOR)
            mbr = bytearray(SECTOR)
            struct.pack_into("<I", mbr, 440, 0x5EC7C0DE)
            struct.pack_into("<B3sB3sII", mbr, 446, 0, b"\xfe\xff\xff", 0x42, b"\xfe\xff\xff", data_start,
                             total - data_start)
            mbr[510:512] = b"\x55\xaa"
            disk.write(mbr)
        privheads = [6, config_start + 1856, config_start + DB_SECTORS - 1]
    # MBR: the data area starts at sector 63, pieces are placed 1 MiB aligned on the disk as on GPT
    shift = MiB // SECTOR - MBR_DATA_START if scheme != "gpt" else 0
    recs, vol_guids = _database_records(group, group_guid, list(zip(disks, guids)), volumes, data_sectors, shift)
    entries, last_seq = _vblks(recs)
    head = _privhead(scheme, guids[0], group, group_guid, data_start, data_sectors, config_start)
    where: dict[str, tuple[tuple[int, int], ...]] = {}
    with open(path, "r+b") as disk:
        for lba in privheads:
            _put(disk, lba * SECTOR, head)
        for sector in (1, 2, DB_SECTORS - 3, DB_SECTORS - 2):
            _put(disk, (config_start + sector) * SECTOR, _tocblock())
        _put(disk, (config_start + CONFIG_AT) * SECTOR, _vmdb(group, group_guid, recs, last_seq) + entries)
        for vol in volumes:
            runs = tuple(((data_start + shift + p.start) * SECTOR, p.sectors * SECTOR)
                         for p in vol.pieces if p.disk == 0)
            where[vol.name] = runs
            if vol.content is not None and vol.layout in ("concatenated", "mirrored"):
                for pieces in vol.groups():  # a mirror: each plex holds the whole volume
                    _write_pieces(disk, vol.content, pieces, data_start + shift)
        size = disk.seek(0, 2)
        if vhd_footer:
            from scripts.devkit.gptdisk import fixed_vhd_footer

            disk.write(fixed_vhd_footer(size))
    return DynamicDisk(path, scheme, size, group, group_guid, guids, disks, data_start, config_start, where, vol_guids)


def _put(disk, offset: int, data: bytes) -> None:
    disk.seek(offset)
    disk.write(data)


def _write_pieces(disk, content: bytes | Path, pieces: list[Piece], data_start: int) -> None:
    """The volume's content, cut at the pieces' sizes (one after the other), written into those on this disk."""
    source = open(content, "rb") if isinstance(content, Path) else None
    try:
        at = 0
        for piece in pieces:
            length = piece.sectors * SECTOR
            if piece.disk == 0:
                if source is not None:
                    source.seek(at)
                    remaining, out = length, (data_start + piece.start) * SECTOR
                    while remaining > 0:
                        chunk = source.read(min(remaining, 4 * MiB))
                        if not chunk:
                            break
                        if chunk.strip(b"\0"):  # keep the image sparse
                            _put(disk, out, chunk)
                        out += len(chunk)
                        remaining -= len(chunk)
                else:
                    _put(disk, (data_start + piece.start) * SECTOR, bytes(content[at:at + length]))
            at += length
    finally:
        if source is not None:
            source.close()


# ---- a broken Windows VM's OS disk, dynamic --------------------------------------------------------------
def windows_volume(work: Path, *, name: str = "dynamic", windows_mib: int | None = None) -> tuple[Path, object]:
    """A Windows NTFS volume's bytes in a file (gptdisk builds it on a basic disk: a SYSTEM hive, the dump...),
    and gptdisk's WindowsDisk (its `originals`: the files put on it)."""
    from scripts.devkit import gptdisk

    built = gptdisk.windows_disk(work / name, dump="bitmap", layout="fragmented", slot=16 * 1024,
                                 windows_mib=windows_mib, name=name, minidump=False)
    volume = work / f"{name}-windows.ntfs"
    with open(built.image.path, "rb") as src, open(volume, "wb") as out:
        src.seek(built.image.windows_offset)
        remaining = built.image.windows_size
        while remaining:
            chunk = src.read(min(remaining, 4 * MiB))
            out.write(chunk)
            remaining -= len(chunk)
    built.image.path.unlink()
    return volume, built
