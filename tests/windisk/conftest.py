"""Real BitLocker volumes for the windisk tests: the ones dissect.fve's own test suite uses.

dissect.fve's source distribution on PyPI ships BitLocker volumes made by Windows (tests/_data/bde: a volume
protected by a recovery key file and one by a startup key, each with its .BEK file; a suspended one). They
are downloaded once into a cache under the temp folder (never into the repository) with pip, and the test
is skipped, saying why, when the download fails.

Windows left those volumes' NTFS mostly zeroed (only the FVE metadata and a few sectors are kept, to keep
the archive small), so `bitlocker_disk` writes an NTFS volume of ours (a SYSTEM hive and a crash dump, from
gptdisk) into a copy of the real volume: unlocked with its real BEK through dissect.fve, the volume's own
cipher (dissect.fve's, with the volume's full-volume encryption key) encrypts each sector where BitLocker
keeps it (the first sectors at the volume's virtualized block, as BitLocker relocates them). Nothing of
BitLocker is written by hand: the metadata, the key protectors and the cipher are the real ones, and reading
it back goes through dissect.fve's decrypting stream. The result is put in a GPT disk image.
"""

from __future__ import annotations

import importlib.metadata
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

SDIST_VERSION = importlib.metadata.version("dissect.fve")
CACHE = Path(tempfile.gettempdir()) / "crashcart-test-cache" / f"dissect.fve-{SDIST_VERSION}"
SECTOR = 512


@dataclass(frozen=True)
class BdeVolume:
    name: str
    image: bytes  # the volume's bytes as Windows wrote them
    bek: bytes | None  # the .BEK file that unlocks it (None: no key needed)


def _download() -> Path:
    """tests/_data/bde of the installed dissect.fve's source distribution, cached; raises on failure."""
    data = CACHE / "bde"
    if (data / "recovery_key.bek").exists():
        return data
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--disable-pip-version-check", f"dissect.fve=={SDIST_VERSION}", "-d", work],
                       check=True, capture_output=True, timeout=180)
        archive = next(Path(work).glob("dissect*fve-*.tar.gz"))
        staged = Path(work) / "bde"
        staged.mkdir()
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and parts[1:4] == ("tests", "_data", "bde"):
                    (staged / parts[-1]).write_bytes(tar.extractfile(member).read())
        shutil.move(str(staged), data)
    return data


@pytest.fixture(scope="session")
def bde_data() -> Path:
    try:
        return _download()
    except (subprocess.SubprocessError, OSError, StopIteration, tarfile.TarError) as err:
        detail = getattr(err, "stderr", b"") or b""
        pytest.skip(f"could not download dissect.fve {SDIST_VERSION}'s source distribution (its BitLocker test "
                    f"volumes): {err} {detail.decode(errors='replace')[-300:]}")


def bde_volume(data: Path, name: str, bek: str | None) -> BdeVolume:
    import gzip

    return BdeVolume(name, gzip.decompress((data / f"{name}.bin.gz").read_bytes()),
                     (data / f"{bek}.bek").read_bytes() if bek else None)


def plant_ntfs(volume: BdeVolume, ntfs: bytes) -> bytes:
    """A copy of the real BitLocker `volume` whose plaintext volume is `ntfs`, written through dissect.fve's
    own cipher for the volume (see the module's docstring)."""
    from dissect.fve.bde import bde

    fve = bde.BDE(io.BytesIO(volume.image))
    if volume.bek is not None:
        fve.unlock_with_bek(io.BytesIO(volume.bek))
    else:
        fve.unlock_with_clear_key()
    stream = fve.open()
    info = fve.information
    first, count = info.virtualized_block_offset // SECTOR, info.virtualized_sectors
    sectors = len(ntfs) // SECTOR
    reserved_start = min(start for start, _ in fve.reserved_regions())
    assert sectors <= reserved_start and sectors <= first, "the NTFS volume must end before BitLocker's own sectors"
    assert sectors * SECTOR <= info.state_offset, "pre-EOW volumes are encrypted up to their state offset"
    out = bytearray(volume.image)

    def put(physical: int, plain: bytes) -> None:
        out[physical * SECTOR:physical * SECTOR + len(plain)] = stream.cipher.encrypt(plain, physical)

    put(first, ntfs[:count * SECTOR])  # the relocated first sectors (the NTFS boot sector among them)
    put(count, ntfs[count * SECTOR:sectors * SECTOR])
    return bytes(out)


@dataclass(frozen=True)
class BitlockerDisk:
    path: Path  # a GPT disk image whose Windows partition is the BitLocker volume
    windows: object  # gptdisk.WindowsDisk whose NTFS volume was planted (its originals: the files inside)
    volume: BdeVolume
    offset: int  # the BitLocker partition's byte offset on the disk


def build_bitlocker_disk(work: Path, volume: BdeVolume) -> BitlockerDisk:
    from scripts.devkit import gptdisk

    plain = gptdisk.windows_disk(work / "plain", dump="bitmap", layout="fragmented",
                                 slot=16 * 1024, windows_mib=32, name="plain")
    with open(plain.image.path, "rb") as disk:
        disk.seek(plain.image.windows_offset)
        ntfs = disk.read(plain.image.windows_size)
    encrypted = plant_ntfs(volume, ntfs)
    mib = -(-len(encrypted) // gptdisk.MiB)
    image = gptdisk.build_windows_disk(work / "bitlocker.img", scheme="gpt", windows_mib=mib, bitlocker=True)
    with open(image.path, "r+b") as disk:
        disk.seek(image.windows_offset)
        disk.write(encrypted)
    return BitlockerDisk(image.path, plain, volume, image.windows_offset)


@pytest.fixture(scope="session")
def bitlocker_disk(bde_data, tmp_path_factory) -> BitlockerDisk:
    """A GPT disk whose Windows volume is dissect.fve's real recovery-key BitLocker volume holding our NTFS."""
    from scripts.devkit import gptdisk

    if gptdisk.can_build() is not None:
        pytest.skip(str(gptdisk.can_build()))
    return build_bitlocker_disk(tmp_path_factory.mktemp("bitlocker"), bde_volume(bde_data, "recovery_key", "recovery_key"))
