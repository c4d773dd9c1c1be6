"""Azure Resource Graph in the ARM double: `POST /providers/Microsoft.ResourceGraph/resources` over the
double's own store, for driving the real azure-mgmt-resourcegraph client.

Shape (azure-rest-api-specs specification/resourcegraph/resource-manager/Microsoft.ResourceGraph/stable/
2021-03-01/resourcegraph.json, Resources operation; examples ResourcesBasicQuery.json,
ResourcesNextPageQuery.json): the body is a QueryRequest {subscriptions, managementGroups, query,
options{$skipToken, $top, $skip, resultFormat, allowPartialScopes}, facets}; the answer a QueryResponse
{totalRecords, count, resultTruncated "true"|"false", $skipToken (only while more rows follow), data, facets}.
`data` is an array of row objects (resultFormat objectArray, the default of 2021-03-01) or {columns, rows}
(table). A page holds at most $top rows (default 100, at most 1000); `$skipToken` is opaque and only valid
for the query that issued it. Rows are what ARG stores: `type` and `resourceGroup` lower-cased,
`subscriptionId`, `properties` with `extended.instanceView.powerState` for VMs.

The query language is KQL; the double runs only the subset crashcart's selector writes
(scripts.run.fleetselect) and refuses anything else 400 with ARG's error shape (BadRequest, details
InvalidQuery / ParserFailure), so a selector that stops building valid KQL fails here as it would in Azure:

    Resources
    | where <cond> and <cond> ...        cond: NAME =~ 'lit' | NAME == 'lit' | NAME in~ ('lit', ...)
                                         NAME: a column or a dotted path (properties.a.b), tags['lit']
    | project col, alias = tostring(path), ...
    | order by col asc|desc

String literals follow KQL: '...' or "..." with backslash escapes.

Authorization: ARG answers for every authenticated caller and filters rows itself: "you at least need read
access to the resources you want to query" (Microsoft Learn, "Permissions in Azure Resource Graph"). A row
is returned only when the caller's role assignments grant the row's own read action
(`{type}/read`, e.g. Microsoft.Compute/virtualMachines/read) at its scope - evaluated here without
recording a decision (nothing was requested from ARM for the row). The POST itself is the operation
`Microsoft.ResourceGraph/resources/read` at scope "/", which scripts/devkit/arm_rbac.py grants any
authenticated caller (Rbac.decide); its api-version is armdouble.API_VERSIONS["resourcegraph"].
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

from scripts.devkit import arm_rbac
from scripts.devkit.armdouble import ArmDouble, Request, Response

GRAPH_API_VERSION = "2021-03-01"  # what azure-mgmt-resourcegraph sends (armdouble.API_VERSIONS["resourcegraph"])
GRAPH_PATH = "/providers/Microsoft.ResourceGraph/resources"
GRAPH_ACTION = arm_rbac.GRAPH_ACTION
DEFAULT_TOP, MAX_TOP = 100, 1000
_POWER_KEY = "_crashcart_graph_power"


# ---- the route ------------------------------------------------------------------------------------------
def install(double: ArmDouble) -> None:
    """Serves Resources (Resource Graph queries) on `double`."""
    double.route("POST", re.escape(GRAPH_PATH), query_resources)


def set_power_state(double: ArmDouble, vm_id: str, code: str) -> None:
    """The power state ARG reports for a VM (properties.extended.instanceView.powerState.code), e.g.
    PowerState/deallocated; PowerState/running unless set."""
    double.__dict__.setdefault(_POWER_KEY, {})[vm_id.lower()] = code


def readable(rbac: Any, resource_id: str, resource_type: str) -> bool:
    """Whether the caller's assignments in effect grant `{type}/read` at the resource (no decision recorded)."""
    action = f"{resource_type}/read"
    caller = rbac.principal_id.lower()
    now = rbac.clock()
    return any((g.principal_id or rbac.principal_id).lower() == caller and g.effective(now)
               and arm_rbac.covers(g.scope, resource_id) and g.role.allows(action) for g in list(rbac.grants))


