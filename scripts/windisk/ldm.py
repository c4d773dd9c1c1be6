"""Dynamic disks (LDM): the volumes of a Windows dynamic disk, read from its LDM database.

A dynamic disk keeps its volumes not in the partition table but in the LDM (Logical Disk Manager) database,
which the partition table only points at: an MBR disk has one entry of type 0x42 over the whole disk, its
PRIVHEAD in sector 6 and the 1 MiB database in the disk's last MiB; a GPT disk has an "LDM metadata"
partition (the database, its PRIVHEAD in the partition's last sector) and an "LDM data" partition (the volumes'
space). The PRIVHEAD names this disk (a GUID), its disk group, where the volumes' space (the data area) and
the database are. The database starts with TOCBLOCKs (kept at sectors 1, 2 and at the end: a table of its
regions), whose "config" region is the VMDB (the disk group's header: record counts, entry size) followed by
VBLK records: the disk group, its disks (by GUID: the disks of a group all carry the same database), and per
volume a volume record, its components and their partitions (each a run of sectors on one disk's data
area). ldm_records.py parses them; this module checks how they link (the way libldm, which Linux's ldmtool
uses, checks them), and maps each volume onto this disk.

What one disk's copy can give: a volume with one concatenated component whose partitions are all on this disk
(Windows calls it simple, even when extending it added a second run of sectors) is read, its runs joined in
volume order. A mirrored volume (a dynamic-disk mirror of C:, carried into Azure from on-premises) has one
component per copy, a "plex", each holding the whole volume: the plex on this disk is read like a simple volume
when all its partitions are here and this disk's database says it is current. The records carry a state: the
volume record's (14 bytes) and each component's (a length-prefixed string); Windows writes "ACTIVE" on a volume in
use and on a plex in it. Neither libldm nor Linux's ldm.c interprets them, and no public documentation lists
the other values (LDM comes from Veritas' volume manager, whose plexes are also STALE, OFFLINE, IOFAIL, ...,
its volumes SYNC, NEEDSYNC, ...): so anything but "ACTIVE" on either is refused, naming the state and the other
half. Which plex was read is in the entry's type and a note. A volume spanned or striped over several disks, a
mirror whose plex here continues on another disk, or RAID-5 is not in one disk's copy: it is named with that
reason and the way to collect from it (the rescue-vm strategy with copies of the group's disks, imported as a
foreign disk group). A database that cannot be read (no PRIVHEAD, a damaged TOCBLOCK, VMDB or VBLK) says which
structure and where, never a traceback; a PRIVHEAD is also looked for where Windows keeps its copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple
from uuid import UUID

from dissect.volume.ldm import c_ldm

from scripts.windisk.ldm_records import (CONCATENATED, RAID, STRIPED, Records, RecordError, c_rec,
                                         parse_vblks)
from scripts.windisk.mbr import Read

SECTOR = 512
DATABASE_SECTORS = 2048  # 1 MiB, as Windows writes it
MAX_DATABASE_SECTORS = 64 * 2048  # larger is not a database, it is a damaged size field
TOC_AT = (2, 1)  # sectors into the database; and its last-but-two and last-but-one (see _tocblock)
PRIVHEAD_COPIES = (1856, 2047)  # sectors into the database where Windows keeps PRIVHEAD's other copies

IMPORT = ("Disk Management > Import Foreign Disks, or diskpart `import`")
DAMAGED = ("the disk is a dynamic disk (LDM{where}) whose LDM database cannot be read: {why}; without it its "
           "volumes are not known: collect with repair.strategy = \"rescue-vm\" (the Windows rescue VM imports the "
           "disk copy as a foreign dynamic disk: " + IMPORT + ")")
ELSEWHERE = ("no single disk's copy holds it: collect with repair.strategy = \"rescue-vm\" with copies of every disk "
             "of disk group '{group}' ({disks}) attached to the rescue VM, where Windows imports them as a foreign "
             "disk group (" + IMPORT + ")")


CURRENT = "ACTIVE"  # the state of a volume in use, and of a plex that holds its current data
STALE = ("{whole}, but this disk's LDM database says {said}, not '" + CURRENT + "': this copy may not hold the "
         "volume's current data (a plex detached, resynchronising or out of date). Read the other half instead: "
         "snapshot-export the disk holding it ({other}; source.os_disk_id = that disk), or collect with "
         "repair.strategy = \"rescue-vm\" with copies of every disk of disk group '{group}' attached (Windows "
         "resynchronises the mirror when it imports them: " + IMPORT + "), or break the mirror on a working machine "
         "(Disk Management > Remove Mirror, keeping the current half)")


class DatabaseError(ValueError):
    """The LDM database cannot be read; the message names the structure and what is wrong with it."""


class LdmEntry(NamedTuple):
    """A readable dynamic volume as the disk reader lists it (mbr.Entry's fields, and the runs on this disk)."""

    number: int
    offset: int  # byte offset of its first run
    size: int  # bytes, all runs
    type: str
    name: str
    extents: tuple[tuple[int, int], ...]  # (byte offset on the disk, bytes), in volume order


@dataclass
class DynamicVolume:
    name: str
    layout: str  # simple | spanned | striped | mirrored | raid5 (as ldmtool names them)
    size: int  # bytes
    guid: UUID
    hint: str
    partition_type: int
    extents: list[tuple[int, int]] = field(default_factory=list)  # on this disk, in volume order (readable only)
    disks: list[str] = field(default_factory=list)  # the disks holding its partitions
    partitions: list[tuple[str, int, int, str]] = field(default_factory=list)  # (name, start, size, disk): sectors
    why: str = ""  # why it cannot be read from this disk ("" when it can)
    plex: str = ""  # a mirrored volume read from this disk: the component (plex) read
    note: str = ""  # what an operator should know about how it was read (a mirror: which plex)


@dataclass
class Database:
    group_name: str
    group_guid: UUID
    disk_guid: UUID
    disk_name: str
    data_start: int  # sectors
    data_size: int
    config_start: int
    config_size: int
    disks: list[tuple[str, UUID | None]]
    volumes: list[DynamicVolume]
    notes: list[str]


def _guid(raw: bytes, what: str) -> UUID:
    text = raw.split(b"\x00")[0].decode("ascii", "replace")
    try:
        return UUID(text)
    except ValueError:
        raise DatabaseError(f"its {what} {text[:40]!r} is not a GUID") from None


def _privhead(read: Read, lba: int, size: int):
    """The PRIVHEAD at sector `lba`, checked: the areas it names lie on the disk and do not overlap."""
    raw = read(lba * SECTOR, SECTOR)
    if len(raw) < len(c_rec.PRIVHEAD) or raw[:8] != b"PRIVHEAD":
        raise DatabaseError(f"no PRIVHEAD at sector {lba}")
    head = c_rec.PRIVHEAD(raw[:len(c_rec.PRIVHEAD)])
    sectors = size // SECTOR
    where = f"the PRIVHEAD at sector {lba}"
    if head.version_major != 2:
        raise DatabaseError(f"{where} has version {head.version_major}.{head.version_minor} (2.x is known)")
    if not 0 < head.config_size <= MAX_DATABASE_SECTORS or head.config_start + head.config_size > sectors:
        raise DatabaseError(f"{where} places the database at sectors {head.config_start}+{head.config_size}, "
                            f"outside the {sectors}-sector disk")
    data_end = head.logical_disk_start + head.logical_disk_size
    if head.logical_disk_start == 0 or data_end > sectors:
        raise DatabaseError(f"{where} places the data area at sectors {head.logical_disk_start}+"
                            f"{head.logical_disk_size}, outside the {sectors}-sector disk")
    if head.logical_disk_start < head.config_start + head.config_size and head.config_start < data_end:
        raise DatabaseError(f"{where} places the data area over the database")
    try:
        _guid(head.disk_guid, "disk GUID"), _guid(head.disk_group_guid, "disk group GUID")
    except DatabaseError as err:
        raise DatabaseError(f"{where}: {err}") from None
    return head


def find_privhead(read: Read, size: int, at: object, scheme: str) -> tuple[object, list[str]]:
    """The PRIVHEAD (sector 6 on MBR, the LDM metadata partition's last sector on GPT), or one of the copies
    Windows keeps in the database (noted)."""
    if scheme == "gpt":
        offset, length = at  # type: ignore[misc]
        start = offset // SECTOR
        candidates = [start + length // SECTOR - 1] + [start + copy for copy in PRIVHEAD_COPIES[:1]]
    else:  # the database is the disk's last MiB
        start = size // SECTOR - DATABASE_SECTORS
        candidates = [6] + [start + copy for copy in PRIVHEAD_COPIES]
    errors = []
    for lba in candidates:
        if not 0 <= lba < size // SECTOR:
            continue
        try:
            head = _privhead(read, lba, size)
        except DatabaseError as err:
            errors.append(str(err))
            continue
        notes = [] if lba == candidates[0] else [
            f"the dynamic disk's PRIVHEAD at sector {candidates[0]} is damaged ({errors[0]}): read its copy at sector "
            f"{lba}"]
        return head, notes
    raise DatabaseError(errors[0] if errors else "no PRIVHEAD on the disk")


def _tocblock(read: Read, head) -> object:
    """The database's table of contents: the first valid TOCBLOCK of its copies."""
    base, length = head.config_start, head.config_size
    errors = []
    for sector in TOC_AT + (length - 3, length - 2):
        raw = read((base + sector) * SECTOR, len(c_ldm.TOCBLOCK))
        if len(raw) < len(c_ldm.TOCBLOCK) or raw[:8] != b"TOCBLOCK":
            errors.append(f"no TOCBLOCK at sector {base + sector}")
            continue
        toc = c_ldm.TOCBLOCK(raw)
        region = next((r for r in (toc.config, toc.log) if r.name.rstrip(b"\x00") == b"config"), None)
        if region is None or not 0 < region.offset < length or region.offset + region.size > length:
            errors.append(f"the TOCBLOCK at sector {base + sector} names no config region inside the database")
            continue
        return region
    raise DatabaseError("; ".join(errors[:2]) + " (nor at its copies)")


def read_records(read: Read, head) -> tuple[object, Records]:
    """(VMDB, records) of the database the PRIVHEAD names."""
    region = _tocblock(read, head)
    start = (head.config_start + region.offset) * SECTOR
    raw = read(start, region.size * SECTOR)
    if len(raw) < len(c_ldm.VMDB) or raw[:4] != b"VMDB":
        raise DatabaseError(f"no VMDB at sector {head.config_start + region.offset} (where the TOCBLOCK puts the "
                            f"config region)")
    vmdb = c_ldm.VMDB(raw[:len(c_ldm.VMDB)])
    if not len(c_ldm.VBLK_HEADER) + 8 <= vmdb.vblk_size <= 64 * 1024 or not 0 < vmdb.first_vblk < len(raw):
        raise DatabaseError(f"the VMDB is damaged: its VBLK size is {vmdb.vblk_size} bytes from offset "
                            f"{vmdb.first_vblk} (Windows writes 128 from 512)")
    try:
        records = parse_vblks(raw[vmdb.first_vblk:], vmdb.vblk_size, vmdb.first_vblk // vmdb.vblk_size)
    except RecordError as err:
        raise DatabaseError(str(err)) from None
    counts = [("volume", len(records.volumes), vmdb.num_committed_volume_vblk),
              ("component", len(records.components), vmdb.num_committed_component_vblk),
              ("partition", len(records.partitions), vmdb.num_committed_partition_vblk),
              ("disk", len(records.disks), vmdb.num_committed_disk_vblk)]
    for kind, found, expected in counts:
        if found != expected:
            raise DatabaseError(f"the VMDB counts {expected} {kind} record(s) but the VBLKs hold {found}")
    return vmdb, records


def _layout(volume, comps: list, parts: list) -> str:
    """How ldmtool (libldm) names the volume's layout."""
    if any(c.type == RAID for c in comps):
        return "raid5"
    if any(c.type == STRIPED for c in comps):
        return "striped"
    if len(comps) > 1:
        return "mirrored"
    return "spanned" if len(parts) > 1 else "simple"


def build(head, records: Records) -> Database:
    """The database's volumes mapped onto this disk, every link between records checked."""
    disks = {d.id: d for d in records.disks}
    comps = {c.id: c for c in records.components}
    vols = {v.id: v for v in records.volumes}
    for p in records.partitions:
        if p.disk_id not in disks:
            raise DatabaseError(f"partition record {p.name!r} names disk id {p.disk_id}, which has no disk record")
        if p.component_id not in comps:
            raise DatabaseError(f"partition record {p.name!r} names component id {p.component_id}, which has no "
                                f"component record")
    for c in records.components:
        if c.volume_id not in vols:
            raise DatabaseError(f"component record {c.name!r} names volume id {c.volume_id}, which has no volume "
                                f"record")
        found = sum(1 for p in records.partitions if p.component_id == c.id)
        if found != c.partitions:
            raise DatabaseError(f"component record {c.name!r} has {c.partitions} partition(s), {found} name it")
    disk_guid = _guid(head.disk_guid, "disk GUID")
    this = next((d for d in records.disks if d.guid == disk_guid), None)
    if this is None:
        raise DatabaseError(f"this disk ({disk_guid}) is not among the disk group's disk records")
    group = records.group_name or head.disk_group_name.split(b"\x00")[0].decode("utf-8", "replace")
    db = Database(group, _guid(head.disk_group_guid, "disk group GUID"), disk_guid, this.name,
                  head.logical_disk_start, head.logical_disk_size, head.config_start, head.config_size,
                  [(d.name, d.guid) for d in records.disks], [], [])
    for v in records.volumes:
        vcomps = [c for c in records.components if c.volume_id == v.id]
        if len(vcomps) != v.components:
            raise DatabaseError(f"volume record {v.name!r} has {v.components} component(s), {len(vcomps)} name it")
        parts = [p for c in vcomps for p in records.partitions if p.component_id == c.id]
        layout = _layout(v, vcomps, parts)
        on = sorted({disks[p.disk_id].name for p in parts})
        vol = DynamicVolume(v.name, layout, v.size * SECTOR, v.guid, v.hint, v.partition_type, disks=on,
                            partitions=[(p.name, p.start, p.size, disks[p.disk_id].name) for p in parts])
        vol.why = _why_not(vol, vcomps, parts, this.id, db)
        runs = parts
        if vol.layout == "mirrored" and not vol.why:
            vol.why, runs = _mirror_plex(vol, v, vcomps, parts, this.id, db, disks)
        if not vol.why:
            vol.extents = [((db.data_start + p.start) * SECTOR, p.size * SECTOR)
                           for p in sorted(runs, key=lambda p: p.volume_offset)]
        db.volumes.append(vol)
    return db


def _why_not(vol: DynamicVolume, comps: list, parts: list, this: int, db: Database) -> str:
    """Why the volume cannot be read from this disk's copy; "" when it can."""
    others = [name for name in vol.disks if name != db.disk_name]
    listing = ", ".join(f"{name}{' (this disk)' if name == db.disk_name else ''}" for name in vol.disks)
    elsewhere = ELSEWHERE.format(group=db.group_name, disks=", ".join(name for name, _ in db.disks))
    if not parts:
        return f"volume '{vol.name}' has no partitions in the LDM database"
    if all(p.disk_id != this for p in parts):
        return f"volume '{vol.name}' is on disk {listing} of disk group '{db.group_name}', not on this disk"
    if vol.layout == "striped":
        chunk = comps[0].chunk_size * SECTOR // 1024
        return (f"volume '{vol.name}' is striped over disks {listing} ({chunk} KiB stripes): its data alternates "
                f"between the disks, so {elsewhere}")
    if vol.layout == "raid5":
        return (f"volume '{vol.name}' is RAID-5 over disks {listing}: its data and parity are spread over them, "
                f"so {elsewhere}")
    if vol.layout == "mirrored":
        return ""  # each plex is a whole copy: _mirror_plex looks for one on this disk
    if others:
        return (f"volume '{vol.name}' is spanned over disks {listing}: its part on {', '.join(others)} is not in "
                f"this disk's copy, so {elsewhere}")
    return _runs_why(vol, parts, db)


def _runs_why(vol: DynamicVolume, parts: list, db: Database) -> str:
    """Why the partitions (all on this disk) do not make up the whole volume, one after the other; "" when they
    do."""
    at = 0
    for p in sorted(parts, key=lambda p: p.volume_offset):
        if p.volume_offset != at:
            return (f"volume '{vol.name}': its partition {p.name!r} starts at sector {p.volume_offset} of the "
                    f"volume, where the partitions before it end at {at} (a damaged LDM database)")
        if p.start + p.size > db.data_size:
            return (f"volume '{vol.name}': its partition {p.name!r} (sectors {p.start}+{p.size}) runs past this "
                    f"disk's LDM data area ({db.data_size} sectors; a damaged LDM database)")
        at += p.size
    if at * SECTOR < vol.size:
        return f"volume '{vol.name}' is {vol.size} bytes but its partitions hold {at * SECTOR} (a damaged LDM database)"
    return ""


def _mirror_plex(vol: DynamicVolume, record, comps: list, parts: list, this: int, db: Database,
                 disks: dict) -> tuple[str, list]:
    """A mirrored volume: (why not, []) or ("", the partitions of the plex read). Each plex (component) is a whole
    copy of the volume; the one on this disk is read alone when all its partitions are here, follow each other
    from the volume's start to its end, and this disk's database says the volume and that plex are CURRENT."""
    listing = ", ".join(f"{name}{' (this disk)' if name == db.disk_name else ''}" for name in vol.disks)
    whole = f"volume '{vol.name}' is mirrored over disks {listing}"
    why = ""
    for comp in comps:
        plex = [p for p in parts if p.component_id == comp.id]
        if all(p.disk_id != this for p in plex):
            continue
        away = sorted({disks[p.disk_id].name for p in plex if p.disk_id != this})
        others = sorted({disks[p.disk_id].name for p in parts if p.component_id != comp.id and p.disk_id != this})
        if away:
            why = why or (f"{whole}: its plex '{comp.name}' on this disk continues on {', '.join(away)} (the plex is "
                          f"itself spanned), so " + ELSEWHERE.format(group=db.group_name,
                                                                     disks=", ".join(n for n, _ in db.disks)))
            continue
        damaged = _runs_why(vol, plex, db)
        if damaged:
            why = why or damaged
            continue
        if record.state != CURRENT or comp.state != CURRENT:
            said = " and ".join(([f"its plex '{comp.name}' on this disk is in state '{comp.state}'"]
                                 if comp.state != CURRENT else [])
                                + ([f"the volume is in state '{record.state}'"] if record.state != CURRENT else []))
            why = why or STALE.format(whole=whole, said=said, other=", ".join(others) or "another disk",
                                      group=db.group_name)
            continue
        vol.plex = comp.name
        rest = ", ".join(f"'{c.name}'" for c in comps if c.id != comp.id)
        rest += f" on {', '.join(others)}" if others else ""
        plural = len(comps) > 2
        vol.note = (f"dynamic disk: {whole}: read its plex '{comp.name}' on this disk, which this disk's LDM database "
                    f"says is current (volume and plex {CURRENT}); the other plex{'es' if plural else ''} ({rest}) "
                    f"{'are' if plural else 'is'} not read. A disk that dropped out of the mirror keeps its database "
                    f"as it was then: if the dump is older than the crash, collect from "
                    f"{', '.join(others) or 'the other disk'} instead")
        return "", plex
    return why, []


def read_database(read: Read, size: int, at: object, scheme: str) -> Database:
    """The dynamic disk's LDM database, its volumes mapped onto this disk. Raises DatabaseError."""
    head, notes = find_privhead(read, size, at, scheme)
    try:
        _, records = read_records(read, head)
    except EOFError as err:  # cstruct on a short read
        raise DatabaseError(f"the database is cut short ({err})") from None
    db = build(head, records)
    db.notes = notes
    return db


def is_container(type_name: str) -> bool:
    """Whether a partition of the table is one of a dynamic disk's own (MBR type 0x42, GPT LDM metadata or LDM
    data): it holds the database or the volumes' space, not a filesystem. A volume that starts where the data
    area does puts its boot sector at the data partition's start, but only the LDM volume reads it right."""
    from scripts.windisk.gpt import LDM_DATA, LDM_METADATA
    from scripts.windisk.mbr import LDM_DYNAMIC, type_name as name_of

    return type_name in {name_of(LDM_DYNAMIC), name_of(LDM_DATA), name_of(LDM_METADATA)}


def read_ldm(read: Read, size: int, at: object, scheme: str, notes: list[str], first_number: int = 1
             ) -> tuple[list[LdmEntry], list[str]]:
    """The readable volumes of the dynamic disk (numbered from `first_number`, after the table's partitions),
    and the notes: volumes that cannot be read from this disk and why, or why the database cannot be read.
    `at`: the start LBA of the MBR's type 0x42 entry, or (offset, size) of the GPT LDM metadata partition."""
    where = " metadata partition on GPT" if scheme == "gpt" else ", MBR partition type 0x42"
    from scripts.base.errors import first_line
    from scripts.windisk.errors import damaged

    try:
        db = read_database(read, size, at, scheme)
    except damaged() as err:  # DatabaseError (a ValueError), and what cstruct raises on bytes cut short
        return [], notes + [DAMAGED.format(where=where, why=first_line(err))]
    entries: list[LdmEntry] = []
    notes = notes + db.notes
    for vol in db.volumes:
        if vol.why:
            notes.append(f"dynamic disk: {vol.why}")
            continue
        runs = f"{len(vol.extents)} extents" if len(vol.extents) > 1 else ""  # Windows: still a simple volume
        kind = (f"LDM mirrored volume (plex '{vol.plex}'{', ' + runs if runs else ''})" if vol.plex
                else f"LDM simple volume{f' ({runs})' if runs else ''}")
        entries.append(LdmEntry(first_number + len(entries), vol.extents[0][0], sum(n for _, n in vol.extents),
                                kind, vol.name, tuple(vol.extents)))
        if vol.note:
            notes.append(vol.note)
    if not db.volumes:
        notes.append(f"the dynamic disk's LDM database (disk group '{db.group_name}') lists no volumes")
    return entries, notes
