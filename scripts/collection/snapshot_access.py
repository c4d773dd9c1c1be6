"""The snapshot side of snapshot-export: which snapshot, read access to it, and taking both back.

The export reads a snapshot of the broken OS disk: the repair stack's (reused, never deleted here) or,
without a repair stack, one the kit makes of the disk (tagged with an expiry, deleted at the end). The source
side is only read: a snapshot the kit makes goes in the VM's repair resource group (`crashcart-repair-<vm
key>`, the group the operator role and the repair stack work in), never the source VM's. When that group does
not exist the kit creates it, tagged as a repair group with an expiry (so `sweep` finds it should the run
die), and deletes it at the end. Read
access is a short-lived SAS from `begin_grant_access`; with dataAccessAuthMode AzureActiveDirectory
every read also carries an Azure AD token for `https://disk.azure.com/`.

Each step registers its undo on the run's `contextlib.ExitStack` the moment there is something to undo:
"delete the snapshot" once the kit asked for one, "revoke access" once a grant was asked for. The stack
unwinds on success, failure and KeyboardInterrupt alike; an undo never raises, and what it could not
undo goes to `left` with the exact `az` command that finishes the job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scripts.azure import ids
from scripts.azure.clients import AzureClients
from scripts.azure.errors import azure_call, translate_azure_error
from scripts.azure.identity import vm_key
from scripts.base import rangeio
from scripts.base.console import step
from scripts.base.endpoints import is_loopback, is_storage_host
from scripts.base.errors import CrashcartError, ExitCode, first_line
from scripts.collection.contract import source_vm_id
from scripts.config.model import Config
from scripts.config.stackoutputs import RepairOutputs

log = logging.getLogger("crashcart.snapshot_export")

DISK_SCOPE = "https://disk.azure.com//.default"  # the double slash is what the disk service expects
MIN_ACCESS_SECONDS = 3600
MAX_ACCESS_SECONDS = 36000
MAX_SNAPSHOT_NAME = 80
READ_BLOCK = 64 * 1024  # range size for metadata reads: MFT records and index buffers cluster together
DENY_ALL_HINT = ("the kit never changes the source's policy. Either collect with repair.strategy = \"rescue-vm\" "
                 "(the disk copy is read on a rescue VM, no export needed), or let the owner allow export first "
                 "(`az disk update -g <rg> -n <disk> --network-access-policy AllowAll`, or AllowPrivate with a disk "
                 "access), then run collect again")
_STACK_SNAPSHOT_DENY_ALL = (" (a repair stack deployed with repair.strategy = \"rescue-vm\" makes its snapshot "
                            "DenyAll: redeploy it with repair.strategy = \"snapshot-export\")")


@dataclass(frozen=True)
class ExportTarget:
    """What the export needs to know, from the repair stack's outputs or from the config alone."""

    outputs: RepairOutputs  # for the report (rescue fields empty when there is no repair stack)
    source_vm_id: str  # the broken VM's resource ID: what the evidence prefix and the snapshot are named by
    snapshot_id: str  # "" : the kit snapshots source_disk_id itself (and deletes it afterwards)
    source_disk_id: str
    ttl_hours: int = 8
    tags: dict[str, str] = field(default_factory=dict)
    # where a snapshot the kit makes goes: the repair resource group (made, tagged so, when absent)
    snapshot_group: str = ""
    group_tags: dict[str, str] = field(default_factory=dict)

    @property
    def source_vm_name(self) -> str:
        return ids.parse(self.source_vm_id, "vm").name

    @property
    def vm_key(self) -> str:
        return vm_key(self.source_vm_id)

    @classmethod
    def from_outputs(cls, outputs: RepairOutputs, config: Config | None = None) -> "ExportTarget":
        """A source VM ID that is neither the outputs' nor the config's is a usage error (CrashcartError)."""
        vm_id = source_vm_id(outputs, config)
        return cls(outputs, vm_id, outputs.snapshot_id, outputs.source_os_disk_id,
                   config.repair.ttl_hours if config else 8,
                   config.kit_tags("export-snapshot") if config else {"crashcart": "export-snapshot"},
                   outputs.resource_group_name or (config.repair_resource_group if config else
                                                   f"crashcart-repair-{vm_key(vm_id)}"),
                   config.kit_tags("repair") if config else {"crashcart": "repair", "crashcart-source-vm": vm_id})

    @classmethod
    def from_config(cls, config: Config, blob_endpoint: str = "", container: str = "",
                    snapshot_id: str = "") -> "ExportTarget":
        """No repair stack: the evidence account from the config (or given), a snapshot made here."""
        endpoint = blob_endpoint or config.evidence_blob_endpoint
        outputs = RepairOutputs(
            subscription_id=config.source.subscription_id, resource_group_name="", rescue_vm_id="",
            rescue_vm_name="", rescue_vm_principal_id="", rescue_os="none", disk_copy_id="", disk_copy_lun=0,
            snapshot_id=snapshot_id, source_vm_id=config.source.vm_id, source_os_disk_id=config.source.os_disk_id,
            evidence_account_name=config.evidence_account_name, evidence_blob_endpoint=endpoint,
            evidence_container=container or config.evidence.container)
        return cls(outputs, config.source.vm_id, snapshot_id, config.source.os_disk_id, config.repair.ttl_hours,
                   config.kit_tags("export-snapshot"), config.repair_resource_group, config.kit_tags("repair"))


