"""Which frame to blame: the first one outside the Microsoft core set, as WinDbg's !analyze does.

A crash inside ntoskrnl on a driver's behalf (a bad pointer handed to a pool routine, an IRQL
violation in a list routine) is the driver's fault, and !analyze says so by walking the stack and
skipping the frames a triage.ini file marks "ignore": the bugcheck machinery, the kernel and the HAL,
dispatchers like the filter manager. `blame_core.txt` next to this module is that list for triage,
in triage.ini's own syntax (documented at its top); an operator can add or override rules with a file
of the same syntax (`triage --blame-rules FILE`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from scripts.base import userfiles
from scripts.dumpfile.stackwalk import Frame

CORE_FILE = Path(__file__).with_name("blame_core.txt")
WINDOWS_FILE = Path(__file__).with_name("windows_modules.txt")
KERNEL_NAMES = ("ntoskrnl", "ntkrnlmp", "ntkrnlpa", "ntkrpamp")
IGNORE = "ignore"


class BadRules(ValueError):
    """A blame-rules file line that is not `module[!function]=owner`."""


@dataclass(frozen=True)
class Rule:
    module: str  # lower case, may end in *
    function: str | None  # None or "*": a module rule
    owner: str
    order: int  # later files win ties

    def matches(self, module: str, function: str | None) -> bool:
        if not _matches_module(self.module, module):
            return False
        if self.function in (None, "*"):
            return True
        return function is not None and _match(self.function, function.split("+", 1)[0].lower())

    @property
    def specificity(self) -> tuple[int, int, int]:
        function = self.function not in (None, "*")
        return (int(function), len((self.function or "").rstrip("*")) + len(self.module.rstrip("*")), self.order)


def _match(pattern: str, text: str) -> bool:
    return text.startswith(pattern[:-1]) if pattern.endswith("*") else text == pattern


def _matches_module(pattern: str, module: str) -> bool:
    name = module.lower()
    stem = name.rsplit(".", 1)[0]
    if pattern == "nt":
        return stem in KERNEL_NAMES
    return _match(pattern, name) or _match(pattern, stem)


def parse_rules(text: str, source: str, order: int = 0) -> list[Rule]:
    rules = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        target, sep, owner = line.partition("=")
        module, _, function = target.strip().partition("!")
        owner = "".join(owner.split())  # triage.ini ignores spaces in owners
        if not sep or not module.strip() or not owner or "*" in module.strip()[:-1] or "*" in function[:-1]:
            raise BadRules(f"{source} line {number}: expected module[!function]=owner, '*' only at the end; got {raw.strip()!r}")
        rules.append(Rule(module.strip().lower(), function.strip().lower() or None, owner, order))
    return rules


class BlameRules:
    """The core set plus any overrides; `owner(frame)` is the best-matching rule's owner (or None)."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules

    @classmethod
    def load(cls, extra: str | Path | None = None) -> "BlameRules":
        """The built-in core set, plus the rules in `extra` (a path) on top. BadRules for a bad line; a usage
        error (CrashcartError) when the file cannot be read (missing, a folder or pipe, not UTF-8)."""
        rules = parse_rules(CORE_FILE.read_text(), CORE_FILE.name)
        if extra is not None:
            text = userfiles.read_text(extra, "--blame-rules", "pass a UTF-8 text file of rules: module[!function]=owner",
                                       "the blame rules")
            rules += parse_rules(text, str(extra), order=1)
        return cls(rules)

    def owner(self, module: str, function: str | None = None) -> str | None:
        matching = [rule for rule in self.rules if rule.matches(module, function)]
        return max(matching, key=lambda rule: rule.specificity).owner if matching else None


@dataclass(frozen=True)
class Culprit:
    frame: Frame
    owner: str | None  # the rule's owner, when a rule named one (not "ignore")
    skipped: int  # core frames passed over before it

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.frame.module.name if self.frame.module else None, "symbol": self.frame.symbol,
                "frame": self.frame.index, "found_by": self.frame.trust, "owner": self.owner,
                "core_frames_skipped": self.skipped}


def blame(frames: tuple[Frame, ...] | list[Frame], rules: BlameRules) -> Culprit | None:
    """The first frame in a module whose owner is not "ignore" (None if every frame is core, or no
    frame is in a module)."""
    skipped = 0
    for frame in frames:
        if frame.module is None:
            continue
        owner = rules.owner(frame.module.name, frame.function)
        if owner is not None and owner.lower() == IGNORE:
            skipped += 1
            continue
        return Culprit(frame, owner, skipped)
    return None


@cache
def _windows_modules() -> frozenset[str]:
    lines = (line.strip().lower() for line in WINDOWS_FILE.read_text(encoding="utf-8").splitlines())
    return frozenset(line for line in lines if line and not line.startswith("#"))


def is_windows_module(name: str) -> bool:
    """Whether `name` (an image file name, a path, or a service name without .sys) is a module Windows ships
    (windows_modules.txt: what triage and `fix disable-driver:auto` say of a culprit, not who is blamed)."""
    base = name.replace("/", "\\").rsplit("\\", 1)[-1].lower()
    known = _windows_modules()
    return base in known or (base + ".sys") in known
