"""Reading a config: the TOML file, then CRASHCART_* environment overrides (pydantic-settings), validated by
the models of scripts.config.sections; the first failure becomes one ConfigError line, exit code 2.

Environment overrides: `CRASHCART_<SECTION>_<KEY>` (e.g. `CRASHCART_SOURCE_VM_NAME`,
`CRASHCART_RESCUE_OS=linux`); lists are comma-separated; `CRASHCART_TAGS` is `key=value,key=value`.
The file itself is `CRASHCART_CONFIG` or `repair.toml` in the working directory.

This module hands back a validated model of the class it is given; scripts.config.model's
`Config.load` and `Config.from_dict` pass the Config class.
"""

from __future__ import annotations

import difflib
import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_settings import EnvSettingsSource, SettingsError
from pydantic_settings.sources.utils import parse_env_vars

from scripts.base import userfiles
from scripts.base.errors import ConfigError, CrashcartError, ExitCode
from scripts.config.sections import DEFAULT_PATH, EXAMPLE_PATH, SECTIONS
from scripts.config.shown import escape, shown
from scripts.config.validate import Invalid

ENV_PREFIX = "CRASHCART_"
MAX_FILE_BYTES = 1 << 20  # a config is a few KiB; anything larger is the wrong file
DISCOVER_HINT = "run `pipenv run discover --vm <VM resource ID>` to fill the [source] section from Azure"
M = TypeVar("M", bound=BaseModel)


def read_file(path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> dict[str, Any]:
    """The config file's tables: `path`, else CRASHCART_CONFIG, else repair.toml here. A path that is
    missing, not a regular file, unreadable, not UTF-8 or not TOML is a usage error (exit 2)."""
    path = Path(path or env.get("CRASHCART_CONFIG") or DEFAULT_PATH)
    name = escape(str(path), 300)
    fix = "fix the syntax (https://toml.io) and re-run"
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CrashcartError(
            f"no config file at {name}",
            f"run `pipenv run discover --vm <VM resource ID>` to write it from Azure, or copy "
            f"{EXAMPLE_PATH} to {DEFAULT_PATH} and edit it (CRASHCART_CONFIG names another file)",
            ExitCode.USAGE) from None
    except (OSError, ValueError) as err:  # a name too long, a NUL byte, a loop of links
        raise CrashcartError(f"cannot read the config file {name}: {escape(_reason(err))}",
                             "pass the path of a TOML file (--config or CRASHCART_CONFIG)", ExitCode.USAGE) from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise CrashcartError(f"the config file {name} is {kind}",
                             "pass the path of a TOML file (--config or CRASHCART_CONFIG)", ExitCode.USAGE)
    if info.st_size > MAX_FILE_BYTES:
        raise CrashcartError(f"the config file {name} is {info.st_size} bytes, not a config (at most 1 MiB)",
                             "pass the path of the repair's TOML file", ExitCode.USAGE)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CrashcartError(f"cannot read the config file {name}: {escape(_reason(err))}",
                             "check the file's permissions and re-run", ExitCode.USAGE) from None
    try:
        return tomllib.loads(raw.decode("utf-8").removeprefix(userfiles.BOM))  # Notepad writes a BOM
    except UnicodeDecodeError as err:
        bad = escape(repr(raw[err.start:err.start + 4]))
        raise CrashcartError(f"{name} is not UTF-8 text (byte {err.start}: {bad})",
                             "save the config as UTF-8 and re-run", ExitCode.USAGE) from None
    except tomllib.TOMLDecodeError as err:
        raise CrashcartError(f"{name} is not valid TOML: {escape(str(err))}", fix, ExitCode.USAGE) from None
    except (ValueError, RecursionError) as err:  # an integer over 4300 digits, arrays nested too deep
        raise CrashcartError(f"{name} is not valid TOML: {escape(_reason(err))}", fix, ExitCode.USAGE) from None


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err).split(":")[0] or type(err).__name__


