"""Every layout an Azure Windows OS disk has, read over real images (issue #15, item 3).

One Windows NTFS volume (mkntfs + ntfs-3g, a SYSTEM hive from hivebuilder) is built once and placed in each
layout: a GPT disk whose primary table is damaged with dd and seen damaged by sgdisk (gdisk), so only the
backup copy holds the partitions; an MBR disk whose Windows volume is a logical partition of an extended
one, its EBR chain checked against the partitions gdisk and util-linux's libblkid (partx) read from the same
image; EBR chains that loop. Every image is read through scripts.base.rangeio, as the export reads a SAS URL.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from scripts.base.errors import ExitCode
from scripts.base.rangeio import open_source
from scripts.devkit import gptdisk
from scripts.windisk import extract
from scripts.windisk.errors import ExtractError

pytestmark = pytest.mark.skipif(gptdisk.can_build() is not None, reason=str(gptdisk.can_build()))

SECTOR = 512
MiB = 1 << 20


def _inspect(path: Path) -> extract.DiskFindings:
    with open_source(str(path), block_size=64 * 1024) as reader:
        return extract.inspect_disk(reader)


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    """A Generation 2 disk (ESP, MSR, Windows, Recovery) and the bytes of its Windows NTFS volume."""
    from scripts.devkit import hivebuilder

    work = tmp_path_factory.mktemp("layouts")
    hive = hivebuilder.system_hive()

    def populate(mount: Path) -> None:
        gptdisk.write_file(mount, "Windows/System32/config/SYSTEM", hive)
        gptdisk.write_file(mount, "Windows/MEMORY.DMP", b"PAGEDU64" + bytes(256 * 1024 - 8))

    image = gptdisk.build_windows_disk(work / "gpt.img", windows_mib=40, populate=populate)
    with open(image.path, "rb") as f:
        f.seek(image.windows_offset)
        volume = f.read(image.windows_size)
    return image, volume


def _copy(image, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    shutil.copyfile(image.path, path)
    return path


def _dd(path: Path, lba: int, data: bytes) -> None:
    """Writes `data` at sector `lba` with dd (conv=notrunc), as a stray write to the device would."""
    src = path.with_suffix(".patch")
    src.write_bytes(data)
    subprocess.run(["dd", f"if={src}", f"of={path}", "bs=512", f"seek={lba}", "conv=notrunc", "status=none"],
                   check=True)


def _sgdisk_verify(path: Path) -> str:
    done = subprocess.run(["sgdisk", "-v", str(path)], capture_output=True, text=True)
    return done.stdout + done.stderr


needs_sgdisk = pytest.mark.skipif(shutil.which("sgdisk") is None, reason="sgdisk (Debian package gdisk) not installed")


# -- GPT: the backup table ------------------------------------------------------------------------------------
@needs_sgdisk
def test_a_gpt_whose_primary_header_is_zeroed_is_read_from_the_backup(windows, tmp_path):
    image, _ = windows
    path = _copy(image, tmp_path, "zeroed-header.img")
    assert "No problems found" in _sgdisk_verify(path)
    _dd(path, 1, bytes(SECTOR))  # the primary header
    report = _sgdisk_verify(path)
    assert re.search(r"Main header: ERROR", report) and re.search(r"Backup header: OK", report), report
    found = _inspect(path)
    assert found.scheme == "gpt" and found.volume.number == 3 and found.volume.offset == image.windows_offset
    assert found.volume.size == image.windows_size
    assert [p["name"] for p in found.partitions][:3] == ["EFI system partition", "Microsoft reserved partition",
                                                         "Basic data partition"]
    (note,) = [n for n in found.notes if "backup GPT" in n]
    last_lba = image.size // SECTOR - 1
    assert "primary GPT (LBA 1): no 'EFI PART' signature" in note and f"backup GPT at LBA {last_lba}" in note


@needs_sgdisk
def test_a_gpt_whose_primary_entries_are_overwritten_is_read_from_the_backup_of_a_grown_disk(windows, tmp_path):
    """The disk was grown after it was partitioned (as resizing an Azure OS disk does): its backup table is at the
    old end, which the primary header names; the primary entry array was overwritten (its CRC no longer matches)."""
    image, _ = windows
    path = _copy(image, tmp_path, "grown.img")
    with open(path, "r+b") as f:
        f.truncate(image.size + 64 * MiB)
    garbage = b"\x5a" * (4 * 128)  # the first four entries: ESP, MSR, Windows, Recovery
    _dd(path, 2, garbage)
    report = _sgdisk_verify(path)
    assert "Main partition table: ERROR" in report or "CRC" in report, report
    found = _inspect(path)
    assert found.volume.number == 3 and found.volume.offset == image.windows_offset
    (note,) = [n for n in found.notes if "backup GPT" in n]
    assert "partition entry array" in note and f"LBA {image.size // SECTOR - 1}" in note


def test_a_gpt_damaged_in_both_copies_is_refused_naming_the_primary_damage(windows, tmp_path):
    """The checks of issue #13 (an entry size of 1, counts in the billions) now hold for both copies: the backup
    with the same impossible field is refused too, and the message names the primary's."""
    image, _ = windows
    path = _copy(image, tmp_path, "both.img")
    last_lba = image.size // SECTOR - 1
    with open(path, "r+b") as f:
        for lba in (1, last_lba):
            f.seek(lba * SECTOR + 84)
            f.write(struct.pack("<I", 1))
    with pytest.raises(ExtractError) as caught:
        _inspect(path)
    err = caught.value
    assert err.exit_code == ExitCode.DISK_NOT_FOUND and "no partition table crashcart can read" in err.message
    assert "primary GPT (LBA 1): the GPT header is corrupt: its partition entry size is 1 " in err.message
    assert f"no valid backup: backup GPT (LBA {last_lba})" in err.message


