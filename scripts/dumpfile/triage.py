"""`triage(source)`: which driver crashed the machine, read straight from the dump.

Microsoft's procedure for stop 0x7E ends with "send the dump to support". The operator's first question
is simpler: which driver? `triage` answers it from a local file or a blob URL without WinDbg and without
downloading the dump: the header gives the stop code and its parameters, parameter 1 of a 0x7E is the
exception and parameter 2 the faulting instruction, and the loaded-module list (walked through the page
tables of a full or bitmap dump, or the driver list of a small dump) names the module that contains it.
A 4 GiB dump costs well under 2 MiB of reads.

Then the culprit, which is not always that module: a crash inside ntoskrnl on a driver's behalf is the
driver's fault. The crashing thread's stack is unwound from the dump alone (stackwalk.py: the CONTEXT or
trap frame the bugcheck parameters name, else the header's context record), and blame.py names the
first frame outside the Microsoft core set, as WinDbg's !analyze does with triage.ini. The unwinding
reads the stack pages and a few pages of the modules on it: tens to a few hundred KiB.

The verdict is data (`Verdict.to_dict`, `summary`, `next_step`); printing it is the `triage` verb's job
(scripts/cli/triage.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dissect.cstruct import cstruct

from scripts.dumpfile import BugcheckMeaning, Dump, DumpHeader, ModuleLookup, NotInDump, interpret, open_dump
from scripts.dumpfile.blame import BlameRules, Culprit, blame, is_windows_module
from scripts.dumpfile.bugcheck import ACCESS_KINDS
from scripts.dumpfile.context import bugcheck_record, header_context
from scripts.dumpfile.modules import is_placeholder
from scripts.dumpfile.stackwalk import Stack, StackWalker

Resolver = Callable[[Any, int], "str | None"]  # (LoadedModule, rva) -> "function+0x12" or None

_LAYOUTS = cstruct().load("""
struct EXCEPTION_RECORD64_HEAD {        /* EXCEPTION_RECORD64 up to ExceptionInformation[1] */
    uint32   ExceptionCode;             /* 0x00 */
    uint32   ExceptionFlags;            /* 0x04 */
    uint64   ExceptionRecord;           /* 0x08 chained record */
    uint64   ExceptionAddress;          /* 0x10 */
    uint32   NumberParameters;          /* 0x18 */
    uint32   _unusedAlignment;
    uint64   ExceptionInformation[2];   /* 0x20 access violation: access kind, accessed address */
};
""")
_EXCEPTION_RECORD = _LAYOUTS.EXCEPTION_RECORD64_HEAD


@dataclass(frozen=True)
class ExceptionRecord:
    """The EXCEPTION_RECORD a 0x7E's parameter 3 points at, when the dump holds it."""

    address: int
    code: int
    exception_address: int
    access: str | None  # access violations: read / write / execute
    accessed_address: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": f"{self.address:#x}",
            "code": f"{self.code:#010x}",
            "exception_address": f"{self.exception_address:#x}",
            "access": self.access,
            "accessed_address": None if self.accessed_address is None else f"{self.accessed_address:#x}",
        }


