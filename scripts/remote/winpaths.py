"""Which paths of the broken Windows are on its OS volume, and where: the one rule, as data.

CrashControl names its files as Windows does (`%SystemRoot%\\MEMORY.DMP`, `C:\\CrashDumps\\web-01.dmp`,
`\\??\\C:\\pagefile.sys`, `\\SystemRoot\\Minidump`), but nothing that reads them runs on that Windows:
the snapshot export reads the volume over HTTP, the rescue VM's scripts see it as some other drive or a
mount point. Each of them has to turn such a path into a path on the broken volume, and refuse one that
is elsewhere (D: is Azure's temporary disk, not part of the snapshot). The rule is written once, here,
as the table `PREFIXES`; `volume_path` applies it in Python, and the remote templates get the same table
rendered into them as data (`_winpaths.sh.j2`, `_winpaths.ps1.j2`) with a small function that reads it,
so the Python, bash and PowerShell readers cannot drift apart. tests/remote/test_winpaths.py holds one
table of cases that all three answer.

The rule, with Windows' semantics:
1. '/' is a separator like '\\' (Win32 accepts both);
2. a leading `\\??\\` is dropped: it is the NT object namespace's folder of DOS drive letters, as
   PagingFiles writes `\\??\\C:\\pagefile.sys`;
3. the first row of `PREFIXES` that starts the path (ASCII letters compared case-insensitively, as
   Windows compares these names) replaces its prefix with the folder it stands for. An environment
   variable is text, replaced as is (`%SystemRoot%x` is `C:\\Windowsx`); a drive or an NT link is a
   whole path component, so it must be followed by '\\' or end the path (`C:x` is relative to a current
   directory, `\\SystemRootX` is another object). Anything else is not on the OS volume;
4. the result is split at '\\'; empty and '.' components are dropped, and '..' refuses the path (it
   could climb out of the volume or of the folder it names).

The broken Windows is taken to live on C: (its %SystemDrive%), as every Azure Windows image does.
"""

from __future__ import annotations

from dataclasses import dataclass

# Windows' own defaults when CrashControl leaves a value empty, and where the page file always is.
DEFAULT_DUMP_FILE = r"%SystemRoot%\MEMORY.DMP"
DEFAULT_MINIDUMP_DIR = r"%SystemRoot%\Minidump"
PAGEFILE = r"%SystemDrive%\pagefile.sys"
# Where prepare-dump puts a dedicated dump file when the page file cannot hold the dump (the kit's choice).
DEDICATED_DUMP_FILE = r"C:\DedicatedDump.sys"

NT_DOS_DEVICES = "\\??\\"

# A path the kit writes into the registry (prepare-dump's DumpFile, DedicatedDumpFile): what Win32 and
# the Run Command parameter transport both carry safely. Control characters are refused as well.
PARAMETER_LENGTH = (4, 240)
PARAMETER_FORBIDDEN = '"*?<>|'


@dataclass(frozen=True)
class Prefix:
    """A way a path of the broken VM may start: `prefix` stands for `folder` on the broken volume ('' is
    its root). `whole_component`: the prefix must be followed by '\\' or end the path."""

    prefix: str
    folder: str
    whole_component: bool


PREFIXES: tuple[Prefix, ...] = (
    Prefix("%SystemRoot%", "Windows", False),
    Prefix("%WinDir%", "Windows", False),
    Prefix("%SystemDrive%", "", True),  # expands to "C:": "%SystemDrive%x" would be the relative "C:x"
    Prefix("\\SystemRoot", "Windows", True),  # the NT object link the kernel resolves to the Windows folder
    Prefix("C:", "", True),
)


@dataclass(frozen=True)
class Split:
    """A path matched by the rule: the folder its prefix stands for, and the text after the prefix."""

    folder: str
    tail: str


def _same_ascii(text: str, prefix: str) -> bool:
    """Case-insensitive for ASCII letters only: the bash and PowerShell readers compare the same way, and a
    non-ASCII look-alike (e.g. 'ſ' for 's') is never taken for a prefix."""
    return text.isascii() and text.lower() == prefix.lower()


def split(windows_path: str) -> Split | None:
    """Steps 1-3 of the rule: the matching prefix's folder and the rest, or None (not on the OS volume)."""
    path = windows_path.replace("/", "\\")
    if path.startswith(NT_DOS_DEVICES):
        path = path[len(NT_DOS_DEVICES):]
    for row in PREFIXES:
        head, tail = path[:len(row.prefix)], path[len(row.prefix):]
        if not _same_ascii(head, row.prefix):
            continue
        if row.whole_component and tail and not tail.startswith("\\"):
            continue
        return Split(row.folder, tail)
    return None


def volume_path(windows_path: str) -> str | None:
    """A Windows path of the broken VM as a '/'-separated path on its OS volume ('' for the volume's
    root), or None when it is not on that volume or leaves it ('..')."""
    found = split(windows_path)
    if found is None:
        return None
    parts = [part for part in (found.folder + found.tail).split("\\") if part not in ("", ".")]
    if ".." in parts:
        return None
    return "/".join(parts)


def file_path(windows_path: str) -> str | None:
    """`volume_path` of a path that names a file: something follows the prefix, and its last component is
    a name (not empty, not '.'). None otherwise."""
    found = split(windows_path)
    rel = volume_path(windows_path)
    if found is None or rel is None or found.tail.split("\\")[-1] in ("", "."):
        return None
    return rel


def parameter_path(value: str) -> str | None:
    """`file_path` of a path the kit hands to a remote script to write into the registry, which must also
    be 4-240 characters without control characters or any of `PARAMETER_FORBIDDEN`; None when it is not."""
    low, high = PARAMETER_LENGTH
    if not low <= len(value) <= high:
        return None
    if any(ord(c) < 0x20 or c in PARAMETER_FORBIDDEN for c in value):
        return None
    return file_path(value)
