"""Dynamic disks (LDM), read over real images (issue #15, item 3).

The images are built by scripts.devkit.ldmdisk to the documented on-disk format (MBR type 0x42 and GPT with LDM
metadata/data partitions; PRIVHEAD, TOCBLOCK, VMDB, VBLKs) around a Windows NTFS volume made with mkntfs and
ntfs-3g (a SYSTEM hive and a MEMORY.DMP, by gptdisk). Each is read back by an independent reader, Debian's
ldmtool (libldm), which reads image files directly (`ldmtool -d <image> show ...`; only `create`, which maps
volumes with device-mapper, needs a block device), and its view of the disk group, disks, volumes and
partitions must equal ours. Then snapshot-export's disk reader (extract.inspect_disk over scripts.base.rangeio,
as test_layouts.py) must find the Windows volume on the dynamic disk and give the dump's bytes as written.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from scripts.base.errors import ExitCode
from scripts.base.rangeio import open_source
from scripts.devkit import gptdisk, ldmdisk
from scripts.devkit.ldmdisk import Piece, VolumeSpec
from scripts.windisk import extract, gpt, ldm, mbr
from scripts.windisk.errors import ExtractError

pytestmark = pytest.mark.skipif(gptdisk.can_build() is not None, reason=str(gptdisk.can_build()))
needs_ldmtool = pytest.mark.skipif(shutil.which("ldmtool") is None,
                                   reason="ldmtool (Debian package ldmtool) is not installed")

SECTOR = 512
MiB = 1 << 20
DUMP = "Windows/MEMORY.DMP"
LONG_NAME = "Data volume restored from the old file server, kept on the OS disk for now"  # > one VBLK entry


# ---- the two readers' views ------------------------------------------------------------------------------
def _ldmtool(path: Path, *args: str) -> tuple[object, str]:
    done = subprocess.run(["ldmtool", "-d", str(path), *args], capture_output=True, text=True, timeout=60)
    return (json.loads(done.stdout) if done.stdout.strip() else None), done.stderr


def ldmtool_view(path: Path) -> dict:
    """The disk group on the image as ldmtool shows it: disks, volumes and their partitions (sectors)."""
    (guid,), _ = _ldmtool(path, "scan")
    group, _ = _ldmtool(path, "show", "diskgroup", guid)
    view = {"group": group["name"], "guid": guid, "disks": {}, "volumes": {}}
    for name in group["disks"]:
        disk, _ = _ldmtool(path, "show", "disk", guid, name)
        view["disks"][name] = {k: disk.get(k) for k in ("guid", "present", "data-start", "data-size",
                                                         "metadata-start", "metadata-size")}
    for name in group["volumes"]:
        vol, _ = _ldmtool(path, "show", "volume", guid, name)
        parts = []
        for part in vol["partitions"]:
            shown, _ = _ldmtool(path, "show", "partition", guid, part)
            parts.append((shown["name"], shown["start"], shown["size"], shown["disk"]))
        view["volumes"][name] = {"type": vol["type"].lower(), "size": vol["size"], "hint": vol.get("hint"),
                                 "guid": vol["guid"], "partitions": sorted(parts)}
    return view


def _read(path: Path):
    f = open(path, "rb")
    return f, lambda offset, length: (f.seek(offset), f.read(length))[1]


def our_database(path: Path, size: int | None = None) -> ldm.Database:
    f, read = _read(path)
    with f:
        size = size or path.stat().st_size
        table = mbr.parse(read(0, SECTOR))
        if any(e.type == mbr.GPT_PROTECTIVE for e in table.entries):
            scheme, (_, _, at) = "gpt", gpt.read_gpt(read, size)
        else:
            scheme, (_, _, at) = "mbr", mbr.read_mbr(read, size)
        return ldm.read_database(read, size, at, scheme)


def our_view(db: ldm.Database, present: set[str]) -> dict:
    """Our database in ldmtool's terms (sizes in sectors; only this disk's placement is known to either)."""
    disks = {}
    for name, guid in db.disks:
        here = name in present
        disks[name] = {"guid": str(guid), "present": here,
                       "data-start": db.data_start if here else None, "data-size": db.data_size if here else None,
                       "metadata-start": db.config_start if here else None,
                       "metadata-size": db.config_size if here else None}
    volumes = {v.name: {"type": v.layout, "size": v.size // SECTOR, "hint": v.hint or None, "guid": str(v.guid),
                        "partitions": sorted(v.partitions)} for v in db.volumes}
    return {"group": db.group_name, "guid": str(db.group_guid), "disks": disks, "volumes": volumes}


def _inspect(path: Path) -> extract.DiskFindings:
    with open_source(str(path), block_size=64 * 1024) as reader:
        return extract.inspect_disk(reader)


# ---- images ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    """A Windows NTFS volume (a file holding its bytes) with a SYSTEM hive and a fragmented MEMORY.DMP, its size
    in MiB, and the dump's original bytes."""
    work = tmp_path_factory.mktemp("ldm")
    volume, built = ldmdisk.windows_volume(work)
    return volume, volume.stat().st_size // MiB, built.originals[DUMP].read_bytes()


