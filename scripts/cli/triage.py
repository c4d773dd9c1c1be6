"""`pipenv run triage <path-or-url>`: which driver crashed the machine, read straight from the dump.

The verdict itself is scripts.dumpfile.triage; this verb prints it. Human output is a table on stderr;
`--json` writes the verdict to stdout for pipelines (and its one-line summary to stderr). Exit 0 with a
verdict (even when the faulting module cannot be named), 21 with a verdict from a dump truncated or damaged
past a whole header (what is there is read, the verdict says what is missing), 20 for a file that is not a readable dump, 2 for a
path that is not a regular file or a URL that is not one (refused before anything is read) or an unreadable
or malformed --blame-rules file, 3-5 for a blob that cannot be read. No path or URL a user can give ends in
a traceback.

Besides the faulting module, the verdict names the culprit: the first frame of the crashing thread's
stack outside the Microsoft core set (scripts/dumpfile/blame_core.txt, triage.ini syntax; `--blame-rules
FILE` adds or overrides rules), and lists the frames with how each was found (context, cfi,
frame-pointer, scan). `--no-unwind` skips the stack (fewer reads).
"""

from __future__ import annotations

import argparse
import logging
import sys

from scripts.azure.clients import credential
from scripts.base.console import emit_json, is_interactive, log
from scripts.base.errors import CrashcartError, ExitCode
from scripts.dumpfile.blame import BadRules, BlameRules
from scripts.dumpfile.triage import Verdict, triage

MAX_FRAMES_SHOWN = 12


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dump", help="path of a .dmp file, or an https blob URL (with a SAS, or signed in with az login)")
    parser.add_argument("--json", action="store_true", help="write the verdict as JSON on stdout")
    parser.add_argument("--blame-rules", metavar="FILE",
                        help="extra module[!function]=owner rules (triage.ini syntax; owner 'ignore' = never the "
                             "culprit) on top of the built-in core set")
    parser.add_argument("--symbols", metavar="PATH",
                        help="symbol path (srv*CACHE*https://msdl.microsoft.com/download/symbols): name the frames' "
                             "functions from public symbols; never required")
    parser.add_argument("--no-unwind", action="store_true",
                        help="do not walk the stack: faulting module only, fewer reads")


def run(args: argparse.Namespace) -> int:
    if not args.verbose:  # a failed sign-in is told in one line (exit 3); azure-identity's own report is for -v
        logging.getLogger("azure.identity").setLevel(logging.ERROR)
    # `credential` is passed uncalled: the reader signs in only for a blob URL that has no SAS
    rules = _rules(getattr(args, "blame_rules", None))
    symbols = None
    if getattr(args, "symbols", None):
        from scripts.dumpfile.symbolpath import SymbolPath

        symbols = SymbolPath.parse(args.symbols)  # a malformed path is refused (exit 2) before the dump is read
    verdict = triage(args.dump, credential, unwind=not getattr(args, "no_unwind", False), rules=rules,
                     symbols=symbols)
    if args.json:
        emit_json(verdict.to_dict())
        log.info("%s", verdict.summary)
    else:
        render(verdict)
    return ExitCode.DUMP_PARTIAL if verdict.partial else 0


def _rules(path: str | None) -> BlameRules | None:
    if path is None:
        return None
    try:
        return BlameRules.load(path)  # an unreadable file: a usage error from scripts.base.userfiles
    except BadRules as err:
        raise CrashcartError(f"--blame-rules: {err}", "fix that line and re-run", ExitCode.USAGE) from None