# -- MBR: logical partitions --------------------------------------------------------------------------------
def _mbr_entry(boot: int, kind: int, start: int, sectors: int) -> bytes:
    return struct.pack("<B3sB3sII", boot, b"\xfe\xff\xff", kind, b"\xfe\xff\xff", start, sectors)


def _sector(entries: list[bytes], signature: int = 0) -> bytes:
    sector = bytearray(SECTOR)
    if signature:
        struct.pack_into("<I", sector, 440, signature)
    for i, entry in enumerate(entries):
        sector[446 + 16 * i:462 + 16 * i] = entry
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def _extended_disk(path: Path, volume: bytes, *, loop: str | None = None) -> dict[int, int]:
    """An MBR disk as Windows' Disk Management leaves one with five volumes: System Reserved (primary 1), a
    data partition (primary 2), an extended partition (0x0F) holding three logical ones, the Windows volume
    the second of them. The EBRs are written to the MBR specification (each logical start relative to its
    EBR, each link relative to the extended partition). Returns {start sector: size in sectors} of every
    partition that holds data. `loop`: "self" makes the last EBR link to itself, "first" to the first EBR."""
    win = len(volume) // SECTOR
    layout = {2048: 8 * MiB // SECTOR, 2048 + 16384: 4 * MiB // SECTOR}
    ext = 2048 + 16384 + 8192
    logical = [(ext, 4 * MiB // SECTOR, 0x07), (None, win, 0x07), (None, 2 * MiB // SECTOR, 0x27)]
    ebrs, at = [], ext
    for i, (_, sectors, kind) in enumerate(logical):
        ebrs.append((at, sectors, kind))
        at += 2048 + sectors  # each logical partition 1 MiB after its EBR
    total = at + 2048
    with open(path, "wb") as f:
        f.truncate(total * SECTOR)
        f.write(_sector([_mbr_entry(0x80, 0x07, 2048, layout[2048]),
                         _mbr_entry(0, 0x07, 2048 + 16384, layout[2048 + 16384]),
                         _mbr_entry(0, 0x0F, ext, total - ext)], signature=0x5EC7C0DE))
        for i, (ebr, sectors, kind) in enumerate(ebrs):
            entries = [_mbr_entry(0, kind, 2048, sectors)]
            if i + 1 < len(ebrs):
                entries.append(_mbr_entry(0, 0x05, ebrs[i + 1][0] - ext, ebrs[i + 1][1] + 2048))
            elif loop == "self":
                entries.append(_mbr_entry(0, 0x05, ebr - ext, sectors + 2048))
            elif loop == "first":
                entries.append(_mbr_entry(0, 0x05, 0, sectors + 2048))
            f.seek(ebr * SECTOR)
            f.write(_sector(entries))
            layout[ebr + 2048] = sectors
        f.seek((ebrs[1][0] + 2048) * SECTOR)
        f.write(volume)
    return layout


def _gdisk_starts(path: Path) -> dict[int, int]:
    """{start sector: size in sectors} as gdisk reads the MBR (it converts it, logical partitions included, in
    memory: nothing is written)."""
    done = subprocess.run(["sgdisk", "-p", str(path)], capture_output=True, text=True, check=True)
    rows = re.findall(r"^\s+\d+\s+(\d+)\s+(\d+)\s", done.stdout, re.M)
    return {int(start): int(end) - int(start) + 1 for start, end in rows}


def _blkid_partitions(path: Path) -> dict[int, tuple[int, int]] | None:
    """{number: (start sector, size in sectors)} as util-linux's libblkid reads the image (partx --show), the
    extended container left out; None where partx is not installed."""
    if shutil.which("partx") is None:
        return None
    done = subprocess.run(["partx", "--show", "--noheadings", "-o", "NR,START,SECTORS,TYPE", str(path)],
                          capture_output=True, text=True, check=True)
    rows = [line.split() for line in done.stdout.splitlines()]
    return {int(nr): (int(start), int(sectors)) for nr, start, sectors, kind in rows if kind not in ("0x5", "0xf")}


@needs_sgdisk
def test_the_windows_volume_in_a_logical_partition_is_found(windows, tmp_path):
    image, volume = windows
    path = tmp_path / "extended.img"
    layout = _extended_disk(path, volume)
    assert _gdisk_starts(path) == layout  # an independent reader sees the same partitions
    blkid = _blkid_partitions(path)
    found = _inspect(path)
    assert found.scheme == "mbr" and found.volume.number == 6
    windows_start = sorted(layout)[3]
    assert found.volume.offset == windows_start * SECTOR and found.volume.size == len(volume)
    got = {p["offset"] // SECTOR: p["size"] // SECTOR for p in found.partitions}  # listed up to the Windows one
    assert got == {start: size for start, size in layout.items() if start <= windows_start}
    assert [p["partition"] for p in found.partitions] == [1, 2, 5, 6]
    assert not [n for n in found.notes if "EBR" in n or "partition" in n]
    if blkid is not None:  # a second independent reader, numbering included
        assert {n: blkid[n] for n in (1, 2, 5, 6)} == {p["partition"]: (p["offset"] // SECTOR, p["size"] // SECTOR)
                                                       for p in found.partitions}


@pytest.mark.parametrize("loop", ["self", "first"])
def test_an_ebr_chain_that_loops_is_read_once_and_noted(windows, tmp_path, loop):
    _, volume = windows
    path = tmp_path / f"loop-{loop}.img"
    _extended_disk(path, volume, loop=loop)
    found = _inspect(path)
    assert found.volume.number == 6
    assert [p["partition"] for p in found.partitions] == [1, 2, 5, 6]
    (note,) = [n for n in found.notes if "EBR chain" in n]
    assert "links back to the EBR at sector" in note and "read 3 logical partition(s) and stopped" in note


# -- dump files whose clusters are not their bytes ---------------------------------------------------------
def _data_attribute_flags_offset(image: Path, volume_offset: int, rel: str) -> int:
    """Where on the disk the flags of `rel`'s unnamed $DATA attribute header are (its MFT record read through
    dissect.ntfs; the MFT's first run holds the record on a fresh volume)."""
    from dissect.ntfs import NTFS
    from dissect.util.stream import RangeStream

    with open(image, "rb") as f:
        ntfs = NTFS(RangeStream(f, volume_offset, image.stat().st_size - volume_offset))
        record = ntfs.mft.get(rel)
        lcn, _ = next(iter(ntfs.mft.get(0).attributes.find("", 0x80)[0].header.dataruns()))
        at = volume_offset + lcn * ntfs.cluster_size + record.segment * ntfs._record_size
        f.seek(at)
        raw = f.read(ntfs._record_size)
    attr = struct.unpack_from("<H", raw, 0x14)[0]
    while struct.unpack_from("<I", raw, attr)[0] not in (0x80, 0xFFFFFFFF):
        attr += struct.unpack_from("<I", raw, attr + 4)[0]
    assert struct.unpack_from("<I", raw, attr)[0] == 0x80
    return at + attr + 0x0C


def test_a_compressed_dump_says_why_it_cannot_be_exported_and_what_collects_it():
    from scripts.windisk.ntfs import NotExportable, map_file

    disk = gptdisk.shared_disk("gpt-compressed")  # MEMORY.DMP written by ntfs-3g into a compressed folder
    with open_source(str(disk.image.path)) as reader, pytest.raises(NotExportable) as caught:
        map_file(extract.inspect_disk(reader).volume, "Windows/MEMORY.DMP")
    err = caught.value
    assert str(err) == "Windows/MEMORY.DMP is NTFS-compressed" and err.kind == "NTFS-compressed"
    assert "LZNT1" in err.why and "compression units" in err.why
    assert 'repair.strategy = "rescue-vm"' in err.todo and "decompresses" in err.todo and "compact /u" in err.todo
    assert err.explanation.startswith("Windows/MEMORY.DMP is NTFS-compressed (NTFS stores")


def test_an_efs_encrypted_dump_says_no_copy_can_decrypt_it_without_the_certificate(windows, tmp_path):
    """ntfs-3g cannot encrypt: the EFS flag (0x4000) is set on MEMORY.DMP's $DATA attribute header of a copy of a
    real image, as Windows sets it for a file in an encrypted folder."""
    from scripts.windisk.ntfs import NotExportable, map_file

    image, _ = windows
    path = _copy(image, tmp_path, "efs.img")
    flags_at = _data_attribute_flags_offset(path, image.windows_offset, "Windows/MEMORY.DMP")
    with open(path, "r+b") as f:
        f.seek(flags_at)
        flags = struct.unpack("<H", f.read(2))[0]
        f.seek(flags_at)
        f.write(struct.pack("<H", flags | 0x4000))
    with open_source(str(path)) as reader:
        found = extract.inspect_disk(reader)
        with pytest.raises(NotExportable) as caught:
            map_file(found.volume, "Windows/MEMORY.DMP")
    assert found.dumps == []
    assert found.skipped == [r"%SystemRoot%\MEMORY.DMP: Windows/MEMORY.DMP is EFS-encrypted"]
    err = caught.value
    assert "certificate" in err.why and "ciphertext" in err.why
    assert "Windows rescue VM" in err.todo and ".pfx" in err.todo and "cipher /d" in err.todo


# -- dynamic disks ------------------------------------------------------------------------------------------
def test_a_dynamic_disk_is_named_with_the_way_to_collect_from_it(windows, tmp_path):
    """An MBR dynamic disk (one type 0x42 entry over the disk; the volumes are in the LDM database, which is not
    read yet): the error says so and names the rescue-vm strategy, instead of only "no Windows volume"."""
    _, volume = windows
    path = tmp_path / "dynamic.img"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
        f.write(_sector([_mbr_entry(0, 0x42, 63, 64 * MiB // SECTOR - 63)], signature=0x5EC7C0DE))
        f.seek(2048 * SECTOR)
        f.write(volume[:SECTOR])
    with pytest.raises(ExtractError) as caught:
        _inspect(path)
    err = caught.value
    assert err.exit_code == ExitCode.DISK_NOT_FOUND and "dynamic disk (LDM, MBR partition type 0x42)" in err.message
    assert 'repair.strategy = "rescue-vm"' in err.message and "Import Foreign Disks" in err.message
