"""`fleet run --selector`: the fleet's VMs chosen through Azure Resource Graph (azure-mgmt-resourcegraph).

The selector is one string of space-separated terms (shell-style quoting for values with spaces):

    subscription=<id>[,<id>...]         required; repeat or comma-separate for several (OR)
    resourceGroup=<name>[,<name>...]    optional; alias rg=; several: any of them (OR)
    location=<region>[,<region>...]     optional; e.g. westeurope (OR)
    tag:<name>=<value>                  optional, repeatable: every tag must match (AND); the value exactly,
                                        the name as the VMs spell it

e.g. `--selector "subscription=0000... resourceGroup=prod-web,prod-api tag:env=prod 'tag:owner=web team'"`.

Only Windows VMs are taken (properties.storageProfile.osDisk.osType =~ 'Windows'); the kit's own rescue VMs
(tag `crashcart`) never are. Every match is taken whatever its power state - a VM in a boot loop shows as
running - and the selection says how many are in each state.

The KQL is built from validated parts only: subscription IDs are GUIDs (and go in the request's
`subscriptions`, not the query), resource group and region names match ARM's own rules, and tag names and
values become KQL string literals with `\\` and `'` escaped (control characters are refused): user text never
reaches the query unquoted. Results are read page by page ($skipToken, 1000 rows a page); Resource Graph
returns only what the caller can read, so a VM the pipeline identity may not read is not selected.
"""

from __future__ import annotations

import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from scripts.azure import ids
from scripts.azure.errors import azure_call
from scripts.base.console import log
from scripts.base.errors import CrashcartError, ExitCode
from scripts.config.sections import KIT_TAG

PAGE = 1000  # Resource Graph's largest $top
MAX_VMS = 10_000  # as a VM file (scripts.run.fleet.MAX_VMS)
_GUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_GROUP = re.compile(r"[-\w.()]{0,89}[-\w()]", re.ASCII)  # ARM: 1-90 of these, not ending in a period
_REGION = re.compile(r"[a-z][a-z0-9]{1,39}")
_TAG_NAME_FORBIDDEN = set('<>%&\\?/')  # ARM refuses these in tag names
_KEYS = {"subscription": "subscriptions", "subscriptions": "subscriptions", "sub": "subscriptions",
         "resourcegroup": "groups", "resourcegroups": "groups", "rg": "groups", "location": "locations",
         "region": "locations"}
HELP = ("write terms like: subscription=<id> [resourceGroup=<name>[,<name>]] [location=<region>] "
        "[tag:<name>=<value> ...]")


@dataclass(frozen=True)
class Selector:
    subscriptions: tuple[str, ...]
    groups: tuple[str, ...] = ()
    locations: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()

    def query(self) -> str:
        """The KQL: every user value a quoted, escaped literal."""
        where = ["type =~ 'microsoft.compute/virtualmachines'",
                 "properties.storageProfile.osDisk.osType =~ 'Windows'"]
        if self.groups:
            where.append(f"resourceGroup in~ ({', '.join(kql_string(g) for g in self.groups)})")
        if self.locations:
            where.append(f"location in~ ({', '.join(kql_string(g) for g in self.locations)})")
        where += [f"tags[{kql_string(name)}] == {kql_string(value)}" for name, value in self.tags]
        return ("Resources\n| where " + "\n    and ".join(where)
                + f"\n| project id, name, resourceGroup, subscriptionId, location, "
                  f"powerState = tostring(properties.extended.instanceView.powerState.code), "
                  f"kit = tostring(tags[{kql_string(KIT_TAG)}])\n| order by id asc")


@dataclass
class Selection:
    selector: str
    query: str
    vm_ids: tuple[str, ...]
    power_states: dict[str, int] = field(default_factory=dict)
    pages: int = 0
    skipped_kit_vms: int = 0
    locations: dict[str, str] = field(default_factory=dict)  # lower-cased VM ID -> region

    def summary(self) -> dict[str, Any]:
        return {"selector": self.selector, "matched": len(self.vm_ids), "power_states": self.power_states,
                "pages": self.pages, "skipped_rescue_vms": self.skipped_kit_vms, "query": self.query}


