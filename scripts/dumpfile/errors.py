"""The two ways reading a dump goes wrong, kept apart on purpose.

`BadDump` is the operator's problem: the file is not a kernel dump, or it is truncated, corrupt or
encrypted. It is a CrashcartError (exit 20, BAD_DUMP) with a message naming what is wrong and a hint.

`NotInDump` is the dump format's normal limit: a kernel or small dump leaves most of memory out, so a
page table, a list entry or a name may simply not be there. Readers catch it and report what they could
not resolve instead of failing the whole triage.
"""

from __future__ import annotations

from scripts.base.errors import CrashcartError, ExitCode

BAD_DUMP_HINT = "check that this is the MEMORY.DMP (or a \\Windows\\Minidump\\*.dmp) from the broken VM and that its copy completed"


class BadDump(CrashcartError):
    exit_code = ExitCode.BAD_DUMP

    def __init__(self, message: str, hint: str = BAD_DUMP_HINT):
        super().__init__(message, hint, ExitCode.BAD_DUMP)


class NotInDump(Exception):
    """An address the dump does not contain (or does not map); `reason` says which step failed."""

    def __init__(self, address: int, reason: str):
        super().__init__(f"{address:#x}: {reason}")
        self.address = address
        self.reason = reason
