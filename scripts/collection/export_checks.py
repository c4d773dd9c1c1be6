"""What snapshot-export checks after a server-side copy, and the manifest that says how.

Hashing, honestly. A SHA-256 needs every byte read by someone, and Azure Storage computes no SHA-256
server-side. So the manifest's `sha256` is computed by the kit by streaming the committed blob back
(`sha256_by` says so, with the bytes read); that read is the verification step, separate from the copy
and reported separately (the copy itself stays below 1% of the dump's size). `hash_blobs=False` skips it
and leaves `sha256` null, the manifest saying why. What is checked without reading everything: the blob's
size, its header (read through the same extent map from the disk and from the blob, compared), and
`spot_checks` sampled ranges compared between the snapshot and the blob, which catches a wrong extent
mapping. The per-block Content-MD5 the service returns for each staged block is its own integrity check.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

from scripts.base.console import step
from scripts.evidence import blobs as evidence
from scripts.windisk import extract
from scripts.windisk.ntfs import FileMap

SPOT_BYTES = 16 * 1024  # per sampled range: enough to catch an extent mapped to the wrong place
DEFAULT_SPOT_CHECKS = 8
HEADER_SPOT = 0x2000


@dataclass
class CopyCheck:
    """The checks of one copied blob: its SHA-256 (None when not computed) and what did not match."""

    sha256: str | None = None
    hashed_bytes: int = 0
    spots: list[tuple[int, int]] = field(default_factory=list)
    spot_bytes: int = 0  # bytes read for the comparisons, from both sides
    problems: list[str] = field(default_factory=list)


def check_copy(container: Any, reader: Any, dump: extract.FoundDump, name: str, *,
               spot_checks: int = DEFAULT_SPOT_CHECKS, hash_blobs: bool = True) -> CopyCheck:
    """Size, header and sampled ranges against the snapshot; then the SHA-256 (when asked) by reading back."""
    fmap = dump.file
    checked = CopyCheck(spots=spot_ranges(fmap, name, spot_checks))
    props = evidence.properties(container, name)
    if props is None or int(props.size) != fmap.size:
        checked.problems.append(f"{name} is {None if props is None else props.size} bytes after the commit, "
                                f"expected {fmap.size}")
    for offset, length in checked.spots:
        source = fmap.read(reader, offset, length)
        stored = evidence.read_bytes(container, name, offset, length) or b""
        checked.spot_bytes += len(source) + len(stored)
        if source != stored:
            checked.problems.append(f"{name}: bytes {offset}-{offset + length - 1} differ between the snapshot and the blob")
    if hash_blobs and not checked.problems:
        with step(f"SHA-256 of {name} (streaming the committed blob back)"):
            checked.sha256 = evidence.sha256(container, name)
            checked.hashed_bytes = fmap.size
    return checked


def spot_ranges(fmap: FileMap, name: str, count: int) -> list[tuple[int, int]]:
    """The header, and `count` ranges inside data extents (seeded by the blob name: reproducible)."""
    spots = [(0, min(fmap.size, HEADER_SPOT))] if fmap.size else []
    data = [e for e in fmap.extents if not e.zero]
    if not data or count <= 0:
        return spots
    rng = random.Random(hashlib.sha256(name.encode()).digest())
    for _ in range(count):
        extent = rng.choice(data)
        length = min(SPOT_BYTES, extent.length)
        offset = extent.file_offset + rng.randrange(0, extent.length - length + 1)
        offset -= offset % 512
        spots.append((offset, min(length, fmap.size - offset)))
    return spots


def write_manifest(container: Any, dump: extract.FoundDump, copied: dict[str, Any], checked: CopyCheck, *,
                   source_disk_id: str, snapshot_id: str | None, partition: Any) -> dict[str, Any]:
    """`<blob>.manifest.json` beside the blob: what it is, where it came from, how it was copied and checked."""
    name, sha = copied["blob"], checked.sha256
    body = {
        "schema": "crashcart.manifest/1",
        "blob": name,
        "kind": dump.kind,
        "size": dump.file.size,
        "sha256": sha,
        "sha256_by": ({"party": "crashcart host", "how": "streamed the committed blob back after Put Block List",
                       "bytes_read": checked.hashed_bytes} if sha else
                      {"party": None, "how": "not computed on request (the copy was server-side, so no party read "
                                             "every byte); hash the blob later by streaming it"}),
        "block_size": copied["block_bytes"],
        "source": {"path": dump.windows_path, "file_size": dump.file.file_size, "disk_copy_id": "",
                   "source_disk_id": source_disk_id, "snapshot_id": snapshot_id, "volume_path": dump.file.path,
                   "partition": partition},
        "header": dump.header_dict(),
        "collected_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "collector": "snapshot-export",
        "copy": {"method": "Put Block From URL from the snapshot's export SAS, then Put Block List (server-side)",
                 "blocks": copied["blocks"], "blocks_from_snapshot": copied["disk_blocks"],
                 "zero_blocks": copied["zero_blocks"], "zero_bytes": copied["zero_bytes"],
                 "fragments": copied["fragments"], "bytes_uploaded_by_kit": copied["uploaded_by_kit"],
                 "sparse_source": dump.file.sparse, "valid_data_length": dump.file.valid_data_length},
        "spot_check": {"ranges": len(checked.spots), "bytes_compared": checked.spot_bytes,
                       "by": "crashcart host: snapshot ranges (through the file's extent map) vs blob ranges",
                       "matched": not checked.problems},
    }
    # If-None-Match: * like every write: a manifest already there (an earlier run's) stays, BlobExists
    evidence.upload_text(container, f"{name}.manifest.json", json.dumps(body, indent=2), "application/json")
    return body