def kql_string(value: str) -> str:
    """A KQL single-quoted string literal of `value` (backslash and quote escaped); control characters refused."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise CrashcartError(f"the selector value {_shown(value)} holds a control character",
                             "write the value without it", ExitCode.USAGE)
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _shown(value: str) -> str:
    return repr(value.encode("unicode_escape").decode()[:80])


def parse_selector(text: str) -> Selector:
    """The selector string as a Selector; a usage error naming the first bad term."""
    try:
        terms = shlex.split(text or "")
    except ValueError as err:
        raise CrashcartError(f"--selector cannot be read: {err}", HELP, ExitCode.USAGE) from None
    found: dict[str, list[str]] = {"subscriptions": [], "groups": [], "locations": []}
    tags: list[tuple[str, str]] = []
    for term in terms:
        key, sep, value = term.partition("=")
        if not sep or not value:
            raise CrashcartError(f"--selector term {_shown(term)} is not key=value", HELP, ExitCode.USAGE)
        if key.lower().startswith("tag:"):
            name = key[4:]
            if not name or len(name) > 512 or _TAG_NAME_FORBIDDEN & set(name):
                raise CrashcartError(f"--selector tag name {_shown(name)} is not a valid Azure tag name",
                                     "tag names are 1-512 characters without < > % & \\ ? /", ExitCode.USAGE)
            if len(value) > 256:
                raise CrashcartError(f"--selector tag value for {_shown(name)} is longer than 256 characters",
                                     "Azure tag values are at most 256 characters", ExitCode.USAGE)
            kql_string(name), kql_string(value)  # control characters refused here
            tags.append((name, value))
            continue
        kind = _KEYS.get(key.lower())
        if kind is None:
            raise CrashcartError(f"--selector key {_shown(key)} is not known", HELP, ExitCode.USAGE)
        for item in (v.strip() for v in value.split(",")):
            item = item.lower() if kind == "locations" else item
            _check(kind, item)
            if item.lower() not in {x.lower() for x in found[kind]}:
                found[kind].append(item.lower() if kind != "groups" else item)
    if not found["subscriptions"]:
        raise CrashcartError("--selector names no subscription", "add subscription=<subscription id>; " + HELP,
                             ExitCode.USAGE)
    return Selector(tuple(found["subscriptions"]), tuple(found["groups"]), tuple(found["locations"]), tuple(tags))


def _check(kind: str, item: str) -> None:
    rules = {"subscriptions": (_GUID, "a subscription ID (a GUID)"),
             "groups": (_GROUP, "a resource group name (1-90 letters, digits, - _ . ( ), not ending in .)"),
             "locations": (_REGION, "a region name such as westeurope")}
    pattern, what = rules[kind]
    if not pattern.fullmatch(item):
        raise CrashcartError(f"--selector value {_shown(item)} is not {what}", HELP, ExitCode.USAGE)


def graph_client() -> Any:
    """The Resource Graph client on the kit's ARM endpoint and credential (scripts.azure.clients)."""
    from scripts.azure import clients

    return clients.resource_graph()


def select(text: str, client: Any = None) -> Selection:
    """The Windows VMs the selector matches (every page), in resource-ID order."""
    selector = parse_selector(text)
    query = selector.query()
    rows, pages = query_pages(selector.subscriptions, query, client, "query the VMs of the --selector")
    found: dict[str, str] = {}
    locations: dict[str, str] = {}
    states: Counter[str] = Counter()
    skipped = 0
    for row in rows:
        vm_id = str((row or {}).get("id") or "")
        if ids.try_parse(vm_id, "vm") is None:
            continue
        if row.get("kit"):
            skipped += 1  # one of the kit's own rescue VMs
            continue
        if vm_id.lower() not in found:
            found[vm_id.lower()] = vm_id
            locations[vm_id.lower()] = str(row.get("location") or "").lower()
            states[(row.get("powerState") or "PowerState/unknown").split("/", 1)[-1]] += 1
    if len(found) > MAX_VMS:
        raise CrashcartError(f"--selector matches {len(found)} VMs, more than {MAX_VMS}", "narrow it (a resource "
                             "group, a tag) or split the fleet", ExitCode.USAGE)
    if not found:
        raise CrashcartError(f"--selector matches no Windows VM the pipeline identity can read "
                             f"(subscriptions {', '.join(selector.subscriptions)})",
                             "check the selector's terms, and that the identity has read access to those VMs",
                             ExitCode.USAGE)
    selection = Selection(text, query, tuple(found.values()), dict(sorted(states.items())), pages, skipped, locations)
    states_text = ", ".join(f"{n} {s}" for s, n in selection.power_states.items())
    log.info("selector: %d Windows VM(s) matched (%s), all taken%s", len(found), states_text,
             f"; {skipped} crashcart rescue VM(s) left out" if skipped else "")
    return selection


def locate(vm_ids: tuple[str, ...] | list[str], client: Any = None) -> dict[str, str]:
    """The region of each listed VM (lower-cased ID -> region) through Resource Graph: one paged query per
    fleet, not one GET per VM. VMs Resource Graph does not show are absent."""
    subscriptions = sorted({ref.subscription for ref in (ids.try_parse(v, "vm") for v in vm_ids) if ref})
    if not subscriptions:
        return {}
    query = ("Resources\n| where type =~ 'microsoft.compute/virtualmachines'\n| project id, location\n"
             "| order by id asc")
    rows, _ = query_pages(tuple(subscriptions), query, client, "read the regions of the fleet's VMs")
    wanted = {v.lower() for v in vm_ids}
    return {str(r.get("id")).lower(): str(r.get("location") or "").lower() for r in rows
            if str(r.get("id") or "").lower() in wanted}


def query_pages(subscriptions: tuple[str, ...], query: str, client: Any, doing: str) -> tuple[list[Any], int]:
    """Every row of `query` over `subscriptions`, following $skipToken; (rows, pages)."""
    from azure.mgmt.resourcegraph.models import QueryRequest, QueryRequestOptions

    client = client or graph_client()
    rows: list[Any] = []
    pages, token = 0, None
    while True:
        request = QueryRequest(subscriptions=list(subscriptions), query=query,
                               options=QueryRequestOptions(top=PAGE, skip_token=token, result_format="objectArray"))
        response = azure_call(lambda: client.resources(request), "Azure Resource Graph", doing=doing, hints=_HINTS)
        pages += 1
        rows += [r for r in response.data or [] if isinstance(r, dict)]
        if len(rows) > MAX_VMS + 1000:
            raise CrashcartError(f"Resource Graph returns more than {MAX_VMS} VMs to {doing}", "narrow the selector "
                                 "(a resource group, a tag) or split the fleet", ExitCode.USAGE)
        token = response.skip_token
        if not token:
            return rows, pages


_HINTS = {"auth": "the identity needs read access to the VMs (Resource Graph shows only what it can read)",
          "failed": "retry in a few minutes; if Resource Graph refused the query (BadRequest), report it as a "
                    "crashcart bug with the --selector you used"}