# ---- environment overrides (pydantic-settings) ------------------------------------------------------------
class _Environment(EnvSettingsSource):
    """CRASHCART_<SECTION>_<KEY> of the mapping given (not only os.environ), for the sections of `cls`."""

    def __init__(self, cls: type[BaseModel], env: Mapping[str, str]):
        self._env = env
        super().__init__(cls, case_sensitive=False, env_prefix=ENV_PREFIX, env_nested_delimiter="_",
                         env_nested_max_split=1, env_ignore_empty=False, env_parse_none_str=None,
                         env_parse_enums=False)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars({k: v for k, v in self._env.items() if k.upper().startswith(ENV_PREFIX)},
                              self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        return value  # never JSON: lists are comma-separated and validated by the field's own rule

    def prepare_field_value(self, field_name: str, field: Any, value: Any, value_is_complex: bool) -> Any:
        if field_name == "tags" and isinstance(value, str):
            return _tag_pairs(value)
        return super().prepare_field_value(field_name, field, value, value_is_complex)


def _tag_pairs(value: str) -> dict[str, str]:
    pairs = [p for p in value.split(",") if p.strip(" ")]
    if any("=" not in p for p in pairs):
        raise ConfigError("CRASHCART_TAGS", shown(value), "comma-separated key=value pairs, e.g. owner=ops,ticket=123")
    return {k.strip(" "): v.strip(" ") for k, v in (p.split("=", 1) for p in pairs)}


def overrides(cls: type[BaseModel], env: Mapping[str, str]) -> dict[str, Any]:
    """The values the environment sets, as nested tables: {"repair": {"ttl_hours": "2"}, "tags": {...}}."""
    try:
        values = _Environment(cls, env)()
    except SettingsError as err:
        raise ConfigError("CRASHCART_*", shown(str(err)), "CRASHCART_<SECTION>_<KEY>=value") from None
    for section, value in values.items():
        if not isinstance(value, Mapping):  # CRASHCART_SOURCE=... names a whole table
            raise ConfigError(f"{ENV_PREFIX}{section.upper()}", shown(value),
                              "no value: set one key, CRASHCART_<SECTION>_<KEY>=value (e.g. CRASHCART_SOURCE_VM_NAME)",
                              f"unset {ENV_PREFIX}{section.upper()}")
    return values


# ---- building the model ---------------------------------------------------------------------------------
def build(cls: type[M], data: Mapping[str, Any], env: Mapping[str, str] | None) -> M:
    """A validated `cls` of the tables in `data` with the overrides of `env` (none when None); regions
    added by CRASHCART_EXTRA_REGIONS come from `env`, or os.environ when None."""
    if not isinstance(data, Mapping):
        raise ConfigError("config", shown(data), "a TOML document of [section] tables")
    from_env = overrides(cls, env) if env is not None else {}
    merged = _merge(data, from_env)
    try:
        return cls.model_validate(merged, context={"env": env})
    except ValidationError as err:
        raise _config_error(cls, err, from_env) from None


def _merge(data: Mapping[str, Any], from_env: Mapping[str, Any]) -> dict[str, Any]:
    """The file's tables with the environment's values over them (a table the file got wrong stays wrong)."""
    merged = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for section, values in from_env.items():
        if isinstance(merged.get(section), dict) and isinstance(values, Mapping):
            merged[section].update(values)
        elif section not in merged:
            merged[section] = values
    return merged


def _config_error(cls: type[BaseModel], err: ValidationError, from_env: Mapping[str, Any]) -> ConfigError:
    """The first failure as one line: an unknown key before anything else (it often explains the rest)."""
    errors = err.errors(include_url=False)
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [str(part) for part in first["loc"]]
    field = ".".join(escape(part, 60) for part in loc)
    value = first.get("input")
    kind = first["type"]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, Invalid):
        if cause.at:
            field = f"{field}{escape(cause.at, 80)}" if field else escape(cause.at.lstrip("."), 80)
        value = value if cause.value is Invalid.NO_VALUE else cause.value
        hint = "; ".join(filter(None, (_env_hint(field, from_env), cause.hint)))
        return ConfigError(field, shown(value), cause.expected, hint)
    if kind == "extra_forbidden":
        return _unknown_key(cls, loc, value, from_env)
    if kind == "missing":
        if len(loc) == 1:
            return ConfigError(field, None, f"a [{field}] section naming the broken VM (run `pipenv run discover`)"
                               if field == "source" else f"a [{field}] table", DISCOVER_HINT)
        return ConfigError(field, None, "a value (this key is required)", DISCOVER_HINT)
    if kind in ("model_type", "model_attributes_type", "dict_type") and len(loc) == 1:
        return ConfigError(field, shown(value), f"a [{field}] table")
    return ConfigError(field or "config", shown(value), escape(first["msg"], 200), _env_hint(field, from_env))


def _unknown_key(cls: type[BaseModel], loc: list[str], value: Any, from_env: Mapping[str, Any]) -> ConfigError:
    if len(loc) == 1:
        sections = ", ".join(f"[{s}]" for s in cls.model_fields)
        return ConfigError(escape(loc[0], 60), "" if isinstance(value, Mapping) else shown(value),
                           f"one of the sections {sections}")
    section, key = loc[0], loc[-1]
    fields = list(SECTIONS[section].model_fields) if section in SECTIONS else []
    close = difflib.get_close_matches(key, fields, n=1)
    name = f"{section}.{escape(key, 60)}"
    variable = f"{ENV_PREFIX}{section}_{key}".upper()
    where = (f"the environment variable {escape(variable, 80)} names no key; " if key in from_env.get(section, {})
             else "")
    return ConfigError(name, shown(value),
                       f"one of the keys of [{section}]" + (f' (did you mean "{close[0]}"?)' if close else ""),
                       f"{where}known keys: {', '.join(fields)}")


def _env_hint(field: str, from_env: Mapping[str, Any]) -> str:
    section, _, key = field.partition(".")
    key = key.split("[")[0].split(".")[0]
    if key and key in (from_env.get(section) or {}):
        return f"fix the environment variable {ENV_PREFIX}{section.upper()}_{key.upper()} (it overrides the file)"
    if section == "tags" and from_env.get("tags"):
        return "fix the tag in the config file or in CRASHCART_TAGS"
    return ""
