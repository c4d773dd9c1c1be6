"""Sweeping: find repair resource groups whose time is up, and delete them when asked (`pipenv run sweep`).

The safety net under repair-run's teardown: a runner killed with SIGKILL, a lost state file, a
`--keep` nobody came back to. Every repair resource group carries the tags the repair stack sets:
`crashcart=repair`, `crashcart-source-vm=<VM resource ID>` and `crashcart-expires-at` (ISO-8601 UTC,
creation time + repair.ttl_hours). A dry run (the default) lists them; `--delete` deletes the expired
ones through Azure Resource Manager.

What it never touches: a group without the exact tag `crashcart=repair` (the evidence group carries
`crashcart=evidence`), a group without a readable expiry (listed, for a person to decide), a group
not yet expired, and a group holding a managed disk attached to a VM outside it (status "kept"): the
group `repair-run --fix` / `fix --verify` keeps on purpose holds the disk the source VM now boots from,
and deleting the group would take the VM's OS disk with it (or fail half-way on it). Each expired
group's disks are read (Microsoft.Compute/disks/read) before anything is deleted; a group that cannot
be read stops the sweep. Each group is read again just before its deletion, so a tag changed in
between (someone extending the expiry, say) is honoured.

Left behind by a sweep (and not by a Terraform teardown): the role assignment the repair stack made
on the evidence container, which outlives the deleted VM identity as an "unknown" principal. It
grants nothing to anyone, and `az role assignment list --scope <container id>` shows it for cleanup.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scripts.azure import ids
from scripts.azure.errors import azure_call, translate_azure_error
from scripts.base.console import log
from scripts.base.errors import CrashcartError, ExitCode
from scripts.config.model import DEFAULT_PATH, KIT_TAG, Config

REPAIR_ROLE = "repair"
EXPIRES_AT_TAG = "crashcart-expires-at"
SOURCE_VM_TAG = "crashcart-source-vm"
REPAIR_FILTER = f"tagName eq '{KIT_TAG}' and tagValue eq '{REPAIR_ROLE}'"


@dataclass(frozen=True)
class RepairGroup:
    name: str
    id: str
    location: str
    source_vm: str
    expires_at: str  # the tag as written; "" when absent
    provisioning_state: str

    @property
    def expiry(self) -> dt.datetime | None:
        return parse_time(self.expires_at)

    def status(self, now: dt.datetime) -> str:
        """expired | active | deleting | no-expiry"""
        if self.provisioning_state.lower() == "deleting":
            return "deleting"
        expiry = self.expiry
        if expiry is None:
            return "no-expiry"
        return "expired" if expiry <= now else "active"


@dataclass
class SweepReport:
    """What a sweep found and did; `to_dict()` is the verb's JSON."""

    subscription_id: str
    now: dt.datetime
    dry_run: bool
    groups: list[RepairGroup]
    deleted: list[str] = field(default_factory=list)
    deletion_started: list[str] = field(default_factory=list)
    left_alone: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # group name -> why it is never swept ("holds ...")

    def status(self, group: RepairGroup) -> str:
        """RepairGroup.status, or "kept" for an expired group that holds a VM's disk."""
        status = group.status(self.now)
        return "kept" if status == "expired" and group.name in self.kept else status

    @property
    def expired(self) -> list[RepairGroup]:
        return [g for g in self.groups if self.status(g) == "expired"]

    def failure(self) -> CrashcartError | None:
        """The verb's error when a deletion failed (exit 31), else None."""
        if not self.failed:
            return None
        return CrashcartError(
            f"{len(self.failed)} expired repair group(s) could not be deleted: "
            + "; ".join(f"{f['name']}: {f['error']}" for f in self.failed),
            "fix the cause (a lock on the group? the sweeping identity needs delete rights on it) and re-run",
            ExitCode.TEARDOWN_FAILED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "subscription_id": self.subscription_id,
            "now": self.now.isoformat(timespec="seconds"),
            "dry_run": self.dry_run,
            "groups": [{**asdict(g), "status": self.status(g)} for g in self.groups],
            "expired": [g.name for g in self.expired],
            "deleted": self.deleted,
            "deletion_started": self.deletion_started,
            "left_alone": self.left_alone,
            "failed": self.failed,
            "kept": [{"name": name, "reason": reason} for name, reason in self.kept.items()],
        }


