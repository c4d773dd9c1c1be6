"""The one way reading a Windows disk without mounting it fails for the operator.

A disk that can be read but not understood (no partition table, no Windows volume, BitLocker, a damaged
hive) is `ExtractError`: a CrashcartError whose message says what was found and whose hint says what to
do next (usually: the rescue-vm strategy, which mounts the disk copy on a VM instead). It lives apart
from the readers so that each structure module (disk, hive) can raise it and extract.py can orchestrate
them without an import loop.
"""

from __future__ import annotations

from scripts.base.errors import CrashcartError, ExitCode


class ExtractError(CrashcartError):
    """The disk could be read but not understood (no Windows volume, encrypted, corrupt)."""

    exit_code = ExitCode.DISK_NOT_FOUND
