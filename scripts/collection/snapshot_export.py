"""Strategy `snapshot-export`: collect the dump from a snapshot of the broken OS disk, with no VM at all.

    snapshot (the repair stack's, or one made here) -> grant read access (short-lived SAS)
    -> read partition table / NTFS / SYSTEM hive over HTTP range requests (scripts.extract)
    -> copy each dump's extents server-side into a block blob (Put Block From URL) -> Put Block List
    -> manifest, verify, triage, report -> revoke access, delete a snapshot made here (always)

Where the bytes go. The dump's bytes travel from the snapshot's export URL straight into the evidence
account: for every extent of the file (its NTFS data runs mapped to disk offsets) the kit asks the storage
service to stage a block from `<export URL>` with `x-ms-source-range`, then commits the block list. The
kit itself reads only the metadata it needs to find the file (partition table, MFT records, index
buffers, hive cells: a few MiB whatever the disk size), the dump header and a few sampled ranges.

Sparse runs (and bytes past the valid data length) are zeros that exist nowhere on the disk. Uploading
zeros from the kit (Put Block with a local buffer) would send as many bytes through the kit as the
holes are long — gigabytes for a preallocated dump file, over the operator's uplink. Instead the kit
creates one empty page blob beside the run (`Put Blob` with `x-ms-blob-type: PageBlob` and a length:
no data is sent, unwritten pages read as zeros and are not billed) and stages zero blocks *from it* by URL;
it is deleted when the run ends. Cost through the kit: one empty request per zero block.

Hashing, honestly. A SHA-256 needs every byte read by someone, and Azure Storage computes no SHA-256
server-side. So the manifest's `sha256` is computed by the kit by streaming the committed blob back
(`sha256_by` says so, with the bytes read); that read is the verification step, separate from the copy
and reported separately (the copy itself stays below 1% of the dump's size). `hash_blobs=False` skips it
and leaves `sha256` null, the manifest saying why. What is checked without reading everything: the blob's
size, its header (read through the same extent map from the disk and from the blob, compared), and
`spot_checks` sampled ranges compared between the snapshot and the blob, which catches a wrong extent
mapping. The per-block Content-MD5 the service returns for each staged block is its own integrity check.

Guarantees: access is revoked (`begin_revoke_access`) whenever a grant was requested, and a snapshot made
here is deleted, on success, failure or interrupt. A snapshot or disk whose network access policy is
DenyAll cannot be exported: that is refused with the way out. With dataAccessAuthMode
AzureActiveDirectory, reads carry an Azure AD token for `https://disk.azure.com/` and server-side copies
carry it in `x-ms-copy-source-authorization`.

The result is the same `CollectResult` scripts.collect returns (blobs, manifests, verification, report),
plus `export`: what was read, copied, hashed and cleaned up, and the triage verdict.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.evidence import blobs as evidence
from scripts.windisk import extract
from scripts.base import rangeio
from scripts.collection import report
from scripts.evidence import verify
from scripts.azure.clients import AzureClients
from scripts.azure.errors import translate_azure_error
from scripts.base.endpoints import STORAGE_SCOPE, is_loopback
from scripts.base.console import NullProgress, Progress, step
from scripts.collection.rescue_vm import CollectError, CollectResult, OUT_DIR, run_stamp
from scripts.config.model import DISK_ID, VM_ID, Config
from scripts.base.errors import CrashcartError, ExitCode
from scripts.config.stackoutputs import RepairOutputs

log = logging.getLogger("crashcart.snapshot_export")

STRATEGY = "snapshot-export"
DISK_SCOPE = "https://disk.azure.com//.default"  # the double slash is what the disk service expects
MiB = 1 << 20
DEFAULT_BLOCK_BYTES = 100 * MiB  # per Put Block From URL: within every service version's block limit
MAX_BLOCKS = 50_000  # committed blocks per block blob
DEFAULT_PARALLEL = 8
READ_BLOCK = 64 * 1024  # range size for metadata reads: MFT records and index buffers cluster together
SPOT_BYTES = 16 * 1024  # per sampled range: enough to catch an extent mapped to the wrong place
DEFAULT_SPOT_CHECKS = 8
DEFAULT_POLL_SECONDS = 2.0  # ARM long-running operations without Retry-After (azure-core would wait 30 s)
MIN_ACCESS_SECONDS = 3600
MAX_ACCESS_SECONDS = 36000
ZERO_SOURCE = ".crashcart-zero-source"
_TOKEN_HOSTS = (".blob.storage.azure.net", ".blob.core.windows.net", ".blob.core.usgovcloudapi.net",
                ".blob.core.chinacloudapi.cn")

NO_DUMP_HINT = ("the broken VM left no memory dump on its OS disk (see notes: CrashControl, page file). Configure a "
                "dump and reproduce the crash: `pipenv run prepare-dump`, then collect again")
DENY_ALL_HINT = ("the kit never changes the source's policy. Either collect with repair.strategy = \"rescue-vm\" "
                 "(the disk copy is read on a rescue VM, no export needed), or let the owner allow export first "
                 "(`az disk update -g <rg> -n <disk> --network-access-policy AllowAll`, or AllowPrivate with a disk "
                 "access), then run collect again")


@dataclass
class ExportResult(CollectResult):
    """A CollectResult with what the snapshot export did (read, copied, hashed, cleaned up, triage)."""

    export: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportTarget:
    """What the export needs to know, from the repair stack's outputs or from the config alone."""

    outputs: RepairOutputs  # for the report (rescue fields empty when there is no repair stack)
    source_vm_name: str
    snapshot_id: str  # "" : the kit snapshots source_disk_id itself (and deletes it afterwards)
    source_disk_id: str
    ttl_hours: int = 8
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_outputs(cls, outputs: RepairOutputs, config: Config | None = None) -> "ExportTarget":
        vm = VM_ID.fullmatch(outputs.source_vm_id or "")
        name = vm.group("name") if vm else (config.source.vm_name if config else "source-vm")
        return cls(outputs, name, outputs.snapshot_id, outputs.source_os_disk_id,
                   config.repair.ttl_hours if config else 8,
                   config.kit_tags("export-snapshot") if config else {"crashcart": "export-snapshot"})

    @classmethod
    def from_config(cls, config: Config, blob_endpoint: str = "", container: str = "",
                    snapshot_id: str = "") -> "ExportTarget":
        """No repair stack: the evidence account from the config (or given), a snapshot made here."""
        endpoint = blob_endpoint or f"https://{config.evidence_account_name}.blob.core.windows.net"
        outputs = RepairOutputs(
            subscription_id=config.source.subscription_id, resource_group_name="", rescue_vm_id="",
            rescue_vm_name="", rescue_vm_principal_id="", rescue_os="none", disk_copy_id="", disk_copy_lun=0,
            snapshot_id=snapshot_id, source_vm_id=config.source.vm_id, source_os_disk_id=config.source.os_disk_id,
            evidence_account_name=config.evidence_account_name, evidence_blob_endpoint=endpoint,
            evidence_container=container or config.evidence.container)
        return cls(outputs, config.source.vm_name, snapshot_id, config.source.os_disk_id, config.repair.ttl_hours,
                   config.kit_tags("export-snapshot"))