def rows(verdict: Verdict) -> list[tuple[str, str]]:
    """The verdict as (label, value) lines, in the order an operator reads them."""
    h, b = verdict.header, verdict.bugcheck
    out = [
        ("dump", f"{verdict.source}"),
        ("type", f"{h.kind}, {h.machine}, {h.processors} processor{'s' if h.processors != 1 else ''}, "
                 f"Windows build {h.minor_version}, {_size(verdict.file_size)}"),
    ]
    if verdict.partial:
        out.append(("partial", verdict.partial))
    if h.system_time:
        out.append(("crashed at", h.system_time.strftime("%Y-%m-%d %H:%M:%S UTC")))
    out.append(("stop code", f"{b.code:#010x} {b.name or '(unknown stop code)'}"))
    out.append(("parameters", " ".join(f"{p:#x}" for p in b.parameters)))
    out += [(f"  parameter {p.index}", p.line.split(" = ", 1)[-1]) for p in b.described if p.meaning]
    if b.exception_code is not None:
        described = f" - {b.exception_description}" if b.exception_description else ""
        out.append(("exception", f"{b.exception_code:#010x} {b.exception_symbol or '(unknown exception code)'}{described}"))
    if verdict.access:
        out.append(("access", f"{verdict.access[0]} at {verdict.access[1]:#x}"))
    if b.faulting_address is not None:
        out.append(("faulting address", f"{b.faulting_address:#x} (parameter {b.faulting_address_parameter})"))
    out += _module_rows(verdict)
    out += _stack_rows(verdict)
    out.append(("read", f"{_size(verdict.bytes_read)} in {verdict.requests} reads, {verdict.seconds:.2f} s"))
    out.append(("verdict", verdict.summary))
    out.append(("next", verdict.next_step))
    return out


def _module_rows(verdict: Verdict) -> list[tuple[str, str]]:
    b, lookup = verdict.bugcheck, verdict.lookup
    out = []
    if verdict.module is not None and b.faulting_address is not None:
        m = verdict.module
        out.append(("faulting module", verdict.faulting_symbol or m.name))
        out.append(("  base, size", f"{m.base:#x}, {m.size:#x} bytes"))
        if m.timestamp:
            out.append(("  timestamp", m.timestamp_text))
        if m.path:
            out.append(("  path", m.path))
    elif lookup is not None:
        if lookup.status == "not-in-any-module":
            out.append(("faulting module", f"none: the address is in none of the {lookup.modules_seen} loaded modules "
                                           "(an unloaded driver, pool memory or user space)"))
        else:
            out.append(("faulting module", f"not resolved: {lookup.problem}"))
    if lookup is not None and lookup.module is not None and lookup.problem:
        out.append(("  note", lookup.problem))
    return out


def _stack_rows(verdict: Verdict) -> list[tuple[str, str]]:
    """The culprit, then the frames (module+offset and how each was found), innermost first."""
    out = []
    culprit = verdict.culprit
    if culprit is not None:
        skipped = f", after {culprit.skipped} Windows frame{'s' if culprit.skipped != 1 else ''}" if culprit.skipped else ""
        out.append(("culprit", f"{culprit.frame.symbol} (frame {culprit.frame.index}, found by {culprit.frame.trust}{skipped})"))
    elif verdict.stack is not None:
        out.append(("culprit", "none outside the Windows core set on the stack"))
    if verdict.stack is not None:
        out.append(("stack", f"from the {verdict.stack.origin}; {verdict.stack.stopped}"))
        for frame in verdict.frames[:MAX_FRAMES_SHOWN]:
            out.append((f"  #{frame.index}", f"{frame.symbol}  [{frame.trust}]"))
        if len(verdict.frames) > MAX_FRAMES_SHOWN:
            out.append(("  ...", f"{len(verdict.frames) - MAX_FRAMES_SHOWN} more frames (--json lists them all)"))
    elif verdict.stack_problem:
        out.append(("stack", verdict.stack_problem))
    for note in (verdict.symbols or {}).get("notes", [])[:5]:
        out.append(("  symbols", note))
    return out


def render(verdict: Verdict) -> None:
    """The verdict as a table on stderr: rich in a terminal, plain aligned text in a pipeline log."""
    table = rows(verdict)
    if is_interactive():
        from rich.console import Console
        from rich.table import Table

        grid = Table(show_header=False, box=None, pad_edge=False)
        grid.add_column(style="bold")
        grid.add_column(overflow="fold")
        for key, value in table:
            grid.add_row(key, value)
        Console(stderr=True, highlight=False).print(grid)
        return
    width = max(len(key) for key, _ in table)
    sys.stderr.write("".join(f"{key:<{width}}  {value}\n" for key, value in table))
    sys.stderr.flush()


def _size(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count}"  # pragma: no cover
