"""Strategy `snapshot-export`: collect the dump from a snapshot of the broken OS disk, with no VM at all.

    snapshot (the repair stack's, or one made here) -> grant read access (short-lived SAS)   snapshot_access
    -> read partition table / NTFS / SYSTEM hive over HTTP range requests                     windisk.extract
    -> copy each dump's extents server-side into a block blob (Put Block From URL)            server_copy
    -> the service's per-block CRC-64s composed; header + sampled ranges compared; manifest    export_checks
    -> undo: delete the zero source, revoke access, delete a snapshot made here (always)
    -> verify, triage, SAS links (best effort), report

Where the bytes go. The dump's bytes travel from the snapshot's export URL straight into the evidence
account. The kit itself reads only the metadata it needs to find the file (partition table, MFT records,
index buffers, hive cells: a few MiB whatever the disk size), the dump header and a few sampled ranges.
The proof that the blob is the file is the CRC-64 the storage service reports for every block it wrote,
composed into the blob's (no read-back); only when asked (`hash_blobs`, collect --full-hash) does the kit
read the committed blob back for a SHA-256. `export.bytes_through_kit` accounts for every byte.

Guarantees: access is revoked whenever a grant was requested, and a snapshot made here is deleted, on
success, failure or interrupt: each is an undo action on a contextlib.ExitStack, registered when there
is something to undo, and the stack unwinds with SIGINT/SIGTERM held back (scripts.base.signals: a second
Ctrl-C waits for the revoke instead of skipping it). What could not be undone is named in
`export.left_behind` with the `az` command that finishes the job, and a run whose dumps are stored ends
`cleanup_failed`. A snapshot or disk whose
network access policy is DenyAll cannot be exported: that is refused with the way out. With
dataAccessAuthMode AzureActiveDirectory, reads carry an Azure AD token for `https://disk.azure.com/` and
server-side copies carry it in `x-ms-copy-source-authorization`.

An encrypted OS disk (Azure Disk Encryption: BitLocker). When the Windows volume turns out to be BitLocker,
the disk's encryption settings name its key (scripts.collection.ade_key): the .BEK file is read from the VM's
Key Vault with the kit's credential (roles "Key Vault Secrets User", + "Key Vault Crypto User" with a KEK) and
the volume unlocked in the kit (scripts.windisk.bitlocker). The disk holds ciphertext, so a server-side
copy is impossible: each dump is read over the export URL, decrypted here and uploaded (the report, the
manifest and `export.bitlocker` say the bytes passed through the kit, and why). A disk that names no key
is refused (exit 11) with the ways out.

The result is the contract's CollectResult (strategy "snapshot-export") with `export`: what was read,
copied, hashed and cleaned up, and `triage`: the verdict on the stored dump.

Nothing is overwritten. The run writes under `<vm key>/<UTC run stamp>/` (contract.run_prefix: two VMs
named alike never share it); a prefix that already holds a report is refused before anything is done,
and every blob written (the block list, the zero source, manifests, the report) is If-None-Match: *, so a
dump already stored there stays as it is: the run ends with exit 12 naming the blob, and no report of it
is written over the earlier run's folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from scripts.base import signals
from scripts.base.console import step
from scripts.base.errors import CrashcartError, ExitCode, first_line
from scripts.base.stop import check
from scripts.collection import ade_key, report
from scripts.collection.contract import (CollectError, CollectRequest, CollectResult, failure_status, run_prefix,
                                         run_stamp)
from scripts.collection.export_checks import DEFAULT_SPOT_CHECKS, check_copy, write_manifest
from scripts.collection.sas import add_sas_links
from scripts.collection.server_copy import DEFAULT_BLOCK_BYTES, DEFAULT_PARALLEL, ServerCopy, read_url
from scripts.collection.snapshot_access import ExportTarget, SnapshotAccess, open_export
from scripts.evidence import blobs as evidence
from scripts.evidence import verify
from scripts.windisk import bitlocker, extract
from scripts.windisk.errors import ExtractError

log = logging.getLogger("crashcart.snapshot_export")

STRATEGY = "snapshot-export"
NO_COMMAND = "none: snapshot-export runs no command on any VM"
NO_DUMP_HINT = ("the broken VM left no memory dump on its OS disk (see notes: CrashControl, page file). Configure a "
                "dump and reproduce the crash: `pipenv run prepare-dump`, then collect again")
ENCRYPTED = "the Windows volume is encrypted with BitLocker"  # disk.find_windows_volume: needs a key
TRIAGE_ORDER = {"memory": 0, "pagefile": 1, "dedicated": 2, "minidump": 3}


@dataclass(frozen=True)
class ExportOptions:
    """The export's own knobs, beside the contract's CollectRequest (defaults are what `collect` uses)."""

    target: ExportTarget | None = None  # None: from the request's outputs, else from its config
    credential: Any = None  # Azure AD credential for disk and storage tokens (None: DefaultAzureCredential)
    block_bytes: int = DEFAULT_BLOCK_BYTES
    parallel: int = DEFAULT_PARALLEL
    hash_blobs: bool = False  # also a SHA-256 (and the kit's own CRC-64), reading each committed blob back
    spot_checks: int = DEFAULT_SPOT_CHECKS
    triage: bool = True
    keyvault_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra Key Vault client kwargs


class SnapshotExportCollector:
    """contract.Collector over a snapshot export: returns the result when every dump is stored and
    verified, raises CollectError (with the partial result) for every other outcome."""

    strategy = STRATEGY

    def __init__(self, options: ExportOptions | None = None):
        self.options = options or ExportOptions()

    def collect(self, request: CollectRequest) -> CollectResult:
        if request.sas_days is not None:
            evidence.check_sas_days(request.sas_days)  # a usage error before anything runs, not after the copy
        run = _Export(request, self.options)
        report.claim(run.result, run.container, run.prefix)
        started = time.monotonic()
        failure = run.copy_out()
        run.result.run_command["seconds"] = round(time.monotonic() - started, 1)
        if run.left:
            run.export["left_behind"] = run.left
        if failure is not None:
            raise self._failed(run, failure)
        return self._finish(run)

    def _failed(self, run: "_Export", failure: CrashcartError) -> CollectError:
        """The run ended before every dump was stored: what is stored is verified (not re-hashed) and
        reported; the CollectError carries the result."""
        r = run.result
        also = f"; also left behind: {'; '.join(run.left)}" if run.left else ""
        r.conclude(failure_status(failure), failure.message + also, failure.hint, cause=failure)
        r.run_command["state"] = "Failed"
        if run.files:
            r.blobs = verify.verify_files(run.container, run.files, full_hash=False, hash_limit=0)
        if not isinstance(failure, evidence.BlobExists):  # the prefix holds an earlier run's blobs: leave it be
            run.write_report()
        return CollectError.of(r)

    def _finish(self, run: "_Export") -> CollectResult:
        """Every dump is stored: verify, triage, links, the account of bytes, the report, the outcome."""
        r, options = run.result, self.options
        with step("verify the stored dumps"):
            # the read-back, when asked, was done once already (export_checks): never a second full read
            r.blobs = verify.verify_files(run.container, run.files, full_hash=False, hash_limit=0)
            for blob, stored in zip(r.blobs, run.files):
                blob.problems += stored["problems"]
                blob.crc64_checked = stored["crc64_checked"] and not blob.problems  # read back == the service's
                blob.bytes_read = stored["read_back"]
            from scripts.dumpfile.header import PROBE_SIZE

            run.export["kit_bytes"]["verify_headers"] = sum(min(PROBE_SIZE, b.size or 0) for b in r.blobs)
        r.run_command["state"] = "Succeeded"
        problems = [p for b in r.blobs for p in b.problems]
        if problems:
            r.conclude("verify_failed", "verification failed: " + "; ".join(problems),
                       "the stored blobs are incomplete or differ from the snapshot: run collect again (a new run "
                       "copies afresh)")
        else:
            r.conclude("collected", f"{len(r.blobs)} dump file(s) " + (
                "copied server-side from the snapshot" if run.plain is None else
                "read from the snapshot, decrypted and uploaded through the kit (BitLocker: the disk holds "
                "ciphertext, so no server-side copy)") + f" under {run.prefix}/")
            if options.triage:
                _triage(r, run.export, run.container, run.credential)
            add_sas_links(r, run.container, run.request.sas_days)
        _account(run.export, run.files)
        if run.left and r.ok:
            r.conclude("cleanup_failed", f"the dumps are stored, but cleanup left resources: {'; '.join(run.left)}",
                       "remove them with the commands above")
        run.write_report()
        for blob in r.blobs:
            log.info("    %s %s (%d bytes)%s", "ok " if blob.ok else "BAD", blob.name, blob.size or 0,
                     "" if blob.ok else ": " + "; ".join(blob.problems))
        if not r.ok:
            raise CollectError.of(r)
        return r


class _Export:
    """One export: the target, container, result and account its steps share."""

    def __init__(self, request: CollectRequest, options: ExportOptions):
        self.request, self.options = request, options
        self.target = _target(request, options)
        self.outputs = self.target.outputs
        self.timeout_s = max(60.0, request.timeout_minutes * 60)
        self.deadline = time.monotonic() + self.timeout_s
        self.now = request.now or dt.datetime.now(dt.timezone.utc)
        self.stamp = run_stamp(self.now)
        self.prefix = run_prefix(self.target.source_vm_id, self.stamp)
        self.container = evidence.container_client(self.outputs.evidence_blob_endpoint, self.outputs.evidence_container)
        self.result = CollectResult(
            status="running", exit_code=int(ExitCode.OK), message="", run=self.prefix, strategy=STRATEGY,
            source_vm_id=self.target.source_vm_id, rescue_vm_id=self.outputs.rescue_vm_id, rescue_os="none",
            container_url=self.container.url.split("?", 1)[0].rstrip("/"), run_command={"name": NO_COMMAND},
            export={"kit_bytes": {"metadata": 0, "header_and_spot_checks": 0, "uploaded": 0, "verify_headers": 0,
                                  "hash_read": 0, "triage": 0}})
        self.export: dict[str, Any] = self.result.export  # type: ignore[assignment]
        self.files: list[dict[str, Any]] = []  # the stored dumps, as verify.verify_files takes them
        self.left: list[str] = []  # what the undo actions could not undo
        self.reader: Any = None
        self.plain: Any = None  # a BitLocker volume's decrypting view of the disk (None: the disk is plaintext)
        self._credential = options.credential

    def credential(self) -> Any:
        """The Azure AD credential, made only when a token is needed (AAD data access, triage over AAD)."""
        if self._credential is None:
            from scripts.azure.clients import credential

            self._credential = credential()
        return self._credential

    def copy_out(self) -> CrashcartError | None:
        """Everything that needs the snapshot, inside the undo stack that takes it back; returns the failure
        that ended it, if any. A stop request (StopRun) passes through, after the undo."""
        try:
            with contextlib.ExitStack() as undo, _unwound_whole(undo):
                access = SnapshotAccess(self.target, undo, self.export, self.result.notes, self.left,
                                        credential=self.credential, poll_seconds=self.request.poll_seconds,
                                        stamp=self.stamp, now=self.now)
                self.outputs = dataclasses.replace(self.outputs, snapshot_id=access.prepare())  # the report names it
                url = access.grant(self.timeout_s)
                findings = self.inspect(url, access.disk_auth)
                copier = ServerCopy(self.container, self.prefix, url, access.source_auth, undo, self.result.notes,
                                    credential=self.credential, block_bytes=self.options.block_bytes,
                                    parallel=self.options.parallel, before_block=self._before_block,
                                    progress=self.request.progress, plain_reader=self.plain)
                for dump in findings.dumps:
                    self.store(copier, dump)
                self.export["looked_at"] = findings.looked_at
                _refuse_incomplete(findings)
        except KeyboardInterrupt:
            return CrashcartError("interrupted", "run collect again", ExitCode.INTERRUPTED)
        except CrashcartError as err:
            return err
        except Exception as err:  # an SDK error nothing above translated: still a report, then a bug
            log.exception("snapshot export failed unexpectedly")
            return CrashcartError(f"the snapshot export failed: {first_line(err)}",
                                  "re-run with -v and report it with the log", ExitCode.BUG)
        return None

    def inspect(self, url: str, disk_auth: Any) -> extract.DiskFindings:
        with step("read the partition table, the Windows volume and CrashControl over range requests"):
            self.reader = open_export(url, disk_auth)
            findings = self._inspect_unlocking()
            self.export["kit_bytes"]["metadata"] = self.reader.bytes_read
        v = findings.volume
        log.info("    %s disk%s, Windows on partition %s (%s MiB); CrashControl %s: DumpFile=%s",
                 findings.scheme.upper(), " (fixed VHD)" if findings.vhd_footer else "", v.number, v.total_size >> 20,
                 findings.crash_control.get("control_set"), findings.crash_control.get("DumpFile") or "(default)")
        self.result.crash_control = findings.crash_control
        self.result.volume = {**v.to_dict(), "disk_size": findings.disk_size, "vhd_footer": findings.vhd_footer}
        self.result.notes += findings.notes
        self.export["partitions"] = findings.partitions
        self.export["metadata_requests"] = self.reader.requests
        return findings

    def _inspect_unlocking(self) -> extract.DiskFindings:
        """extract.inspect_disk; a BitLocker volume that needs a key is read again with the key(s) the disk's
        encryption settings name, read from Key Vault (none named: exit 11 with the ways out)."""
        try:
            return extract.inspect_disk(self.reader)
        except ExtractError as err:
            if not err.message.startswith(ENCRYPTED):
                raise
        with step("read the BitLocker key (BEK) the disk's encryption settings name from Key Vault"):
            keys = ade_key.read_keys(self.target.source_disk_id, self.target.source_vm_id, self.credential,
                                     **self.options.keyvault_options)
        last: ExtractError | None = None
        for key in keys:
            try:
                findings = extract.inspect_disk(self.reader, bek=key.data)
            except ExtractError as err:
                last = err
                continue
            self.plain = findings.volume.reader
            self.export["bitlocker"] = {"key": key.describe(), "unlocked": findings.volume.encryption,
                                        "through_kit": bitlocker.THROUGH_THE_KIT}
            return findings
        assert last is not None
        raise last

    def store(self, copier: ServerCopy, dump: extract.FoundDump) -> None:
        """One dump: copied server-side, checked against the snapshot, its manifest written."""
        how = "server-side" if self.plain is None else "decrypted in the kit, uploaded"
        read_before = self.reader.bytes_read
        with step(f"copy {dump.windows_path} -> {self.prefix}/{dump.blob_suffix} ({how})"):
            copied = copier.copy(dump)
        kit = self.export["kit_bytes"]
        kit["uploaded"] += copied["uploaded_by_kit"]
        if self.plain is not None:  # the ciphertext read to decrypt it
            kit["read_to_decrypt"] = kit.get("read_to_decrypt", 0) + self.reader.bytes_read - read_before
        name = copied["blob"]
        checked = check_copy(self.container, self.plain or self.reader, dump, name, spot_checks=self.options.spot_checks,
                             sha256=self.options.hash_blobs or self.request.full_hash, service_crc64=copied["crc64"])
        checked.problems += copied["crc64_problems"]
        kit["header_and_spot_checks"] += checked.spot_bytes
        kit["hash_read"] += checked.hashed_bytes
        manifest = write_manifest(self.container, dump, copied, checked, source_disk_id=self.target.source_disk_id,
                                  snapshot_id=self.export["snapshot"].get("id"),
                                  partition=(self.result.volume or {}).get("partition"))
        self.export.setdefault("copies", []).append({**copied, "sha256": checked.sha256, "crc64_by": manifest["crc64_by"],
                                                     "hashed_bytes": checked.hashed_bytes, "problems": checked.problems})
        self.files.append({"kind": dump.kind, "source_path": dump.windows_path, "blob": name,
                           "url": evidence.blob_url(self.container, name), "size": dump.file.size,
                           "sha256": manifest["sha256"], "header": manifest["header"], "uploaded": True,
                           "problems": checked.problems, "read_back": checked.hashed_bytes,
                           "crc64_checked": checked.kit_crc64 is not None and checked.kit_crc64 == copied["crc64"]})

    def _before_block(self, what: str) -> None:
        check(self.request.stop)
        if time.monotonic() > self.deadline:
            raise CrashcartError(f"the export did not finish within {self.timeout_s / 60:.0f} min ({what})",
                                 "raise repair.collect_timeout_minutes (or --timeout-minutes) and run collect again",
                                 ExitCode.TIMED_OUT)

    def write_report(self) -> None:
        report.store(self.result, self.outputs, self.request.out_dir / self.prefix, self.container, self.prefix)


@contextlib.contextmanager
def _unwound_whole(undo: contextlib.ExitStack) -> Iterator[None]:
    """Unwinds `undo` (revoke access, delete the snapshot and the zero source) on the way out, with SIGINT and
    SIGTERM held back until every undo action ran: a second Ctrl-C waits, it never skips one."""
    try:
        yield
    finally:
        with signals.deferred("the snapshot export's cleanup (revoke access, delete what the kit made)"):
            undo.close()


def _target(request: CollectRequest, options: ExportOptions) -> ExportTarget:
    if options.target is not None:
        return options.target
    if request.outputs is not None:
        return ExportTarget.from_outputs(request.outputs, request.config)
    if request.config is not None:
        return ExportTarget.from_config(request.config)
    raise CrashcartError("snapshot-export needs the repair stack's outputs or a config naming the disk",
                         "run `pipenv run discover --vm <id>` first", ExitCode.USAGE)


def _refuse_incomplete(findings: extract.DiskFindings) -> None:
    """A dump that cannot be copied server-side, or none at all, ends the run (after what could be stored)."""
    if findings.skipped:
        stored = f"{len(findings.dumps)} other dump(s) are stored and verified, but " if findings.dumps else ""
        raise CrashcartError(
            f"{stored}{'; '.join(findings.skipped)}: its bytes on disk are not the file's, so it cannot be "
            "copied server-side", "collect with repair.strategy = \"rescue-vm\" (the rescue VM's NTFS driver "
            "decompresses it)", ExitCode.COLLECT_FAILED)
    if not findings.dumps:
        raise CrashcartError(f"the broken volume holds no memory dump (looked at {', '.join(findings.looked_at)})",
                             NO_DUMP_HINT, ExitCode.NO_DUMP)


def _triage(result: CollectResult, export: dict[str, Any], container: Any, credential: Any) -> None:
    """The verdict on the primary stored dump (the full one before minidumps); a dump triage cannot read
    is a note, the collection stands."""
    good = sorted(result.dumps, key=lambda b: TRIAGE_ORDER.get(b.kind, 9))
    if not good:
        return
    blob = good[0]
    from scripts.dumpfile.errors import BadDump
    from scripts.dumpfile.triage import triage

    with step(f"triage {blob.name}"):
        try:
            verdict = triage(read_url(container, blob.name), credential)
        except (BadDump, CrashcartError) as err:
            result.notes.append(f"triage of {blob.name} failed: {getattr(err, 'message', None) or first_line(err)}")
            return
    data = {**verdict.to_dict(), "source": blob.name}
    export["kit_bytes"]["triage"] = verdict.bytes_read
    export["triage"] = result.triage = data
    module = (data.get("faulting_module") or {}).get("name")
    result.notes.append(f"triage of {blob.name}: {verdict.summary}" + (f" (faulting driver: {module})" if module else ""))
    result.notes.append(f"next: {verdict.next_step}")
    log.info("    %s", verdict.summary)


def _account(export: dict[str, Any], files: list[dict[str, Any]]) -> None:
    """How many bytes passed through the kit, per purpose, against the dump bytes copied."""
    kit = export["kit_bytes"]
    total = sum(f["size"] for f in files) or 1
    copy_bytes = (kit["metadata"] + kit["header_and_spot_checks"] + kit["uploaded"] + kit["verify_headers"]
                  + kit.get("read_to_decrypt", 0))
    export["bytes_through_kit"] = {
        "copy": copy_bytes, "copy_ratio": round(copy_bytes / total, 6), "hash": kit["hash_read"],
        "triage": kit["triage"], "dump_bytes": total,
        "counts": "response and request bodies only (HTTP headers are not counted); copy = metadata + dump headers and "
                  "spot checks + bytes uploaded + verification header reads (+ the ciphertext read to decrypt a "
                  "BitLocker volume)"}
