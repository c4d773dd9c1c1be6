"""Windows PowerShell 5.1 as it really is, checked over the tree-sitter parse of a script (1 of 2: the
parse and the cmdlet signatures; the lint rules are in pslint.py).

The rescue VM runs Windows PowerShell 5.1 (Windows Server 2022), and nothing here can run it: a cmdlet,
a parameter or a syntax that 5.1 does not have fails only there. So the rendered scripts are held to
- the documented 5.1 cmdlet signatures, read from ../shared/pwsh/cmdlets-ws2022-ps51.json beside the
  project (never copied into it; README.md there says where they come from): every command name that is
  a cmdlet (or a cmdlet alias) exists, every -Parameter resolves as PowerShell resolves it (name, alias,
  or an unambiguous prefix; the common parameters too), named parameters share a parameter set, and no
  set takes more positional arguments than it has positions (`check_signatures`);
- lint rules for the 5.1 pitfalls (pslint.py: `RULES`, `lint`), each proven by a test that it fires on a
  bad snippet.

`pslint.findings(source)` is both. The parse is tree-sitter-powershell's, whose grammar is PowerShell 7's plus
holes: syntax it does not know becomes ERROR nodes, which the `ps7-syntax` rule names.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tree_sitter
import tree_sitter_powershell

ROOT = Path(__file__).resolve().parents[2]
SIGNATURES = ROOT.parent / "shared" / "pwsh" / "cmdlets-ws2022-ps51.json"
LANGUAGE = tree_sitter.Language(tree_sitter_powershell.language())

# What the docs do not record (README.md of the signatures, "Limits"): these take the remaining arguments.
REMAINING_ARGUMENTS = {("write-output", "InputObject"), ("foreach-object", "RemainingScripts")}
COMMON_SWITCHES = {"Debug", "Verbose"}
# A number the grammar takes for a command name (tree-sitter-powershell has no type suffixes or multipliers).
NUMBER = re.compile(r"^(0x[0-9a-f]+|\d+(\.\d+)?)(l|d|u|ul)?(kb|mb|gb|tb|pb)?$", re.I)
VERB_NOUN = re.compile(r"^[a-z]+-[a-z0-9]+$", re.I)


@dataclass(frozen=True, order=True)
class Finding:
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: [{self.rule}] {self.message}"


# ---- the parse ------------------------------------------------------------------------------------------
@dataclass
class Element:
    kind: str  # param | arg | splat | redirect
    text: str
    node: Any
    colon_value: bool = False  # -Name:value


@dataclass
class Command:
    node: Any
    name: str  # as written, quotes removed ('' when the target is an expression: & $x, & { })
    elements: list[Element] = field(default_factory=list)

    @property
    def line(self) -> int:
        return self.node.start_point[0] + 1

    def params(self) -> list[str]:
        return [e.text for e in self.elements if e.kind == "param"]

    def redirects_stderr(self) -> bool:
        return any(e.kind == "redirect" and re.match(r"^(2|\*)>", e.text) for e in self.elements)


class Script:
    def __init__(self, source: str):
        self.source = source
        self.data = source.encode("utf-8")
        self.tree = tree_sitter.Parser(LANGUAGE).parse(self.data)

    def text(self, node) -> str:
        return self.data[node.start_byte:node.end_byte].decode("utf-8", "replace")

    def walk(self, node=None) -> Iterator[Any]:
        stack = [node or self.tree.root_node]
        while stack:
            current = stack.pop()
            yield current
            stack.extend(reversed(current.children))

    def nodes(self, *types: str) -> list[Any]:
        return [n for n in self.walk() if n.type in types]

    @functools.cached_property
    def functions(self) -> set[str]:
        return {self.text(name).lower() for fn in self.nodes("function_statement")
                for name in fn.children if name.type == "function_name"}

    @functools.cached_property
    def commands(self) -> list[Command]:
        found = []
        for node in self.nodes("command"):
            name = ""
            for child in node.children:
                if child.type == "command_name":
                    name = self.text(child)
                elif child.type == "command_name_expr":
                    inner = self.text(child)
                    plain = [c for c in child.children if c.type in ("command_name", "string_literal")]
                    name = inner.strip("'\"") if plain else ""
            if NUMBER.match(name):
                continue  # `$n = 0L`: a number the grammar misreads, not a command
            found.append(Command(node, name, self._elements(node)))
        return found

    def _elements(self, node) -> list[Element]:
        out: list[Element] = []
        colon = False
        for box in (c for c in node.children if c.type == "command_elements"):
            for child in box.children:
                text = self.text(child)
                if child.type == "command_argument_sep":
                    colon = text.strip() == ":"
                    continue
                if child.type == "command_parameter" and not re.match(r"^-\d", text):
                    out.append(Element("param", text, child))
                elif child.type == "redirection":
                    out.append(Element("redirect", text, child))
                elif child.type == "variable" and text.startswith("@"):
                    out.append(Element("splat", text, child))
                else:
                    out.append(Element("arg", text, child, colon_value=colon))
                colon = False
        return out

    def enclosing_function(self, node):
        current = node.parent
        while current is not None and current.type != "function_statement":
            current = current.parent
        return current


# ---- the documented signatures ------------------------------------------------------------------------------
class Signatures:
    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.common: dict[str, list[str]] = data["common"]
        self.cmdlets = {name.lower(): (name, spec) for name, spec in data["cmdlets"].items()}
        self.aliases = {alias.lower(): name for name, spec in data["cmdlets"].items()
                        for alias in spec.get("aliases", [])}

    def cmdlet(self, name: str) -> tuple[str, dict[str, Any]] | None:
        key = name.lower()
        if key in self.aliases:
            key = self.aliases[key].lower()
        return self.cmdlets.get(key)

    def table(self, spec: dict[str, Any]) -> dict[str, list[str]]:
        """Every parameter of a cmdlet with its names (name + aliases), the common ones included."""
        table = {name: [name, *info.get("aliases", [])] for name, info in spec["params"].items()}
        if spec.get("common", True):
            for name, aliases in self.common.items():
                table.setdefault(name, [name, *aliases])
        return table

    @staticmethod
    def resolve(table: dict[str, list[str]], given: str) -> tuple[str | None, set[str]]:
        """PowerShell's rule: an exact name or alias, else the one parameter a name or alias starts with.
        Returns (parameter, candidates): None and the candidates when none or several match."""
        low = given.lower()
        exact = {p for p, names in table.items() if low in (n.lower() for n in names)}
        if len(exact) == 1:
            return exact.pop(), exact
        prefixed = {p for p, names in table.items() if any(n.lower().startswith(low) for n in names)}
        if len(prefixed) == 1:
            return next(iter(prefixed)), prefixed
        return None, prefixed

    def is_switch(self, spec: dict[str, Any], param: str) -> bool:
        info = spec["params"].get(param)
        return info.get("type") == "SwitchParameter" if info else param in COMMON_SWITCHES


@functools.lru_cache(maxsize=1)
def signatures() -> Signatures:
    return Signatures(json.loads(SIGNATURES.read_text(encoding="utf-8")))


def is_native(script: Script, command: Command, sig: Signatures) -> bool:
    """A program, not a cmdlet or function: a static name that is neither (and not Verb-Noun, which is an
    unknown cmdlet), or `& $program ... 2>&1` (a target in a variable whose stderr is redirected)."""
    if not command.name:
        return command.redirects_stderr()
    low = command.name.lower()
    return not (low in script.functions or sig.cmdlet(low) or VERB_NOUN.match(low))


def check_signatures(script: Script, sig: Signatures | None = None) -> list[Finding]:
    sig = sig or signatures()
    out: list[Finding] = []
    for command in script.commands:
        if not command.name or command.name.lower() in script.functions:
            continue
        found = sig.cmdlet(command.name)
        if found is None:
            if VERB_NOUN.match(command.name):
                out.append(Finding(command.line, "cmdlet", f"{command.name} is not a cmdlet of Windows PowerShell 5.1 "
                                                          "on Windows Server 2022 (nor a function of this script)"))
            continue
        out.extend(_check_binding(command, *found, sig))
    return out


@dataclass
class Binding:
    named: list[str] = field(default_factory=list)  # the parameters given by name, resolved
    positional: int = 0  # arguments left for positions
    problems: list[str] = field(default_factory=list)
    splatted: bool = False  # @args: what it binds is known only when it runs


def bind(command: Command, name: str, spec: dict[str, Any], sig: Signatures) -> Binding:
    """The command's arguments as PowerShell binds them: each -Name resolved, the argument after a
    parameter that is not a switch taken as its value, the rest positional."""
    out = Binding()
    table = sig.table(spec)
    elements = command.elements
    i = 0
    while i < len(elements):
        element = elements[i]
        i += 1
        if element.kind == "splat":
            out.splatted = True
            continue
        if element.kind == "redirect":
            continue
        if element.kind == "arg":
            out.positional += 1
            continue
        param, candidates = sig.resolve(table, element.text[1:])
        if param is None:
            out.problems.append(f"-{element.text[1:]} is ambiguous for {name}: it could be -{', -'.join(sorted(candidates))}"
                                if candidates else f"{name} has no parameter {element.text} in Windows PowerShell 5.1")
        elif param in out.named:
            out.problems.append(f"{name}: -{param} is given twice")
        else:
            out.named.append(param)
        following = elements[i] if i < len(elements) else None
        if following is not None and following.kind == "arg" and (
                following.colon_value or param is None or not sig.is_switch(spec, param)):
            i += 1  # its value: -Name value, or -Name:value (also a switch's)
    return out


def _check_binding(command: Command, name: str, spec: dict[str, Any], sig: Signatures) -> list[Finding]:
    binding = bind(command, name, spec, sig)
    out = [Finding(command.line, "parameter", problem) for problem in binding.problems]
    if not binding.splatted:
        out.extend(_check_sets(command, name, spec, binding.named, binding.positional, sig))
    return out


def _check_sets(command: Command, name: str, spec: dict[str, Any], named: list[str], positional: int,
                sig: Signatures) -> list[Finding]:
    sets: dict[str, dict[str, str]] = spec.get("sets") or {}
    in_some_set = {p for members in sets.values() for p in members}
    specific = [p for p in named if p in in_some_set]  # common parameters belong to every set
    viable = {s: members for s, members in sets.items() if all(p in members for p in specific)}
    if sets and not viable:
        return [Finding(command.line, "parameter-set", f"{name}: no parameter set takes -{' with -'.join(specific)} "
                                                        "together in Windows PowerShell 5.1")]
    if not positional or not viable:
        return []
    best = 0
    for members in viable.values():
        slots = [p for p, code in members.items() if re.search(r"\d", code) and p not in named]
        rest = any(code.endswith("*") or (name.lower(), p) in REMAINING_ARGUMENTS for p, code in members.items())
        best = max(best, 10**6 if rest else len(slots))
    if positional > best:
        return [Finding(command.line, "positional", f"{name} takes at most {best} positional argument(s) in Windows "
                                                     f"PowerShell 5.1, {positional} given")]
    return []
