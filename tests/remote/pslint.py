"""The Windows PowerShell 5.1 pitfalls as lint rules over the tree-sitter parse (2 of 2; the parse and the
cmdlet signatures are in psparse.py). Each rule has a test that it fires on a bad snippet
(tests/remote/test_ps51.py); `findings(source)` runs the signature checks and every rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from tests.remote.psparse import Command, Finding, Script, bind, check_signatures, is_native, signatures

# ---- lint rules: the 5.1 pitfalls ----------------------------------------------------------------------------
Rule = Callable[[Script], list[Finding]]
RULES: dict[str, Rule] = {}


def rule(name: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        RULES[name] = fn
        return fn
    return register


def _command_named(script: Script, *names: str) -> Iterator[Command]:
    sig = signatures()
    wanted = {n.lower() for n in names}
    for command in script.commands:
        found = sig.cmdlet(command.name) if command.name else None
        if found and found[0].lower() in wanted and command.name.lower() not in script.functions:
            yield command


@rule("band-sign")
def band_sign(script: Script) -> list[Finding]:
    """A hex literal of 8 digits with the top bit set is a negative Int32 in PowerShell (0xFFFFFFFF is -1):
    `$v -band 0xFFFFFFFF` keeps the sign, and the [uint32] cast after it throws for a DWORD >= 0x80000000."""
    out = []
    for literal in script.nodes("hexadecimal_integer_literal"):
        text = script.text(literal)
        if not re.fullmatch(r"0x[0-9a-f]+", text, re.I) or not 0x80000000 <= int(text, 16) <= 0xFFFFFFFF:
            continue
        node = literal.parent
        while node is not None and not (node.type == "bitwise_expression"
                                        and any(c.type in ("-band", "-bor", "-bxor") for c in node.children)):
            node = node.parent
        if node is not None:
            out.append(Finding(literal.start_point[0] + 1, "band-sign",
                               f"{text} is the Int32 {int(text, 16) - (1 << 32)} in Windows PowerShell 5.1: a bitwise "
                               "mask with it keeps the sign; convert with [BitConverter], or write the mask in decimal (an Int64)"))
    return out


@rule("native-stderr")
def native_stderr(script: Script) -> list[Finding]:
    """Under `$ErrorActionPreference = 'Stop'`, 5.1 turns a native program's first stderr line into a
    terminating error: a native call needs the preference set to Continue in its function before it, and
    its $LASTEXITCODE read after it."""
    stops = [a for a in script.nodes("assignment_expression") if _assigns_preference(script, a, {"stop"})]
    if not stops:
        return []
    out = []
    for command in script.commands:
        if not is_native(script, command, signatures()):
            continue
        what = command.name or script.text(command.node).split()[1]
        scope = script.enclosing_function(command.node)
        if scope is None:
            out.append(Finding(command.line, "native-stderr", f"{what} runs at script level under "
                               "$ErrorActionPreference = 'Stop': in 5.1 its first stderr line ends the script"))
            continue
        guarded = any(_assigns_preference(script, a, {"continue", "silentlycontinue", "ignore"})
                      and a.start_byte < command.node.start_byte for a in _inside(script, scope, "assignment_expression"))
        checked = any(script.text(v).lower() in ("$lastexitcode", "$global:lastexitcode")
                      and v.start_byte > command.node.end_byte and not _assigned(v)
                      for v in _inside(script, scope, "variable"))
        if not guarded:
            out.append(Finding(command.line, "native-stderr", f"{what} runs under $ErrorActionPreference = 'Stop': in "
                               "Windows PowerShell 5.1 its first stderr line ends the script; set the preference to "
                               "'Continue' in the function first (Invoke-Native)"))
        if not checked:
            out.append(Finding(command.line, "native-stderr", f"{what}: its exit code ($LASTEXITCODE) is never read"))
    return out


def _inside(script: Script, scope, *types: str) -> list[Any]:
    return [n for n in script.walk(scope) if n.type in types]


def _assigns_preference(script: Script, node, values: set[str]) -> bool:
    left = next((c for c in node.children if c.type == "left_assignment_expression"), None)
    right = node.children[-1] if node.children else None
    if left is None or right is None:
        return False
    target = script.text(left).lower().replace("$local:", "$").replace("$script:", "$")
    return target == "$erroractionpreference" and script.text(right).strip().strip("'\"").lower() in values


def _assigned(variable) -> bool:
    node = variable.parent
    while node is not None and node.type not in ("left_assignment_expression", "pipeline", "statement_list"):
        node = node.parent
    return node is not None and node.type == "left_assignment_expression"


@rule("ps7-syntax")
def ps7_syntax(script: Script) -> list[Finding]:
    """Syntax of PowerShell 7 that 5.1 cannot parse: ??, ??=, ?. and ?[], the ternary ? :, && and ||."""
    out = []
    for chain in script.nodes("pipeline_chain_tail"):
        out.append(Finding(chain.start_point[0] + 1, "ps7-syntax",
                           f"the pipeline chain operator {script.text(chain).strip()} is PowerShell 7: use if ($?) / -not $?"))
    for error in script.nodes("ERROR"):
        if error.parent is not None and _has_error_ancestor(error):
            continue
        text = _without_strings(script, error) + script.data[error.end_byte:error.end_byte + 2].decode("utf-8", "replace")
        if "??" in text:
            what = "the null-coalescing operator ?? (or ??=) is PowerShell 7"
        elif re.search(r"\?[.\[]", text):
            what = "null-conditional member access ?. / ?[] is PowerShell 7"
        elif "?" in text:
            what = "the ternary operator ? : is PowerShell 7: use if / else"
        else:
            what = "this does not parse as PowerShell"
        out.append(Finding(error.start_point[0] + 1, "ps7-syntax", what))
    return out


def _has_error_ancestor(node) -> bool:
    parent = node.parent
    while parent is not None:
        if parent.type == "ERROR":
            return True
        parent = parent.parent
    return False


def _without_strings(script: Script, node) -> str:
    text = bytearray(script.data[node.start_byte:node.end_byte])
    for inner in script.walk(node):
        if inner.type in ("string_literal", "comment"):
            for at in range(inner.start_byte - node.start_byte, inner.end_byte - node.start_byte):
                text[at] = ord(" ")
    return text.decode("utf-8", "replace")


def _param_rule(name: str, cmdlets: tuple[str, ...], params: tuple[str, ...], message: str) -> None:
    """A rule: one of `params` (a PowerShell 6+/7 parameter, given in full or as a prefix of 3+ letters) on
    one of `cmdlets` ('*': any)."""
    def check(script: Script) -> list[Finding]:
        commands = script.commands if cmdlets == ("*",) else list(_command_named(script, *cmdlets))
        return [Finding(c.line, name, f"{c.name} {p}: {message}") for c in commands for p in c.params()
                if len(p) > 3 and any(full.lower().startswith(p[1:].lower()) for full in params)]
    RULES[name] = check


_param_rule("foreach-parallel", ("ForEach-Object",), ("Parallel",), "PowerShell 7 only (5.1 runs ForEach-Object in sequence)")
_param_rule("convertfrom-json-ps7", ("ConvertFrom-Json",), ("AsHashtable", "Depth", "NoEnumerate"),
            "PowerShell 6+: 5.1's ConvertFrom-Json takes only -InputObject (it returns PSCustomObjects)")
_param_rule("asbytestream", ("*",), ("AsByteStream",), "PowerShell 6+: 5.1 reads and writes bytes with -Encoding Byte")


@rule("join-path-children")
def join_path_children(script: Script) -> list[Finding]:
    """Join-Path with more than one child path (-AdditionalChildPath, or a third positional) is PowerShell 6+."""
    out = []
    sig = signatures()
    for command in _command_named(script, "Join-Path"):
        name, spec = sig.cmdlet("Join-Path")  # type: ignore[misc]
        binding = bind(command, name, spec, sig)
        extra = any(p.lower().startswith("-add") for p in command.params())
        if extra or binding.positional + sum(p in ("Path", "ChildPath") for p in binding.named) > 2:
            out.append(Finding(command.line, "join-path-children", "Join-Path takes one child path in Windows "
                               "PowerShell 5.1: nest Join-Path (Join-Path (Join-Path a b) c)"))
    return out


@rule("convertto-json-depth")
def convertto_json_depth(script: Script) -> list[Finding]:
    """ConvertTo-Json's default -Depth is 2: deeper objects silently become their type name in 5.1."""
    return [Finding(c.line, "convertto-json-depth", "ConvertTo-Json without -Depth: 5.1 writes anything deeper "
                    "than 2 levels as a type name, silently") for c in _command_named(script, "ConvertTo-Json")
            if not any(p.lower().startswith("-d") for p in c.params())]


