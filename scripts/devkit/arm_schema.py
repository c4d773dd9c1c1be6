"""Request-body validation for the ARM double, against the Azure REST API specs (vendored in
scripts/devkit/specs/, see its README for the source commit and what was trimmed).

Which requests: the operations crashcart sends a body with (`OPERATIONS`), at the api-versions the SDK it
pins sends (azure-mgmt-compute 39: Compute 2026-04-01, disks/snapshots 2026-03-02; azure-mgmt-resource 26:
Microsoft.Resources 2025-04-01). A request at another api-version the double accepts, or to an operation not
listed, is not validated (there is no vendored spec for it): add the operation and its definitions first.

What Azure answers, and what the double answers the same way (400, ARM's body `{"error": {"code",
"message", "target"?}}`):

- an unknown member at the top of a resource PUT is refused by ARM itself while it reads the resource
  envelope: `InvalidRequestContent`, "The request content was invalid and could not be deserialized: 'Could
  not find member 'resources' on object of type 'ResourceDefinition'. Path 'resources' ...'"
  (azure-rest-api-specs#286; the same wording for templates in the ARM troubleshooting tutorial);
- a PUT without `location` is ARM's `LocationRequired`, "The location property is required for this
  definition.";
- inside the body, the Compute resource provider deserializes with Newtonsoft.Json and refuses what it
  cannot read with code `BadRequest` and the target `<body parameter>.<path>`:
  an unknown member is "Could not find member 'securityProfile' on object of type 'Properties'. Path
  'properties.securityProfile' ..." (azure-cli#18109, target `vm.properties.securityProfile`); a value of
  the wrong type or outside an enum is "Error converting value "StandardLRS" to type '...StorageAccountType'.
  Path 'properties.storageProfile.osDisk.managedDisk.storageAccountType' ..." (MicrosoftDocs/
  OfficeDocs-SharePoint#1684, target `vm.properties...storageAccountType`). The double names the swagger
  definition where Compute names its internal .NET type, and gives no line/position;
- a required member that is missing or null is the provider's own validation: `InvalidParameter`,
  "Required parameter 'storageProfile' is missing (null)." (JeffBow/AzurePowerShell#10), target the member;
- a resource group PUT is served by ARM itself (Microsoft.Resources), so what it cannot read anywhere in the
  body is ARM's `InvalidRequestContent` with the deserializer's message, as above.

Rules of the swagger 2.0 subset the specs use: `$ref` (local), `allOf` (members and `required` merged),
`properties` (an object with `properties` and no `additionalProperties` is closed: any other member is
unknown), `additionalProperties` (a map: every value checked against it), an object with neither is free
JSON, `items`, `type`/`format`, `enum` with `x-ms-enum`. Read-only members are accepted and not checked:
clients send back what they read (the GET-modify-PUT every SDK does) and the service ignores them
(azure-resource-manager-rpc: id/name/type/provisioningState are set by the service). The double is only
as strict as Newtonsoft in the places a user can hit: JSON numbers and booleans are accepted for a string,
numeric strings for an integer, "true"/"false" and numbers for a boolean; enum values match
case-insensitively. Where the double is more lenient than Azure: `minimum`/`maximum`/`pattern` are not
checked, and an enum whose published list is known to be incomplete (`OPEN_ENUMS`: VirtualMachineSizeTypes,
whose own description says the list is deprecated and sizes come from the SKU API) accepts any string.
Where it may be stricter: an integer for an enum is refused (Newtonsoft reads a .NET enum's number), and
Azure's RP may accept members its swagger lacks (azure-rest-api-specs#36582); the double follows the spec.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

SPECS = Path(__file__).with_name("specs")
OPEN_ENUMS = frozenset({"VirtualMachineSizeTypes"})

_RG = r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Compute"


@dataclass(frozen=True)
class Operation:
    """One operation with a request body: which requests it is, and the schema of the body."""

    name: str  # the spec's operationId
    method: str
    pattern: str  # regex, matched whole and case-insensitively against the URL path
    spec: str  # file under SPECS
    version: str  # the api-version that file describes
    definition: str
    parameter: str  # the body parameter's name, which Compute puts in front of an error's target
    resource: bool  # a PUT of a tracked resource: ARM reads the envelope first
    served_by_arm: bool = False  # Microsoft.Resources is ARM itself: every read error is InvalidRequestContent

    def matches(self, method: str, path: str, api_version: str | None) -> bool:
        return (method.upper() == self.method and api_version == self.version
                and re.fullmatch(self.pattern, path, re.IGNORECASE) is not None)


OPERATIONS: tuple[Operation, ...] = (
    Operation("VirtualMachines_CreateOrUpdate", "PUT", _RG + r"/virtualMachines/[^/]+",
              "compute-2026-04-01.json", "2026-04-01", "VirtualMachine", "vm", True),
    Operation("VirtualMachineRunCommands_CreateOrUpdate", "PUT", _RG + r"/virtualMachines/[^/]+/runCommands/[^/]+",
              "compute-2026-04-01.json", "2026-04-01", "VirtualMachineRunCommand", "runCommand", True),
    Operation("Snapshots_CreateOrUpdate", "PUT", _RG + r"/snapshots/[^/]+",
              "disks-2026-03-02.json", "2026-03-02", "Snapshot", "snapshot", True),
    Operation("Snapshots_GrantAccess", "POST", _RG + r"/snapshots/[^/]+/beginGetAccess",
              "disks-2026-03-02.json", "2026-03-02", "GrantAccessData", "grantAccessData", False),
    Operation("ResourceGroups_CreateOrUpdate", "PUT", r"/subscriptions/[^/]+/resourceGroups/[^/]+",
              "resources-2025-04-01.json", "2025-04-01", "ResourceGroup", "parameters", True, served_by_arm=True),
)


@dataclass(frozen=True)
class Refusal:
    """What Azure answers a body it will not take."""

    code: str
    message: str
    target: str | None = None
    status: int = 400

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.target is not None:
            error["target"] = self.target
        return {"error": error}


@lru_cache(maxsize=None)
def load(spec: str) -> dict[str, Any]:
    """The definitions of one vendored spec file."""
    return json.loads((SPECS / spec).read_text())["definitions"]


def operation_for(method: str, path: str, api_version: str | None) -> Operation | None:
    return next((op for op in OPERATIONS if op.matches(method, path, api_version)), None)


def check(method: str, path: str, api_version: str | None, body: Any) -> Refusal | None:
    """Azure's refusal of this request's body, or None (also None when the operation is not validated)."""
    op = operation_for(method, path, api_version)
    if op is None:
        return None
    return Validator(load(op.spec), op).validate(body)


class _Stop(Exception):
    def __init__(self, refusal: Refusal):
        super().__init__(refusal.message)
        self.refusal = refusal


def _path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class Validator:
    """Walks one body against one definition. Deserialization errors (unknown member, wrong type, bad enum)
    stop at the first one in document order, as Newtonsoft does; missing required members are reported after
    the body has been read, as the provider validates after deserializing."""

    def __init__(self, definitions: dict[str, Any], op: Operation):
        self.definitions, self.op = definitions, op
        self.missing: list[tuple[str, str]] = []  # (member, path) of required members not given

    def validate(self, body: Any) -> Refusal | None:
        if not isinstance(body, dict):
            shown = body.decode(errors="replace")[:40] if isinstance(body, bytes) else _text(body)[:40]
            return Refusal("InvalidRequestContent",
                           f"The request content was invalid and could not be deserialized: 'Error converting "
                           f"value {json.dumps(shown)} to type '{self.op.definition}'. Path ''.'.")
        try:
            if self.op.resource:
                self._envelope(body)
            self._object(body, self._resolve({"$ref": f"#/definitions/{self.op.definition}"}), "", top=True)
        except _Stop as stop:
            refusal = stop.refusal
            if self.op.served_by_arm and refusal.code == "BadRequest":  # ARM's own deserializer, not an RP's
                refusal = Refusal("InvalidRequestContent", "The request content was invalid and could not be "
                                                           f"deserialized: '{refusal.message}'.")
            return refusal
        if self.missing:
            member, path = self.missing[0]
            return Refusal("InvalidParameter", f"Required parameter '{member}' is missing (null).", member)
        return None

    # ---- ARM's envelope ---------------------------------------------------------------------------------
    def _envelope(self, body: dict[str, Any]) -> None:
        members, _ = self._members(self._resolve({"$ref": f"#/definitions/{self.op.definition}"}))
        for key in body:
            if key not in members:
                raise _Stop(Refusal(
                    "InvalidRequestContent",
                    "The request content was invalid and could not be deserialized: 'Could not find member "
                    f"'{key}' on object of type 'ResourceDefinition'. Path '{key}'.'."))
        if not body.get("location"):
            raise _Stop(Refusal("LocationRequired", "The location property is required for this definition."))

    # ---- the provider's deserializer ----------------------------------------------------------------------
    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        seen = 0
        while "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            resolved = self.definitions.get(name)
            if resolved is None:
                raise KeyError(f"definition {name} is not vendored in {self.op.spec}")
            schema = {**resolved, **{k: v for k, v in schema.items() if k != "$ref"}, "x-name": name}
            seen += 1
            if seen > 50:
                raise RecursionError(name)
        return schema

    def _members(self, schema: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Members and required names of an object schema, allOf parents included."""
        members: dict[str, Any] = {}
        required: list[str] = []
        for parent in schema.get("allOf") or []:
            more, req = self._members(self._resolve(parent))
            members.update(more)
            required += req
        members.update(schema.get("properties") or {})
        required += list(schema.get("required") or [])
        return members, required

    def _type_name(self, schema: dict[str, Any]) -> str:
        enum = schema.get("x-ms-enum") or {}
        return enum.get("name") or schema.get("x-name") or schema.get("format") or schema.get("type") or "Object"

    def _convert_error(self, value: Any, schema: dict[str, Any], path: str) -> _Stop:
        return _Stop(Refusal("BadRequest", f"Error converting value {json.dumps(value)} to type "
                                           f"'{self._type_name(schema)}'. Path '{path}'.",
                             _path(self.op.parameter, path)))

    def _value(self, value: Any, schema: dict[str, Any], path: str) -> None:
        if schema.get("readOnly") or value is None:  # before resolving: read-only subtrees are not vendored
            return
        schema = self._resolve(schema)
        if schema.get("readOnly"):
            return
        kind = schema.get("type")
        if kind == "object" or (kind is None and ("properties" in schema or "allOf" in schema
                                                  or "additionalProperties" in schema)):
            if not isinstance(value, dict):
                raise self._convert_error(value, schema, path)
            self._object(value, schema, path)
        elif kind == "array":
            if not isinstance(value, list):
                raise self._convert_error(value, schema, path)
            for i, item in enumerate(value):
                self._value(item, schema.get("items") or {}, _path(path, i))
        elif kind in ("string", "integer", "number", "boolean"):
            self._primitive(value, schema, kind, path)

    def _object(self, value: dict[str, Any], schema: dict[str, Any], path: str, top: bool = False) -> None:
        members, required = self._members(schema)
        extra = schema.get("additionalProperties")
        if not members and not schema.get("allOf"):
            if isinstance(extra, dict):  # a map: every value is checked
                for key, item in value.items():
                    self._value(item, extra, _path(path, key))
            return  # no members, no map: free-form JSON
        for key, item in value.items():
            member = members.get(key)
            if member is None:
                if isinstance(extra, dict):
                    self._value(item, extra, _path(path, key))
                    continue
                if extra is True:
                    continue
                raise _Stop(Refusal("BadRequest",
                                    f"Could not find member '{key}' on object of type '{self._type_name(schema)}'. "
                                    f"Path '{_path(path, key)}'.", _path(self.op.parameter, _path(path, key))))
            self._value(item, member, _path(path, key))
        for name in required:
            member = members.get(name) or {}
            read_only = member.get("readOnly") or self._resolve(member).get("readOnly")
            if value.get(name) is None and not read_only and not (top and name == "location"):
                self.missing.append((name, _path(path, name)))

    def _primitive(self, value: Any, schema: dict[str, Any], kind: str, path: str) -> None:
        if isinstance(value, (dict, list)):
            raise _Stop(Refusal("BadRequest", f"Unexpected character encountered while parsing value: "
                                              f"{'{' if isinstance(value, dict) else '['}. Path '{path}'.",
                                _path(self.op.parameter, path)))
        if kind == "string":
            text = value if isinstance(value, str) else _text(value)  # Newtonsoft reads a number as its text
            self._enum(text, schema, path, value)
        elif kind == "integer":
            if isinstance(value, bool) or not _is_integer(value):
                raise self._convert_error(value, schema, path)
        elif kind == "number":
            if isinstance(value, bool) or not _is_number(value):
                raise self._convert_error(value, schema, path)
        elif kind == "boolean":
            if not (isinstance(value, (bool, int, float))
                    or (isinstance(value, str) and value.strip().lower() in ("true", "false"))):
                raise self._convert_error(value, schema, path)

    def _enum(self, text: str, schema: dict[str, Any], path: str, original: Any) -> None:
        allowed = schema.get("enum")
        if not allowed or self._type_name(schema) in OPEN_ENUMS:
            return
        if text.lower() not in {str(a).lower() for a in allowed}:
            raise self._convert_error(original, schema, path)


def _is_integer(value: Any) -> bool:
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, str):
        return re.fullmatch(r"\s*[-+]?\d+\s*", value) is not None
    return False


def _is_number(value: Any) -> bool:
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


def unresolved_writable_refs(spec: str, roots: tuple[str, ...]) -> list[str]:
    """$refs reachable from `roots` through members that are not read-only and that the vendored file does
    not define (must be empty: only read-only subtrees were trimmed)."""
    definitions, missing, seen, todo = load(spec), [], set(), list(roots)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("readOnly") is True:
                return
            if "$ref" in node:
                todo.append(node["$ref"].rsplit("/", 1)[-1])
            for item in node.values():
                walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in definitions:
            missing.append(name)
            continue
        walk(definitions[name])
    return sorted(missing)
