"""The one way reading a Windows disk without mounting it fails for the operator.

A disk that can be read but not understood (no partition table, no Windows volume, BitLocker, a damaged
hive) is `ExtractError`: a CrashcartError whose message says what was found and whose hint says what to
do next (usually: the rescue-vm strategy, which mounts the disk copy on a VM instead). It lives apart
from the readers so that each structure module (disk, ntfs, hive) can raise it and extract.py can
orchestrate them without an import loop.

`damaged()` names what the dissect parsers raise when the bytes do not hold the structure they parse: each
reader catches exactly that, where it calls dissect, and says which structure is damaged. Anything else
(a CrashcartError from the range reader: the network, a refused SAS) passes through with its own exit code.
"""

from __future__ import annotations

import functools
import struct

from scripts.base.errors import CrashcartError, ExitCode

DAMAGED_HINT = ("the disk's file system is damaged; collect with repair.strategy = \"rescue-vm\" (Windows reads "
                "what it can, and chkdsk on the disk copy can repair the rest)")


class ExtractError(CrashcartError):
    """The disk could be read but not understood (no Windows volume, encrypted, corrupt)."""

    exit_code = ExitCode.DISK_NOT_FOUND


@functools.cache
def damaged() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "these bytes are not a valid structure": dissect's own errors, and the plain
    ones its parsers let through on damaged data (a short read: EOFError, struct.error; an offset or count
    out of range: IndexError, KeyError, ValueError, OverflowError, ZeroDivisionError; a cycle: RecursionError;
    a cell type it does not know: NotImplementedError; an offset that leads to a structure of another kind, a
    key node where dissect.regf expects a subkey list, an index entry without the attribute dissect.ntfs
    expects: AttributeError, TypeError). Only ever caught around calls into dissect."""
    from dissect.cstruct.exceptions import Error as CstructError
    from dissect.ntfs.exceptions import Error as NtfsError
    from dissect.regf.exceptions import Error as RegfError
    from dissect.util.exceptions import Error as UtilError
    from dissect.volume.exceptions import Error as VolumeError

    return (NtfsError, RegfError, CstructError, UtilError, VolumeError, EOFError, struct.error, IndexError,
            KeyError, ValueError, OverflowError, ZeroDivisionError, RecursionError, NotImplementedError,
            AttributeError, TypeError)
