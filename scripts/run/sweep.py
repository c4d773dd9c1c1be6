"""`pipenv run sweep`: find repair resource groups whose time is up, and delete them when asked.

The safety net under repair-run's teardown: a runner killed with SIGKILL, a lost state file, a
`--keep` nobody came back to. Every repair resource group carries the tags the repair stack sets:
`crashcart=repair`, `crashcart-source-vm=<VM resource ID>` and `crashcart-expires-at` (ISO-8601 UTC,
creation time + repair.ttl_hours). A dry run (the default) lists them; `--delete` deletes the expired
ones through Azure Resource Manager.

What it never touches: a group without the exact tag `crashcart=repair` (the evidence group carries
`crashcart=evidence`), a group without a readable expiry (listed, for a person to decide), a group
not yet expired. Each group is read again just before its deletion, so a tag changed in between
(someone extending the expiry, say) is honoured.

Left behind by a sweep (and not by a Terraform teardown): the role assignment the repair stack made
on the evidence container, which outlives the deleted VM identity as an "unknown" principal. It
grants nothing to anyone, and `az role assignment list --scope <container id>` shows it for cleanup.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scripts.base.console import emit_json, log
from scripts.config.model import DEFAULT_PATH, GUID, KIT_TAG, Config
from scripts.base.errors import CrashcartError, ExitCode

REPAIR_ROLE = "repair"
EXPIRES_AT_TAG = "crashcart-expires-at"
SOURCE_VM_TAG = "crashcart-source-vm"
REPAIR_FILTER = f"tagName eq '{KIT_TAG}' and tagValue eq '{REPAIR_ROLE}'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subscription", metavar="ID",
                        help="subscription to sweep (env CRASHCART_SOURCE_SUBSCRIPTION_ID or AZURE_SUBSCRIPTION_ID; "
                             "default: the config's source.subscription_id)")
    parser.add_argument("--config", metavar="PATH",
                        help=f"config file to take the subscription from (env CRASHCART_CONFIG; default {DEFAULT_PATH})")
    parser.add_argument("--delete", action="store_true",
                        help="delete the expired groups (default: only list them)")
    parser.add_argument("--now", metavar="ISO-8601",
                        help="judge expiry as of this time instead of now, e.g. 2025-01-31T06:00:00Z")
    parser.add_argument("--no-wait", action="store_true",
                        help="start the deletions and return without waiting for them to finish")


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
    from azure.core.exceptions import AzureError

    try:
        groups = [g for g in resource_client.resource_groups.list(filter=REPAIR_FILTER) if is_repair_group(g.tags)]
    except AzureError as err:
        raise _azure_error(err, "the subscription's resource groups") from None
    return sorted((as_repair_group(g) for g in groups), key=lambda g: g.name.lower())


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


def resolve_subscription(args: argparse.Namespace, env: dict[str, str] | os._Environ[str]) -> str:
    subscription = (args.subscription or env.get("CRASHCART_SOURCE_SUBSCRIPTION_ID")
                    or env.get("AZURE_SUBSCRIPTION_ID") or "").strip()
    if not subscription:
        path = Path(args.config or env.get("CRASHCART_CONFIG") or DEFAULT_PATH)
        if path.exists():
            subscription = Config.load(path).source.subscription_id
    if not subscription:
        raise CrashcartError("no subscription to sweep",
                             "pass --subscription <id> (or set AZURE_SUBSCRIPTION_ID), or run where the config is",
                             ExitCode.USAGE)
    if not re.fullmatch(GUID, subscription):
        raise CrashcartError(f'"{subscription}" is not a subscription ID',
                             "pass a GUID like 00000000-0000-0000-0000-000000000000", ExitCode.USAGE)
    return subscription


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


def _azure_error(err: Exception, what: str) -> CrashcartError:
    from scripts.azure.errors import translate_azure_error

    return translate_azure_error(err, what)


def run(args: argparse.Namespace) -> int:
    from azure.core.exceptions import AzureError

    subscription = resolve_subscription(args, os.environ)
    now = resolve_now(args.now)
    client = resource_client(subscription)
    groups = list_repair_groups(client)
    statuses = {g.name: g.status(now) for g in groups}
    expired = [g for g in groups if statuses[g.name] == "expired"]
    log.info("%d repair resource group(s) in subscription %s, %d expired as of %s", len(groups), subscription,
             len(expired), now.isoformat(timespec="seconds"))
    for g in groups:
        log.info("    %-9s %-40s expires %-25s source %s", statuses[g.name], g.name, g.expires_at or "(no tag)",
                 g.source_vm or "?")
    for g in groups:
        if statuses[g.name] == "no-expiry":
            log.warning("    %s has no readable %s tag: never swept; delete it by hand if nothing uses it",
                        g.name, EXPIRES_AT_TAG)

    deleted: list[str] = []
    started: list[str] = []
    skipped: list[str] = []
    failed: list[dict[str, str]] = []
    if args.delete and expired:
        pollers: dict[str, Any] = {}
        for g in expired:
            try:
                poller = start_delete(client, g, now)
            except AzureError as err:
                failed.append({"name": g.name, "error": _azure_error(err, f"resource group {g.name}").message})
                continue
            if poller is None:
                skipped.append(g.name)
            else:
                log.info("    deleting %s ...", g.name)
                pollers[g.name] = poller
        for name, poller in pollers.items():
            if args.no_wait:
                started.append(name)
                continue
            try:
                poller.result()
                deleted.append(name)
                log.info("    deleted %s", name)
            except AzureError as err:
                failed.append({"name": name, "error": _azure_error(err, f"resource group {name}").message})
    elif expired:
        log.info("dry run: `pipenv run sweep --delete` deletes the %d expired group(s)", len(expired))

    emit_json({
        "subscription_id": subscription,
        "now": now.isoformat(timespec="seconds"),
        "dry_run": not args.delete,
        "groups": [{**asdict(g), "status": statuses[g.name]} for g in groups],
        "expired": [g.name for g in expired],
        "deleted": deleted,
        "deletion_started": started,
        "left_alone": skipped,
        "failed": failed,
    })
    if failed:
        raise CrashcartError(
            f"{len(failed)} expired repair group(s) could not be deleted: "
            + "; ".join(f"{f['name']}: {f['error']}" for f in failed),
            "fix the cause (a lock on the group? the sweeping identity needs delete rights on it) and re-run",
            ExitCode.TEARDOWN_FAILED)
    return int(ExitCode.OK)
