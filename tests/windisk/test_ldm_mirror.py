"""Dynamic disks (LDM) with a mirrored Windows volume, and BitLocker on a dynamic volume of two runs (issue #15,
item 3).

A dynamic-disk mirror of C: (an on-premises habit carried into migrated Azure VMs) keeps a whole copy of the
volume, a plex, on each disk of the mirror: the OS disk's plex is read alone, like a simple volume, when the
LDM database on the disk says it is current, and refused with what to do when it does not. The images are
built by scripts.devkit.ldmdisk to the documented format (the other disk's plex is named in the database, its
sectors are on a disk that is not in the image) and read back by Debian's ldmtool, whose view must equal ours.
The BitLocker volume is dissect.fve's real recovery-key volume holding our NTFS (tests/windisk/conftest.py),
laid on a dynamic disk as a volume Windows extended: two runs, the dump in both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scripts.base.errors import ExitCode
from scripts.base.rangeio import open_source
from scripts.devkit import gptdisk, ldmdisk
from scripts.devkit.ldmdisk import Piece, VolumeSpec
from scripts.windisk import disk, extract
from scripts.windisk.errors import ExtractError
from tests.windisk.conftest import bde_volume, plant_ntfs
from tests.windisk.test_ldm import (DUMP, MiB, _dump_read_back, _inspect, _split_in_the_dump, ldmtool_view,
                                    needs_ldmtool, our_database, our_view)

pytestmark = pytest.mark.skipif(gptdisk.can_build() is not None, reason=str(gptdisk.can_build()))


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    """A Windows NTFS volume (a file) with a SYSTEM hive and a fragmented MEMORY.DMP, its size in MiB, the dump."""
    volume, built = ldmdisk.windows_volume(tmp_path_factory.mktemp("ldm-mirror"), name="mirror")
    return volume, volume.stat().st_size // MiB, built.originals[DUMP].read_bytes()


def _mirror_mbr(windows, path: Path, *, state: str = "ACTIVE", plex_states: tuple[str, ...] = ()):
    """Disk1 of a two-disk group, Generation 1: C: mirrored, its first plex here in one piece, its second on
    Disk2; then a simple data volume."""
    volume, mib, _ = windows
    return ldmdisk.build_dynamic_disk(
        path, [VolumeSpec("Volume1", (Piece(0, mib, plex=0), Piece(0, mib, disk=1, plex=1)), layout="mirrored",
                          content=volume, hint="C:", state=state, plex_states=plex_states),
               VolumeSpec("Volume2", (Piece(mib, 8),), hint="D:")],
        scheme="mbr", data_mib=mib + 16, disks=("Disk1", "Disk2"))


@pytest.fixture(scope="module")
def mirror_mbr(windows, tmp_path_factory):
    return _mirror_mbr(windows, tmp_path_factory.mktemp("ldm-mirror-mbr") / "mirror-mbr.img")


@pytest.fixture(scope="module")
def mirror_gpt(windows, tmp_path_factory):
    """Disk2 of a two-disk group, Generation 2 as a fixed VHD: C:'s first plex is on Disk1; its second, here, was
    extended, so it is two pieces (the dump in both) with a data volume between them."""
    volume, mib, _ = windows
    split = _split_in_the_dump(volume) / MiB
    path = tmp_path_factory.mktemp("ldm-mirror-gpt") / "mirror-gpt.vhd"
    return ldmdisk.build_dynamic_disk(
        path, [VolumeSpec("Volume1", (Piece(0, mib, disk=1, plex=0), Piece(0, split, plex=1),
                                      Piece(16, mib - split, plex=1)), layout="mirrored", content=volume, hint="C:"),
               VolumeSpec("Volume2", (Piece(8, 8),))],
        scheme="gpt", data_mib=mib + 24, disks=("Disk2", "Disk1"), vhd_footer=True)


@needs_ldmtool
@pytest.mark.parametrize("image", ["mirror_mbr", "mirror_gpt"])
def test_ldmtool_reads_the_mirror_as_we_do(image, request):
    built = request.getfixturevalue(image)
    theirs = ldmtool_view(built.path)
    assert our_view(our_database(built.path, built.size), {built.disk_names[0]}) == theirs
    assert theirs["volumes"]["Volume1"]["type"] == "mirrored"
    here = sorted(p for p in theirs["volumes"]["Volume1"]["partitions"] if p[3] == built.disk_names[0])
    assert [(start, size) for _, start, size, _ in here] == sorted(
        ((at - built.data_start * 512) // 512, n // 512) for at, n in built.volumes["Volume1"])


def test_the_windows_volume_is_read_from_the_plex_on_this_disk(windows, mirror_mbr):
    _, _, original = windows
    found = _inspect(mirror_mbr.path)
    (run,) = mirror_mbr.volumes["Volume1"]
    v = found.volume
    assert (v.name, v.type, v.offset, v.size, v.extents) == ("Volume1", "LDM mirrored volume (plex 'Volume1-01')",
                                                            run[0], run[1], ())
    assert _dump_read_back(found, mirror_mbr.path) == original
    (note,) = found.notes
    assert ("volume 'Volume1' is mirrored over disks Disk1 (this disk), Disk2: read its plex 'Volume1-01' on this "
            "disk, which this disk's LDM database says is current (volume and plex ACTIVE); the other plex "
            "('Volume1-02' on Disk2) is not read") in note
    assert "collect from Disk2 instead" in note


def test_a_plex_of_two_pieces_second_in_the_database_maps_the_dump_onto_both(windows, mirror_gpt):
    _, _, original = windows
    found = _inspect(mirror_gpt.path)
    runs = mirror_gpt.volumes["Volume1"]
    v = found.volume
    assert (found.scheme, v.name, v.type, v.extents) == ("gpt", "Volume1",
                                                         "LDM mirrored volume (plex 'Volume1-02', 2 extents)", runs)
    assert _dump_read_back(found, mirror_gpt.path) == original
    (dump,) = [d for d in found.dumps if d.kind == "memory"]
    placed = {next(i for i, (at, n) in enumerate(runs) if at <= e.disk_offset and e.disk_offset + e.length <= at + n)
              for e in dump.file.extents if not e.zero}
    assert placed == {0, 1}
    assert any("plex 'Volume1-02' on this disk" in n and "('Volume1-01' on Disk1)" in n for n in found.notes)


@pytest.mark.parametrize("state, plex_states, said", [
    ("ACTIVE", ("STALE", "ACTIVE"), "its plex 'Volume1-01' on this disk is in state 'STALE'"),
    ("SYNC", ("ACTIVE", "ACTIVE"), "the volume is in state 'SYNC'"),
    ("ACTIVE", ("", "ACTIVE"), "its plex 'Volume1-01' on this disk is in state ''"),  # cannot tell: refused too
])
def test_a_plex_the_database_does_not_call_current_is_refused_with_what_to_do(windows, tmp_path, state,
                                                                             plex_states, said):
    built = _mirror_mbr(windows, tmp_path / "stale.img", state=state, plex_states=plex_states)
    if shutil.which("ldmtool"):  # the states are not the layout: ldmtool reads the same mirror
        assert ldmtool_view(built.path)["volumes"]["Volume1"]["type"] == "mirrored"
    with pytest.raises(ExtractError) as caught:
        _inspect(built.path)
    err = caught.value
    assert err.exit_code == ExitCode.DISK_NOT_FOUND
    assert (f"volume 'Volume1' is mirrored over disks Disk1 (this disk), Disk2, but this disk's LDM database says "
            f"{said}, not 'ACTIVE'") in err.message
    assert "snapshot-export the disk holding it (Disk2; source.os_disk_id = that disk)" in err.message
    assert "Remove Mirror" in err.message and "Import Foreign Disks" in err.message and "Traceback" not in err.message


def test_a_plex_here_that_continues_on_another_disk_is_refused(windows, tmp_path):
    volume, mib, _ = windows
    built = ldmdisk.build_dynamic_disk(
        tmp_path / "spanned-plex.img",
        [VolumeSpec("Volume1", (Piece(0, 16, plex=0), Piece(0, mib - 16, disk=1, plex=0),
                                Piece(0, mib, disk=2, plex=1)), layout="mirrored", content=volume, hint="C:")],
        scheme="mbr", data_mib=mib + 8, disks=("Disk1", "Disk2", "Disk3"))
    if shutil.which("ldmtool"):
        assert our_view(our_database(built.path, built.size), {"Disk1"}) == ldmtool_view(built.path)
    with pytest.raises(ExtractError) as caught:
        _inspect(built.path)
    message = caught.value.message
    assert ("volume 'Volume1' is mirrored over disks Disk1 (this disk), Disk2, Disk3: its plex 'Volume1-01' on this "
            "disk continues on Disk2 (the plex is itself spanned), so no single disk's copy holds it: collect with "
            'repair.strategy = "rescue-vm" with copies of every disk of disk group') in message


# ---- BitLocker on a dynamic volume of two runs ------------------------------------------------------------
@pytest.fixture(scope="module")
def bitlocker_ldm(bde_data, tmp_path_factory):
    """dissect.fve's real recovery-key BitLocker volume holding our NTFS, as an LDM simple volume Windows extended:
    two runs on a GPT dynamic disk, cut inside the dump, a data volume between them."""
    work = tmp_path_factory.mktemp("ldm-bde")
    plain, built = ldmdisk.windows_volume(work, name="plain", windows_mib=32)
    bde = bde_volume(bde_data, "recovery_key", "recovery_key")
    encrypted = plant_ntfs(bde, plain.read_bytes())
    whole, split = len(encrypted) / MiB, _split_in_the_dump(plain) / MiB
    image = ldmdisk.build_dynamic_disk(
        work / "bde-ldm.img", [VolumeSpec("Volume1", (Piece(0, split), Piece(40, whole - split)), content=encrypted,
                                          hint="C:"), VolumeSpec("Volume2", (Piece(32, 8),))],
        scheme="gpt", data_mib=int(40 + whole - split) + 2)
    return image, bde, built.originals[DUMP].read_bytes()


def test_bitlocker_on_a_dynamic_volume_of_two_runs_is_unlocked_and_its_dump_read(bitlocker_ldm):
    image, bde, original = bitlocker_ldm
    runs = image.volumes["Volume1"]
    with open_source(str(image.path), block_size=64 * 1024) as reader:
        found = extract.inspect_disk(reader, bek=bde.bek)
        v = found.volume
        assert (v.name, v.type, v.extents, v.encryption) == ("Volume1", "LDM simple volume (2 extents)", runs, "BEK")
        assert [p["filesystem"] for p in found.partitions if p["name"] == "Volume1"] == ["NTFS in BitLocker"]
        (dump,) = [d for d in found.dumps if d.kind == "memory"]
        assert dump.file.read(v.reader, 0, dump.file.size) == original
        data = [e for e in dump.file.extents if not e.zero]
        placed = [next(i for i, (at, n) in enumerate(runs) if at <= e.disk_offset <= e.disk_offset + e.length <= at + n)
                  for e in data]
        assert set(placed) == {0, 1}  # the dump in both runs, read decrypted from each
        # on the disk the runs hold ciphertext: what the decrypting view gives there is not what the disk holds
        second = data[placed.index(1)]
        plain = v.reader.read_at(second.disk_offset, 512)
        assert plain == original[second.file_offset:second.file_offset + 512]
        assert disk.read_at(reader, second.disk_offset, 512) != plain


def test_bitlocker_on_a_dynamic_volume_of_two_runs_without_its_key_says_bitlocker(bitlocker_ldm):
    image, _, _ = bitlocker_ldm
    with pytest.raises(ExtractError) as caught:
        _inspect(image.path)
    assert "the Windows volume is encrypted with BitLocker" in caught.value.message
    assert "Azure Disk Encryption" in caught.value.hint
