"""A BitLocker volume (Azure Disk Encryption on a Windows VM) unlocked in the kit, through dissect.fve.

ADE keeps each encrypted volume's key as a BitLocker external key file (the .BEK file a VM reads at boot)
in the VM's Key Vault (scripts.azure.keyvault reads it). dissect.fve parses the volume's FVE metadata,
unlocks the volume master key with that file's external key and opens a stream that decrypts every sector
it reads (AES-CBC, AES-CBC with the diffuser, AES-XTS; the relocated boot sectors and the metadata regions
handled as BitLocker lays them out). crashcart writes no BitLocker code of its own: this module only
chooses how to unlock, says in one line why a volume did not unlock, and offers the decrypted volume as a
view of the whole disk, so that every reader above (NTFS, hive, the dump's extent map) keeps using disk
byte offsets.

Two states need no key at all, as Windows itself reads them: a volume whose protection is suspended
(`manage-bde -protectors -disable`: its volume master key is stored in the clear) and one fully decrypted.

What the decryption means for the snapshot-export strategy: the sectors on the disk are ciphertext, so the
dump's bytes cannot be copied server-side (Put Block From URL would copy ciphertext). Every byte of an
encrypted volume's dump is read over the export URL, decrypted here and uploaded from this machine; the
Volume says so (`Volume.encryption`, its `to_dict()["read"]`) for the report and the preflight.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scripts.base.errors import first_line
from scripts.windisk.errors import ExtractError, damaged

FVE_SIGNATURE = b"-FVE-FS-"
BEK_HINT = ("check that the key is this disk's: Azure Disk Encryption names the OS volume's secret in the VM's "
            "encryption settings (`az vm encryption show -g <group> -n <vm>`, or the disk's "
            "encryptionSettingsCollection); a disk re-encrypted since the snapshot has a newer secret version; "
            "or collect with repair.strategy = \"rescue-vm\" (the rescue VM unlocks the copy with manage-bde)")
THROUGH_THE_KIT = ("BitLocker: decrypted in the kit with dissect.fve, so the dump's bytes pass through this machine "
                   "(read over the export URL, decrypted, uploaded; no server-side copy of ciphertext)")


@dataclass
class Unlocked:
    """A BitLocker volume opened for reading: `stream` reads the plaintext volume."""

    stream: Any  # dissect.fve.bde.bde.BitlockerStream (seek/read over the decrypted volume)
    how: str  # "BEK" | "clear key (protection suspended)" | "fully decrypted"
    description: str  # BitLocker's own description of the volume (machine, drive, date), "" when it has none

    @property
    def size(self) -> int:
        return int(self.stream.size)


def is_bitlocker(boot_sector: bytes) -> bool:
    return boot_sector[3:11] == FVE_SIGNATURE


def unlock(volume: Any, *, bek: bytes | None, where: str) -> Unlocked | None:
    """`volume` (a file object over the partition's bytes) opened through dissect.fve: with `bek` (the .BEK
    file's bytes), or without a key when its protection is suspended or it is decrypted. None when it needs a
    key and none was given. Raises ExtractError when its metadata is damaged or `bek` does not unlock it."""
    from dissect.fve.bde import bde

    try:
        volume.seek(0)
        fve = bde.BDE(volume)
    except damaged() as err:
        raise ExtractError(f"{where} carries the BitLocker signature but its FVE metadata could not be read: "
                           f"{first_line(err)}", "the volume is damaged or not BitLocker; collect with "
                           "repair.strategy = \"rescue-vm\" and unlock it there") from None
    description = _description(fve)
    if fve.decrypted:
        return Unlocked(fve.open(), "fully decrypted", description)
    if fve.has_clear_key():
        fve.unlock_with_clear_key()
        return Unlocked(fve.open(), "clear key (protection suspended)", description)
    if bek is None:
        return None
    if not fve.has_bek():
        raise ExtractError(f"{where} has no external-key (.BEK) protector, so the key from Key Vault cannot "
                           f"unlock it ({description or 'no description'})", BEK_HINT)
    try:
        fve.unlock_with_bek(io.BytesIO(bek))
    except damaged() as err:  # ValueError("Unable to unlock with BEK ...") for another volume's key; struct errors for garbage
        said = first_line(err)
        what = "does not unlock" if "unlock" in said.lower() else "is not a BitLocker external key file, so it cannot unlock"
        raise ExtractError(f"the BitLocker key (BEK, {len(bek)} bytes) {what} {where} "
                           f"({description or 'no description'}): {said}", BEK_HINT) from None
    return Unlocked(fve.open(), "BEK", description)


def _description(fve: Any) -> str:
    try:
        return " ".join(str(fve.description() or "").split())
    except damaged():
        return ""


class DecryptedDisk:
    """The whole disk as its readers see it once a volume is unlocked: bytes inside the volume's runs come
    decrypted from the volume's stream, every other byte from the disk as it is. Offers what the windisk readers
    use (read_at, seek/read/tell, size).

    `runs` are the volume's (disk offset, bytes) in volume order: one for a partition; several for a dynamic
    (LDM) volume in pieces. BitLocker encrypts the volume as the volume manager presents it (the cipher's sector
    numbers count from the volume's start, through the runs in volume order), so the volume is unlocked through
    the runs joined, and a disk offset inside a run reads the volume at that run's place in it."""

    def __init__(self, raw_read: Callable[[int, int], bytes], disk_size: int, runs: list[tuple[int, int]],
                 unlocked: Unlocked):
        self._raw_read, self.size = raw_read, disk_size
        self._stream = unlocked.stream
        self._lock = threading.Lock()  # the dissect stream has one file position
        self._runs: list[tuple[int, int, int]] = []  # (disk offset, bytes, volume offset), by disk offset
        at = 0
        for offset, length in runs:
            readable = max(0, min(length, disk_size - offset, int(unlocked.size) - at))
            if readable:
                self._runs.append((offset, readable, at))
            at += length
        self._runs.sort()
        self._position = 0

    def read_at(self, offset: int, length: int) -> bytes:
        end = min(self.size, offset + max(0, length))
        out: list[bytes] = []
        at = max(0, offset)
        while at < end:
            run = next(((start, n, vol) for start, n, vol in self._runs if at < start + n), None)
            if run is None or at < run[0]:  # before the next run (or past the last): the disk as it is
                upto = end if run is None else min(end, run[0])
                out.append(self._raw_read(at, upto - at))
            else:
                start, n, vol = run
                upto = min(end, start + n)
                with self._lock:
                    self._stream.seek(vol + at - start)
                    out.append(self._stream.read(upto - at))
            at = upto
        return b"".join(out)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, length: int = -1) -> bytes:
        length = self.size - self._position if length is None or length < 0 else length
        data = self.read_at(self._position, length)
        self._position += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True
