"""Resource groups in the ARM double: list (with $filter on a tag, $top and nextLink paging), get, and
the long-running delete, shaped after azure-rest-api-specs (Microsoft.Resources, ResourceGroups_List /
ResourceGroups_Get / ResourceGroups_Delete):

- a group is `{"id", "name", "type": "Microsoft.Resources/resourceGroups", "location",
  "properties": {"provisioningState"}, "tags"}`; a list page is `{"value": [...], "nextLink"}`;
- `$filter` accepts what ARM accepts for groups: `tagName eq 'n'`, optionally `and tagValue eq 'v'`;
  anything else is 400 InvalidFilterInQueryString, as ARM answers;
- DELETE answers 202 Accepted with a `Location` header (no Azure-AsyncOperation: ARM's group delete
  is tracked by location) and `Retry-After`; the location answers 202 while the delete is running
  (the group then reads `provisioningState: Deleting`) and 200 when it is done, at which point the
  group and everything under it are gone. A delete of a missing group is 404 ResourceGroupNotFound.
  `fail_delete[name] = (status, code, message)` makes the operation end in that error instead.

Also the managed disks of a group (Microsoft.Compute, Disks_ListByResourceGroup: `GET .../resourceGroups/{g}/
providers/Microsoft.Compute/disks`, RBAC Microsoft.Compute/disks/read): `{"value": [disk...]}` as stored, each
with its `managedBy` (the VM it is attached to, in whatever group that VM lives); 404 ResourceGroupNotFound for
a group that does not exist.
"""

from __future__ import annotations

import re
import urllib.parse
import uuid
from dataclasses import dataclass, field

from scripts.devkit.armdouble import ArmDouble, ArmError, Request, Response, error_response

_GROUPS = r"/subscriptions/(?P<sub>[^/]+)/resourcegroups"
_FILTER = re.compile(r"\s*tagName\s+eq\s+'(?P<name>[^']*)'(\s+and\s+tagValue\s+eq\s+'(?P<value>[^']*)')?\s*",
                     re.IGNORECASE)


def group_id(subscription_id: str, name: str) -> str:
    return f"/subscriptions/{subscription_id}/resourceGroups/{name}"


