"""What snapshot-export checks after a server-side copy, and the manifest that says how.

The proof, without reading the dump back. Every Put Block From URL answers with the service's own CRC-64
of the block it wrote (x-ms-content-crc64); server_copy composes them, in block order, into the CRC-64 of
the committed blob (scripts.evidence.crc64). The manifest records it as `crc64` with `crc64_by: "service"`
(a resident file's single block is hashed by the kit, which holds its bytes: `"kit"` for that part is
counted in `crc64_blocks`). Beside it, what the kit checks by reading little: the blob's size, its header
(read through the same extent map from the disk and from the blob, compared), and `spot_checks` sampled
ranges compared between the snapshot and the blob, which catches a wrong extent mapping.

SHA-256, honestly. A SHA-256 needs every byte read by someone, and Azure Storage computes none. So it is
not computed by default (`sha256` null, `sha256_by` says why). With `sha256=True` (collect --full-hash) the
kit streams the committed blob back with parallel range reads, computing SHA-256 and CRC-64 in one pass;
its CRC-64 must equal the service's (or stands in for it when the service sent none: `crc64_by: "kit"`).
Anyone with read access can do the same later: `pipenv run verify <blob URL>`.

A BitLocker volume decrypted in the kit (server_copy's `plain_reader`): every block was uploaded by the kit,
which computed its CRC-64 from the plaintext it held (`crc64_by: "kit"`); the sampled ranges are read through
the same decrypting view; the manifest's `copy.method` and `copy.through_kit` say the bytes passed through.
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
from scripts.evidence import crc64 as crc
from scripts.evidence.verify import hash_blob
from scripts.windisk import extract
from scripts.windisk.ntfs import FileMap

SPOT_BYTES = 16 * 1024  # per sampled range: enough to catch an extent mapped to the wrong place
DEFAULT_SPOT_CHECKS = 8
HEADER_SPOT = 0x2000


@dataclass
class CopyCheck:
    """The checks of one copied blob: its SHA-256 and the kit's CRC-64 (None when not read back) and what did
    not match."""

    sha256: str | None = None
    kit_crc64: str | None = None
    hashed_bytes: int = 0
    spots: list[tuple[int, int]] = field(default_factory=list)
    spot_bytes: int = 0  # bytes read for the comparisons, from both sides
    problems: list[str] = field(default_factory=list)


def check_copy(container: Any, reader: Any, dump: extract.FoundDump, name: str, *,
               spot_checks: int = DEFAULT_SPOT_CHECKS, sha256: bool = False,
               service_crc64: str | None = None) -> CopyCheck:
    """Size, header and sampled ranges against the snapshot; then (when asked) SHA-256 and CRC-64 by reading
    the blob back, that CRC-64 compared with the one composed from the service's answers."""
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
    if sha256 and not checked.problems:
        with step(f"SHA-256 and CRC-64 of {name} (reading the committed blob back, parallel ranges)"):
            hashes = hash_blob(container, name)
        checked.sha256, checked.kit_crc64, checked.hashed_bytes = hashes.sha256, hashes.crc64, hashes.bytes_read
        if service_crc64 is not None and hashes.crc64 != service_crc64:
            checked.problems.append(f"{name}: CRC-64 {hashes.crc64} read back, the service reported {service_crc64} "
                                    "for the blocks it wrote")
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
    service_crc = copied.get("crc64")
    body = {
        "schema": "crashcart.manifest/1",
        "blob": name,
        "kind": dump.kind,
        "size": dump.file.size,
        "sha256": sha,
        "sha256_by": ({"party": "crashcart host", "how": "read the committed blob back (parallel ranges) after "
                                                         "Put Block List", "bytes_read": checked.hashed_bytes} if sha else
                      {"party": None, "how": "not computed (the copy was server-side, so no party read every byte); "
                                             "`pipenv run verify <blob URL>` reads it and computes it"}),
        **crc64_fields(copied, checked, service_crc),
        "block_size": copied["block_bytes"],
        "source": {"path": dump.windows_path, "file_size": dump.file.file_size, "disk_copy_id": "",
                   "source_disk_id": source_disk_id, "snapshot_id": snapshot_id, "volume_path": dump.file.path,
                   "partition": partition},
        "header": dump.header_dict(),
        "collected_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "collector": "snapshot-export",
        "copy": {"method": copied.get("method") or "Put Block From URL from the snapshot's export SAS, then Put Block "
                                                   "List (server-side)",
                 "through_kit": bool(copied.get("decrypted")),
                 "blocks": copied["blocks"], "blocks_from_snapshot": copied["disk_blocks"],
                 "zero_blocks": copied["zero_blocks"], "zero_bytes": copied["zero_bytes"],
                 "fragments": copied["fragments"], "bytes_uploaded_by_kit": copied["uploaded_by_kit"],
                 "sparse_source": dump.file.sparse, "valid_data_length": dump.file.valid_data_length},
        "spot_check": {"ranges": len(checked.spots), "bytes_compared": checked.spot_bytes, "header_bytes": HEADER_SPOT,
                       "by": "crashcart host: snapshot ranges (through the file's extent map) vs blob ranges",
                       "matched": not checked.problems},
    }
    # If-None-Match: * like every write: a manifest already there (an earlier run's) stays, BlobExists
    evidence.upload_text(container, f"{name}.manifest.json", json.dumps(body, indent=2), "application/json")
    return body


def crc64_fields(copied: dict[str, Any], checked: CopyCheck, service_crc: str | None) -> dict[str, Any]:
    """`crc64`, who computed it (`crc64_by`: service | kit) and how, for the manifest."""
    blocks = copied.get("crc64_blocks") or {}
    if service_crc is not None:
        how = (f"composed from the CRC-64 the Blob service returned (x-ms-content-crc64) for each of the "
               f"{blocks.get('service', 0)} blocks it wrote by Put Block From URL"
               + (f", and the kit's CRC-64 of {blocks['kit']} block(s) it uploaded itself" if blocks.get("kit") else "")
               + "; combined in block order (GF(2) shift matrices, as zlib's crc32_combine)")
        if blocks.get("kit") and not blocks.get("service"):
            how = (f"computed by the kit over the bytes of each of the {blocks['kit']} block(s) it uploaded itself (it held "
                   "them: decrypted or resident data), combined in block order (GF(2) shift matrices, as zlib's "
                   "crc32_combine)")
        return {"crc64": service_crc, "crc64_by": "service" if not blocks.get("kit") or blocks.get("service") else "kit",
                "crc64_how": how, "crc64_base64": crc.to_header(int(service_crc, 16)),
                "crc64_checked_by_kit": checked.kit_crc64 == service_crc if checked.kit_crc64 else None,
                "crc64_blocks": blocks}
    if checked.kit_crc64 is not None:
        return {"crc64": checked.kit_crc64, "crc64_by": "kit", "crc64_base64": crc.to_header(int(checked.kit_crc64, 16)),
                "crc64_how": "the service returned no CRC-64 for some blocks "
                             f"({blocks.get('missing', '?')}); computed by the kit reading the blob back"}
    return {"crc64": None, "crc64_by": None,
            "crc64_how": f"the service returned no CRC-64 for {blocks.get('missing', '?')} block(s) and the blob was not "
                         "read back: `pipenv run verify <blob URL>` computes it"}