class Tokens:
    """Azure AD tokens for one scope, refreshed five minutes before they expire (copies run for hours)."""

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
                        f"could not get an Azure AD token for {self.scope}: {first_line(err)}",
                        "sign in (`az login`, or workload identity in a pipeline); reading a disk with "
                        "dataAccessAuthMode AzureActiveDirectory needs the 'Data Operator for Managed Disks' role",
                        ExitCode.AZURE_AUTH) from None
            return self._token.token


def open_export(url: str, bearer: Callable[[], str] | None = None, block_size: int = READ_BLOCK) -> Any:
    """A range reader over the export SAS URL. `bearer()` (when the snapshot's dataAccessAuthMode is
    AzureActiveDirectory) returns a disk token that goes with every range request beside the SAS."""
    if bearer is None:
        return rangeio.open_source(url, block_size=block_size)
    if not (is_loopback(url) or is_storage_host(url)):
        raise CrashcartError(f"refusing to send an Azure AD token to {urllib.parse.urlsplit(url).hostname}",
                             "the export URL is not an Azure Storage endpoint: check CRASHCART_ARM_ENDPOINT",
                             ExitCode.USAGE)
    # A SAS URL alone is refused in AAD mode: the disk token goes beside it on every range request.
    return rangeio.open_source(url, block_size=block_size,
                               extra_headers=lambda: {"Authorization": f"Bearer {bearer()}"})


def _text(value: Any) -> str:
    """An SDK enum or string as the plain string ARM sent ("" for None)."""
    return "" if value is None else str(getattr(value, "value", value))