def parse_time(text: str) -> dt.datetime | None:
    """ISO-8601 (Terraform's timeadd() writes RFC 3339, `2025-01-31T06:00:00Z`); naive means UTC."""
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("z", "Z"))
    except (ValueError, AttributeError):
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def is_repair_group(tags: dict[str, str] | None) -> bool:
    """The filter ARM applies is not trusted alone: the tag must say exactly `repair`."""
    return (tags or {}).get(KIT_TAG) == REPAIR_ROLE


def as_repair_group(group: Any) -> RepairGroup:
    tags = group.tags or {}
    properties = getattr(group, "properties", None)
    return RepairGroup(name=group.name, id=group.id, location=group.location or "",
                       source_vm=tags.get(SOURCE_VM_TAG, ""), expires_at=tags.get(EXPIRES_AT_TAG, ""),
                       provisioning_state=getattr(properties, "provisioning_state", None) or "")


def list_repair_groups(resource_client: Any) -> list[RepairGroup]:
    groups = azure_call(lambda: [g for g in resource_client.resource_groups.list(filter=REPAIR_FILTER)
                                 if is_repair_group(g.tags)], "the subscription's resource groups")
    return sorted((as_repair_group(g) for g in groups), key=lambda g: g.name.lower())


def held_disk(compute_client: Any, group: RepairGroup) -> str:
    """Why `group` must stay ("holds <disk>, the OS disk of <vm>"), or "" when none of its managed disks is
    attached to a VM outside it (a disk of the group's own rescue VM goes with the group)."""
    disks = azure_call(lambda: list(compute_client.disks.list_by_resource_group(group.name)),
                       f"the disks of resource group {group.name}",
                       doing=f"check that resource group {group.name} holds no VM's disk before sweeping it")
    inside = group.id.rstrip("/").lower() + "/"
    for disk in disks:
        holder = str(getattr(disk, "managed_by", None) or "")
        if holder and not holder.lower().startswith(inside):
            what = "the OS disk of" if getattr(disk, "os_type", None) else "a disk attached to"
            return f"holds {disk.id}, {what} {holder}"
    return ""


