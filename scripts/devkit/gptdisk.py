"""Windows OS disk images whose Windows volume is written file by file: fragmented and sparse dumps,
BitLocker volumes, and the fixed-VHD form Azure exports a snapshot in.

The partition tables and the volumes come from diskimage.py (its Generation 1 MBR and Generation 2 GPT
layouts and `build_disk`). What a partition's plain `files` do not control is *how* a file lands on
NTFS, and the snapshot-export tests need exactly that: a MEMORY.DMP in many fragments (as on a disk that
was full), sparse runs, a valid data length short of the file size, a runlist long enough to need an
$ATTRIBUTE_LIST. So the Windows partition gets the caller's `populate(mount)` hook, which writes files
with the helpers below (ntfs-3g allocates when a file is closed, so alternating appends to two files
interleave their clusters); its volume has 4 KiB clusters and is mounted with NTFS compression enabled.

Needs root, /dev/fuse, mkntfs and ntfs-3g, as diskimage does (`diskimage.can_build()`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scripts.devkit import diskimage

MiB = diskimage.MiB
SECTOR = diskimage.SECTOR
can_build = diskimage.can_build


@dataclass(frozen=True)
class DiskImage:
    path: Path
    scheme: str  # gpt | mbr
    windows_offset: int  # byte offset of the Windows partition
    windows_size: int
    size: int


def build_windows_disk(path: Path, *, populate: Callable[[Path], None] | None = None, scheme: str = "gpt",
                       windows_mib: int = 48, bitlocker: bool = False) -> DiskImage:
    """A Generation 2 (gpt: EFI, MSR, Windows, Recovery) or Generation 1 (mbr: System Reserved, Windows)
    OS disk whose Windows volume `populate(mount)` fills; with bitlocker=True that partition holds a
    BitLocker volume header instead (nothing is readable in it)."""
    make_layout = diskimage.windows_gpt_layout if scheme == "gpt" else diskimage.windows_mbr_layout
    layout = make_layout({}, windows_mib)
    index = next(i for i, p in enumerate(layout) if p.ntfs_label == "Windows")
    if bitlocker:
        layout[index] = dataclasses.replace(layout[index], ntfs_label=None, files={})
    else:
        layout[index] = dataclasses.replace(layout[index], files={}, populate=populate, cluster_size=4096,
                                            compression=True)
    diskimage.build_disk(path, layout, scheme)
    offset = diskimage.partition_starts(layout)[index] * SECTOR
    size = windows_mib * MiB
    if bitlocker:
        with open(path, "r+b") as disk:
            disk.seek(offset)
            disk.write(bitlocker_boot_sector(size))
    return DiskImage(path, scheme, offset, size, path.stat().st_size)


def bitlocker_boot_sector(size: int) -> bytes:
    """The first sector of a BitLocker (Windows 7+) volume: jump, OEM '-FVE-FS-', a BPB, the FVE
    metadata offsets and the BitLocker GUID; what a reader sees instead of NTFS."""
    sector = bytearray(SECTOR)
    sector[0:3] = b"\xeb\x58\x90"
    sector[3:11] = b"-FVE-FS-"
    struct.pack_into("<HBH", sector, 11, 512, 8, 0)  # bytes per sector, sectors per cluster, reserved
    struct.pack_into("<B", sector, 21, 0xF8)  # media descriptor
    struct.pack_into("<I", sector, 32, 0)
    struct.pack_into("<Q", sector, 40, size // SECTOR)
    sector[160:176] = uuid.UUID("4967d63b-2e29-4ad8-8399-f6a339e3d001").bytes_le  # BitLocker volume GUID
    struct.pack_into("<QQQ", sector, 176, 0x2100000, 0x4100000, 0x6100000)  # FVE metadata block offsets
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def fixed_vhd_footer(disk_size: int, unique: bytes = b"crashcart-demo!!") -> bytes:
    """The 512-byte footer that makes a raw disk a fixed VHD (what an exported managed disk is)."""
    cylinders, heads, sectors = _chs(disk_size)
    footer = bytearray(512)
    struct.pack_into(">8sIIQI4sIIQQHBBII16sB", footer, 0, b"conectix", 2, 0x00010000, 0xFFFFFFFFFFFFFFFF,
                     int(time.time()) - 946684800, b"cart", 0x000A0000, 0x5769326B, disk_size, disk_size,
                     cylinders, heads, sectors, 2, 0, unique[:16].ljust(16, b"\0"), 0)
    checksum = (~sum(footer)) & 0xFFFFFFFF
    struct.pack_into(">I", footer, 64, checksum)
    return bytes(footer)


def _chs(size: int) -> tuple[int, int, int]:
    """CHS geometry per the VHD specification's algorithm."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


