"""Writing a config as the TOML file `discover` leaves behind (and `Config.to_toml` returns).

Every key of every section is written, defaults included, so the file shows all there is to change;
reading it back gives the same Config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from scripts.config.sections import SECTIONS


def render_toml(config: Any, header: str = "") -> str:
    """`config` (a scripts.config.model.Config) as TOML, `header` as a comment block on top."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for section in SECTIONS:
        obj = getattr(config, section)
        lines += ["", f"[{section}]"]
        for f in dataclasses.fields(obj):
            lines.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")
    lines += ["", "[tags]"] + [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in config.tags.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        return '""'
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
