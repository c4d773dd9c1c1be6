"""Where a file's bytes are on the disk: its NTFS data runs as extents of disk byte offsets.

The snapshot export copies a dump server-side (Put Block From URL over the export URL's byte ranges), so
what it needs is not the file's content but a map: for each stretch of the file, the disk offset it is
stored at, or "zeros" for a sparse run and for everything past the valid data length (Windows reads both
as zeros, and they are never stored). `map_file` builds that map from the file's $DATA attribute
(dissect.ntfs), following every attribute of an $ATTRIBUTE_LIST; `FileMap.read` reads through it, which
is how the dump's header is read and how the mapping itself gets checked.

A file whose bytes on disk are not its content cannot be copied that way: an NTFS-compressed or
EFS-encrypted file raises `NotExportable` (the rescue-vm strategy reads it through Windows instead). A
damaged MFT record, directory index or data run (one that points outside the volume) raises ExtractError
naming the file: a map is never made of bytes that are not the file's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scripts.base.errors import ExitCode, first_line
from scripts.windisk.disk import Volume, read_at
from scripts.windisk.errors import DAMAGED_HINT, ExtractError, damaged
from scripts.windisk.ntfspath import find, listdir

# NTFS attribute flags (ATTRIBUTE_RECORD_HEADER.Flags)
_ATTR_COMPRESSED = 0x00FF
_ATTR_ENCRYPTED = 0x4000
_ATTR_SPARSE = 0x8000


class NotExportable(Exception):
    """The file exists but its bytes on disk are not its content (compressed or EFS-encrypted).

    `str()` is the short form a findings list shows ("<path> is NTFS-compressed"); `why` says what is on the
    disk instead of the file's bytes, `todo` what collects it, and `explanation` is both in one line."""

    def __init__(self, path: str, kind: str, why: str, todo: str) -> None:
        super().__init__(f"{path} is {kind}")
        self.path, self.kind, self.why, self.todo = path, kind, why, todo

    @property
    def explanation(self) -> str:
        return f"{self} ({self.why}): {self.todo}"


# Why each kind of file cannot be copied as disk ranges, and what collects it instead. A sparse file is not
# one of them: its sparse runs and the bytes past its valid data length are zeros, which the map says.
COMPRESSED_WHY = ("NTFS stores a compressed file in compression units of 16 clusters, each LZNT1-compressed, so "
                  "its clusters hold the compressed form and a copy of them would not be the dump")
COMPRESSED_TODO = ("collect it with repair.strategy = \"rescue-vm\": the rescue VM reads it through its NTFS driver "
                   "(Windows, ntfs-3g or ntfs3), which decompresses it; so that the next dump is exportable, "
                   "clear the compression of its folder (`compact /u` on it, or Properties > Advanced)")
ENCRYPTED_WHY = ("EFS encrypts a file's contents with a key that only the certificate of the user who encrypted it, "
                 "or of a data recovery agent, unlocks, so its clusters hold ciphertext")
ENCRYPTED_TODO = ("no copy of the disk can decrypt it without that certificate: collect it with repair.strategy = "
                  "\"rescue-vm\" on a Windows rescue VM where that certificate and its private key (.pfx) are "
                  "imported for the account the collection runs as (Run Command: SYSTEM); crashcart never asks for "
                  "it. Or, from a working boot, decrypt the folder (`cipher /d`) so the next dump is plain")


@dataclass(frozen=True)
class Extent:
    """`length` bytes of a file from `file_offset`, stored on the disk at `disk_offset` (None: zeros,
    i.e. a sparse run or bytes past the valid data length, which Windows reads as zeros)."""

    file_offset: int
    length: int
    disk_offset: int | None

    @property
    def zero(self) -> bool:
        return self.disk_offset is None


@dataclass
class FileMap:
    """Where the bytes of one file (or of its first `size` bytes) are on the disk."""

    path: str  # on the volume, '/'-separated, as found (e.g. "Windows/MEMORY.DMP")
    size: int  # bytes this map covers: the file size, or less for a dump inside pagefile.sys
    file_size: int
    valid_data_length: int
    extents: list[Extent] = field(default_factory=list)
    resident: bytes | None = None  # data kept inside the MFT record (files under ~700 bytes)
    sparse: bool = False  # the NTFS sparse flag

    @property
    def fragments(self) -> int:
        return sum(1 for e in self.extents if not e.zero)

    @property
    def zero_bytes(self) -> int:
        return sum(e.length for e in self.extents if e.zero)

    def truncated(self, size: int) -> "FileMap":
        """The first `size` bytes only (a dump at the start of a bigger file)."""
        size = min(size, self.size)
        extents = []
        for e in self.extents:
            if e.file_offset >= size:
                break
            length = min(e.length, size - e.file_offset)
            extents.append(Extent(e.file_offset, length, e.disk_offset))
        resident = self.resident[:size] if self.resident is not None else None
        return FileMap(self.path, size, self.file_size, self.valid_data_length, extents, resident, self.sparse)

    def read(self, disk: Any, offset: int, length: int) -> bytes:
        """Bytes `offset`..`offset+length` of the file, read from the disk through the extents (the same
        mapping the server-side copy uses, so reading the header through it also checks the mapping)."""
        return self.read_many(disk, [(offset, length)])[0]

    def read_many(self, disk: Any, ranges: list[tuple[int, int]]) -> list[bytes]:
        """`read` of each (offset, length); the disk reads of all their extents are made together (one round
        trip over HTTP when the disk is a range reader with `read_many`, scripts.base.rangereader)."""
        plans = [self.spans(offset, length) for offset, length in ranges]
        pieces = [part for plan in plans for part in plan if isinstance(part, tuple)]
        many = getattr(disk, "read_many", None)
        data = iter(many(pieces) if many is not None else [read_at(disk, at, n) for at, n in pieces])
        return [b"".join(part if isinstance(part, bytes) else next(data) for part in plan) for plan in plans]

    def spans(self, offset: int, length: int) -> list[bytes | tuple[int, int]]:
        """Bytes `offset`..`offset+length` of the file as what to read: (disk offset, length) spans, and the
        bytes themselves where the file has them without the disk (zeros, resident data)."""
        end = min(self.size, offset + length)
        if offset >= end:
            return []
        if self.resident is not None:
            return [self.resident[offset:end]]
        out: list[bytes | tuple[int, int]] = []
        for e in self.extents:
            lo, hi = max(offset, e.file_offset), min(end, e.file_offset + e.length)
            if lo < hi:
                out.append(bytes(hi - lo) if e.zero else (e.disk_offset + (lo - e.file_offset), hi - lo))  # type: ignore[operator]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "file_size": self.file_size,
                "valid_data_length": self.valid_data_length, "fragments": self.fragments,
                "zero_bytes": self.zero_bytes, "sparse": self.sparse, "resident": self.resident is not None}


