"""A finite, bounded number from what a person typed: the one check behind every numeric option and knob.

`float("nan")`, `float("inf")` and `1e999` all parse, and then stop a retry loop (nan compares false to
everything), wait forever (inf) or overflow a timer (OverflowError). Every number a verb takes from its
command line (collect --timeout-minutes, prepare-dump --memory-gb, ...) or repair-run takes from the
environment (CRASHCART_TEARDOWN_RETRY_SECONDS, ...) goes through `number()`: a usage error (exit 2, one
line naming the option, the value and the range) for anything that is not a plain finite number in range.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scripts.base.errors import CrashcartError, ExitCode

MAX_TEXT = 40  # characters: longer is no number a person meant (and int() of 5000 digits is refused anyway)
# ASCII digits only: no nan, inf, '١٢' or '1_0'
_PLAIN = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class Range:
    """Where a number may lie: `minimum` <= x <= `maximum` (`above_minimum`: strictly above); `integer`:
    a whole number."""

    minimum: float
    maximum: float
    integer: bool = False
    above_minimum: bool = False
    unit: str = ""

    def describe(self) -> str:
        kind = "a whole number" if self.integer else "a number"
        unit = f" {self.unit}" if self.unit else ""
        if self.above_minimum:
            return f"{kind} above {_show(self.minimum)} and at most {_show(self.maximum)}{unit}"
        return f"{kind} from {_show(self.minimum)} to {_show(self.maximum)}{unit}"


def _show(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def shown_text(text: str) -> str:
    """The value as typed, safe on one line (control characters escaped, long text cut)."""
    cut = text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "..."
    return cut.encode("unicode_escape").decode("ascii").replace('"', '\\"')


def number(value: Any, what: str, bounds: Range, hint: str = "") -> float | int:
    """`value` (text, int or float) as a finite number within `bounds`; CrashcartError (USAGE) otherwise."""
    text = value if isinstance(value, str) else repr(value)

    def refuse() -> CrashcartError:
        return CrashcartError(f'{what} = "{shown_text(text.strip())}" is not valid: expected {bounds.describe()}',
                              hint or f"give {what} a plain decimal number in that range (no nan or inf)",
                              ExitCode.USAGE)

    if isinstance(value, bool) or value is None:
        raise refuse()
    if isinstance(value, str):
        stripped = value.strip()
        if len(stripped) > MAX_TEXT or not _PLAIN.fullmatch(stripped):
            raise refuse()
        parsed: float = float(stripped)
    elif isinstance(value, (int, float)):
        try:
            parsed = float(value)
        except OverflowError:
            raise refuse() from None
    else:
        raise refuse()
    if not math.isfinite(parsed):
        raise refuse()
    too_low = parsed <= bounds.minimum if bounds.above_minimum else parsed < bounds.minimum
    if too_low or parsed > bounds.maximum:
        raise refuse()
    if bounds.integer:
        if not parsed.is_integer():
            raise refuse()
        return int(parsed)
    return parsed


def env_number(env: Mapping[str, str], name: str, bounds: Range, default: Any) -> Any:
    """A number from the environment (unset or blank: `default`)."""
    text = env.get(name, "")
    if not text.strip():
        return default
    return number(text, name, bounds, f"set {name} to {bounds.describe()}, or unset it")


def check_options(args: argparse.Namespace, options: Mapping[str, Range]) -> None:
    """Checks (and converts in place) the numeric options of a verb: `{"timeout_minutes": Range(...)}` for
    `--timeout-minutes`. The options are declared as text (`type=str`), so that argparse, whose errors
    print the whole usage, never sees them: a bad one is one line and exit 2 from here. Unset (None)
    stays None."""
    for attribute, bounds in options.items():
        value = getattr(args, attribute)
        if value is not None:
            setattr(args, attribute, number(value, "--" + attribute.replace("_", "-"), bounds))


# The ranges the verbs share (minutes and seconds a person could mean; a week is the longest wait).
WEEK_MINUTES = 7 * 24 * 60.0
TIMEOUT_MINUTES = Range(0, WEEK_MINUTES, above_minimum=True, unit="minutes")
WAIT_MINUTES = Range(0, WEEK_MINUTES, unit="minutes")
POLL_SECONDS = Range(0, 3600, unit="seconds")
