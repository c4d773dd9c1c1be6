"""Windows kernel crash dumps, read without WinDbg and without downloading them.

Each module owns one on-disk structure, written down as C for dissect.cstruct where it has fields:
    header.py     DUMP_HEADER64 / DUMP_HEADER32: type, bugcheck, machine, time, size checks
    physical.py   where a physical page is in the file: run list (full) or bitmap (kernel/complete)
    paging.py     page-table walks: x64 4-level (2 MiB and 1 GiB pages), x86 2-level and x86 PAE
    smalldump.py  TRIAGE_DUMP64, the table of contents of a \\Windows\\Minidump file
    modules.py    PsLoadedModuleList (KLDR_DATA_TABLE_ENTRY) and the small dump's driver list
    bugcheck.py   stop-code and exception-code names (bugcheck_codes.json: every code Microsoft documents),
                  and what each parameter means
    dump.py       `open_dump`: the validated whole (`allow_partial`: what a damaged dump still holds)
    pe.py         a module's PE image read from dump memory: headers, RUNTIME_FUNCTION, UNWIND_INFO
    unwind.py     x64 unwinding of one frame (every UWOP code, chained info, epilogs)
    context.py    where a walk starts: CONTEXT, KTRAP_FRAME, MACHINE_FRAME
    stackwalk.py  the crashing thread's frames: unwind info -> frame pointer -> scan, each frame tagged
    blame.py      the culprit: the first frame outside the core set (blame_core.txt, triage.ini syntax)
    symbolpath.py, symbols.py  optional public symbols (`srv*cache*url`) read with symbolic
    triage.py     `triage`: the verdict (stop code, exception, faulting module, culprit); the verb is
                  scripts/cli/triage.py

Public API: `open_dump(source) -> Dump`, `read_header(source) -> DumpHeader`, `DumpHeader.parse(bytes)`.
A source is a local path, a blob URL (SAS or Azure AD), a scripts.base.rangeio reader or a binary file object.
"""

from scripts.dumpfile.bugcheck import BugcheckMeaning, bugcheck_name, exception_name, interpret
from scripts.dumpfile.dump import Dump, ModuleLookup, open_dump
from scripts.dumpfile.errors import BadDump, NotInDump
from scripts.dumpfile.header import DumpHeader, DumpType, read_header
from scripts.dumpfile.modules import LoadedModule

__all__ = [
    "BadDump", "BugcheckMeaning", "Dump", "DumpHeader", "DumpType", "LoadedModule", "ModuleLookup", "NotInDump",
    "bugcheck_name", "exception_name", "interpret", "open_dump", "read_header",
]