# ---- reading the export URL ------------------------------------------------------------------------------
def _token_allowed(url: str) -> bool:
    parsed = urllib.parse.urlsplit(url)
    return is_loopback(url) or (parsed.scheme == "https" and (parsed.hostname or "").endswith(_TOKEN_HOSTS))


def open_export(url: str, bearer: Any = None, block_size: int = READ_BLOCK) -> Any:
    """A scripts.rangeio reader over the export SAS URL. `bearer()` (when the snapshot's dataAccessAuthMode is
    AzureActiveDirectory) returns a disk token that goes with every range request beside the SAS."""
    if bearer is None:
        return rangeio.open_source(url, block_size=block_size)
    if not _token_allowed(url):
        raise CrashcartError(f"refusing to send an Azure AD token to {urllib.parse.urlsplit(url).hostname}",
                             "the export URL is not an Azure Storage endpoint: check CRASHCART_ARM_ENDPOINT",
                             ExitCode.USAGE)
    # A SAS URL alone is refused in AAD mode: the disk token goes beside it on every range request.
    return rangeio.open_source(url, block_size=block_size,
                               extra_headers=lambda: {"Authorization": f"Bearer {bearer()}"})


class _Tokens:
    """Azure AD tokens, refreshed five minutes before they expire."""

    def __init__(self, credential: Any, scope: str):
        self.credential, self.scope = credential, scope
        self._token: Any = None
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            if self._token is None or self._token.expires_on - 300 < time.time():
                try:
                    self._token = self.credential.get_token(self.scope)
                except Exception as err:
                    raise CrashcartError(
                        f"could not get an Azure AD token for {self.scope}: {str(err).splitlines()[0] if str(err) else err}",
                        "sign in (`az login`, or workload identity in a pipeline); reading a disk with "
                        "dataAccessAuthMode AzureActiveDirectory needs the 'Data Operator for Managed Disks' role",
                        ExitCode.AZURE_AUTH) from None
            return self._token.token


# ---- planning the copy -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    kind: str  # disk | zero | data
    length: int
    source_offset: int = 0  # disk byte offset (disk), 0 (zero)
    data: bytes = b""  # (data) bytes kept in the MFT record


def plan_blocks(fmap: extract.FileMap, block_bytes: int = DEFAULT_BLOCK_BYTES) -> list[Block]:
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


def _block_id(index: int) -> str:
    return f"crashcart-{index:08d}"  # the SDK base64-encodes it; every id has the same length