def start_delete(resource_client: Any, group: RepairGroup, now: dt.datetime) -> Any | None:
    """Re-reads the group and starts its deletion if it is still a repair group and still expired.
    Returns the poller, or None when the group is gone or changed (and is left alone)."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        fresh = resource_client.resource_groups.get(group.name)
    except ResourceNotFoundError:
        log.info("    %s: already gone", group.name)
        return None
    status = as_repair_group(fresh).status(now)
    if not is_repair_group(fresh.tags) or status != "expired":
        log.warning("    %s: changed since it was listed (now %s); left alone", group.name,
                    status if is_repair_group(fresh.tags) else "no longer tagged crashcart=repair")
        return None
    return resource_client.resource_groups.begin_delete(group.name)


def sweep(resource_client: Any, subscription_id: str, now: dt.datetime, *, delete: bool,
          wait: bool = True, compute_client: Any = None) -> SweepReport:
    """Lists the subscription's repair groups and, with `delete`, deletes the expired ones (waiting for
    each deletion to finish unless `wait` is False), never one that holds a VM's disk (`held_disk`). A
    failed deletion is recorded, not raised."""
    from azure.core.exceptions import AzureError

    report = SweepReport(subscription_id, now, not delete, list_repair_groups(resource_client))
    if report.expired:
        compute = compute_client if compute_client is not None else _compute_client(subscription_id)
        for group in report.expired:
            reason = held_disk(compute, group)
            if reason:
                report.kept[group.name] = reason
    _log_groups(report)
    expired = report.expired
    if not delete:
        if expired:
            log.info("dry run: `pipenv run sweep --delete` deletes the %d expired group(s)", len(expired))
        return report
    pollers: dict[str, Any] = {}
    for group in expired:
        try:
            poller = start_delete(resource_client, group, now)
        except AzureError as err:  # this group's; the others still go
            report.failed.append({"name": group.name, "error": _delete_error(err, group.name)})
            continue
        if poller is None:
            report.left_alone.append(group.name)
        else:
            log.info("    deleting %s ...", group.name)
            pollers[group.name] = poller
    for name, poller in pollers.items():
        if not wait:
            report.deletion_started.append(name)
            continue
        try:
            poller.result()
        except AzureError as err:
            report.failed.append({"name": name, "error": _delete_error(err, name)})
            continue
        report.deleted.append(name)
        log.info("    deleted %s", name)
    return report


def _delete_error(err: Exception, name: str) -> str:
    return translate_azure_error(err, f"resource group {name}", doing=f"delete resource group {name}").message


def _log_groups(report: SweepReport) -> None:
    log.info("%d repair resource group(s) in subscription %s, %d expired as of %s", len(report.groups),
             report.subscription_id, len(report.expired), report.now.isoformat(timespec="seconds"))
    for g in report.groups:
        log.info("    %-9s %-40s expires %-25s source %s", report.status(g), g.name, g.expires_at or "(no tag)",
                 g.source_vm or "?")
    for g in report.groups:
        if report.status(g) == "kept":
            log.warning("    %s kept: %s; never swept (delete it by hand once the VM no longer uses that disk)",
                        g.name, report.kept[g.name])
        if report.status(g) == "no-expiry":
            log.warning("    %s has no readable %s tag: never swept; delete it by hand if nothing uses it",
                        g.name, EXPIRES_AT_TAG)


def resolve_subscription(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    """--subscription, else CRASHCART_SOURCE_SUBSCRIPTION_ID or AZURE_SUBSCRIPTION_ID, else the config's. A value
    that is not a GUID is told by where it came from (the operator may not know a variable is set)."""
    given = [("--subscription", args.subscription)] + [(name, env.get(name)) for name in SUBSCRIPTION_ENV]
    source, subscription = next(((name, value.strip()) for name, value in given if (value or "").strip()), ("", ""))
    if not subscription:
        path = Path(args.config or env.get("CRASHCART_CONFIG") or DEFAULT_PATH)
        if path.exists():
            subscription = Config.load(path).source.subscription_id
    if not subscription:
        raise CrashcartError("no subscription to sweep",
                             "pass --subscription <id> (or set AZURE_SUBSCRIPTION_ID), or run where the config is",
                             ExitCode.USAGE)
    if not ids.is_subscription_id(subscription):
        if source in SUBSCRIPTION_ENV:
            raise CrashcartError(f'{source}="{subscription}" is not a subscription ID',
                                 f"set {source} to a GUID like 00000000-0000-0000-0000-000000000000, unset it, or "
                                 "pass --subscription <id>", ExitCode.USAGE)
        raise CrashcartError(f'"{subscription}" is not a subscription ID',
                             "pass a GUID like 00000000-0000-0000-0000-000000000000", ExitCode.USAGE)
    return subscription


SUBSCRIPTION_ENV = ("CRASHCART_SOURCE_SUBSCRIPTION_ID", "AZURE_SUBSCRIPTION_ID")  # after --subscription, in this order


def resolve_now(text: str | None) -> dt.datetime:
    if not text:
        return dt.datetime.now(dt.timezone.utc)
    value = parse_time(text)
    if value is None:
        raise CrashcartError(f'--now "{text}" is not an ISO-8601 time',
                             "write it like 2025-01-31T06:00:00Z", ExitCode.USAGE)
    return value


def resource_client(subscription_id: str) -> Any:
    """`AzureClients(...).resource`: the one client factory (and the one place tests point elsewhere)."""
    from scripts.azure.clients import AzureClients

    return AzureClients(subscription_id).resource


def _compute_client(subscription_id: str) -> Any:
    from scripts.azure.clients import AzureClients

    return AzureClients(subscription_id).compute