def rows_of(d: ArmDouble, subscriptions: list[str]) -> list[dict[str, Any]]:
    """Every resource of the store in `subscriptions` the caller may read, as ARG rows."""
    wanted = {s.lower() for s in subscriptions}
    power = d.__dict__.get(_POWER_KEY, {})
    out = []
    for key, body in list(d.resources.items()):
        parts = key.strip("/").split("/")
        if len(parts) < 8 or parts[0] != "subscriptions" or parts[2] != "resourcegroups" or parts[4] != "providers":
            continue
        if parts[1] not in wanted:
            continue
        rtype = "/".join([parts[5]] + parts[6::2])
        full_type = str(body.get("type") or rtype)
        if not readable(d.rbac, key, full_type):
            continue
        properties = json.loads(json.dumps(body.get("properties") or {}))
        if rtype == "microsoft.compute/virtualmachines":
            code = power.get(key, "PowerState/running")
            properties.setdefault("extended", {}).setdefault("instanceView", {})["powerState"] = {
                "code": code, "displayStatus": "VM " + code.split("/", 1)[-1], "level": "Info"}
        out.append({"id": body.get("id") or key, "name": body.get("name") or parts[-1], "type": full_type.lower(),
                    "tenantId": "", "kind": "", "location": str(body.get("location") or "").lower(),
                    "resourceGroup": parts[3], "subscriptionId": parts[1], "managedBy": "",
                    "sku": body.get("sku"), "plan": None, "properties": properties, "tags": body.get("tags") or {},
                    "identity": body.get("identity"), "zones": body.get("zones")})
    return out


def query_resources(d: ArmDouble, req: Request, m: re.Match) -> Response:
    body = req.body if isinstance(req.body, dict) else {}
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        return _bad("InvalidQuery", "The query is missing or empty.")
    subscriptions = body.get("subscriptions") or []
    if not isinstance(subscriptions, list) or not all(isinstance(s, str) for s in subscriptions):
        return _bad("InvalidSubscriptions", "subscriptions must be a list of subscription IDs.")
    options = body.get("options") or {}
    top = options.get("$top", DEFAULT_TOP)
    if not isinstance(top, int) or not 1 <= top <= MAX_TOP:
        return _bad("InvalidTop", f"$top must be between 1 and {MAX_TOP}.")
    try:
        plan = parse(query)
    except QueryError as err:
        return _bad("ParserFailure", str(err))
    rows = run(plan, rows_of(d, subscriptions))
    digest = hashlib.sha256(json.dumps([query, sorted(s.lower() for s in subscriptions)]).encode()).hexdigest()[:16]
    start = int(options.get("$skip") or 0)
    token = options.get("$skipToken")
    if token:
        try:
            issued_for, offset = base64.urlsafe_b64decode(token.encode()).decode().split(":")
            start = int(offset)
        except (ValueError, UnicodeDecodeError):
            return _bad("InvalidSkipToken", "The $skipToken is not valid.")
        if issued_for != digest:
            return _bad("InvalidSkipToken", "The $skipToken was issued for another query.")
    page = rows[start:start + top]
    answer: dict[str, Any] = {"totalRecords": len(rows), "count": len(page), "facets": [],
                              "resultTruncated": "false"}
    if start + top < len(rows):
        answer["$skipToken"] = base64.urlsafe_b64encode(f"{digest}:{start + top}".encode()).decode()
    if options.get("resultFormat", "objectArray") == "table":
        columns = list(page[0]) if page else []
        answer["data"] = {"columns": [{"name": c, "type": "string"} for c in columns],
                          "rows": [[r.get(c) for c in columns] for r in page]}
    else:
        answer["data"] = page
    return Response(200, answer)


def _bad(code: str, message: str) -> Response:
    return Response(400, {"error": {"code": "BadRequest", "message": "Please provide below info when asking for "
                                    "support: timestamp, correlationId.", "details": [
        {"code": "InvalidQuery", "message": "Query is invalid. Please refer to the documentation for the Azure "
                                            "Resource Graph service and fix the error before retrying."},
        {"code": code, "message": message}]}})


# ---- the KQL subset ---------------------------------------------------------------------------------------
class QueryError(ValueError):
    pass


_TOKEN = re.compile(r"""\s*(?:(?P<str>'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")|(?P<op>=~|==|!=|in~|[|(),=\[\]])|"""
                    r"""(?P<name>[A-Za-z_][A-Za-z0-9_.]*))""")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def tokens(query: str) -> list[tuple[str, str]]:
    out, at = [], 0
    while at < len(query):
        if not query[at:].strip():
            break
        found = _TOKEN.match(query, at)
        if found is None:
            raise QueryError(f"unexpected character at {at}: {query[at:at + 20]!r}")
        kind = found.lastgroup or ""
        text = found.group(kind)
        if kind == "str":
            text = re.sub(r"\\(.)", lambda e: _ESCAPES.get(e.group(1), e.group(1)), text[1:-1])
        elif kind == "name" and text == "in" and query[found.end():found.end() + 1] == "~":
            raise QueryError("in ~ must be written in~")
        out.append((kind, text))
        at = found.end()
    return out