# ---- the run -----------------------------------------------------------------------------------------------
class _Export:
    def __init__(self, target: ExportTarget, config: Config | None, *, timeout_minutes: float, progress: bool,
                 out_dir: Path, full_hash: bool, sas_days: int | None, now: dt.datetime | None, credential: Any,
                 block_bytes: int, parallel: int, hash_blobs: bool, spot_checks: int, triage: bool,
                 poll_seconds: float = DEFAULT_POLL_SECONDS):
        self.target, self.config = target, config
        self.outputs = target.outputs
        self.timeout_s = max(60.0, timeout_minutes * 60)
        self.deadline = time.monotonic() + self.timeout_s
        self.progress, self.full_hash, self.sas_days = progress, full_hash, sas_days
        self.block_bytes, self.parallel = block_bytes, max(1, parallel)
        self.hash_blobs, self.spot_checks, self.run_triage = hash_blobs, spot_checks, triage
        self._credential = credential
        self.poll = {"polling_interval": poll_seconds}
        self.now = now or dt.datetime.now(dt.timezone.utc)
        self.stamp = run_stamp(self.now)
        self.prefix = f"{target.source_vm_name}/{self.stamp}"
        self.out_dir = out_dir / self.prefix
        self.container = evidence.container_client(self.outputs.evidence_blob_endpoint, self.outputs.evidence_container)
        self.result = ExportResult(
            status="running", exit_code=int(ExitCode.OK), message="", run=self.prefix,
            source_vm_id=self.outputs.source_vm_id, rescue_vm_id=self.outputs.rescue_vm_id, rescue_os="none",
            container_url=self.container.url.split("?", 1)[0].rstrip("/"),
            run_command={"name": "none: snapshot-export runs no command on any VM", "strategy": STRATEGY})
        self.export: dict[str, Any] = self.result.export
        self.export.update(strategy=STRATEGY, snapshot={"id": target.snapshot_id, "made_by_kit": False},
                           access={"granted": False, "revoked": None},
                           kit_bytes={"metadata": 0, "header_and_spot_checks": 0, "uploaded": 0, "verify_headers": 0,
                                      "hash_read": 0, "triage": 0})
        self.compute: Any = None
        self.snapshot_rg = self.snapshot_name = ""
        self.made_snapshot = False
        self.grant_requested = False
        self.grant_refused = False
        self.sas_url = ""
        self.disk_auth: _Tokens | None = None
        self.zero_url = ""
        self.zero_auth: str | None = None
        self.zero_made = False
        self._lock = threading.Lock()

    # -- helpers
    @property
    def credential(self) -> Any:
        if self._credential is None:
            from scripts.azure.clients import credential

            self._credential = credential()
        return self._credential

    def _bar(self, description: str, total: float | None = None, unit: str = "") -> Any:
        return Progress(description, total=total, unit=unit, every=15) if self.progress else NullProgress()

    def _check_time(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise CrashcartError(f"the export did not finish within {self.timeout_s / 60:.0f} min ({what})",
                                 "raise repair.collect_timeout_minutes (or --timeout-minutes) and run collect again",
                                 ExitCode.TIMED_OUT)

    def _arm(self, func: Any, what: str) -> Any:
        from azure.core.exceptions import HttpResponseError

        try:
            return func()
        except HttpResponseError as err:
            raise translate_azure_error(err, what) from None

    # -- 1. the snapshot
    def prepare_snapshot(self) -> None:
        self.compute = AzureClients(self.outputs.subscription_id).compute
        if self.target.snapshot_id:
            parts = _snapshot_parts(self.target.snapshot_id)
            self.snapshot_rg, self.snapshot_name = parts
            snapshot = self._arm(lambda: self.compute.snapshots.get(*parts), f"snapshot {self.target.snapshot_id}")
            self._check_policy(snapshot, f"snapshot {self.snapshot_name}",
                               " (a repair stack deployed with repair.strategy = \"rescue-vm\" makes its snapshot "
                               "DenyAll: redeploy it with repair.strategy = \"snapshot-export\")")
            self._note_snapshot(snapshot)
            return
        disk_match = DISK_ID.fullmatch(self.target.source_disk_id or "")
        if not disk_match:
            raise CrashcartError(f"source disk ID {self.target.source_disk_id!r} is not a managed disk ID",
                                 "set source.os_disk_id (pipenv run discover writes it)", ExitCode.USAGE)
        disk_rg, disk_name = disk_match.group("rg"), disk_match.group("name")
        disk = self._arm(lambda: self.compute.disks.get(disk_rg, disk_name), f"OS disk {self.target.source_disk_id}")
        self._check_policy(disk, f"OS disk {disk_name}", "")
        from azure.mgmt.compute.models import CreationData, Snapshot, SnapshotProperties, SnapshotSku

        self.snapshot_rg = disk_rg
        self.snapshot_name = f"crashcart-export-{self.target.source_vm_name}-{self.stamp.lower()}"[:80]
        expires = (self.now + dt.timedelta(hours=self.target.ttl_hours)).strftime("%Y-%m-%dT%H:%M:%SZ")
        properties = SnapshotProperties(
            creation_data=CreationData(create_option="Copy", source_resource_id=self.target.source_disk_id),
            incremental=False, network_access_policy=_text(getattr(disk, "network_access_policy", None)) or "AllowAll")
        if getattr(disk, "disk_access_id", None):
            properties.disk_access_id = disk.disk_access_id
        if _text(getattr(disk, "data_access_auth_mode", None)):
            properties.data_access_auth_mode = _text(disk.data_access_auth_mode)
        if _text(getattr(disk, "public_network_access", None)):
            properties.public_network_access = _text(disk.public_network_access)
        body = Snapshot(location=disk.location, sku=SnapshotSku(name="Standard_LRS"), properties=properties,
                        tags={**self.target.tags, "crashcart-expires-at": expires})
        with step(f"snapshot the OS disk {disk_name} ({self.snapshot_name}, deleted at the end)"):
            self.made_snapshot = True  # from here on, the finally deletes it (a failed create leaves nothing)
            snapshot = self._arm(lambda: self.compute.snapshots.begin_create_or_update(
                disk_rg, self.snapshot_name, body, **self.poll).result(), f"a snapshot of {disk_name}")
        self.export["snapshot"] = {"id": snapshot.id, "made_by_kit": True, "deleted": None}
        self.outputs = dataclasses.replace(self.outputs, snapshot_id=snapshot.id)  # the report names it
        self._note_snapshot(snapshot)

    def _check_policy(self, resource: Any, what: str, extra: str) -> None:
        policy = _text(getattr(resource, "network_access_policy", None))
        if policy == "DenyAll":
            raise CrashcartError(
                f"{what} cannot be exported: its network access policy is DenyAll{extra}", DENY_ALL_HINT,
                ExitCode.USAGE)

    def _note_snapshot(self, snapshot: Any) -> None:
        mode = _text(getattr(snapshot, "data_access_auth_mode", None))
        policy = _text(getattr(snapshot, "network_access_policy", None)) or "AllowAll"
        self.export["snapshot"].update(id=snapshot.id, network_access_policy=policy, data_access_auth_mode=mode or "None",
                                       disk_size_bytes=getattr(snapshot, "disk_size_bytes", None))
        if mode == "AzureActiveDirectory":
            self.disk_auth = _Tokens(self.credential, DISK_SCOPE)
        if policy == "AllowPrivate":
            self.result.notes.append(
                "the snapshot's network access policy is AllowPrivate: its export URL answers only through the disk "
                "access's private endpoint, so this host and the evidence account must reach it that way")

    # -- 2. access
    def grant(self) -> None:
        from azure.mgmt.compute.models import GrantAccessData

        seconds = int(min(MAX_ACCESS_SECONDS, max(MIN_ACCESS_SECONDS, self.timeout_s)))
        from azure.core.exceptions import HttpResponseError

        what = f"read access to snapshot {self.snapshot_name}"
        with step(f"grant read access to snapshot {self.snapshot_name} for {seconds // 60} min"):
            self.grant_requested = True  # from here on, release() revokes, whatever happens
            try:
                poller = self.compute.snapshots.begin_grant_access(
                    self.snapshot_rg, self.snapshot_name, GrantAccessData(access="Read", duration_in_seconds=seconds),
                    **self.poll)
            except HttpResponseError as err:
                if (err.status_code or 500) < 500:
                    self.grant_refused = True  # ARM said no: nothing was granted, a failing revoke leaves nothing
                raise translate_azure_error(err, what) from None
            access = self._arm(poller.result, what)
        url = getattr(access, "access_sas", None) if access is not None else None
        if not url:
            raise CrashcartError(f"Azure granted access to snapshot {self.snapshot_name} but returned no SAS URL",
                                 "retry; if it persists, check the snapshot in the portal (Snapshot export)",
                                 ExitCode.AZURE_FAILED)
        self.sas_url = url
        self.export["access"].update(granted=True, seconds=seconds, aad=self.disk_auth is not None,
                                     host=urllib.parse.urlsplit(url).hostname)

    def release(self) -> list[str]:
        """Revokes access (when a grant was asked for) and deletes the snapshot made here. Never raises;
        returns what could not be cleaned up."""
        left: list[str] = []
        if self.zero_made:
            try:
                self.container.get_blob_client(f"{self.prefix}/{ZERO_SOURCE}").delete_blob()
                self.zero_made = False
            except Exception as err:  # e.g. an immutability policy keeps it; it is an empty page blob
                self.result.notes.append(f"the empty zero-source page blob {self.prefix}/{ZERO_SOURCE} could not be "
                                         f"deleted ({_first_line(err)}); it holds no data")
        if self.compute is None or not self.snapshot_name:
            return left
        if self.grant_requested:
            try:
                with step(f"revoke access to snapshot {self.snapshot_name}"):
                    self.compute.snapshots.begin_revoke_access(self.snapshot_rg, self.snapshot_name, **self.poll).result()
                self.export["access"]["revoked"] = True
            except Exception as err:
                self.export["access"]["revoked"] = False
                if self.grant_refused:
                    log.warning("revoking access to %s failed (%s); the grant had been refused, so nothing is left",
                                self.snapshot_name, _first_line(err))
                else:
                    left.append(f"read access to snapshot {self.snapshot_name} may still be granted ({_first_line(err)}): "
                                f"`az snapshot revoke-access -g {self.snapshot_rg} -n {self.snapshot_name}` (it expires "
                                "by itself at the end of its duration)")
        if self.made_snapshot:
            try:
                with step(f"delete snapshot {self.snapshot_name}"):
                    self.compute.snapshots.begin_delete(self.snapshot_rg, self.snapshot_name, **self.poll).result()
                self.export["snapshot"]["deleted"] = True
            except Exception as err:
                self.export["snapshot"]["deleted"] = False
                left.append(f"snapshot {self.snapshot_name} was not deleted ({_first_line(err)}): "
                            f"`az snapshot delete -g {self.snapshot_rg} -n {self.snapshot_name}`")
        return left

    # -- 3. read the disk
    def inspect(self) -> extract.DiskFindings:
        with step("read the partition table, the Windows volume and CrashControl over range requests"):
            self.reader = open_export(self.sas_url, self.disk_auth)
            findings = extract.inspect_disk(self.reader)
            self.export["kit_bytes"]["metadata"] = self.reader.bytes_read
        v = findings.volume
        log.info("    %s disk%s, Windows on partition %s (%s MiB); CrashControl %s: DumpFile=%s",
                 findings.scheme.upper(), " (fixed VHD)" if findings.vhd_footer else "", v.number, v.size >> 20,
                 findings.crash_control.get("control_set"), findings.crash_control.get("DumpFile") or "(default)")
        self.result.crash_control = findings.crash_control
        self.result.volume = {**v.to_dict(), "disk_size": findings.disk_size, "vhd_footer": findings.vhd_footer}
        self.result.notes += findings.notes
        self.export["partitions"] = findings.partitions
        self.export["metadata_requests"] = self.reader.requests
        return findings

    # -- 4. copy
    def _source_auth(self) -> str | None:
        return f"Bearer {self.disk_auth()}" if self.disk_auth is not None else None

    def _zero_source(self, length: int) -> None:
        """An empty page blob to stage zero blocks from (created once, deleted by release())."""
        if self.zero_made:
            return
        from azure.core.exceptions import HttpResponseError

        name = f"{self.prefix}/{ZERO_SOURCE}"
        client = self.container.get_blob_client(name)
        size = max(512, math.ceil(length / 512) * 512)

        def create() -> None:
            client.create_page_blob(size=size)

        try:
            evidence.auth_retry(create, f"create the zero-source page blob {name}")
        except CrashcartError:
            raise
        except HttpResponseError as err:  # pragma: no cover - auth_retry converts these
            raise evidence.storage_error(err, f"create {name}") from None
        self.zero_made = True
        credential = self.container.credential
        if getattr(credential, "account_key", None):  # the emulator (connection string): a short read SAS
            from azure.storage.blob import BlobSasPermissions, generate_blob_sas

            token = generate_blob_sas(self.container.account_name, self.container.container_name, name,
                                      account_key=credential.account_key, permission=BlobSasPermissions(read=True),
                                      expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2))
            self.zero_url, self.zero_auth = f"{client.url.split('?', 1)[0]}?{token}", None
        elif "sig=" in client.url:
            self.zero_url, self.zero_auth = client.url, None
        else:
            self.zero_url = client.url
            tokens = _Tokens(self.credential, STORAGE_SCOPE)
            self.zero_auth = f"Bearer {tokens()}"

    def copy(self, dump: extract.FoundDump) -> dict[str, Any]:
        name = f"{self.prefix}/{dump.blob_suffix}"
        fmap = dump.file
        size_block = block_size_for(fmap.size, self.block_bytes)
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
        staged = [0]
        uploaded = [0]

        def stage(index: int, block: Block) -> None:
            self._check_time(f"copying {name}")
            block_id = _block_id(index)
            if block.kind == "data":
                evidence.auth_retry(lambda: client.stage_block(block_id, block.data, length=block.length),
                                    f"upload a block of {name}")
                with self._lock:
                    uploaded[0] += block.length
            elif block.kind == "zero":
                self._stage_from_url(client, name, block_id, self.zero_url, 0, block.length, self.zero_auth, "zero source")
            else:
                self._stage_from_url(client, name, block_id, self.sas_url, block.source_offset, block.length,
                                     self._source_auth(), "snapshot")
            with self._lock:
                staged[0] += block.length

        with self._bar(f"copy {dump.blob_suffix} server-side", total=float(fmap.size), unit=" bytes") as bar:
            with concurrent.futures.ThreadPoolExecutor(max_workers=self.parallel) as pool:
                futures = [pool.submit(stage, i, b) for i, b in enumerate(blocks)]
                try:
                    for future in concurrent.futures.as_completed(futures):
                        future.result()
                        bar.update(staged[0], status=f"{len(blocks)} blocks")
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        from azure.storage.blob import BlobBlock, ContentSettings

        block_list = [BlobBlock(block_id=_block_id(i)) for i in range(len(blocks))]
        evidence.auth_retry(lambda: client.commit_block_list(
            block_list, content_settings=ContentSettings(content_type="application/octet-stream"),
            metadata={"crashcart_strategy": "snapshot_export", "crashcart_source": _meta(dump.windows_path)}),
            f"commit the block list of {name}")
        with self._lock:
            self.export["kit_bytes"]["uploaded"] += uploaded[0]
        seconds = time.monotonic() - started
        log.info("    %s: %d bytes in %d blocks (%d from the snapshot, %d zero), %.1fs", name, fmap.size, len(blocks),
                 sum(1 for b in blocks if b.kind == "disk"), len(zero_blocks), seconds)
        return {"blob": name, "blocks": len(blocks), "block_bytes": size_block,
                "disk_blocks": sum(1 for b in blocks if b.kind == "disk"), "zero_blocks": len(zero_blocks),
                "zero_bytes": sum(b.length for b in zero_blocks), "fragments": fmap.fragments,
                "uploaded_by_kit": uploaded[0], "seconds": round(seconds, 2)}

    def _stage_from_url(self, client: Any, name: str, block_id: str, url: str, offset: int, length: int,
                        authorization: str | None, what: str) -> None:
        from azure.core.exceptions import HttpResponseError

        kwargs = {"source_authorization": authorization} if authorization else {}

        def put() -> None:
            try:
                client.stage_block_from_url(block_id, url, source_offset=offset, source_length=length, **kwargs)
            except HttpResponseError as err:
                code = getattr(err, "error_code", None) or ""
                if code == "CannotVerifyCopySource" or (code and "CopySource" in code):
                    raise CrashcartError(
                        f"the storage service could not read the {what} to copy {name} ({err.status_code} {code}): "
                        f"{_first_line(err)}",
                        "the evidence account fetches the snapshot's export URL itself: with a network access policy "
                        "of AllowPrivate (or public network access disabled) it cannot, and an expired or revoked "
                        "access ends the copy too. Run collect again, or use repair.strategy = \"rescue-vm\"",
                        ExitCode.COLLECT_FAILED) from None
                raise

        evidence.auth_retry(put, f"copy a block of {name} from the {what}")

    # -- 5. hash, spot checks, manifest
    def check(self, dump: extract.FoundDump, copied: dict[str, Any]) -> dict[str, Any]:
        name = copied["blob"]
        fmap = dump.file
        props = evidence.properties(self.container, name)
        problems = []
        if props is None or int(props.size) != fmap.size:
            problems.append(f"{name} is {None if props is None else props.size} bytes after the commit, expected {fmap.size}")
        spots = self._spot_ranges(fmap, name)
        compared = 0
        for offset, length in spots:
            source = fmap.read(self.reader, offset, length)
            stored = evidence.read_bytes(self.container, name, offset, length) or b""
            compared += len(source) + len(stored)
            if source != stored:
                problems.append(f"{name}: bytes {offset}-{offset + length - 1} differ between the snapshot and the blob")
        self.export["kit_bytes"]["header_and_spot_checks"] += compared
        sha = None
        hashed_bytes = 0
        if self.hash_blobs and not problems:
            with step(f"SHA-256 of {name} (streaming the committed blob back)"):
                sha = evidence.sha256(self.container, name)
                hashed_bytes = fmap.size
            self.export["kit_bytes"]["hash_read"] += hashed_bytes
        return {"sha256": sha, "hashed_bytes": hashed_bytes, "spots": spots, "spot_bytes": compared, "problems": problems}

    def _spot_ranges(self, fmap: extract.FileMap, name: str) -> list[tuple[int, int]]:
        """The header, and `spot_checks` ranges inside data extents (seeded by the blob name: reproducible)."""
        spots = [(0, min(fmap.size, 0x2000))] if fmap.size else []
        data = [e for e in fmap.extents if not e.zero]
        if not data or self.spot_checks <= 0:
            return spots
        rng = random.Random(hashlib.sha256(name.encode()).digest())
        for _ in range(self.spot_checks):
            extent = rng.choice(data)
            length = min(SPOT_BYTES, extent.length)
            offset = extent.file_offset + rng.randrange(0, extent.length - length + 1)
            offset -= offset % 512
            spots.append((offset, min(length, fmap.size - offset)))
        return spots

    def manifest(self, dump: extract.FoundDump, copied: dict[str, Any], checked: dict[str, Any]) -> dict[str, Any]:
        name = copied["blob"]
        sha = checked["sha256"]
        body = {
            "schema": "crashcart.manifest/1",
            "blob": name,
            "kind": dump.kind,
            "size": dump.file.size,
            "sha256": sha,
            "sha256_by": ({"party": "crashcart host", "how": "streamed the committed blob back after Put Block List",
                           "bytes_read": checked["hashed_bytes"]} if sha else
                          {"party": None, "how": "not computed on request (the copy was server-side, so no party read "
                                                 "every byte); hash the blob later by streaming it"}),
            "block_size": copied["block_bytes"],
            "source": {"path": dump.windows_path, "file_size": dump.file.file_size, "disk_copy_id": "",
                       "source_disk_id": self.target.source_disk_id, "snapshot_id": self.export["snapshot"].get("id"),
                       "volume_path": dump.file.path, "partition": self.result.volume.get("partition") if self.result.volume else None},
            "header": dump.header_dict(),
            "collected_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "collector": "snapshot-export",
            "copy": {"method": "Put Block From URL from the snapshot's export SAS, then Put Block List (server-side)",
                     "blocks": copied["blocks"], "blocks_from_snapshot": copied["disk_blocks"],
                     "zero_blocks": copied["zero_blocks"], "zero_bytes": copied["zero_bytes"],
                     "fragments": copied["fragments"], "bytes_uploaded_by_kit": copied["uploaded_by_kit"],
                     "sparse_source": dump.file.sparse, "valid_data_length": dump.file.valid_data_length},
            "spot_check": {"ranges": len(checked["spots"]), "bytes_compared": checked["spot_bytes"],
                           "by": "crashcart host: snapshot ranges (through the file's extent map) vs blob ranges",
                           "matched": not checked["problems"]},
        }
        evidence.upload_text(self.container, f"{name}.manifest.json", json.dumps(body, indent=2), "application/json")
        return body

    # -- 6. triage of the stored dump
    def triage(self, blobs: list[verify.VerifiedBlob]) -> None:
        order = {"memory": 0, "pagefile": 1, "dedicated": 2, "minidump": 3}
        good = sorted((b for b in blobs if b.ok), key=lambda b: order.get(b.kind, 9))
        if not good or not self.run_triage:
            return
        blob = good[0]
        from scripts.dumpfile.errors import BadDump
        from scripts.dumpfile.triage import triage

        url = self._read_url(blob.name)
        with step(f"triage {blob.name}"):
            try:
                verdict = triage(url, lambda: self.credential)
            except (BadDump, CrashcartError) as err:
                self.result.notes.append(f"triage of {blob.name} failed: {getattr(err, 'message', str(err))}")
                return
        data = verdict.to_dict()
        data["source"] = blob.name
        self.export["kit_bytes"]["triage"] = verdict.bytes_read
        self.export["triage"] = data
        module = (data.get("faulting_module") or {}).get("name")
        self.result.notes.append(f"triage of {blob.name}: {verdict.summary}"
                                 + (f" (faulting driver: {module})" if module else ""))
        self.result.notes.append(f"next: {verdict.next_step}")
        log.info("    %s", verdict.summary)

    def _read_url(self, name: str) -> str:
        client = self.container.get_blob_client(name)
        credential = self.container.credential
        if getattr(credential, "account_key", None):
            from azure.storage.blob import BlobSasPermissions, generate_blob_sas

            token = generate_blob_sas(self.container.account_name, self.container.container_name, name,
                                      account_key=credential.account_key, permission=BlobSasPermissions(read=True),
                                      expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
            return f"{client.url.split('?', 1)[0]}?{token}"
        return client.url

    # -- outcome
    def fail(self, status: str, code: ExitCode, message: str, hint: str) -> None:
        self.result.status, self.result.exit_code, self.result.message = status, int(code), message
        self.result.run_command["hint"] = hint

    def write_report(self) -> None:
        report.store(self.result, self.outputs, self.out_dir, self.container, self.prefix)


def _snapshot_parts(snapshot_id: str) -> tuple[str, str]:
    parts = snapshot_id.strip("/").split("/")
    lowered = [p.lower() for p in parts]
    try:
        rg = parts[lowered.index("resourcegroups") + 1]
        name = parts[lowered.index("snapshots") + 1]
    except (ValueError, IndexError):
        raise CrashcartError(f"{snapshot_id!r} is not a snapshot resource ID",
                             "check the repair stack's snapshot_id output", ExitCode.USAGE) from None
    return rg, name


def _text(value: Any) -> str:
    if value is None:
        return ""
    return str(getattr(value, "value", value))


def _meta(text: str) -> str:
    """Blob metadata values are ASCII: keep the path readable."""
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\\", "/")


def _first_line(err: BaseException) -> str:
    text = getattr(err, "message", None) or str(err)
    text = str(text).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---- the entry point ---------------------------------------------------------------------------------------
def collect_from_snapshot(outputs: RepairOutputs | None, config: Config | None, *, timeout_minutes: float = 120,
                          progress: bool = True, out_dir: Path = OUT_DIR, full_hash: bool = False,
                          sas_days: int | None = None, now: dt.datetime | None = None,
                          target: ExportTarget | None = None, credential: Any = None,
                          block_bytes: int = DEFAULT_BLOCK_BYTES, parallel: int = DEFAULT_PARALLEL,
                          hash_blobs: bool = True, spot_checks: int = DEFAULT_SPOT_CHECKS, triage: bool = True,
                          agent_wait_minutes: float | None = None, poll_seconds: float | None = None,
                          settings: Any = None) -> ExportResult:
    """The snapshot-export collection; same contract as scripts.collect.collect_dump: returns the result
    when every dump is stored and verified, else raises CollectError with the outcome's exit code and the
    partial result. `outputs` (the repair stack's) supplies the snapshot to reuse; without them, `config`
    names the disk, the kit snapshots it and deletes the snapshot afterwards. `poll_seconds` paces the ARM
    long-running operations when ARM sends no Retry-After. agent_wait_minutes and settings are accepted
    for call compatibility with collect_dump and not used (there is no VM)."""
    if sas_days is not None:
        evidence.check_sas_days(sas_days)
    if target is None:
        if outputs is not None:
            target = ExportTarget.from_outputs(outputs, config)
        elif config is not None:
            target = ExportTarget.from_config(config)
        else:
            raise CrashcartError("snapshot-export needs the repair stack's outputs or a config naming the disk",
                                 "run `pipenv run discover --vm <id>` first", ExitCode.USAGE)
    run = _Export(target, config, timeout_minutes=timeout_minutes, progress=progress, out_dir=out_dir,
                  full_hash=full_hash, sas_days=sas_days, now=now, credential=credential, block_bytes=block_bytes,
                  parallel=parallel, hash_blobs=hash_blobs, spot_checks=spot_checks, triage=triage,
                  poll_seconds=poll_seconds if poll_seconds is not None else DEFAULT_POLL_SECONDS)
    r = run.result
    started = time.monotonic()
    files: list[dict[str, Any]] = []
    failure: CrashcartError | None = None
    left: list[str] = []
    try:
        try:
            run.prepare_snapshot()
            run.grant()
            findings = run.inspect()
            copies = []
            for dump in findings.dumps:
                with step(f"copy {dump.windows_path} -> {run.prefix}/{dump.blob_suffix} (server-side)"):
                    copied = run.copy(dump)
                checked = run.check(dump, copied)
                manifest = run.manifest(dump, copied, checked)
                copies.append({**copied, "sha256": checked["sha256"], "hashed_bytes": checked["hashed_bytes"],
                               "problems": checked["problems"]})
                files.append({"kind": dump.kind, "source_path": dump.windows_path, "blob": copied["blob"],
                              "url": evidence.blob_url(run.container, copied["blob"]), "size": dump.file.size,
                              "sha256": manifest["sha256"], "header": manifest["header"], "uploaded": True,
                              "problems": checked["problems"]})
            run.export["copies"] = copies
            run.export["looked_at"] = findings.looked_at
            if findings.skipped:
                stored = f"{len(findings.dumps)} other dump(s) are stored and verified, but " if findings.dumps else ""
                raise CrashcartError(
                    f"{stored}{'; '.join(findings.skipped)}: its bytes on disk are not the file's, so it cannot be "
                    "copied server-side", "collect with repair.strategy = \"rescue-vm\" (the rescue VM's NTFS driver "
                    "decompresses it)", ExitCode.COLLECT_FAILED)
            if not findings.dumps:
                raise CrashcartError(
                    f"the broken volume holds no memory dump (looked at {', '.join(findings.looked_at)})",
                    NO_DUMP_HINT, ExitCode.NO_DUMP)
        finally:
            left = run.release()
    except KeyboardInterrupt:
        failure = CrashcartError("interrupted", "run collect again", ExitCode.INTERRUPTED)
    except CrashcartError as err:
        failure = err
    except Exception as err:  # an SDK error nothing above translated: still a report, then a bug
        log.exception("snapshot export failed unexpectedly")
        failure = CrashcartError(f"the snapshot export failed: {_first_line(err)}",
                                 "re-run with -v and report it with the log", ExitCode.BUG)
    r.run_command["seconds"] = round(time.monotonic() - started, 1)
    if left:
        run.export["left_behind"] = left
        for item in left:
            log.error("    left behind: %s", item)
    if failure is not None:
        status = {ExitCode.NO_DUMP: "no_dump", ExitCode.DISK_NOT_FOUND: "disk_not_found",
                  ExitCode.TIMED_OUT: "timed_out", ExitCode.COLLECT_FAILED: "upload_failed"}.get(failure.exit_code, "error")
        message = failure.message + (f"; also left behind: {'; '.join(left)}" if left else "")
        run.fail(status, failure.exit_code, message, failure.hint)
        r.run_command["state"] = "Failed"
        if files:
            r.blobs = verify.verify_files(run.container, files, full_hash=False, hash_limit=0)
        run.write_report()
        raise CollectError(message, failure.hint, failure.exit_code, r)
    with step("verify the stored dumps"):
        r.blobs = verify.verify_files(run.container, files, full_hash=full_hash,
                                      hash_limit=0 if hash_blobs else verify.DEFAULT_HASH_LIMIT)
        for blob, reported in zip(r.blobs, files):
            blob.problems += reported["problems"]
        from scripts.dumpfile.header import PROBE_SIZE

        run.export["kit_bytes"]["verify_headers"] = sum(min(PROBE_SIZE, b.size or 0) for b in r.blobs)
    problems = [p for b in r.blobs for p in b.problems]
    r.run_command["state"] = "Succeeded"
    if problems:
        run.fail("verify_failed", ExitCode.VERIFY_FAILED, "verification failed: " + "; ".join(problems),
                 "the stored blobs are incomplete or differ from the snapshot: run collect again (a new run copies afresh)")
    else:
        r.status, r.exit_code = "collected", int(ExitCode.OK)
        r.message = f"{len(r.blobs)} dump file(s) copied server-side from the snapshot under {run.prefix}/"
        run.triage(r.blobs)
        if run.sas_days:
            for blob in r.dumps:
                url, expiry = evidence.user_delegation_sas(run.container, blob.name, run.sas_days)
                r.sas[blob.name] = url
                r.sas_expiry = expiry.isoformat()
    kit = run.export["kit_bytes"]
    total = sum(f["size"] for f in files) or 1
    copy_bytes = kit["metadata"] + kit["header_and_spot_checks"] + kit["uploaded"] + kit["verify_headers"]
    run.export["bytes_through_kit"] = {
        "copy": copy_bytes, "copy_ratio": round(copy_bytes / total, 6), "hash": kit["hash_read"],
        "triage": kit["triage"], "dump_bytes": total,
        "counts": "response and request bodies only (HTTP headers are not counted); copy = metadata + dump headers and "
                  "spot checks + bytes uploaded + verification header reads"}
    if left and r.exit_code == ExitCode.OK:
        run.fail("error", ExitCode.TEARDOWN_FAILED,
                 f"the dumps are stored, but cleanup left resources: {'; '.join(left)}",
                 "remove them with the commands above")
    run.write_report()
    for blob in r.blobs:
        log.info("    %s %s (%d bytes)%s", "ok " if blob.ok else "BAD", blob.name, blob.size or 0,
                 "" if blob.ok else ": " + "; ".join(blob.problems))
    if r.exit_code != ExitCode.OK:
        raise CollectError(r.message, r.run_command.get("hint", ""), ExitCode(r.exit_code), r)
    return r


def export_dump(*args: Any, **kwargs: Any) -> ExportResult:
    """Alias of collect_from_snapshot (the name the issue uses)."""
    return collect_from_snapshot(*args, **kwargs)
