"""Proof that what the rescue VM says it stored is in the evidence container, whole.

For every dump the remote script reports as uploaded:
- the blob and its `<blob>.manifest.json` exist, and the manifest names that blob;
- the blob's size equals the manifest's (and the remote's) size: a committed block list is all or
  nothing, so a right size means every block is there;
- the blob starts with a kernel dump header that parses (scripts.dumpfile's DumpHeader: signature,
  dump type, machine, processors) and its layout fits in the blob's size; its stop code is the one the
  manifest recorded;
- its SHA-256 and CRC-64 (scripts.evidence.crc64, the CRC Azure Storage computes), recomputed in one pass
  over the blob read back with parallel range requests (`hash_blob`), equal the manifest's — always for
  blobs up to `hash_limit` bytes (minidumps, small kernel dumps), for all with `full_hash` (a 16 GiB
  complete dump is a long download, so that is the operator's choice). Above the limit the manifest's
  CRC-64 (composed from what the service reported, or computed where the dump was read) and the size
  stand in for it; `pipenv run verify` does the full read whenever someone wants it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from scripts.evidence import blobs as evidence
from scripts.evidence import crc64 as crc
from scripts.dumpfile.errors import BadDump
from scripts.dumpfile.header import PROBE_SIZE, DumpHeader

DEFAULT_HASH_LIMIT = 256 * 1024 * 1024
READ_CONCURRENCY = 8  # parallel range requests of a read-back


@dataclass(frozen=True)
class BlobHashes:
    sha256: str
    crc64: str  # 16 hex digits (scripts.evidence.crc64.to_hex)
    bytes_read: int


def hash_blob(container: Any, name: str, concurrency: int = READ_CONCURRENCY) -> BlobHashes:
    """SHA-256 and CRC-64 of a whole blob in one pass, read with `concurrency` parallel range requests
    (the SDK's chunked download) and streamed in order: never held in memory whole."""
    def compute() -> BlobHashes:
        sha, running, total = hashlib.sha256(), 0, 0
        for chunk in container.download_blob(name, max_concurrency=concurrency).chunks():
            sha.update(chunk)
            running = crc.crc64(chunk, running)
            total += len(chunk)
        return BlobHashes(sha.hexdigest(), crc.to_hex(running), total)

    return evidence.auth_retry(compute, f"read {name}")


@dataclass
class VerifiedBlob:
    name: str
    url: str
    kind: str
    source_path: str
    size: int | None = None
    sha256: str | None = None  # as the manifest records it
    sha256_checked: bool = False  # recomputed from the blob and equal
    crc64: str | None = None  # as the manifest records it
    crc64_by: str | None = None  # who computed the manifest's: service | kit | rescue-vm
    crc64_checked: bool = False  # recomputed from the blob and equal
    bytes_read: int = 0  # of the blob, to hash it
    computed: dict[str, Any] | None = None  # what was read back: sha256, crc64, bytes_read
    header: dict[str, Any] | None = None  # DumpHeader.to_dict() of the stored blob
    manifest: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def verify_file(container: Any, reported: dict[str, Any], *, full_hash: bool = False,
                hash_limit: int = DEFAULT_HASH_LIMIT, concurrency: int = READ_CONCURRENCY) -> VerifiedBlob:
    """Checks one dump the remote script reported (an entry of its result's `files`)."""
    name = str(reported.get("blob", ""))
    result = VerifiedBlob(name=name, url=evidence.blob_url(container, name), kind=str(reported.get("kind", "")),
                          source_path=str(reported.get("source_path", "")))
    manifest = _manifest(container, name, result)
    props = evidence.properties(container, name)
    if props is None:
        result.problems.append(f"{name} is not in the container")
        return result
    result.size = int(props.size)
    if manifest is not None:
        result.sha256, result.crc64, result.crc64_by = manifest.get("sha256"), manifest.get("crc64"), manifest.get("crc64_by")
        if result.crc64 is not None and crc.from_hex(result.crc64) is None:
            result.problems.append(f"{name}.manifest.json: crc64 {result.crc64!r} is not 16 hex digits")
        if manifest.get("size") != result.size:
            result.problems.append(f"{name} is {result.size} bytes, its manifest says {manifest.get('size')}")
    if reported.get("size") is not None and reported.get("size") != result.size:
        result.problems.append(f"{name} is {result.size} bytes, the rescue VM sent {reported.get('size')}")
    _check_header(container, result, manifest)
    if full_hash and manifest is not None and not (result.sha256 or result.crc64):
        result.problems.append(f"{name}.manifest.json records neither a SHA-256 nor a CRC-64: nothing to compare")
    if (result.sha256 or result.crc64 or full_hash) and (full_hash or result.size <= hash_limit):
        check_hashes(result, hash_blob(container, name, concurrency))
    elif result.sha256 and (props.metadata or {}).get("sha256") not in (None, result.sha256):
        result.problems.append(f"{name}'s metadata SHA-256 differs from its manifest's")
    return result


def check_hashes(result: VerifiedBlob, actual: BlobHashes) -> None:
    """Compares what was read back with the manifest's SHA-256 and CRC-64 (each when it records one)."""
    result.bytes_read = actual.bytes_read
    result.computed = {"sha256": actual.sha256, "crc64": actual.crc64, "bytes_read": actual.bytes_read}
    if result.sha256:
        if actual.sha256 != result.sha256:
            result.problems.append(f"{result.name} has SHA-256 {actual.sha256}, its manifest says {result.sha256}")
        else:
            result.sha256_checked = True
    if result.crc64:
        if actual.crc64 != str(result.crc64).lower():
            result.problems.append(f"{result.name} has CRC-64 {actual.crc64}, its manifest says {result.crc64} "
                                   f"(computed by {result.crc64_by or 'an unnamed party'})")
        else:
            result.crc64_checked = True


def _manifest(container: Any, name: str, result: VerifiedBlob) -> dict[str, Any] | None:
    raw = evidence.read_bytes(container, f"{name}.manifest.json")
    if raw is None:
        result.problems.append(f"{name}.manifest.json is missing")
        return None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        result.problems.append(f"{name}.manifest.json is not JSON: {err}")
        return None
    if manifest.get("blob") != name:
        result.problems.append(f"{name}.manifest.json describes {manifest.get('blob')!r}")
    result.manifest = manifest
    return manifest


def _check_header(container: Any, result: VerifiedBlob, manifest: dict[str, Any] | None) -> None:
    probe = evidence.read_bytes(container, result.name, 0, min(PROBE_SIZE, result.size or 0)) or b""
    try:
        header = DumpHeader.parse(probe)
        header.check_size(result.size or 0)
    except BadDump as err:
        result.problems.append(f"{result.name}: {err.message}")
        return
    result.header = header.to_dict()
    recorded = ((manifest or {}).get("header") or {}).get("bugcheck_code")
    if recorded is not None and _as_int(recorded) != header.bugcheck_code:
        result.problems.append(
            f"{result.name}: stop code {header.bugcheck_code:#x} in the blob, {recorded} in the manifest")


def _as_int(value: Any) -> int | None:
    try:
        return int(str(value), 0)
    except ValueError:
        return None


def verify_files(container: Any, files: list[dict[str, Any]], *, full_hash: bool = False,
                 hash_limit: int = DEFAULT_HASH_LIMIT) -> list[VerifiedBlob]:
    """Every file the remote reported as uploaded."""
    return [verify_file(container, f, full_hash=full_hash, hash_limit=hash_limit)
            for f in files if f.get("uploaded")]