# ---- writing files the way a full, old disk holds them ---------------------------------------------------
def compress_folder(mount: Path, rel: str) -> None:
    """Sets FILE_ATTRIBUTE_COMPRESSED on a folder (ntfs-3g's system.ntfs_attrib): files created in it from
    now on are NTFS-compressed (the volume is mounted with -o compression)."""
    folder = mount / rel
    folder.mkdir(parents=True, exist_ok=True)
    attributes = struct.unpack("<I", os.getxattr(folder, "system.ntfs_attrib"))[0]
    os.setxattr(folder, "system.ntfs_attrib", struct.pack("<I", attributes | 0x800))


def write_file(mount: Path, rel: str, data: bytes) -> Path:
    target = mount / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def fragment_free_space(mount: Path, slot: int, room: int) -> int:
    """Makes `room` bytes of the volume's free space a comb: a ballast file takes what is beyond twice that,
    `slot`-byte files fill the rest, then (reading where each one landed with dissect.ntfs while the volume
    is unmounted) every other one in disk order is deleted. A file of up to `room` bytes written next can
    only go into the `slot`-sized holes, so it lands in about size/slot fragments, as on a full, old disk.
    Returns the number of holes."""
    from dissect.ntfs import NTFS

    folder = mount / "$crashcart-fill"
    folder.mkdir(exist_ok=True)
    stat = os.statvfs(mount)
    ballast = stat.f_bavail * stat.f_frsize - 2 * room - 8 * slot - 2 * MiB
    if ballast > 0:
        with open(folder / "ballast", "wb") as f:
            f.truncate(0)
            block = bytes(MiB)  # zeros: an exported image skips them, the clusters are allocated all the same
            for _ in range(ballast // MiB):
                f.write(block)
    data = bytes(slot)
    names = []
    while True:
        name = f"{len(names):06d}"
        try:
            with open(folder / name, "wb") as f:
                f.write(data)
        except OSError:
            (folder / name).unlink(missing_ok=True)
            break
        names.append(name)
    with diskimage.unmounted(mount) as volume, open(volume, "rb") as fh:
        ntfs = NTFS(fh)
        placed = sorted((ntfs.mft.get(f"$crashcart-fill/{n}").dataruns()[0][0], n) for n in names)
    holes = 0
    for rank, (_, name) in enumerate(placed):
        if rank % 2 == 0:
            (folder / name).unlink()
            holes += 1
    return holes


def write_fragmented(mount: Path, rel: str, source: Path | bytes, slot: int = 128 * 1024) -> Path:
    """Writes `source` to `rel` on a volume whose free space is first made a comb of `slot`-sized holes
    (`fragment_free_space`): the file lands in about size/slot fragments."""
    size = source.stat().st_size if isinstance(source, Path) else len(source)
    fragment_free_space(mount, slot, size + slot)
    target = mount / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(source, Path):
        shutil.copyfile(source, target)
    else:
        target.write_bytes(source)
    return target


def write_sparse(mount: Path, rel: str, pieces: list[tuple[int, bytes]], size: int) -> Path:
    """A sparse file: only `pieces` (offset, bytes) are written, the file is then extended to `size`
    (ntfs-3g leaves holes as sparse runs, and a valid data length short of an extended size)."""
    target = mount / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as f:
        for offset, data in sorted(pieces):
            f.seek(offset)
            f.write(data)
        f.truncate(size)
    return target


def write_sparse_from(mount: Path, rel: str, source: Path, *, hole_granularity: int = 64 * 1024,
                      fragment_slot: int = 0) -> Path:
    """Copies a local file, leaving every all-zero `hole_granularity` block as a hole (sparse run); with
    `fragment_slot`, the written blocks also land in a comb of free space (`fragment_free_space`)."""
    if fragment_slot:
        fragment_free_space(mount, fragment_slot, source.stat().st_size + fragment_slot)
    target = mount / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    size = source.stat().st_size
    zero = bytes(hole_granularity)
    open(target, "wb").close()
    with open(source, "rb") as src:
        at = 0
        while at < size:
            block = src.read(hole_granularity)
            if block != zero[:len(block)]:
                with open(target, "r+b") as out:
                    out.seek(at)
                    out.write(block)
            at += len(block)
    with open(target, "r+b") as out:
        out.truncate(size)
    return target


def write_from(mount: Path, rel: str, source: Path) -> Path:
    target = mount / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    os.sync()
    return target


# ---- a broken Windows VM's OS disk, ready to export ------------------------------------------------------
@dataclass
class WindowsDisk:
    """What `windows_disk` built: the image and the originals of every file it put on the volume."""

    image: DiskImage
    dump: object | None  # scripts.devkit.dumpbuilder.BuiltDump of MEMORY.DMP (or of the dump in pagefile.sys)
    minidump: object | None
    dump_windows_path: str
    originals: dict[str, Path]  # volume path ('/'-separated) -> local file with the same bytes


def windows_disk(work: Path, *, scheme: str = "gpt", dump: str | None = "full", memory_size: int = 32 * MiB,
                 dump_file: str = r"%SystemRoot%\MEMORY.DMP", layout: str = "fragmented",
                 slot: int = 128 * 1024, minidump: bool = True,
                 current_set: int = 1, bitlocker: bool = False, in_pagefile: bool = False,
                 windows_mib: int | None = None, faulting_module: str = "contosoflt.sys",
                 noise: bool = False, compress_dump: bool = False, name: str = "disk") -> WindowsDisk:
    """A Generation 2 (gpt) or 1 (mbr) Windows OS disk after a stop 0x7E: a SYSTEM hive whose current
    control set (`current_set`; the others are decoys) names `dump_file`, the dump there (`layout`:
    fragmented, sparse, sparse-fragmented or contiguous), a minidump in Windows\\Minidump, a page file.
    `dump=None` leaves no dump; `in_pagefile` puts the dump at the start of pagefile.sys instead (as
    Windows writes it before the next boot turns it into MEMORY.DMP); `noise` fills the dump's empty pages
    with pseudo-random bytes (a realistic, incompressible dump for the benchmark)."""
    from scripts.devkit import dumpbuilder
    from scripts.devkit import hivebuilder

    work.mkdir(parents=True, exist_ok=True)
    built = mini = None
    if dump is not None:
        builder = dumpbuilder.build_full_dump if dump == "full" else dumpbuilder.build_bitmap_dump
        built = builder(work / f"{name}-memory.dmp", memory_size=memory_size, faulting_module=faulting_module)
        if noise:
            _fill_empty_pages(built.path)
    if minidump and dump is not None:
        mini = dumpbuilder.build_triage_dump(work / f"{name}-mini.dmp", faulting_module=faulting_module)
    hive = hivebuilder.system_hive(current=current_set, crash_control={
        "CrashDumpEnabled": (hivebuilder.REG_DWORD, 1),
        "DumpFile": (hivebuilder.REG_EXPAND_SZ, dump_file),
        "MinidumpDir": (hivebuilder.REG_EXPAND_SZ, r"%SystemRoot%\Minidump"),
    }, paging_files=[r"C:\pagefile.sys 0 0"])
    from scripts.remote.winpaths import volume_path

    dump_rel = volume_path(dump_file) or "Windows/MEMORY.DMP"
    originals: dict[str, Path] = {}
    hive_path = work / f"{name}-SYSTEM"
    hive_path.write_bytes(hive)
    originals["Windows/System32/config/SYSTEM"] = hive_path
    pagefile = work / f"{name}-pagefile.sys"

    def populate(mount: Path) -> None:
        write_file(mount, "Windows/System32/config/SYSTEM", hive)
        write_file(mount, "Windows/System32/drivers/contosoflt.sys", b"MZ" + bytes(4094))
        write_file(mount, "Windows/Minidump/readme.txt", b"not a dump")
        if mini is not None:
            rel = "Windows/Minidump/051724-21453-01.dmp"
            write_from(mount, rel, mini.path)
            originals[rel] = mini.path
        if built is not None and in_pagefile:
            with open(pagefile, "wb") as out, open(built.path, "rb") as src:
                shutil.copyfileobj(src, out)
                out.write(bytes(2 * MiB))  # the page file is bigger than the dump it holds
            write_fragmented(mount, "pagefile.sys", pagefile, slot)
            originals["pagefile.sys"] = pagefile
        else:
            with open(pagefile, "wb") as out:
                out.write(b"\x00" * MiB)
            write_from(mount, "pagefile.sys", pagefile)
            if built is not None:
                if compress_dump:
                    compress_folder(mount, dump_rel.rsplit("/", 1)[0])
                if layout == "fragmented":
                    write_fragmented(mount, dump_rel, built.path, slot)
                elif layout == "sparse":
                    write_sparse_from(mount, dump_rel, built.path)
                elif layout == "sparse-fragmented":
                    write_sparse_from(mount, dump_rel, built.path, fragment_slot=slot)
                else:
                    write_from(mount, dump_rel, built.path)
                originals[dump_rel] = built.path

    dump_bytes = built.file_size if built else 0
    size_mib = windows_mib or max(40, int(dump_bytes * (2.4 if layout != "contiguous" or in_pagefile else 1.2)) // MiB + 32)
    image = build_windows_disk(work / f"{name}.img", populate=populate, scheme=scheme, windows_mib=size_mib,
                               bitlocker=bitlocker)
    return WindowsDisk(image, built, mini, dump_file if not in_pagefile else r"%SystemDrive%\pagefile.sys", originals)


def _fill_empty_pages(path: Path, seed: int = 1) -> None:
    """Pseudo-random bytes in every all-zero page after the header (the builder writes sparse files)."""
    import random

    page = 4096
    rng = random.Random(seed)
    pattern = rng.randbytes(page * 64)
    zero = bytes(page)
    with open(path, "r+b") as f:
        f.seek(0x2000)
        index = 0
        while True:
            at = f.tell()
            data = f.read(page * 256)
            if not data:
                break
            out = bytearray(data)
            for i in range(0, len(data), page):
                if data[i:i + page] == zero:
                    start = (index % 64) * page
                    out[i:i + page] = pattern[start:start + page][:len(data) - i]
                index += 1
            f.seek(at)
            f.write(out)


# ---- disks the test modules share (built once per process) -----------------------------------------------
RECIPES: dict[str, dict] = {
    # Generation 2, a complete dump in ~250 fragments (its runlist needs an $ATTRIBUTE_LIST), a minidump,
    # current control set 2 (ControlSet001 holds decoys)
    "gpt-fragmented": dict(scheme="gpt", dump="full", layout="fragmented", slot=128 * 1024, current_set=2),
    # Generation 1, a sparse complete dump (valid data length short of the size) at a non-default DumpFile
    "mbr-sparse": dict(scheme="mbr", dump="full", layout="sparse", dump_file=r"C:\CrashDumps\web-01.dmp",
                       minidump=False),
    # a small kernel (bitmap) dump, fragmented: quick to build and to copy
    "gpt-small": dict(scheme="gpt", dump="bitmap", layout="fragmented", slot=16 * 1024),
    # the dump still at the start of pagefile.sys (the VM never booted again after the crash)
    "gpt-pagefile": dict(scheme="gpt", dump="bitmap", in_pagefile=True, slot=16 * 1024, minidump=False),
    "gpt-no-dump": dict(scheme="gpt", dump=None),
    # MEMORY.DMP NTFS-compressed (its folder has the compressed attribute): not copyable server-side
    "gpt-compressed": dict(scheme="gpt", dump="bitmap", layout="contiguous", compress_dump=True),
    "gpt-bitlocker": dict(scheme="gpt", dump=None, bitlocker=True),
}
_shared: dict[str, WindowsDisk] = {}
_shared_dir: list[Path] = []


def shared_disk(recipe: str) -> WindowsDisk:
    """The disk of a RECIPES entry, built on first use and kept (in a temporary folder removed at exit)."""
    if recipe not in _shared:
        if not _shared_dir:
            import atexit

            _shared_dir.append(Path(tempfile.mkdtemp(prefix="crashcart-disks-")))
            atexit.register(shutil.rmtree, _shared_dir[0], True)
        _shared[recipe] = windows_disk(_shared_dir[0] / recipe, name=recipe, **RECIPES[recipe])
    return _shared[recipe]
