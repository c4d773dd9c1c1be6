"""The one way to read a file an operator names on the command line or in the environment.

The path is checked with os.stat before it is opened: a FIFO or a device would block the read forever,
a folder cannot be read. The text is UTF-8; a leading byte-order mark (Windows Notepad writes one) is
dropped; CRLF line ends are the reader's business (splitlines and the TOML and JSON parsers accept them).
Every refusal is a usage error (exit 2) naming the option the path came from.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from scripts.base.errors import CrashcartError, ExitCode, printable

MAX_BYTES = 16 * 1024 * 1024  # no file an operator hands the kit is larger: refuse a mistaken dump or image
BOM = "\ufeff"


def _shown(path: str | os.PathLike) -> str:
    return printable(str(path))[:300]


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or type(err).__name__


def require_file(path: str | os.PathLike, option: str, hint: str, what: str = "the file") -> os.stat_result:
    """The stat of `path`, refused (exit 2, naming `what` and `option`) when it is missing or not a regular
    file."""
    where = f"{what} {_shown(path)} ({option})"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CrashcartError(f"cannot read {where}: there is no such file", hint, ExitCode.USAGE) from None
    except (OSError, ValueError) as err:  # a name too long, a NUL byte, a loop of links, no permission
        raise CrashcartError(f"cannot read {where}: {_reason(err)}", hint, ExitCode.USAGE) from None
    if not stat.S_ISREG(info.st_mode):
        kind = "it is a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe, socket or device)"
        raise CrashcartError(f"cannot read {where}: {kind}", hint, ExitCode.USAGE)
    return info


def read_text(path: str | os.PathLike, option: str, hint: str, what: str = "the file",
              max_bytes: int = MAX_BYTES) -> str:
    """The UTF-8 text of the regular file `path` (a leading byte-order mark dropped); a usage error naming
    `what` and `option` when it is missing, not a regular file, too large, unreadable or not UTF-8."""
    info = require_file(path, option, hint, what)
    where = f"{what} {_shown(path)} ({option})"
    if info.st_size > max_bytes:
        raise CrashcartError(f"cannot read {where}: {info.st_size} bytes is too large (at most {max_bytes})",
                             hint, ExitCode.USAGE)
    try:
        with open(path, "rb") as handle:  # a regular file: the open cannot block
            raw = handle.read(max_bytes + 1)
    except OSError as err:
        raise CrashcartError(f"cannot read {where}: {_reason(err)}", hint, ExitCode.USAGE) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = printable(repr(raw[err.start:err.start + 4]))
        raise CrashcartError(f"cannot read {where}: not UTF-8 text (byte {err.start}: {bad})",
                             "save it as UTF-8 and re-run", ExitCode.USAGE) from None
    return text.removeprefix(BOM)


def require_folder(path: str | os.PathLike, option: str, *, create: bool = False) -> Path:
    """`path` as a folder: refused (exit 2, naming `option`) when it or a folder above it is a file, or
    (unless `create`, when the caller makes it) when it does not exist."""
    name = _shown(path)
    hint = f"pass a folder as {option}"
    current = Path(path)
    for candidate in (current, *current.parents):  # the nearest existing one must be a folder
        try:
            info = os.stat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (OSError, ValueError) as err:  # no permission, a name too long, a NUL byte
            raise CrashcartError(f"{option}: cannot use {name}: {_reason(err)}", hint, ExitCode.USAGE) from None
        if not stat.S_ISDIR(info.st_mode):
            what = f"{name} is a file, not a folder" if candidate == current else \
                f"{name} cannot be a folder: {_shown(candidate)} is a file"
            raise CrashcartError(f"{option}: {what}", hint, ExitCode.USAGE)
        break
    if candidate != current and not create:
        raise CrashcartError(f"{option}: the folder {name} does not exist", f"pass an existing folder as {option}",
                             ExitCode.USAGE)
    return current
