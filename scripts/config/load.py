"""Reading a config: the TOML file, then CRASHCART_* environment overrides, coerced to the sections' types
and validated.

Environment overrides: `CRASHCART_<SECTION>_<KEY>` (e.g. `CRASHCART_SOURCE_VM_NAME`,
`CRASHCART_RESCUE_OS=linux`); lists are comma-separated; `CRASHCART_TAGS` is `key=value,key=value`.
The file itself is `CRASHCART_CONFIG` or `repair.toml` in the working directory.

This module hands back the validated sections; scripts.config.model's `Config.load` and
`Config.from_dict` make the Config of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scripts.base.errors import ConfigError, CrashcartError, ExitCode
from scripts.config.sections import DEFAULT_PATH, EXAMPLE_PATH, SECTIONS, ImageRef
from scripts.config.validate import validate


def read_file(path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> dict[str, Any]:
    """The config file's tables: `path`, else CRASHCART_CONFIG, else repair.toml here."""
    path = Path(path or env.get("CRASHCART_CONFIG") or DEFAULT_PATH)
    if not path.exists():
        raise CrashcartError(
            f"no config file at {path}",
            f"run `pipenv run discover --vm <VM resource ID>` to write it from Azure, or copy "
            f"{EXAMPLE_PATH} to {DEFAULT_PATH} and edit it (CRASHCART_CONFIG names another file)",
            ExitCode.USAGE)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise CrashcartError(f"{path} is not valid TOML: {err}",
                             "fix the syntax (https://toml.io) and re-run", ExitCode.USAGE) from None


def sections_from_dict(data: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The typed, validated sections ({"source": SourceVm, ..., "tags": {...}}) of the tables in `data`
    with the environment's overrides applied."""
    data = _apply_env(data, env)
    known = [*SECTIONS, "tags"]
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(sorted(unknown)[0], "", "one of the sections " + ", ".join(f"[{s}]" for s in known))
    if "source" not in data:
        raise ConfigError("source", None, "a [source] section naming the broken VM (run `pipenv run discover`)")
    sections: dict[str, Any] = {name: _build(cls, name, data.get(name, {})) for name, cls in SECTIONS.items()}
    sections["tags"] = _tags(data.get("tags", {}))
    validate(**sections)
    return sections


# ---- environment overrides -------------------------------------------------------------------------
def env_names() -> dict[str, tuple[str, str]]:
    """Every supported override: CRASHCART_SECTION_KEY -> (section, key)."""
    names = {f"CRASHCART_{s.upper()}_{f.name.upper()}": (s, f.name)
             for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    names["CRASHCART_TAGS"] = ("tags", "")
    return names


def _apply_env(data: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for name, (section, key) in env_names().items():
        if name not in env:
            continue
        value = env[name]
        if section == "tags":
            pairs = [p for p in value.split(",") if p.strip()]
            if any("=" not in p for p in pairs):
                raise ConfigError(name, value, "comma-separated key=value pairs, e.g. owner=ops,ticket=123")
            merged.setdefault("tags", {}).update(dict(p.split("=", 1) for p in pairs))
            continue
        merged.setdefault(section, {})[key] = value
    return merged


# ---- building typed sections ----------------------------------------------------------------------
def _build(cls: type, section: str, raw: Any) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(section, raw, f"a [{section}] table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        key = sorted(unknown)[0]
        close = difflib.get_close_matches(key, fields, n=1)
        raise ConfigError(f"{section}.{key}", raw[key],
                          f"one of the keys of [{section}]" + (f' (did you mean "{close[0]}"?)' if close else ""),
                          f"known keys: {', '.join(fields)}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        values[name] = _coerce(f"{section}.{name}", value, fields[name])
    missing = [n for n, f in fields.items()
               if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{section}.{missing[0]}", None, "a value (this key is required)",
                          "run `pipenv run discover --vm <VM resource ID>` to fill the [source] section from Azure")
    return cls(**values)


def _coerce(name: str, value: Any, f: dataclasses.Field) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "int":
        if isinstance(value, bool):
            raise ConfigError(name, value, "a whole number")
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        if not isinstance(value, int):
            raise ConfigError(name, value, "a whole number")
        return value
    if kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, value, "a number") from None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(name, value, "true or false")
    if kind.startswith("tuple"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(name, value, "a list of strings")
        return tuple(value)
    if kind.startswith("ImageRef"):
        if value in ("", None):
            return None
        parts = str(value).split(":")
        if len(parts) != 4 or not all(parts):
            raise ConfigError(name, value, "an image URN publisher:offer:sku:version, "
                                           "e.g. MicrosoftWindowsServer:WindowsServer:2022-datacenter-g2:latest")
        return ImageRef(*parts)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name.endswith("zone"):
        return str(value)
    if not isinstance(value, str):
        raise ConfigError(name, value, "a string")
    return value.strip()


def _tags(raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise ConfigError("tags", raw, "a [tags] table of key = \"value\" pairs")
    return {str(k): str(v) for k, v in raw.items()}