@rule("ps6-variables")
def ps6_variables(script: Script) -> list[Finding]:
    """Automatic variables that 5.1 does not have (they read as $null there)."""
    names = {"$iswindows", "$islinux", "$ismacos", "$iscoreclr", "$psstyle"}
    return [Finding(v.start_point[0] + 1, "ps6-variables", f"{script.text(v)} does not exist in Windows PowerShell "
                    "5.1 (it is $null there)") for v in script.nodes("variable") if script.text(v).lower() in names]


@rule("unicode-escape")
def unicode_escape(script: Script) -> list[Finding]:
    """`u{...} in a double-quoted string is PowerShell 6+; 5.1 reads it as the letter u."""
    return [Finding(s.start_point[0] + 1, "unicode-escape", "`u{...} is PowerShell 6+: use [char]0x...")
            for s in script.nodes("expandable_string_literal", "expandable_here_string_literal")
            if "`u{" in script.text(s)]


@rule("encoding-name")
def encoding_name(script: Script) -> list[Finding]:
    """-Encoding values that 5.1 does not know (utf8NoBOM, utf8BOM, ansi are PowerShell 6+ names)."""
    out = []
    for command in script.commands:
        for at, element in enumerate(command.elements[:-1]):
            value = command.elements[at + 1].text.strip("'\"").lower()
            if element.kind == "param" and element.text.lower().startswith("-enc") and value in ("utf8nobom", "utf8bom", "ansi"):
                out.append(Finding(command.line, "encoding-name", f"-Encoding {value} is PowerShell 6+"))
    return out


@rule("web-basic-parsing")
def web_basic_parsing(script: Script) -> list[Finding]:
    """Invoke-WebRequest without -UseBasicParsing needs Internet Explorer's engine in 5.1, which Server
    Core and a fresh server do not have ready: the call fails."""
    return [Finding(c.line, "web-basic-parsing", "Invoke-WebRequest without -UseBasicParsing fails where Internet "
                    "Explorer was never set up (5.1)") for c in _command_named(script, "Invoke-WebRequest")
            if not any(p.lower().startswith("-use") for p in c.params())]


def lint(script: Script) -> list[Finding]:
    return sorted(f for check in RULES.values() for f in check(script))


def findings(source: str) -> list[Finding]:
    """Everything: the signature checks and every lint rule."""
    script = Script(source)
    return sorted(check_signatures(script) + lint(script))