class SnapshotAccess:
    """The snapshot of one export and read access to it; every undo goes on `undo` as soon as it is due.

    `record` is the export's account (its "snapshot" and "access" entries are kept here), `notes` the
    result's notes, `left` what could not be cleaned up."""

    def __init__(self, target: ExportTarget, undo: contextlib.ExitStack, record: dict[str, Any], notes: list[str],
                 left: list[str], *, credential: Callable[[], Any], poll_seconds: float, stamp: str,
                 now: dt.datetime):
        self.target, self.undo, self.record, self.notes, self.left = target, undo, record, notes, left
        self.credential, self.stamp, self.now = credential, stamp, now
        self.poll = {"polling_interval": poll_seconds}
        self.snapshot: ids.ResourceId | None = None
        self.compute: Any = None  # the snapshot's subscription's compute client
        self.disk_auth: Tokens | None = None  # set when reads need a disk token (AzureActiveDirectory mode)
        record["snapshot"] = {"id": target.snapshot_id, "made_by_kit": False}
        record["access"] = {"granted": False, "revoked": None}

    def prepare(self) -> str:
        """The snapshot to read (the repair stack's, or one made here): its resource ID."""
        if self.target.snapshot_id:
            self.snapshot = ids.require(self.target.snapshot_id, "snapshot", "check the repair stack's snapshot_id output")
            snap = self.snapshot
            self.compute = AzureClients(snap.subscription).compute
            found = azure_call(lambda: self.compute.snapshots.get(snap.resource_group, snap.name),
                               f"snapshot {self.target.snapshot_id}")
            _refuse_deny_all(found, f"snapshot {self.snapshot.name}", _STACK_SNAPSHOT_DENY_ALL)
        else:
            found = self._make()
        self._note(found)
        return found.id

    def _make(self) -> Any:
        disk_id = ids.try_parse(self.target.source_disk_id, "disk")
        if disk_id is None:
            raise CrashcartError(f"source disk ID {self.target.source_disk_id!r} is not a managed disk ID",
                                 "set source.os_disk_id (pipenv run discover writes it)", ExitCode.USAGE)
        self.compute = compute = AzureClients(disk_id.subscription).compute
        disk = azure_call(lambda: compute.disks.get(disk_id.resource_group, disk_id.name),
                          f"OS disk {self.target.source_disk_id}")
        _refuse_deny_all(disk, f"OS disk {disk_id.name}", "")
        name = snapshot_name(self.target.vm_key, self.stamp)
        group = self._group(disk_id, disk.location)
        self.snapshot = dataclasses.replace(disk_id, kind="snapshot", name=name, resource_group=group)
        body = _snapshot_body(disk, self.target, self.now)
        with step(f"snapshot the OS disk {disk_id.name} ({group}/{name}, deleted at the end)"):
            # Asked for: from here on it is deleted whatever happens (a create that failed leaves nothing).
            self.undo.callback(self.delete)
            made = azure_call(lambda: compute.snapshots.begin_create_or_update(
                group, name, body, **self.poll).result(), f"a snapshot of {disk_id.name}")
        self.record["snapshot"].update(id=made.id, made_by_kit=True, deleted=None)
        return made

    def _group(self, disk_id: ids.ResourceId, location: str) -> str:
        """The repair resource group the kit's snapshot goes in, in the disk's subscription: used as it is
        when it exists, else created here (deleted at the end, also on failure)."""
        from azure.core.exceptions import ResourceNotFoundError

        name = self.target.snapshot_group or f"crashcart-repair-{self.target.vm_key}"
        if name.lower() == disk_id.resource_group.lower():
            raise CrashcartError(f"the repair resource group {name} is the source VM's own group: the kit never "
                                 "writes there", "set repair.resource_group to a group of its own (or leave it empty "
                                 "for crashcart-repair-<vm key>)", ExitCode.USAGE)
        groups = AzureClients(disk_id.subscription).resource.resource_groups
        record: dict[str, Any] = {"name": name, "made_by_kit": False}
        self.record["snapshot"]["resource_group"] = record
        try:
            groups.get(name)
            return name
        except ResourceNotFoundError:
            pass
        except Exception as err:
            raise translate_azure_error(err, f"resource group {name}") from None
        expires = (self.now + dt.timedelta(hours=self.target.ttl_hours)).strftime("%Y-%m-%dT%H:%M:%SZ")
        tags = {**self.target.group_tags, "crashcart-expires-at": expires}
        with step(f"create resource group {name} for the snapshot (deleted at the end)"):
            record.update(made_by_kit=True, deleted=None)
            self.undo.callback(self._delete_group, groups, name, record)  # asked for: deleted whatever happens
            azure_call(lambda: groups.create_or_update(name, {"location": location, "tags": tags}),
                       f"resource group {name}", doing=f"create resource group {name}")
        return name

    def _delete_group(self, groups: Any, name: str, record: dict[str, Any]) -> None:
        """Undo of the group made here (after its snapshot's delete): never raises."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            with step(f"delete resource group {name}"):
                groups.begin_delete(name, **self.poll).result()
            record["deleted"] = True
        except ResourceNotFoundError:
            record["deleted"] = True  # its create failed, or it is gone already
        except Exception as err:
            record["deleted"] = False
            self._left(f"resource group {name} was not deleted ({first_line(err)}): `az group delete -n {name} "
                       "--yes` (`sweep --delete` removes it once its crashcart-expires-at has passed)")

    def _note(self, snapshot: Any) -> None:
        mode = _text(getattr(snapshot, "data_access_auth_mode", None))
        policy = _text(getattr(snapshot, "network_access_policy", None)) or "AllowAll"
        self.record["snapshot"].update(id=snapshot.id, network_access_policy=policy, data_access_auth_mode=mode or "None",
                                       disk_size_bytes=getattr(snapshot, "disk_size_bytes", None))
        if mode == "AzureActiveDirectory":
            self.disk_auth = Tokens(self.credential(), DISK_SCOPE)
        if policy == "AllowPrivate":
            self.notes.append(
                "the snapshot's network access policy is AllowPrivate: its export URL answers only through the disk "
                "access's private endpoint, so this host and the evidence account must reach it that way")

    def grant(self, seconds: float) -> str:
        """Read access for `seconds` (clamped to 1-10 h): the export SAS URL."""
        from azure.core.exceptions import HttpResponseError
        from azure.mgmt.compute.models import GrantAccessData

        assert self.snapshot is not None
        snap, compute = self.snapshot, self.compute
        seconds = int(min(MAX_ACCESS_SECONDS, max(MIN_ACCESS_SECONDS, seconds)))
        what = f"read access to snapshot {snap.name}"
        with step(f"grant read access to snapshot {snap.name} for {seconds // 60} min"):
            refused = False  # ARM answered the request itself with a 4xx: nothing was granted
            try:
                poller = compute.snapshots.begin_grant_access(
                    snap.resource_group, snap.name, GrantAccessData(access="Read", duration_in_seconds=seconds),
                    **self.poll)
            except HttpResponseError as err:
                refused = (err.status_code or 500) < 500
                raise translate_azure_error(err, what) from None
            finally:  # asked for: revoked whatever happens next
                self.undo.callback(self.revoke, may_be_granted=not refused)
            access = azure_call(poller.result, what)
        url = getattr(access, "access_sas", None) if access is not None else None
        if not url:
            raise CrashcartError(f"Azure granted access to snapshot {snap.name} but returned no SAS URL",
                                 "retry; if it persists, check the snapshot in the portal (Snapshot export)",
                                 ExitCode.AZURE_FAILED)
        self.record["access"].update(granted=True, seconds=seconds, aad=self.disk_auth is not None,
                                     host=urllib.parse.urlsplit(url).hostname)
        return url

    def source_auth(self) -> str | None:
        """x-ms-copy-source-authorization for copies from the export URL: the disk token in AAD mode."""
        return f"Bearer {self.disk_auth()}" if self.disk_auth is not None else None

    def revoke(self, may_be_granted: bool = True) -> None:
        """Undo of grant(): never raises."""
        snap = self.snapshot
        assert snap is not None
        try:
            with step(f"revoke access to snapshot {snap.name}"):
                self.compute.snapshots.begin_revoke_access(snap.resource_group, snap.name, **self.poll).result()
            self.record["access"]["revoked"] = True
        except Exception as err:
            self.record["access"]["revoked"] = False
            if not may_be_granted:
                log.warning("revoking access to %s failed (%s); the grant had been refused, so nothing is left",
                            snap.name, first_line(err))
                return
            self._left(f"read access to snapshot {snap.name} may still be granted ({first_line(err)}): "
                       f"`az snapshot revoke-access -g {snap.resource_group} -n {snap.name}` (it expires "
                       "by itself at the end of its duration)")

    def delete(self) -> None:
        """Undo of the snapshot made here: never raises."""
        snap = self.snapshot
        assert snap is not None
        try:
            with step(f"delete snapshot {snap.name}"):
                self.compute.snapshots.begin_delete(snap.resource_group, snap.name, **self.poll).result()
            self.record["snapshot"]["deleted"] = True
        except Exception as err:
            self.record["snapshot"]["deleted"] = False
            self._left(f"snapshot {snap.name} was not deleted ({first_line(err)}): "
                       f"`az snapshot delete -g {snap.resource_group} -n {snap.name}`")

    def _left(self, item: str) -> None:
        self.left.append(item)
        log.error("    left behind: %s", item)


def snapshot_name(key: str, stamp: str) -> str:
    """`crashcart-export-<vm key>-<stamp>` within a snapshot name's 80 characters: a long VM name is
    shortened, never the key's hash nor the stamp (two VMs, or two runs, never share a snapshot name)."""
    name = f"crashcart-export-{key}-{stamp.lower()}"
    excess = len(name) - MAX_SNAPSHOT_NAME
    if excess > 0:
        readable, digest = key.rsplit("-", 1)
        name = f"crashcart-export-{readable[:-excess].rstrip('-') or 'vm'}-{digest}-{stamp.lower()}"
    return name


