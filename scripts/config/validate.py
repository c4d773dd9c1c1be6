"""The rules a config value must follow, as pydantic validators: Azure's naming rules per resource type,
IP ranges by `ipaddress`, finite and bounded numbers, printable single-line text.

Each rule takes the raw value (as TOML or the environment gave it) and returns the typed value or raises
`Invalid` with the form expected; scripts.config.load turns the first failure into one ConfigError line
naming the field. The annotated types at the bottom (`VmName`, `Whole(1, 168, "hours")`, ...)
attach a rule to a field of scripts.config.sections.

Synth never calls Azure, so every rule is offline: the regions are scripts.config.regions, the shape of
a resource ID is scripts.azure.ids.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from pydantic import PlainValidator, ValidationInfo

from scripts.azure import ids
from scripts.config.regions import known_regions, normalize

GUID = ids.GUID
MAX_TEXT = 1024  # no config value is longer; a longer one is a pasted file, not a name


class Invalid(ValueError):
    """A value that breaks a rule: the form `expected`, what to do (`hint`), and where below the field it
    sits (`at`: ".key" or "[0]"; a full dotted name for a check across sections). `value` replaces the
    input in the message when the check is about a whole section."""

    NO_VALUE = object()

    def __init__(self, expected: str, hint: str = "", *, at: str = "", value: Any = NO_VALUE):
        super().__init__(expected)
        self.expected, self.hint, self.at, self.value = expected, hint, at, value


def check(ok: bool, expected: str, hint: str = "", **where: Any) -> None:
    if not ok:
        raise Invalid(expected, hint, **where)


def env_of(info: ValidationInfo | None) -> Mapping[str, str]:
    """The environment the config is read with (CRASHCART_EXTRA_REGIONS), os.environ when none was given."""
    context = info.context if info is not None else None
    env = context.get("env") if isinstance(context, Mapping) else None
    return os.environ if env is None else env


# ---- text ----------------------------------------------------------------------------------------------
def text(value: Any, max_len: int = MAX_TEXT) -> str:
    """A string of printable characters on one line (no control, bidi or zero-width characters, no line
    breaks), stripped of surrounding spaces."""
    if not isinstance(value, str):
        raise Invalid("a string" + (' (quote it: "...")' if isinstance(value, (int, float)) else ""))
    check(value.isprintable(), "printable characters on one line (no control, bidi or zero-width characters, "
                               "no line breaks)")
    value = value.strip(" ")
    check(len(value) <= max_len, f"at most {max_len} characters")
    return value


def one_of(*choices: str, fold: bool = False) -> Callable[[Any], str]:
    def rule(value: Any) -> str:
        value = text(value)
        for choice in choices:
            if value == choice or (fold and value.lower() == choice.lower()):
                return choice
        close = difflib.get_close_matches(value, choices, n=1)
        raise Invalid("one of " + ", ".join(choices) + (f' (did you mean "{close[0]}"?)' if close else ""))
    return rule


def matching(pattern: str, expected: str, flags: int = 0, *, optional: bool = False) -> Callable[[Any], str]:
    compiled = re.compile(pattern, flags | re.ASCII)

    def rule(value: Any) -> str:
        value = text(value)
        check((optional and value == "") or compiled.fullmatch(value) is not None, expected)
        return value
    return rule


# ---- Azure names, per resource type ----------------------------------------------------------------------
RG_NAME = r"[-\w.()]{0,89}[-\w()]"  # 1-90 letters, digits (any script), _ . - ( ), not ending with '.'
RG_EXPECTED = "a resource group name: 1-90 letters, digits, '_', '-', '.', '(' or ')', not ending with '.'"
STORAGE_ACCOUNT_NAME = r"[a-z0-9]{3,24}"
STORAGE_EXPECTED = "a storage account name: 3-24 lowercase letters and digits"
CONTAINER_NAME = r"[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]"
CONTAINER_EXPECTED = ("a container name: 3-63 lowercase letters, digits and single hyphens, "
                      "starting and ending with a letter or digit")
# disks, vnets, subnets: 1-80 letters, digits, '_', '.', '-', from a letter or digit to a letter, digit or '_'
CHILD_NAME = r"[A-Za-z0-9](?:[\w.-]{0,78}[\w])?"
_VM_NAME_ILLEGAL = re.compile(r"[\s~!@#$%^&*()=+\[\]{}\\|;:'\",<>/?`]")


def rg_name(value: Any) -> str:
    value = text(value)
    check(re.fullmatch(RG_NAME, value) is not None, RG_EXPECTED)
    return value


def vm_name(value: Any) -> str:
    value = text(value)
    check(0 < len(value) <= 64 and not _VM_NAME_ILLEGAL.search(value) and not value.startswith("_")
          and not value.endswith((".", "-")),
          "a VM name: 1-64 characters, no spaces or ~!@#$%^&*()=+[]{}\\|;:'\",<>/?`, "
          "not starting with '_' nor ending with '.' or '-'")
    return value


storage_account = matching(STORAGE_ACCOUNT_NAME, STORAGE_EXPECTED)
container = matching(CONTAINER_NAME, CONTAINER_EXPECTED)

_RESERVED_USERS = {
    "administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1", "1", "123", "a",
    "actuser", "adm", "admin2", "aspnet", "backup", "console", "david", "guest", "john", "owner", "root",
    "server", "sql", "support", "support_388945a0", "sys", "test2", "test3", "user4", "user5",
}


def admin_username(value: Any) -> str:
    value = text(value)
    check(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,19}", value, re.ASCII) is not None and not value.endswith(".")
          and value.lower() not in _RESERVED_USERS,
          "1-20 letters, digits, '_', '.', '-', not ending with '.', not a reserved name such as admin or "
          "administrator")
    return value


def resource_id(kind: str, what: str) -> Callable[[Any], str]:
    """An ID of `kind` (scripts.azure.ids) whose resource group and names follow their naming rules."""
    def rule(value: Any) -> str:
        value = text(value)
        found = ids.try_parse(value, kind)
        ok = found is not None and re.fullmatch(RG_NAME, found.resource_group) is not None
        if ok and kind == "storage_account":  # ARM matches IDs case-insensitively: an ID may spell it in capitals
            ok = re.fullmatch(STORAGE_ACCOUNT_NAME, found.name, re.IGNORECASE | re.ASCII) is not None
        elif ok:
            ok = all(re.fullmatch(CHILD_NAME, n, re.ASCII) for n in (found.name, found.parent) if n)
        check(ok, f"{what}: {ids.FORMS[kind]}")
        return value
    return rule


def region(value: Any, info: ValidationInfo | None = None, *, optional: bool = False) -> str:
    value = text(value)
    if optional and not value:
        return value
    regions = known_regions(env_of(info))
    if normalize(value) not in regions:
        close = difflib.get_close_matches(normalize(value), regions, n=3)
        raise Invalid("an Azure region name such as westeurope or eastus2"
                      + (f" (did you mean {', '.join(close)}?)" if close else ""),
                      "list them with `az account list-locations -o table`; a region newer than this release "
                      "can be added with CRASHCART_EXTRA_REGIONS=name:zones")
    return value


# ---- numbers, switches, lists ------------------------------------------------------------------------------
_INT = re.compile(r"[+-]?[0-9]{1,18}")
_FLOAT = re.compile(r"[+-]?(?:[0-9]{1,18}(?:\.[0-9]{0,18})?|\.[0-9]{1,18})(?:[eE][+-]?[0-9]{1,3})?")


def whole(lo: int, hi: int, unit: str, expected: str = "") -> Callable[[Any], int]:
    """A whole number in lo..hi (TOML integer, or digits in a string from the environment); never a bool."""
    expected = expected or f"{lo}-{hi} {unit}"

    def rule(value: Any) -> int:
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"a whole number, {expected}")
        check(lo <= value <= hi, expected)
        return value
    return rule


def number(lo: float, hi: float, expected: str) -> Callable[[Any], float]:
    """A finite number in lo..hi (never nan, inf or a bool)."""
    def rule(value: Any) -> float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value.strip())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(f"a number, {expected}")
        check(isinstance(value, float) and math.isfinite(value) or isinstance(value, int), expected)
        check(lo <= value <= hi, expected)
        return float(value)
    return rule


def switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise Invalid("true or false")


def zone(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    value = text(value)
    check(value in ("", "1", "2", "3"), '"" (no zone) or "1", "2" or "3"')
    return value


def items(rule: Callable[[Any], str], max_items: int = 100) -> Callable[[Any], tuple[str, ...]]:
    """A list of values each following `rule`: a TOML array, or comma-separated from the environment."""
    def parse(value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [v for v in (part.strip(" ") for part in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise Invalid("a list of strings")
        check(len(value) <= max_items, f"at most {max_items} entries")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(rule(item))
            except Invalid as err:
                raise Invalid(err.expected, err.hint, at=f"[{i}]", value=item) from None
        return tuple(out)
    return parse


_NOT_PUBLIC = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4")]
PUBLIC_RANGE = ("a public IPv4 address or CIDR of /8 to /30 such as 203.0.113.0/24 "
                "(no private, loopback or multicast range)")


def public_ip_range(value: Any) -> str:
    """An IP rule of a storage account firewall: a public IPv4 address, or a CIDR up to /30 (Azure's rule)."""
    value = text(value)
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise Invalid(PUBLIC_RANGE) from None
    check(net.version == 4 and ("/" not in value or 8 <= net.prefixlen <= 30)
          and not any(net.overlaps(bad) for bad in _NOT_PUBLIC), PUBLIC_RANGE)
    return value


def address_space(value: Any) -> str:
    value = text(value)
    expected = "an IPv4 CIDR between /16 and /28 with no host bits set, e.g. 10.250.0.0/24"
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise Invalid(expected) from None
    check(net.version == 4 and "/" in value and 16 <= net.prefixlen <= 28, expected)
    return value


# ---- annotated field types ----------------------------------------------------------------------------------
def rule(func: Callable[..., Any]) -> PlainValidator:
    """`func` as a pydantic validator that receives the raw value (no coercion before it)."""
    return PlainValidator(func)


Guid = Annotated[str, rule(matching(GUID, "a subscription ID (a GUID like 00000000-0000-0000-0000-000000000000)"))]
RgName = Annotated[str, rule(rg_name)]
OptionalRgName = Annotated[str, rule(lambda v: "" if v == "" else rg_name(v))]
VmName = Annotated[str, rule(vm_name)]
OptionalStorageAccountName = Annotated[str, rule(lambda v: "" if v == "" else storage_account(v))]
ContainerName = Annotated[str, rule(container)]
Region = Annotated[str, rule(lambda value, info: region(value, info))]
OptionalRegion = Annotated[str, rule(lambda value, info: region(value, info, optional=True))]
Zone = Annotated[str, rule(zone)]
Switch = Annotated[bool, rule(switch)]
AdminUsername = Annotated[str, rule(admin_username)]
VmSize = Annotated[str, rule(matching(r"(Standard|Basic)_[A-Za-z0-9_-]{1,60}",
                                      "a VM size such as Standard_D4s_v5 (az vm list-sizes -l <region>)"))]
OptionalVmSize = Annotated[str, rule(matching(r"(Standard|Basic)_[A-Za-z0-9_-]{1,60}",
                                              'a VM size such as Standard_D4s_v5, or ""', optional=True))]
KeyPrefix = Annotated[str, rule(matching(r"[A-Za-z0-9._-]{1,64}(/[A-Za-z0-9._-]{1,64}){0,4}",
                                         "a blob name prefix: letters, digits, '.', '_', '-', parts separated by '/'"))]
AddressSpace = Annotated[str, rule(address_space)]
IpRanges = Annotated[tuple[str, ...], rule(items(public_ip_range))]


def Whole(lo: int, hi: int, unit: str, expected: str = "") -> Any:  # noqa: N802 - a type, read as one
    return Annotated[int, rule(whole(lo, hi, unit, expected))]


def Number(lo: float, hi: float, expected: str) -> Any:  # noqa: N802
    return Annotated[float, rule(number(lo, hi, expected))]


def OneOf(*choices: str, fold: bool = False) -> Any:  # noqa: N802
    return Annotated[str, rule(one_of(*choices, fold=fold))]


def ResourceId(kind: str, what: str, *, optional: bool = False) -> Any:  # noqa: N802
    parse = resource_id(kind, what)
    return Annotated[str, rule(lambda v: "" if optional and v == "" else parse(v))]


def ResourceIds(kind: str, what: str) -> Any:  # noqa: N802
    return Annotated[tuple[str, ...], rule(items(resource_id(kind, what)))]