def parse(query: str) -> list[tuple[str, Any]]:
    """The query as stages: ("where", [(path, op, values)]), ("project", [(alias, path)]), ("order", (col, desc))."""
    stages: list[list[tuple[str, str]]] = [[]]
    for tok in tokens(query):
        if tok == ("op", "|"):
            stages.append([])
        else:
            stages[-1].append(tok)
    if [t[1].lower() for t in stages[0]] != ["resources"]:
        raise QueryError("the query must start with the Resources table")
    plan: list[tuple[str, Any]] = []
    for stage in stages[1:]:
        if not stage or stage[0][0] != "name":
            raise QueryError("an empty or unnamed stage")
        verb, rest = stage[0][1].lower(), stage[1:]
        if verb == "where":
            plan.append(("where", _conditions(rest)))
        elif verb == "project":
            plan.append(("project", _columns(rest)))
        elif verb == "order" and len(rest) in (2, 3) and rest[0] == ("name", "by") and rest[1][0] == "name":
            direction = rest[2][1].lower() if len(rest) == 3 else "desc"
            if direction not in ("asc", "desc"):
                raise QueryError(f"order by ... {direction}")
            plan.append(("order", (rest[1][1], direction == "desc")))
        else:
            raise QueryError(f"the stage {verb!r} is not supported here")
    return plan


def _path(toks: list[tuple[str, str]], at: int) -> tuple[tuple[str, ...], int]:
    if at >= len(toks) or toks[at][0] != "name":
        raise QueryError("a column was expected")
    path = tuple(toks[at][1].split("."))
    at += 1
    if toks[at:at + 1] == [("op", "[")]:
        if at + 2 >= len(toks) or toks[at + 1][0] != "str" or toks[at + 2] != ("op", "]"):
            raise QueryError("an index must be a string literal in [ ]")
        path += (toks[at + 1][1],)
        at += 3
    return path, at


def _conditions(toks: list[tuple[str, str]]) -> list[tuple[tuple[str, ...], str, list[str]]]:
    out, at = [], 0
    while True:
        path, at = _path(toks, at)
        if at >= len(toks) or toks[at][0] != "op" or toks[at][1] not in ("=~", "==", "!=", "in~"):
            raise QueryError("a comparison (=~, ==, !=, in~) was expected")
        op = toks[at][1]
        at += 1
        if op == "in~":
            if at >= len(toks) or toks[at] != ("op", "("):
                raise QueryError("in~ needs ( ... )")
            values, at = [], at + 1
            while at < len(toks) and toks[at][0] == "str":
                values.append(toks[at][1])
                at += 1
                if at < len(toks) and toks[at] == ("op", ","):
                    at += 1
            if at >= len(toks) or toks[at] != ("op", ")") or not values:
                raise QueryError("in~ needs string literals in ( )")
            at += 1
        else:
            if at >= len(toks) or toks[at][0] != "str":
                raise QueryError("a string literal was expected")
            values, at = [toks[at][1]], at + 1
        out.append((path, op, values))
        if at == len(toks):
            return out
        if toks[at] != ("name", "and"):
            raise QueryError(f"'and' was expected, not {toks[at][1]!r}")
        at += 1


def _columns(toks: list[tuple[str, str]]) -> list[tuple[str, tuple[str, ...]]]:
    out, at = [], 0
    while at < len(toks):
        if toks[at][0] != "name":
            raise QueryError("a column was expected")
        if at + 1 < len(toks) and toks[at + 1] == ("op", "="):
            alias = toks[at][1]
            if toks[at + 2:at + 4] != [("name", "tostring"), ("op", "(")]:
                raise QueryError("alias = tostring(path) expected")
            path, at = _path(toks, at + 4)
            if toks[at:at + 1] != [("op", ")")]:
                raise QueryError("tostring( needs )")
            at += 1
        else:
            alias, at = toks[at][1], at + 1
            path = (alias,)
        out.append((alias, path))
        if at < len(toks):
            if toks[at] != ("op", ","):
                raise QueryError("',' was expected between columns")
            at += 1
    return out


def _value(row: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = row
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _holds(row: dict[str, Any], path: tuple[str, ...], op: str, values: list[str]) -> bool:
    value = _value(row, path)
    text = "" if value is None else str(value)
    if op == "==":
        return text == values[0]
    if op == "!=":
        return text != values[0]
    return text.lower() in {v.lower() for v in values}  # =~ and in~: case-insensitive


def run(plan: list[tuple[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for verb, arg in plan:
        if verb == "where":
            rows = [r for r in rows if all(_holds(r, p, op, v) for p, op, v in arg)]
        elif verb == "project":
            rows = [{alias: (_value(r, path) if len(path) == 1 else _text(_value(r, path))) for alias, path in arg}
                    for r in rows]
        elif verb == "order":
            column, desc = arg
            rows = sorted(rows, key=lambda r: str(r.get(column) or "").lower(), reverse=desc)
    return rows


def _text(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else json.dumps(value)