def _refuse_deny_all(resource: Any, what: str, extra: str) -> None:
    if _text(getattr(resource, "network_access_policy", None)) == "DenyAll":
        raise CrashcartError(f"{what} cannot be exported: its network access policy is DenyAll{extra}", DENY_ALL_HINT,
                             ExitCode.USAGE)


def _snapshot_body(disk: Any, target: ExportTarget, now: dt.datetime) -> Any:
    """A full (not incremental) copy of the disk that keeps its export policy, tagged to expire."""
    from azure.mgmt.compute.models import CreationData, Snapshot, SnapshotProperties, SnapshotSku

    expires = (now + dt.timedelta(hours=target.ttl_hours)).strftime("%Y-%m-%dT%H:%M:%SZ")
    properties = SnapshotProperties(
        creation_data=CreationData(create_option="Copy", source_resource_id=target.source_disk_id),
        incremental=False, network_access_policy=_text(getattr(disk, "network_access_policy", None)) or "AllowAll")
    if getattr(disk, "disk_access_id", None):
        properties.disk_access_id = disk.disk_access_id
    encryption = customer_key(disk)
    if encryption is not None:  # a CMK disk's snapshot is encrypted with the same disk encryption set
        properties.encryption = encryption
    if _text(getattr(disk, "data_access_auth_mode", None)):
        properties.data_access_auth_mode = _text(disk.data_access_auth_mode)
    if _text(getattr(disk, "public_network_access", None)):
        properties.public_network_access = _text(disk.public_network_access)
    return Snapshot(location=disk.location, sku=SnapshotSku(name="Standard_LRS"), properties=properties,
                    tags={**target.tags, "crashcart-expires-at": expires})


CUSTOMER_KEY_TYPES = ("EncryptionAtRestWithCustomerKey", "EncryptionAtRestWithPlatformAndCustomerKeys")


def customer_key(disk: Any) -> Any:
    """The disk's encryption at rest (an azure.mgmt.compute Encryption: disk encryption set ID and type) when it
    uses a customer-managed key, else None. The snapshot names the same set explicitly: its data then stays
    under the customer's key whatever Azure's default for a snapshot is, and revoking that key revokes the
    snapshot too."""
    from azure.mgmt.compute.models import Encryption

    encryption = getattr(disk, "encryption", None)
    kind = _text(getattr(encryption, "type", None))
    des = getattr(encryption, "disk_encryption_set_id", None)
    if kind not in CUSTOMER_KEY_TYPES or not des:
        return None
    return Encryption(disk_encryption_set_id=des, type=kind)