@pytest.fixture(scope="module")
def mbr_disk(windows, tmp_path_factory):
    """Generation 1, dynamic: Volume1 (C:, Windows) in one piece, then a data volume with a long name."""
    volume, mib, _ = windows
    path = tmp_path_factory.mktemp("ldm-mbr") / "dynamic-mbr.img"
    return ldmdisk.build_dynamic_disk(path, [VolumeSpec("Volume1", (Piece(0, mib),), content=volume, hint="C:"),
                                             VolumeSpec(LONG_NAME, (Piece(mib, 8),), hint="D:")],
                                      scheme="mbr", data_mib=mib + 16)


def _split_in_the_dump(volume: Path) -> int:
    """A byte offset of the volume inside the middle one of MEMORY.DMP's data runs: a volume cut there has the dump
    in both pieces, and one of its runs across the cut."""
    from dissect.ntfs import NTFS

    with open(volume, "rb") as f:
        ntfs = NTFS(f)
        runs = [(lcn, count) for lcn, count in ntfs.mft.get(DUMP).dataruns() if lcn is not None and count > 1]
        lcn, count = runs[len(runs) // 2]
        return (lcn + count // 2) * ntfs.cluster_size


@pytest.fixture(scope="module")
def gpt_split_disk(windows, tmp_path_factory):
    """Generation 2, dynamic, exported as a fixed VHD: the Windows volume was extended, so it is two pieces with a
    data volume between them (Windows still calls it a simple volume; libldm a spanned one)."""
    volume, mib, _ = windows
    split = _split_in_the_dump(volume) / MiB
    path = tmp_path_factory.mktemp("ldm-gpt") / "dynamic-gpt.vhd"
    return ldmdisk.build_dynamic_disk(path, [VolumeSpec("Volume1", (Piece(0, split), Piece(16, mib - split)),
                                                        content=volume, hint="C:"),
                                             VolumeSpec("Volume2", (Piece(8, 8),))],
                                      scheme="gpt", data_mib=mib + 24, vhd_footer=True)


@pytest.fixture(scope="module")
def foreign_disk(windows, tmp_path_factory):
    """Disk1 of a three-disk group: the Windows volume spanned onto Disk2, a striped volume, a mirrored one whose
    plex here continues on Disk2 (its other plex on Disk3), a RAID-5 volume over the group's disks, and a volume
    only on Disk3."""
    volume, mib, _ = windows
    path = tmp_path_factory.mktemp("ldm-foreign") / "disk1.img"
    specs = [VolumeSpec("Volume1", (Piece(0, 16), Piece(0, mib, disk=1)), content=volume, hint="C:"),
             VolumeSpec("Volume2", (Piece(16, 4), Piece(mib, 4, disk=1)), layout="striped"),
             VolumeSpec("Volume3", (Piece(20, 4, plex=0), Piece(mib + 4, 4, disk=1, plex=0),
                                    Piece(12, 8, disk=2, plex=1)), layout="mirrored"),
             VolumeSpec("Volume4", (Piece(24, 4), Piece(mib + 8, 4, disk=1), Piece(0, 4, disk=2)), layout="raid5"),
             VolumeSpec("Volume5", (Piece(4, 8, disk=2),))]
    return ldmdisk.build_dynamic_disk(path, specs, scheme="mbr", data_mib=32, disks=("Disk1", "Disk2", "Disk3"))


# ---- read back by ldmtool --------------------------------------------------------------------------------
@needs_ldmtool
@pytest.mark.parametrize("image", ["mbr_disk", "gpt_split_disk", "foreign_disk"])
def test_ldmtool_reads_the_disk_group_as_we_do(image, request):
    built = request.getfixturevalue(image)
    theirs = ldmtool_view(built.path)
    db = our_database(built.path, built.size)
    assert our_view(db, {built.disk_names[0]}) == theirs
    assert theirs["guid"] == str(built.group_guid) and theirs["group"] == built.group_name
    assert set(theirs["volumes"]) == set(built.volumes)


@needs_ldmtool
def test_the_layouts_are_the_ones_ldmtool_names(mbr_disk, gpt_split_disk, foreign_disk):
    def types(built) -> dict[str, str]:
        return {name: v["type"] for name, v in ldmtool_view(built.path)["volumes"].items()}

    assert types(mbr_disk) == {"Volume1": "simple", LONG_NAME: "simple"}
    assert types(gpt_split_disk) == {"Volume1": "spanned", "Volume2": "simple"}  # two pieces: libldm says spanned
    assert types(foreign_disk) == {"Volume1": "spanned", "Volume2": "striped", "Volume3": "mirrored",
                                   "Volume4": "raid5", "Volume5": "simple"}


# ---- snapshot-export's reader ----------------------------------------------------------------------------
def _dump_read_back(found: extract.DiskFindings, path: Path) -> bytes:
    (dump,) = [d for d in found.dumps if d.kind == "memory"]
    with open_source(str(path)) as reader:
        return dump.file.read(reader, 0, dump.file.size)


def test_the_windows_volume_of_an_mbr_dynamic_disk_is_found_and_its_dump_read(windows, mbr_disk):
    _, _, original = windows
    found = _inspect(mbr_disk.path)
    (run,) = mbr_disk.volumes["Volume1"]
    v = found.volume
    assert (found.scheme, v.name, v.type, v.offset, v.size, v.extents) == ("mbr", "Volume1", "LDM simple volume",
                                                                          run[0], run[1], ())
    assert _dump_read_back(found, mbr_disk.path) == original
    (dump,) = [d for d in found.dumps if d.kind == "memory"]
    assert all(run[0] <= e.disk_offset and e.disk_offset + e.length <= run[0] + run[1]
               for e in dump.file.extents if not e.zero)
    names = [p["name"] for p in found.partitions]
    assert names[:2] == ["", "Volume1"] and found.notes == []


def test_a_windows_volume_in_two_pieces_of_a_gpt_dynamic_disk_maps_the_dump_onto_both(windows, gpt_split_disk):
    """The dump's extents name real disk offsets in the volume's two pieces (what the server-side copy reads), and
    read from the disk through them the dump is byte for byte what was written."""
    _, _, original = windows
    found = _inspect(gpt_split_disk.path)
    v = found.volume
    runs = gpt_split_disk.volumes["Volume1"]
    assert (found.scheme, v.name, v.type, v.extents) == ("gpt", "Volume1", "LDM simple volume (2 extents)", runs)
    assert v.to_dict()["size"] == sum(n for _, n in runs) and v.to_dict()["extents"][1]["offset"] == runs[1][0]
    assert _dump_read_back(found, gpt_split_disk.path) == original
    (dump,) = [d for d in found.dumps if d.kind == "memory"]
    placed = [next(i for i, (at, n) in enumerate(runs) if at <= e.disk_offset and e.disk_offset + e.length <= at + n)
              for e in dump.file.extents if not e.zero]
    assert placed == sorted(placed) and set(placed) == {0, 1}  # each extent inside one piece, the dump in both
    assert dump.file.extents[placed.index(1)].disk_offset == runs[1][0]  # the run cut in two: piece 2 from its start


def test_volumes_not_on_this_disk_alone_are_named_with_why_and_how_to_collect(foreign_disk):
    """The Windows volume spanned onto another disk: its boot sector is on this disk, but half a filesystem is not
    read; the error lists every volume that one disk's copy cannot give, and the rescue-vm way."""
    with pytest.raises(ExtractError) as caught:
        _inspect(foreign_disk.path)
    err = caught.value
    assert err.exit_code == ExitCode.DISK_NOT_FOUND
    message = err.message
    assert ("volume 'Volume1' is spanned over disks Disk1 (this disk), Disk2: its part on Disk2 is not in this "
            "disk's copy") in message
    assert "volume 'Volume2' is striped over disks Disk1 (this disk), Disk2 (64 KiB stripes)" in message
    assert ("volume 'Volume3' is mirrored over disks Disk1 (this disk), Disk2, Disk3: its plex 'Volume3-01' on this "
            "disk continues on Disk2 (the plex is itself spanned)") in message
    assert "volume 'Volume4' is RAID-5 over disks Disk1 (this disk), Disk2, Disk3" in message
    assert "volume 'Volume5' is on disk Disk3 of disk group 'CRASHCART-Dg0', not on this disk" in message
    assert message.count('repair.strategy = "rescue-vm" with copies of every disk of disk group '
                         "'CRASHCART-Dg0' (Disk1, Disk2, Disk3)") == 4
    assert "Import Foreign Disks" in message and "Traceback" not in message


# ---- damaged databases -----------------------------------------------------------------------------------
def _damaged_copy(built, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    shutil.copyfile(built.path, path)
    return path


def _find(path: Path, start: int, needle: bytes) -> int:
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(MiB)
    return start + data.index(needle)


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_damaged_vmdb_is_a_clear_note(mbr_disk, tmp_path):
    path = _damaged_copy(mbr_disk, tmp_path, "vmdb.img")
    vmdb = _find(path, mbr_disk.config_start * SECTOR, b"VMDB")
    _patch(path, vmdb, b"\0\0\0\0")
    if shutil.which("ldmtool"):  # the independent reader refuses it too
        assert "VMDB" in _ldmtool(path, "scan", str(path))[1]
    with pytest.raises(ExtractError) as caught:
        _inspect(path)
    message = caught.value.message
    assert (f"dynamic disk (LDM, MBR partition type 0x42) whose LDM database cannot be read: no VMDB at sector "
            f"{vmdb // SECTOR} (where the TOCBLOCK puts the config region)") in message
    assert 'repair.strategy = "rescue-vm"' in message and "Import Foreign Disks" in message


def test_a_damaged_vblk_is_a_clear_note_naming_the_record(mbr_disk, tmp_path):
    """The first partition record's size field claims 9 bytes (a number is at most 8)."""
    path = _damaged_copy(mbr_disk, tmp_path, "vblk.img")
    with open(path, "rb") as f:
        f.seek(mbr_disk.config_start * SECTOR)
        db = f.read(MiB)
    entry = next(m.start() for m in re.finditer(b"VBLK", db) if db[m.start() + 0x13] == 0x33)
    fields = entry + 0x18
    at = fields + 1 + db[fields]  # past the id
    at += 1 + db[at] + 12 + 16  # past the name, zeroes, commit id, start and volume offset: the size's length
    _patch(path, mbr_disk.config_start * SECTOR + at, b"\x09")
    if shutil.which("ldmtool"):
        assert "Found 9 byte integer for size:partition" in _ldmtool(path, "scan", str(path))[1]
    with pytest.raises(ExtractError) as caught:
        _inspect(path)
    message = caught.value.message
    seq = struct.unpack_from(">I", db, entry + 4)[0]
    assert f"whose LDM database cannot be read: the partition record in VBLK {seq} " in message
    assert "has a 9-byte number for its size (at most 8)" in message and "Import Foreign Disks" in message


def test_a_damaged_primary_privhead_is_read_from_its_copy_in_the_database(windows, mbr_disk, tmp_path):
    """Windows keeps PRIVHEAD copies in the database (ldmtool reads only sector 6 and gives up)."""
    _, _, original = windows
    path = _damaged_copy(mbr_disk, tmp_path, "privhead.img")
    _patch(path, 6 * SECTOR, bytes(SECTOR))
    found = _inspect(path)
    assert found.volume.name == "Volume1" and _dump_read_back(found, path) == original
    (note,) = found.notes
    assert f"PRIVHEAD at sector 6 is damaged (no PRIVHEAD at sector 6): read its copy at sector " \
           f"{mbr_disk.config_start + 1856}" in note


def test_a_vmdb_whose_counts_disagree_with_its_vblks_is_refused(mbr_disk, tmp_path):
    path = _damaged_copy(mbr_disk, tmp_path, "counts.img")
    vmdb = _find(path, mbr_disk.config_start * SECTOR, b"VMDB")
    _patch(path, vmdb + 133, struct.pack(">I", 3))  # committed volume records: 3 (there are 2)
    with pytest.raises(ExtractError, match="the VMDB counts 3 volume record.s. but the VBLKs hold 2"):
        _inspect(path)