def map_file(volume: Volume, path: str) -> FileMap | None:
    """The file's default data stream as extents of disk byte offsets; None when there is no such file.
    Raises NotExportable for NTFS-compressed or EFS-encrypted files, and ExtractError when the file's MFT
    record or data runs are damaged (including runs that point outside the volume)."""
    try:
        record = find(volume.ntfs, path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except damaged() as err:
        raise _record_error(path, err) from None
    try:
        return _map_record(volume, path, record)
    except damaged() as err:
        raise _record_error(path, err) from None


def _map_record(volume: Volume, path: str, record: Any) -> FileMap | None:
    from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE

    if record.is_dir():
        return None
    attrs = record.attributes.find("", ATTRIBUTE_TYPE_CODE.DATA)
    if not attrs:
        return None
    if attrs[0].header.resident:
        data = attrs[0].data()
        return FileMap(path, len(data), len(data), len(data), [], resident=data)
    stream = sorted((a for a in attrs if not a.header.resident), key=lambda a: a.header.lowest_vcn)
    first = stream[0].header
    flags = int(first.flags)
    if flags & _ATTR_COMPRESSED:
        raise NotExportable(path, "NTFS-compressed", COMPRESSED_WHY, COMPRESSED_TODO)
    if flags & _ATTR_ENCRYPTED:
        raise NotExportable(path, "EFS-encrypted", ENCRYPTED_WHY, ENCRYPTED_TODO)
    file_size = int(first.size)
    vdl = min(int(first.header.Form.Nonresident.ValidDataLength), file_size)
    cluster = volume.cluster_size
    extents: list[Extent] = []
    at = 0
    for attr in stream:
        for lcn, count in attr.header.dataruns():
            if at >= file_size:
                break
            length = min(count * cluster, file_size - at)
            if lcn is None:
                add_extent(extents, at, length, None, vdl)
                at += length
                continue
            try:  # the volume's bytes on the disk: one run, or a dynamic volume's several (disk.Volume.disk_spans)
                spans = volume.disk_spans(lcn * cluster, length)
            except ValueError:
                raise ExtractError(
                    f"{path} is damaged: its NTFS data run at cluster {lcn} ({count} clusters) lies outside the "
                    f"volume", DAMAGED_HINT, ExitCode.COLLECT_FAILED) from None
            for disk, piece in spans:
                add_extent(extents, at, piece, disk, vdl)
                at += piece
    if at < file_size:  # runs end early: the rest reads as zeros
        add_extent(extents, at, file_size - at, None, vdl)
    return FileMap(path, file_size, file_size, vdl, extents, sparse=bool(flags & _ATTR_SPARSE))


def _record_error(path: str, err: BaseException) -> ExtractError:
    return ExtractError(f"{path} is damaged: its NTFS record cannot be read ({first_line(err)})", DAMAGED_HINT,
                        ExitCode.COLLECT_FAILED)


def add_extent(extents: list[Extent], at: int, length: int, disk: int | None, vdl: int) -> None:
    """Appends an extent, cut at the valid data length (zeros past it), merging with its neighbour
    when the two are contiguous on disk (or both zeros)."""
    if disk is not None and at < vdl < at + length:
        pieces = [(at, vdl - at, disk), (vdl, at + length - vdl, None)]
    elif disk is not None and at >= vdl:
        pieces = [(at, length, None)]
    else:
        pieces = [(at, length, disk)]
    for offset, size, where in pieces:
        if extents:
            last = extents[-1]
            contiguous = (last.disk_offset is None and where is None) or (
                last.disk_offset is not None and where is not None and last.disk_offset + last.length == where)
            if contiguous and last.file_offset + last.length == offset:
                extents[-1] = Extent(last.file_offset, last.length + size, last.disk_offset)
                continue
        extents.append(Extent(offset, size, where))


def list_dir(volume: Volume, path: str) -> list[str]:
    """The names in a folder of the volume, sorted (no 8.3 aliases); [] when it is not a folder. Raises
    ExtractError when the folder's MFT record or index is damaged."""
    try:
        record = find(volume.ntfs, path)
        if not record.is_dir():
            return []
        return listdir(record)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except damaged() as err:
        raise _record_error(path, err) from None
