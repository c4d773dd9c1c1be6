"""`pipenv run verify <blob URL>`: prove a stored dump is what its manifest says, with read access alone.

Reads `<blob>.manifest.json`, then the whole blob once with parallel range requests, computing its SHA-256
and CRC-64 (the CRC Azure Storage computes: scripts.evidence.crc64) in one pass, and compares them with the
manifest's (`crc64` composed from the service's per-block answers by snapshot-export, or computed on the
rescue VM while it read the dump; `sha256` when one was recorded), beside the size and the dump header.
Anyone holding 'Storage Blob Data Reader' on the evidence container (or a container SAS in the URL) can run
it, long after the collection. Prints one JSON document on stdout; exit 0 when everything matches, 15
(VERIFY_FAILED) when the blob or its manifest is missing or anything differs, 2 for a URL that names no blob.
"""

from __future__ import annotations

import argparse
import urllib.parse
from typing import Any

from scripts.base.console import emit_json
from scripts.base.endpoints import is_loopback_host, token_refusal
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.rangeio import check_url
from scripts.evidence import blobs as evidence
from scripts.evidence import verify

USAGE_HINT = ("pass the blob's URL as the report lists it, e.g. "
              "https://<account>.blob.core.windows.net/<container>/<vm key>/<run>/MEMORY.DMP")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="the stored dump's blob URL (a container SAS may follow it as ?...)")
    parser.add_argument("--concurrency", type=int, default=verify.READ_CONCURRENCY,
                        help="parallel range requests while reading the blob (default: %(default)s)")


def split_blob_url(url: str) -> tuple[str, str, str, str]:
    """(account endpoint, container, blob name, SAS query) of a blob URL. A loopback host (the storage
    emulator) carries the account as the first path segment. Without a SAS the URL must be one an Azure AD
    token may go to (scripts.base.endpoints.token_refusal), as for triage."""
    url = url.strip()
    if not url.startswith(("http://", "https://")):
        raise CrashcartError(f"{url.split('?', 1)[0]!r} is not a blob URL", USAGE_HINT, ExitCode.USAGE)
    check_url(url)
    parsed = urllib.parse.urlsplit(url)
    refusal = None if "sig" in urllib.parse.parse_qs(parsed.query) else token_refusal(url)
    if refusal:
        raise CrashcartError(refusal, "give the blob's https://<account>.blob.core.windows.net URL, or the URL "
                             "with a SAS", ExitCode.USAGE)
    parts = [urllib.parse.unquote(p) for p in parsed.path.split("/")[1:]]
    base = f"{parsed.scheme}://{parsed.netloc}"
    if is_loopback_host(base) and parts:
        base, parts = f"{base}/{parts[0]}", parts[1:]
    if len(parts) < 2 or not parts[0] or not parts[-1]:
        raise CrashcartError(f"{url.split('?', 1)[0]} names no blob inside a container", USAGE_HINT, ExitCode.USAGE)
    return base, parts[0], "/".join(parts[1:]), parsed.query


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.concurrency <= 64:
        raise CrashcartError(f"--concurrency {args.concurrency} is out of range", "use 1 to 64", ExitCode.USAGE)
    endpoint, container_name, name, sas = split_blob_url(args.url)
    container = evidence.container_client(endpoint, container_name, credential=sas if "sig=" in sas else None)
    checked = verify.verify_file(container, {"blob": name}, full_hash=True, concurrency=args.concurrency)
    emit_json(_document(checked, args.url.split("?", 1)[0]))
    if not checked.ok:
        raise CrashcartError(f"{name}: " + "; ".join(checked.problems),
                             "the stored blob is not what was collected: collect again, and keep this output with "
                             "the ticket", ExitCode.VERIFY_FAILED)
    return int(ExitCode.OK)


def _document(checked: verify.VerifiedBlob, url: str) -> dict[str, Any]:
    manifest = checked.manifest or {}
    return {"blob": url, "ok": checked.ok, "size": checked.size,
            "manifest": {"sha256": checked.sha256, "crc64": checked.crc64, "crc64_by": checked.crc64_by,
                         "collector": manifest.get("collector")},
            "computed": checked.computed, "sha256_checked": checked.sha256_checked,
            "crc64_checked": checked.crc64_checked, "header": checked.header, "problems": checked.problems}
