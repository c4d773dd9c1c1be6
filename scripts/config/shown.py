"""How a value from the user appears in a message: one line, control characters escaped, never too long.

A config value may hold a newline, an escape sequence or a bidi override; printed raw it would forge
lines in logs or reorder the message on a terminal. Every value and key the config package puts into
an error goes through `shown` first (the message itself is built by scripts.base.errors.ConfigError).
"""

from __future__ import annotations

from typing import Any

from scripts.base.errors import printable

MAX_SHOWN = 120


def escape(text: str, limit: int = MAX_SHOWN) -> str:
    """`text` with every non-printable character as its Python escape (\\n, \\x1b, \\u202e), cut to `limit`."""
    out = printable(text[: limit + 1])
    return out[:limit] + f"... ({len(text)} characters)" if len(text) > limit or len(out) > limit else out


def shown(value: Any) -> Any:
    """`value` ready for ConfigError: strings escaped and cut, numbers and switches as they are, anything
    else (a table, a list, a huge integer) as its escaped, cut repr."""
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        if abs(value) < 10**40:
            return value
        return f"<a number of about {int(abs(value).bit_length() * 0.30103) + 1} digits>"
    if isinstance(value, str):
        return escape(value)
    try:
        text = repr(value)
    except ValueError:  # a container holding an integer too long to print
        text = f"<a {type(value).__name__}>"
    return escape(text)