@dataclass
class ResourceGroups:
    """The routes' state: which deletes are running or scripted to fail, and how long they take."""

    double: ArmDouble
    page_size: int = 2
    delete_polls: int = 0  # extra 202 answers before the delete is done
    retry_after: str = "1"  # whole seconds, as HTTP and ARM send it (azure-core ignores "0")
    fail_delete: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    _operations: dict[str, dict] = field(default_factory=dict)

    def add(self, subscription_id: str, name: str, location: str = "westeurope",
            tags: dict[str, str] | None = None, provisioning_state: str = "Succeeded") -> dict:
        rid = group_id(subscription_id, name)
        return self.double.put(rid, {
            "id": rid, "name": name, "type": "Microsoft.Resources/resourceGroups", "location": location,
            "properties": {"provisioningState": provisioning_state}, "tags": dict(tags or {})})

    def names(self, subscription_id: str) -> list[str]:
        return sorted(g["name"] for g in self._groups(subscription_id))

    def _groups(self, subscription_id: str) -> list[dict]:
        prefix = f"/subscriptions/{subscription_id}/resourcegroups/".lower()
        return [r for k, r in self.double.resources.items()
                if k.startswith(prefix) and "/" not in k[len(prefix):]]

    # ---- routes ----------------------------------------------------------------------------------
    def list(self, double: ArmDouble, req: Request, m: re.Match) -> Response:
        groups = sorted(self._groups(m.group("sub")), key=lambda g: g["name"].lower())
        raw_filter = req.query.get("$filter")
        if raw_filter:
            parsed = _FILTER.fullmatch(raw_filter)
            if parsed is None:
                raise ArmError(400, "InvalidFilterInQueryString",
                               f"Invalid $filter '{raw_filter}' specified in the query string.")
            name, value = parsed.group("name"), parsed.group("value")
            groups = [g for g in groups if name in (g.get("tags") or {})
                      and (value is None or g["tags"][name] == value)]
        start = int(req.query.get("$skiptoken") or 0)
        size = int(req.query.get("$top") or self.page_size)
        page = groups[start:start + size]
        body: dict = {"value": page}
        if start + size < len(groups):
            query = {k: v for k, v in req.query.items() if k != "$skiptoken"}
            query["$skiptoken"] = str(start + size)
            body["nextLink"] = f"{double.url}{req.path}?{urllib.parse.urlencode(query)}"
        return Response(200, body)

    def create(self, double: ArmDouble, req: Request, m: re.Match) -> Response:
        """ResourceGroups_CreateOrUpdate: 201 for a new group, 200 for an existing one (its tags replaced)."""
        rid = group_id(m.group("sub"), m.group("rg"))
        body = req.body if isinstance(req.body, dict) else {}
        if not body.get("location"):
            raise ArmError(400, "LocationRequired", "The location property is required for this definition.")
        existed = double.get(rid) is not None
        group = self.add(m.group("sub"), m.group("rg"), body["location"], body.get("tags"))
        return Response(200 if existed else 201, group)

    def delete(self, double: ArmDouble, req: Request, m: re.Match) -> Response:
        rid = group_id(m.group("sub"), m.group("rg"))
        group = double.get(rid)
        if group is None:
            return error_response(404, "ResourceGroupNotFound", f"Resource group '{m.group('rg')}' could not be found.")
        group["properties"]["provisioningState"] = "Deleting"
        token = uuid.uuid4().hex
        self._operations[token] = {"group": rid, "remaining": self.delete_polls,
                                   "fail": self.fail_delete.get(m.group("rg"))}
        return Response(202, None, self._location(m.group("sub"), token))

    def operation_result(self, double: ArmDouble, req: Request, m: re.Match) -> Response:
        op = self._operations.get(m.group("token"))
        if op is None:
            return error_response(404, "NotFound", "operation not found")
        if op["remaining"] > 0:
            op["remaining"] -= 1
            return Response(202, None, self._location(m.group("sub"), m.group("token")))
        if op["fail"] is not None:
            status, code, message = op["fail"]
            group = double.get(op["group"])
            if group is not None:
                group["properties"]["provisioningState"] = "Failed"
            return error_response(status, code, message)
        prefix = op["group"].lower()
        with double._lock:
            for key in [k for k in double.resources if k == prefix or k.startswith(prefix + "/")]:
                del double.resources[key]
        return Response(200, None)

    def disks(self, double: ArmDouble, req: Request, m: re.Match) -> Response:
        rid = group_id(m.group("sub"), m.group("rg"))
        if double.get(rid) is None:
            return error_response(404, "ResourceGroupNotFound", f"Resource group '{m.group('rg')}' could not be found.")
        return Response(200, {"value": double.children(rid + "/providers/Microsoft.Compute", "disks")})

    def _location(self, subscription_id: str, token: str) -> dict[str, str]:
        url = f"{self.double.url}/subscriptions/{subscription_id}/operationresults/{token}?api-version=2025-04-01"
        return {"Location": url, "Retry-After": self.retry_after}


def add_resource_group_routes(double: ArmDouble, **options) -> ResourceGroups:
    groups = ResourceGroups(double, **options)
    double.route("GET", _GROUPS, groups.list)
    double.route("PUT", _GROUPS + r"/(?P<rg>[^/]+)", groups.create)
    double.route("DELETE", _GROUPS + r"/(?P<rg>[^/]+)", groups.delete)
    double.route("GET", _GROUPS + r"/(?P<rg>[^/]+)/providers/Microsoft\.Compute/disks", groups.disks)
    double.route("GET", r"/subscriptions/(?P<sub>[^/]+)/operationresults/(?P<token>[0-9a-f]+)", groups.operation_result)
    return groups
