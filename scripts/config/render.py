"""Writing a config as the TOML file `discover` leaves behind (and `Config.to_toml` returns).

Every key of every section is written, defaults included, so the file shows all there is to change;
reading it back gives the same Config. Strings are written as TOML basic strings with every character
a TOML string may not hold raw escaped, so no value can end its line early.
"""

from __future__ import annotations

from typing import Any

from scripts.config.sections import SECTIONS


def render_toml(config: Any, header: str = "") -> str:
    """`config` (a scripts.config.model.Config) as TOML, `header` as a comment block on top."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for section in SECTIONS:
        obj = getattr(config, section)
        lines += ["", f"[{section}]"]
        for name in type(obj).model_fields:
            lines.append(f"{name} = {_toml_value(getattr(obj, name))}")
    lines += ["", "[tags]"] + [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in config.tags.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # finite (validated); TOML reads Python's repr of both back unchanged
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        return '""'
    return '"' + "".join(_toml_char(c) for c in str(value)) + '"'


def _toml_char(c: str) -> str:
    if c == "\\":
        return "\\\\"
    if c == '"':
        return '\\"'
    if c < " " or c == "\x7f":
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c, f"\\u{ord(c):04x}")
    return c