@dataclass(frozen=True)
class Verdict:
    source: str
    file_size: int
    header: DumpHeader
    bugcheck: BugcheckMeaning
    lookup: ModuleLookup | None
    exception_record: ExceptionRecord | None
    bytes_read: int
    requests: int
    seconds: float
    stack: Stack | None = None  # the crashing thread's frames, innermost first
    culprit: Culprit | None = None  # the first frame outside the core set (blame.py)
    stack_problem: str | None = None  # why there is no stack, when there is none
    symbols: dict[str, Any] | None = None  # what the symbol lookup did (Symbolizer.to_dict), with --symbols
    partial: str | None = None  # why the dump is incomplete past its header (Dump.partial): exit 21

    @property
    def frames(self):
        return self.stack.frames if self.stack else ()

    @property
    def culprit_module(self):
        return self.culprit.frame.module if self.culprit else None

    @property
    def module(self):
        return self.lookup.module if self.lookup else None

    @property
    def faulting_symbol(self) -> str | None:
        if self.module is None or self.bugcheck.faulting_address is None:
            return None
        return self.module.symbol(self.bugcheck.faulting_address)

    @property
    def access(self) -> tuple[str, int] | None:
        """(read/write/execute, address) of an access violation, from the record or the parameters."""
        record = self.exception_record
        if record and record.access and record.accessed_address is not None:
            return record.access, record.accessed_address
        if self.bugcheck.access and self.bugcheck.accessed_address is not None:
            return self.bugcheck.access, self.bugcheck.accessed_address
        return None

    @property
    def summary(self) -> str:
        b = self.bugcheck
        stop = f"{b.name or 'unknown stop code'} ({b.code:#x})"
        what = ""
        if b.exception_code is not None:
            what = f"{b.exception_symbol or 'exception'} ({b.exception_code:#010x})"
            access = self.access
            if access:
                what += f", {access[0]} at {access[1]:#x}"
        if self.faulting_symbol:
            return f"{stop}: {what + ' in ' if what else 'fault in '}{self.faulting_symbol}"
        if b.faulting_address is not None:
            where = f"at {b.faulting_address:#x}"
            if self.lookup and self.lookup.status == "not-in-any-module":
                where += ", which is in no loaded module"
            return f"{stop}: {what + ' ' if what else 'fault '}{where}"
        return stop

    @property
    def next_step(self) -> str:
        step = self._next_step()
        if self.partial:
            return f"{step}; the dump is incomplete ({self.partial}): collect or copy it again for a full analysis"
        return step

    def _next_step(self) -> str:
        culprit = self.culprit
        if culprit is not None and culprit.frame.module is not None:
            name = culprit.frame.module.name
            where = (f" (the fault itself is in {self.module.name}, a Windows component it called)"
                     if self.module is not None and self.module.name != name else "")
            found = f"{culprit.frame.symbol}, found by {culprit.frame.trust}"
            if is_placeholder(name):
                base = culprit.frame.module.base
                return (f"the first module on the crashing stack outside the Windows core ({found}){where} has no "
                        f"name in this dump: name it with WinDbg on the whole dump (`lm a {base:#x}`), or collect "
                        f"the dump again if this copy is incomplete; no driver can be disabled unnamed")
            if is_windows_module(name):
                return (f"{name}, a Windows driver, is the first module on the crashing stack outside the kernel and "
                        f"its dispatchers ({found}){where}: install the latest cumulative update once the VM boots, "
                        f"or send the dump to Microsoft support with this verdict (a third-party driver that "
                        f"corrupted memory earlier can crash a Windows one)")
            return (f"{name} is the first module on the crashing stack outside Windows ({found}){where}: install "
                    f"its vendor's fixed version, or disable it on the OS disk copy (repair VM) and restart the VM; "
                    f"keep the dump for the vendor")
        module = self.module
        if module is not None and is_placeholder(module.name):
            return (f"the fault is in a module whose name is not in this dump (base {module.base:#x}): name it with "
                    f"WinDbg on the whole dump (`lm a {module.base:#x}`), or collect the dump again if this copy is "
                    f"incomplete")
        if module is not None and not is_windows_module(module.name):
            return (f"{module.name} caused the crash: install its vendor's fixed version, or disable it on the "
                    f"OS disk copy (repair VM) and restart the VM; keep the dump for the vendor")
        if module is not None:
            return (f"the fault is in {module.name}, a Windows component: the cause is often a driver that "
                    f"corrupted memory earlier; send the dump to Microsoft support with this verdict")
        return "send the dump to support with this verdict; the faulting module could not be named from the dump"

    def to_dict(self) -> dict[str, Any]:
        module = None
        if self.module is not None:
            module = self.module.to_dict()
            if self.bugcheck.faulting_address is not None:
                module["offset"] = f"{self.bugcheck.faulting_address - self.module.base:#x}"
                module["symbol"] = self.faulting_symbol
        lookup = None
        if self.lookup is not None:
            lookup = {
                "status": self.lookup.status,
                "modules_seen": self.lookup.modules_seen,
                "list_complete": self.lookup.list_complete,
                "problem": self.lookup.problem,
            }
        access = self.access
        return {
            "source": self.source,
            "file_size": self.file_size,
            "dump": self.header.to_dict(),
            "bugcheck": self.bugcheck.to_dict(),
            "faulting_module": module,
            "module_lookup": lookup,
            "access": None if access is None else {"kind": access[0], "address": f"{access[1]:#x}"},
            "exception_record": self.exception_record.to_dict() if self.exception_record else None,
            "culprit": self.culprit.to_dict() if self.culprit else None,
            "stack": self.stack.to_dict() if self.stack else None,
            "stack_problem": self.stack_problem,
            "symbols": self.symbols,
            "partial": self.partial,
            "summary": self.summary,
            "next_step": self.next_step,
            "read": {"bytes": self.bytes_read, "requests": self.requests, "seconds": round(self.seconds, 3)},
        }




