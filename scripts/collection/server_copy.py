"""The server-side copy: a file on the snapshot rebuilt as a block blob by the storage service itself.

For every extent of the file (its NTFS data runs mapped to disk offsets) the kit asks the evidence account
to stage a block from `<export URL>` with `x-ms-source-range` (Put Block From URL), then commits the
block list. The dump's bytes travel from the snapshot straight into the evidence account, never through
the kit.

Sparse runs (and bytes past the valid data length) are zeros that exist nowhere on the disk. Uploading
them from the kit would send as many bytes through it as the holes are long — gigabytes for a
preallocated dump file, over the operator's uplink. Instead the kit creates one empty page blob beside
the run (`Put Blob` with a length and no data: unwritten pages read as zeros and are not billed) and
stages zero blocks *from it* by URL; its deletion goes on the run's undo stack the moment it exists.
Cost through the kit: one empty request per zero block. A file small enough to live in its MFT record
(resident) is uploaded as one ordinary block.

What the service says it wrote. Every Put Block From URL (and Put Block) answers with the service's own
CRC-64 of the block it stored (`x-ms-content-crc64`, computed by the Blob service, service version
2019-02-02 and later; the SDK returns it as `content_crc64`). The copy keeps them in block order and
composes them (scripts.evidence.crc64.compose: zlib's crc32_combine math) into the CRC-64 of the committed
blob, so the proof of the copy needs no read-back. A zero block's CRC is known in advance (that many
zeros): a service answer that differs is a problem. A resident file's one block is hashed by the kit
itself (it holds the bytes). A block the service answered without a CRC-64 leaves the blob's CRC
unknown (`crc64` None, and the blocks named in `crc64_missing`): nothing is invented.

A BitLocker volume (Azure Disk Encryption) cannot be copied server-side: the disk holds ciphertext. With
`plain_reader` (the volume's decrypting view, scripts.windisk.bitlocker.DecryptedDisk) every disk block is
read over the export URL, decrypted in the kit and uploaded with Put Block (blocks of at most
DECRYPT_BLOCK_BYTES, so that `parallel` blocks fit in memory); the kit computes each block's CRC-64 from the
bytes it holds (`crc64_by` "kit"), and the copy says `method` "decrypted in the kit". Zero runs are still
staged from the zero source: they are zeros in the plaintext too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scripts.base.console import NullProgress, Progress
from scripts.base.endpoints import STORAGE_SCOPE
from scripts.base.errors import CrashcartError, ExitCode, first_line
from scripts.collection.snapshot_access import Tokens
from scripts.evidence import blobs as evidence
from scripts.evidence import crc64
from scripts.windisk import extract
from scripts.windisk.ntfs import FileMap

log = logging.getLogger("crashcart.snapshot_export")

MiB = 1 << 20
DEFAULT_BLOCK_BYTES = 100 * MiB  # per Put Block From URL: within every service version's block limit
MAX_BLOCKS = 50_000  # committed blocks per block blob
DEFAULT_PARALLEL = 8
DECRYPT_BLOCK_BYTES = 8 * MiB  # per uploaded block of a decrypted volume
SERVER_SIDE = "Put Block From URL from the snapshot's export SAS, then Put Block List (server-side)"
THROUGH_KIT = ("read over the snapshot's export SAS, decrypted in the kit (BitLocker, dissect.fve), uploaded with "
               "Put Block, then Put Block List: the bytes passed through the kit (ciphertext cannot be copied "
               "server-side)")
ZERO_SOURCE = ".crashcart-zero-source"
COPY_SOURCE_HINT = ("the evidence account fetches the snapshot's export URL itself: with a network access policy "
                    "of AllowPrivate (or public network access disabled) it cannot, and an expired or revoked "
                    "access ends the copy too. Run collect again, or use repair.strategy = \"rescue-vm\"")

Auth = Callable[[], "str | None"]  # the x-ms-copy-source-authorization value for a source (None: the URL's SAS)


@dataclass(frozen=True)
class Block:
    kind: str  # disk | zero | data
    length: int
    source_offset: int = 0  # disk byte offset (disk), 0 (zero)
    data: bytes = b""  # (data) bytes kept in the MFT record


def plan_blocks(fmap: FileMap, block_bytes: int = DEFAULT_BLOCK_BYTES) -> list[Block]:
    """The blocks that rebuild the file: disk extents split at `block_bytes`, zero runs as zero blocks,
    a resident file as one data block."""
    if fmap.resident is not None:
        return [Block("data", len(fmap.resident), data=fmap.resident)] if fmap.resident else []
    blocks = []
    for extent in fmap.extents:
        done = 0
        while done < extent.length:
            n = min(block_bytes, extent.length - done)
            if extent.zero:
                blocks.append(Block("zero", n))
            else:
                blocks.append(Block("disk", n, extent.disk_offset + done))  # type: ignore[operator]
            done += n
    return blocks


def block_size_for(size: int, block_bytes: int) -> int:
    """`block_bytes`, raised (in MiB steps) when a file that big would need more than MAX_BLOCKS blocks."""
    needed = math.ceil(size / (MAX_BLOCKS - 1000)) if size else block_bytes
    return max(block_bytes, math.ceil(needed / MiB) * MiB)


def block_id(index: int) -> str:
    return f"crashcart-{index:08d}"  # the SDK base64-encodes it; every id has the same length


def read_url(container: Any, name: str, hours: float = 1.0) -> str:
    """A URL others (the storage service, triage) read the blob by: with the emulator's key a short read
    SAS signed here, otherwise the blob's own URL (Azure AD, or the container's SAS)."""
    client = container.get_blob_client(name)
    key = getattr(container.credential, "account_key", None)
    if not key:
        return client.url
    from azure.storage.blob import BlobSasPermissions, generate_blob_sas

    token = generate_blob_sas(container.account_name, container.container_name, name, account_key=key,
                              permission=BlobSasPermissions(read=True),
                              expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=hours))
    return f"{client.url.split('?', 1)[0]}?{token}"


class ServerCopy:
    """Copies files from the snapshot's export URL into block blobs under `prefix`, server-side."""

    def __init__(self, container: Any, prefix: str, source_url: str, source_auth: Auth, undo: contextlib.ExitStack,
                 notes: list[str], *, credential: Callable[[], Any], block_bytes: int = DEFAULT_BLOCK_BYTES,
                 parallel: int = DEFAULT_PARALLEL, before_block: Callable[[str], None] = lambda what: None,
                 progress: bool = False, plain_reader: Any = None):
        self.container, self.prefix, self.source_url, self.source_auth = container, prefix, source_url, source_auth
        self.undo, self.notes, self.credential = undo, notes, credential
        self.block_bytes, self.parallel = block_bytes, max(1, parallel)
        self.before_block, self.progress = before_block, progress
        self.plain_reader = plain_reader  # a decrypting view of the disk: disk blocks are uploaded from it
        self.zero_url = ""
        self.zero_auth: Auth = lambda: None
        self._lock = threading.Lock()

    def copy(self, dump: extract.FoundDump) -> dict[str, Any]:
        """Stages every block of the dump, commits the block list; what was copied, and how."""
        name, fmap = f"{self.prefix}/{dump.blob_suffix}", dump.file
        size_block = block_size_for(fmap.size, self.block_bytes if self.plain_reader is None
                                    else min(self.block_bytes, DECRYPT_BLOCK_BYTES))
        blocks = plan_blocks(fmap, size_block)
        if len(blocks) > MAX_BLOCKS:
            raise CrashcartError(
                f"{dump.windows_path} is in {fmap.fragments} fragments: copying it needs {len(blocks)} blocks, more than "
                f"a block blob's {MAX_BLOCKS}", "collect it with repair.strategy = \"rescue-vm\"", ExitCode.COLLECT_FAILED)
        zero_blocks = [b for b in blocks if b.kind == "zero"]
        if zero_blocks:
            self._zero_source(max(b.length for b in zero_blocks))
        client = self.container.get_blob_client(name)
        started = time.monotonic()
        counts = {"staged": 0, "uploaded": 0}
        crcs: list[int | None] = [None] * len(blocks)  # the service's CRC-64 of each staged block

        def stage(index: int, block: Block) -> None:
            self.before_block(f"copying {name}")
            if block.kind == "data":
                evidence.auth_retry(lambda: client.stage_block(block_id(index), block.data, length=block.length),
                                    f"upload a block of {name}")
                crcs[index] = crc64.crc64(block.data)  # the kit's own: it holds the bytes
            elif self.plain_reader is not None and block.kind == "disk":  # decrypted here: uploaded
                data = self.plain_reader.read_at(block.source_offset, block.length)
                if len(data) != block.length:
                    raise CrashcartError(f"{dump.windows_path}: the decrypted volume gave {len(data)} of {block.length} "
                                         f"bytes at disk offset {block.source_offset}", "run collect again",
                                         ExitCode.COLLECT_FAILED)
                evidence.auth_retry(lambda: client.stage_block(block_id(index), data, length=block.length),
                                    f"upload a decrypted block of {name}")
                crcs[index] = crc64.crc64(data)
            elif block.kind == "zero":
                crcs[index] = self._stage_from_url(client, name, index, self.zero_url, 0, block.length,
                                                   self.zero_auth, "zero source")
            else:
                crcs[index] = self._stage_from_url(client, name, index, self.source_url, block.source_offset,
                                                   block.length, self.source_auth, "snapshot")
            with self._lock:
                counts["staged"] += block.length
                counts["uploaded"] += block.length if block.kind == "data" or self.plain_reader is not None \
                    and block.kind == "disk" else 0

        how = "server-side" if self.plain_reader is None else "decrypting in the kit"
        bar = Progress(f"copy {dump.blob_suffix} {how}", total=float(fmap.size), unit=" bytes", every=15) \
            if self.progress else NullProgress()
        with bar, concurrent.futures.ThreadPoolExecutor(max_workers=self.parallel) as pool:
            futures = [pool.submit(stage, i, b) for i, b in enumerate(blocks)]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    bar.update(counts["staged"], status=f"{len(blocks)} blocks")
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        self._commit(client, name, len(blocks), dump.windows_path)
        seconds = time.monotonic() - started
        disk_blocks = sum(1 for b in blocks if b.kind == "disk")
        log.info("    %s: %d bytes in %d blocks (%d from the snapshot, %d zero), %.1fs", name, fmap.size, len(blocks),
                 disk_blocks, len(zero_blocks), seconds)
        return {"blob": name, "blocks": len(blocks), "block_bytes": size_block, "disk_blocks": disk_blocks,
                "zero_blocks": len(zero_blocks), "zero_bytes": sum(b.length for b in zero_blocks),
                "fragments": fmap.fragments, "uploaded_by_kit": counts["uploaded"], "seconds": round(seconds, 2),
                "method": SERVER_SIDE if self.plain_reader is None else THROUGH_KIT,
                "decrypted": self.plain_reader is not None,
                **compose_crc(blocks, crcs, decrypted=self.plain_reader is not None)}

    def _commit(self, client: Any, name: str, count: int, windows_path: str) -> None:
        from azure.storage.blob import BlobBlock, ContentSettings

        # Blob metadata values are ASCII: keep the Windows path readable.
        source = windows_path.encode("ascii", "backslashreplace").decode("ascii").replace("\\", "/")
        block_list = [BlobBlock(block_id=block_id(i)) for i in range(count)]
        # If-None-Match: * - a dump already stored under this name stays as it is (BlobExists).
        evidence.create_only(self.container, name, lambda conditions: client.commit_block_list(
            block_list, content_settings=ContentSettings(content_type="application/octet-stream"), **conditions),
            f"commit the block list of {name}",
            metadata={"crashcart_strategy": "snapshot_export", "crashcart_source": source})

    def _zero_source(self, length: int) -> None:
        """The empty page blob zero blocks are staged from: made once, deleted by the run's undo stack."""
        if self.zero_url:
            return
        name = f"{self.prefix}/{ZERO_SOURCE}"
        client = self.container.get_blob_client(name)
        size = max(512, math.ceil(length / 512) * 512)
        evidence.create_only(self.container, name, lambda conditions: client.create_page_blob(size=size, **conditions),
                             f"create the zero-source page blob {name}")
        self.undo.callback(self._delete_zero_source, name)  # only once it is ours: never another run's
        self.zero_url = read_url(self.container, name, hours=2)
        if "sig=" not in self.zero_url:  # Azure AD: the service fetches it with the kit's storage token
            tokens = Tokens(self.credential(), STORAGE_SCOPE)
            self.zero_auth = lambda: f"Bearer {tokens()}"

    def _delete_zero_source(self, name: str) -> None:
        """Undo of _zero_source(): never raises."""
        try:
            self.container.get_blob_client(name).delete_blob()
        except Exception as err:  # e.g. an immutability policy keeps it; it is an empty page blob
            self.notes.append(f"the empty zero-source page blob {name} could not be deleted ({first_line(err)}); "
                              "it holds no data")

    def _stage_from_url(self, client: Any, name: str, index: int, url: str, offset: int, length: int,
                        auth: Auth, what: str) -> int | None:
        """Put Block From URL; the service's CRC-64 of the block it wrote (None when it sent none)."""
        from azure.core.exceptions import HttpResponseError

        def put() -> int | None:
            authorization = auth()
            kwargs = {"source_authorization": authorization} if authorization else {}
            try:
                answer = client.stage_block_from_url(block_id(index), url, source_offset=offset,
                                                     source_length=length, **kwargs)
                return crc64.from_header((answer or {}).get("content_crc64"))
            except HttpResponseError as err:
                code = getattr(err, "error_code", None) or ""
                code = str(getattr(code, "value", code))  # StorageErrorCode members read as the service's code
                if "CopySource" in code:  # CannotVerifyCopySource and its kin: the service could not read the source
                    raise CrashcartError(
                        f"the storage service could not read the {what} to copy {name} ({err.status_code} {code}): "
                        f"{first_line(err)}", COPY_SOURCE_HINT, ExitCode.COLLECT_FAILED) from None
                raise

        return evidence.auth_retry(put, f"copy a block of {name} from the {what}")


def compose_crc(blocks: list[Block], crcs: list[int | None], decrypted: bool = False) -> dict[str, Any]:
    """The blob's CRC-64 composed from its blocks' (None when a block has none), who computed it, and what
    did not add up: a zero block whose service CRC is not that of its zeros."""
    missing = [i for i, crc in enumerate(crcs) if crc is None]
    problems = [f"block {i}: the service reports CRC-64 {crc64.to_hex(crc)} for {b.length} zero bytes, "  # type: ignore[arg-type]
                f"expected {crc64.to_hex(crc64.zeros_crc(b.length))}"
                for i, (b, crc) in enumerate(zip(blocks, crcs))
                if b.kind == "zero" and crc is not None and crc != crc64.zeros_crc(b.length)]
    total = None if missing else crc64.compose((crc, b.length) for b, crc in zip(blocks, crcs))  # type: ignore[misc]
    kit_blocks = sum(1 for b in blocks if b.kind == "data" or decrypted and b.kind == "disk")
    return {"crc64": None if total is None else crc64.to_hex(total), "crc64_missing": missing[:20],
            "crc64_blocks": {"service": len(blocks) - kit_blocks - len(missing), "kit": kit_blocks,
                             "missing": len(missing)},
            "crc64_problems": problems}
