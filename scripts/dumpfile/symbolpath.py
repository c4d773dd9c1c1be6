"""`--symbols`: the symbol path, in the syntax WinDbg, symchk and _NT_SYMBOL_PATH use.

Microsoft documents it in "Symbol path for Windows debuggers" and "Advanced SymSrv Use". The subset
read here, elements separated by `;` and searched left to right (the first that has the PDB wins):

    srv*<cache>*<url>          a symbol server (http/https), its files kept in <cache>
    srv*<url>                  the same, kept in the cache set by a `cache*` element to its left, or in
                               the default downstream store (HTTP always uses one, as SymSrv does)
    srv**<url>                 the same, kept in the default downstream store
    srv*<cache>*<mid>*<url>    cascading stores: <cache> is looked in first, then <mid>, then the server;
                               a file found further up is copied into every store below it
    srv*<dir> / srv*<cache>*<dir>   a symbol store directory (symstore layout), read as it is / copied
    srv*                       Microsoft's public symbol server, cached as srv*<url> is
    symsrv*symsrv.dll*...      the long form of srv*
    cache*<dir> / cache*       the cache for the srv* elements to its right that name none (the default store
                               when empty); a plain directory is read where it is
    <dir>                      a plain directory holding <name>.pdb (also <dir>/symbols/<ext>/, <dir>/<ext>/)

The default downstream store (SymSrv's `sym` folder under the debugger's home) is
`$XDG_CACHE_HOME/crashcart/sym` (`~/.cache/crashcart/sym`). Anything else - another symbol server DLL,
a URL that is not the last store of its chain, an FTP or file URL, a UNC share or drive-letter path on a
machine that is not Windows, a `*` in a plain directory - is refused with a usage error (exit 2) that
lists the forms above.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from scripts.base.errors import CrashcartError, ExitCode, printable

MS_PUBLIC_SYMBOLS = "https://msdl.microsoft.com/download/symbols"
SUPPORTED = ("srv*<cache>*<url>, srv*<url>, srv**<url>, srv*<cache>*<mid-level store>*<url>, srv*<store dir>, "
             "srv*<cache>*<store dir>, srv*, symsrv*symsrv.dll*..., cache*<dir>, cache*, <dir>; elements "
             "separated by ';'")
_WINDOWS_PATH = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")


class SymbolPathError(CrashcartError):
    exit_code = ExitCode.USAGE

    def __init__(self, element: str, problem: str):
        super().__init__(f"--symbols: {problem} in {printable(element)!r}; supported: {SUPPORTED}",
                         "fix the symbol path (e.g. srv*/var/cache/symbols*https://msdl.microsoft.com/download/"
                         "symbols) and re-run", ExitCode.USAGE)


def default_store() -> Path:
    """The default downstream store: SymSrv's `sym` folder, in this user's cache directory."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "crashcart" / "sym"


@dataclass(frozen=True)
class Store:
    """One srv* chain: local stores looked in first (bottom-most first; each found file is copied down
    into them) and the upstream store, a URL or a directory."""

    caches: tuple[Path, ...]
    upstream: str | Path

    @property
    def is_http(self) -> bool:
        return isinstance(self.upstream, str)

    def describe(self) -> str:
        return "srv*" + "*".join([*(str(c) for c in self.caches), str(self.upstream)])


@dataclass(frozen=True)
class Directory:
    """A plain directory of PDBs (not a symbol store)."""

    path: Path

    def describe(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class SymbolPath:
    text: str
    elements: tuple[Store | Directory, ...]

    @classmethod
    def parse(cls, text: str) -> "SymbolPath":
        if not isinstance(text, str) or not text.strip():
            raise SymbolPathError(str(text), "an empty symbol path")
        cache: Path | None = None
        elements: list[Store | Directory] = []
        for raw in text.split(";"):
            element = raw.strip()
            if not element:
                continue  # ';;' and a trailing ';' are tolerated, as the debuggers do
            head, star, rest = element.partition("*")
            keyword = head.strip().lower() if star else ""
            if keyword == "cache":
                if "*" in rest:
                    raise SymbolPathError(element, "cache* takes one directory")
                cache = _directory(element, rest) if rest.strip() else default_store()
            elif keyword in ("srv", "symsrv"):
                if keyword == "symsrv":
                    dll, _, rest = rest.partition("*")
                    if dll.strip().lower() != "symsrv.dll":
                        raise SymbolPathError(element, f"the symbol server DLL {dll.strip() or '(none)'!r} is not "
                                                       "supported (only symsrv.dll, i.e. srv*)")
                elements.append(_store(element, rest, cache))
            elif star or "://" in element:
                raise SymbolPathError(element, "an element that is neither srv*, symsrv*, cache* nor a directory"
                                      + (" (a URL needs srv*: srv*<cache>*<url>)" if "://" in element else ""))
            else:
                elements.append(Directory(_directory(element, element)))
        if not elements:
            raise SymbolPathError(text, "no symbol store or directory (a cache* alone looks nowhere)" if cache
                                  else "an empty symbol path")
        return cls(text, tuple(elements))

    def describe(self) -> str:
        return ";".join(e.describe() for e in self.elements)


def _store(element: str, rest: str, cache: Path | None) -> Store:
    tokens = [t.strip() for t in rest.split("*")]
    if tokens == [""]:  # srv*: the default symbol store
        return Store((cache or default_store(),), MS_PUBLIC_SYMBOLS)
    *downstream, last = tokens
    caches = []
    for token in downstream:
        if _is_url(token):
            raise SymbolPathError(element, f"the URL {token} is not the last store of its srv* chain (an HTTP store "
                                           "cannot be a cache)")
        caches.append(_directory(element, token) if token else default_store())
    if _is_url(last):
        upstream: str | Path = _url(element, last)
        if not caches:  # HTTP always goes through a downstream store
            caches.append(cache or default_store())
    else:
        upstream = _directory(element, last) if last else default_store()
        if not caches and cache is not None:  # cache*<dir> to the left caches what a store to its right gives
            caches.append(cache)
    return Store(tuple(caches), upstream)


def _is_url(token: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", token))


def _url(element: str, token: str) -> str:
    parts = urlsplit(token)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise SymbolPathError(element, f"{token} is not an http(s) URL with a host")
    if parts.username is not None or parts.password is not None:
        raise SymbolPathError(element.replace(token, "<url>"), "a URL with credentials (user:password@), which "
                              "would be printed in notes and reports; servers that need a login are not supported")
    if parts.query or parts.fragment:
        raise SymbolPathError(element.replace(token, "<url>"), "a symbol server URL with a query or fragment (a "
                              "token there would be printed in notes and reports)")
    return token.rstrip("/")


def _directory(element: str, token: str) -> Path:
    token = token.strip()
    if _is_url(token):
        raise SymbolPathError(element, f"{token} is a URL where a directory is expected")
    if os.name != "nt" and _WINDOWS_PATH.match(token):
        raise SymbolPathError(element, f"{token} is a Windows path (drive letter or \\\\server\\share), which this "
                                       "machine cannot open: give a local directory (mount a share first)")
    if "\0" in token:
        raise SymbolPathError(element, "a NUL character")
    return Path(os.path.expanduser(token))