def triage(source: Any, credential: Any = None, *, unwind: bool = True, rules: BlameRules | None = None,
           resolve: Resolver | None = None, symbols: Any = None) -> Verdict:
    """Reads the verdict out of a dump: a path, a blob URL, or an open reader (see scripts.dumpfile).
    `credential` (a TokenCredential, or a factory called only when a blob URL without a SAS needs a
    token) is passed to scripts.base.rangeio. `unwind=False` skips the stack (the faulting module only);
    `rules` replaces the built-in core set (BlameRules.load); `symbols` (a symbol path, text or
    symbolpath.SymbolPath) names the frames' functions from public symbols (scripts.dumpfile.symbols)
    before blaming, as does any other `resolve(module, rva) -> "function+0x.." | None`."""
    start = time.monotonic()
    with open_dump(source, credential, allow_partial=True) as dump:
        header = dump.header
        meaning = interpret(header.bugcheck_code, header.bugcheck_parameters, header.bits)
        lookup = None
        if meaning.faulting_address is not None:
            lookup = dump.module_at(meaning.faulting_address)
        record = _exception_record(dump, meaning)
        stack = culprit = problem = symbolizer = None
        if unwind and symbols is not None and resolve is None:
            from scripts.dumpfile.symbols import Symbolizer

            symbolizer = Symbolizer(symbols, dump.read_virtual)
            resolve = symbolizer.function
        if unwind:
            stack, problem = _walk(dump, header.bugcheck_code, header.bugcheck_parameters, meaning.faulting_address,
                                    resolve)
            if stack is not None:
                culprit = blame(stack.frames, rules or BlameRules.load())
        return Verdict(
            source=dump.name, file_size=dump.size, header=header, bugcheck=meaning, lookup=lookup,
            exception_record=record, bytes_read=dump.bytes_read, requests=dump.requests,
            seconds=time.monotonic() - start, stack=stack, culprit=culprit, stack_problem=problem,
            symbols=symbolizer.to_dict() if symbolizer is not None else None,
            partial=dump.partial,  # read last: the lookups and the walk may find damage too
        )


def _walk(dump: Dump, code: int, parameters: tuple[int, ...], faulting_address: int | None,
          resolve: Resolver | None) -> tuple[Stack | None, str | None]:
    """The crashing thread's stack: from the CONTEXT/trap frame the bugcheck names if the dump holds it
    (it starts past the bugcheck machinery), else from the header's context record. A stack is data a
    crash may have corrupted: whatever it holds, the verdict survives, with the reason the stack is not
    there."""
    try:
        named = bugcheck_record(dump, code, parameters)
        if named is not None and faulting_address is not None and named.registers.rip != faulting_address:
            named = None  # not the record we were told about (its RIP is not the faulting address)
        starts = [point for point in (named, header_context(dump)) if point]
        if not starts:
            return None, "no x64 context record in this dump to start the stack from"
        walker = StackWalker(dump)
        best = None
        for point in starts:
            stack = walker.walk(point)
            if best is None or len(stack.frames) > len(best.frames):
                best = stack
            if len(stack.frames) > 1:
                break
        if resolve is not None and best is not None:
            best = best.with_functions(resolve)
        return best, None
    except Exception as err:  # noqa: BLE001 - a corrupt stack must not cost the verdict; the reason is reported
        logging.getLogger(__name__).debug("stack walk failed", exc_info=True)
        return None, f"the stack could not be walked: {type(err).__name__}: {err}"


def _exception_record(dump: Dump, meaning: BugcheckMeaning) -> ExceptionRecord | None:
    """The EXCEPTION_RECORD64 at parameter 3 of a 0x7E, used only if it agrees with parameters 1/2."""
    address = meaning.exception_record_address
    if address is None or dump.header.bits != 64:
        return None
    try:
        raw = _EXCEPTION_RECORD(dump.read_virtual(address, len(_EXCEPTION_RECORD)))
    except NotInDump:
        return None
    code, exception_address = int(raw.ExceptionCode), int(raw.ExceptionAddress)
    if code != meaning.exception_code or exception_address != meaning.faulting_address:
        return None  # not the record we were told about: say nothing rather than something wrong
    access = accessed = None
    if code == 0xC0000005 and raw.NumberParameters >= 2:
        kind, accessed = (int(value) for value in raw.ExceptionInformation)
        access = ACCESS_KINDS.get(kind)
        if access is None:
            accessed = None
    return ExceptionRecord(address, code, exception_address, access, accessed)
