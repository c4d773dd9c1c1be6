"""Optional public symbols: frames named `contosoflt!FltWriteHelper+0x1a` instead of `contosoflt.sys+0x101a`.

Symbols are never required. Without `--symbols`, or when a PDB cannot be had, a frame keeps its
`module+offset` and `Symbolizer.notes` says why, one line per cause; nothing here raises for a
module, a server or a cache (only a malformed symbol path is a usage error, see symbolpath.py).

For each module a frame lands in, and only for those:
1. The CodeView record, from the image in dump memory: the PE headers' page at DllBase (pefile), the
   debug directory it names, the RSDS entry (PDB name, GUID, age): three reads, no more.
2. The symbol store key, as Microsoft's symstore writes it: `<pdb>/<GUID><age>/<pdb>`, the GUID as its
   Data1-Data3 fields (little-endian in the record) and Data4 bytes in upper-case hex without dashes, the
   age in hex without leading zeros (`contosoflt.pdb/21F7A884E089BE394C4C44205044422E1/contosoflt.pdb`).
3. The symbol path's elements left to right: local stores (the cache first), then the upstream store.
   A download goes to a temporary file beside its place in the cache, is checked (a PDB whose GUID
   and age are the record's) and only then renamed into place, so a cache never holds a partial or a
   wrong file; a second run finds it there and asks no server. A server that times out, refuses the
   connection or answers 5xx is not asked again in this run. A `.pd_` (CAB-compressed PDB) is detected
   and named in a note, not expanded (no CAB reader is installed).
4. The PDB's public symbols (and its debug info when it has some) through symbolic's symcache: the
   nearest symbol at or below the frame's RVA gives `function+0x..`, as WinDbg prints with public
   symbols. The kernel is `nt`, as in WinDbg; other modules are named without their extension.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pefile
import requests

from scripts.base.errors import first_line, printable
from scripts.dumpfile.errors import NotInDump
from scripts.dumpfile.modules import LoadedModule, debugger_name
from scripts.dumpfile.symbolpath import Directory, Store, SymbolPath

ReadVirtual = Callable[[int, int], bytes]

HEADER_PAGE = 0x1000
MAX_DEBUG_ENTRIES = 32
MAX_CODEVIEW = 0x400  # RSDS header (24 bytes) and a PDB path of at most MAX_PATH-ish length
MAX_PDB_BYTES = 1 << 30
DEFAULT_TIMEOUT = (5.0, 30.0)  # connect, between bytes (requests' meaning)
DEFAULT_DEADLINE = 300.0  # one download, start to end
PDB_MAGIC = b"Microsoft C/C++ MSF 7.00\r\n\x1aDS\0\0\0"
CAB_MAGIC = b"MSCF"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+\-$~()\[\]{}#@!,' ]{1,200}$")
_DEBUG_DIRECTORY = pefile.PE.__IMAGE_DEBUG_DIRECTORY_format__
_RSDS = ("CV_INFO_PDB70", ("4s,CvSignature", "16s,Signature", "I,Age"))
IMAGE_DEBUG_TYPE_CODEVIEW = 2


@dataclass(frozen=True)
class PdbId:
    """What a module's CodeView (RSDS) record says about its PDB."""

    name: str  # the file name only, as symstore keys it
    guid: uuid.UUID
    age: int

    @property
    def key(self) -> str:
        """`<GUID><age>` as symstore writes it (uuid's hex is Data1-Data3 as numbers, then Data4 bytes)."""
        return f"{self.guid.hex.upper()}{self.age:X}"

    @property
    def debug_id(self) -> str:
        """The same identity in symbolic's form (`guid-age`, lower case)."""
        return f"{self.guid}-{self.age:x}"

    @property
    def relative(self) -> str:
        return f"{self.name}/{self.key}/{self.name}"


class CodeViewMissing(Exception):
    """Why a module's PDB identity could not be read (a sentence for a note)."""


def read_codeview(read: ReadVirtual, base: int) -> PdbId:
    """The RSDS record of the image mapped at `base`, read from dump memory in three small reads."""
    try:
        headers = read(base, HEADER_PAGE)
    except NotInDump as err:
        raise CodeViewMissing(f"its PE header is not in the dump ({err.reason})") from None
    try:
        pe = pefile.PE(data=headers, fast_load=True)
        directory = pe.OPTIONAL_HEADER.DATA_DIRECTORY[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_DEBUG"]]
    except (pefile.PEFormatError, IndexError, AttributeError) as err:
        raise CodeViewMissing(f"its PE header is not valid ({first_line(err)})") from None
    entry_size = pefile.Structure(_DEBUG_DIRECTORY).sizeof()
    count = min(directory.Size // entry_size, MAX_DEBUG_ENTRIES)
    if directory.VirtualAddress == 0 or count == 0:
        raise CodeViewMissing("the image has no debug directory")
    try:
        table = read(base + directory.VirtualAddress, count * entry_size)
    except NotInDump as err:
        raise CodeViewMissing(f"its debug directory is not in the dump ({err.reason})") from None
    for index in range(count):
        entry = pefile.Structure(_DEBUG_DIRECTORY)
        entry.__unpack__(table[index * entry_size:(index + 1) * entry_size])
        if entry.Type != IMAGE_DEBUG_TYPE_CODEVIEW or not entry.AddressOfRawData:
            continue
        size = min(entry.SizeOfData, MAX_CODEVIEW)
        try:
            record = read(base + entry.AddressOfRawData, size)
        except NotInDump as err:
            raise CodeViewMissing(f"its CodeView record is not in the dump ({err.reason})") from None
        return _parse_rsds(record)
    raise CodeViewMissing("the image has no CodeView record (built without a PDB)")


def _parse_rsds(record: bytes) -> PdbId:
    rsds = pefile.Structure(_RSDS)
    if len(record) < rsds.sizeof() + 1 or record[:4] != b"RSDS":
        raise CodeViewMissing(f"its CodeView record is not RSDS (PDB 7.0) but {printable(repr(record[:4]))}")
    rsds.__unpack__(record[:rsds.sizeof()])
    path = record[rsds.sizeof():].split(b"\0", 1)[0].decode("utf-8", "replace")
    name = re.split(r"[\\/]", path)[-1]
    if not _SAFE_NAME.match(name) or name in (".", "..") or not name.lower().endswith(".pdb"):
        raise CodeViewMissing(f"its CodeView record names an unusable PDB file {printable(path)!r}")
    return PdbId(name, uuid.UUID(bytes_le=rsds.Signature), rsds.Age)


def short_name(module: LoadedModule) -> str:
    """The module as WinDbg names it in `module!function` (modules.debugger_name)."""
    return debugger_name(module.name)


def function_name(symbol: str) -> str:
    """The name WinDbg shows for a function: a PDB with private debug info gives symbolic the signature
    (`FltPreWrite(int)`, `Ns::Cls::Run(char *) const`); the parameter list and its qualifiers go, as
    public symbols have none. `operator()` keeps its own parentheses."""
    text = re.sub(r"(?:\s+(?:const|volatile|&&|&)|\s*(?:__ptr64|noexcept))+$", "", symbol.strip())
    if not text.endswith(")"):
        return symbol
    depth = 0
    for index in range(len(text) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(text[index], 0)
        if depth == 0:
            head = text[:index].rstrip()
            return head if head and not head.endswith("operator") else symbol
    return symbol


class _Unavailable(Exception):
    """A store could not be asked (a sentence for a note); `final` when it should not be asked again."""

    def __init__(self, message: str, final: bool):
        super().__init__(message)
        self.final = final


class Symbolizer:
    """Names addresses inside modules from their public symbols. Use one per dump (it caches per module).

    `notes` holds one line per reason a module's frames stayed without names; `requests` and
    `downloaded` count the HTTP traffic."""

    def __init__(self, symbol_path: SymbolPath | str, read: ReadVirtual, *,
                 timeout: float | tuple[float, float] = DEFAULT_TIMEOUT, deadline: float = DEFAULT_DEADLINE,
                 session: requests.Session | None = None):
        """`symbol_path`: the --symbols text (SymbolPathError, exit 2, when malformed: parse it before opening
        the dump) or a parsed SymbolPath. `read`: Dump.read_virtual. `timeout`: seconds to connect and
        between bytes (one number for both); `deadline`: seconds for one whole download."""
        self.path = symbol_path if isinstance(symbol_path, SymbolPath) else SymbolPath.parse(symbol_path)
        self._read = read
        self._timeout = timeout if isinstance(timeout, tuple) else (float(timeout), float(timeout))
        self._deadline = deadline
        self._session = session
        self._dead: dict[str, str] = {}  # upstream URL -> why it is not asked again
        self._modules: dict[int, Any] = {}  # module base -> symcache, or None when unavailable
        self.status: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.requests = 0
        self.downloaded = 0

    # -- public -----------------------------------------------------------------------------------

    def name(self, module: LoadedModule, address: int) -> str | None:
        """`module!function+0x..` for `address` (None when the module's symbols are not available)."""
        function = self.function(module, address - module.base)
        return None if function is None else f"{short_name(module)}!{function}"

    def function(self, module: LoadedModule, rva: int) -> str | None:
        """`function+0x..` for an offset into `module` (the resolver Stack.with_functions takes)."""
        found = self.lookup(module, module.base + rva)
        return None if found is None else found[0] + (f"+{found[1]:#x}" if found[1] else "")

    def lookup(self, module: LoadedModule, address: int) -> tuple[str, int] | None:
        """(function, offset from its start) for `address` inside `module`, or None."""
        if not module.contains(address):
            return None
        symcache = self._symcache(module)
        if symcache is None:
            return None
        hits = symcache.lookup(address - module.base)
        if not hits:
            return None
        outer = hits[-1]  # innermost inlinee first; the last is the function the code belongs to
        return function_name(outer.symbol), address - module.base - outer.sym_addr

    def to_dict(self) -> dict[str, Any]:
        return {"symbol_path": self.path.describe(), "modules": self.status, "notes": list(self.notes),
                "requests": self.requests, "downloaded_bytes": self.downloaded}

    # -- per module -------------------------------------------------------------------------------

    def _symcache(self, module: LoadedModule) -> Any:
        if module.base in self._modules:
            return self._modules[module.base]
        self._modules[module.base] = None
        label = module.name
        try:
            pdb = read_codeview(self._read, module.base)
        except CodeViewMissing as err:
            self._note(label, "no-codeview", f"no symbols for {label}: {err}")
            return None
        self.status[label] = {"pdb": pdb.name, "key": pdb.key, "status": None}
        looked: list[str] = []
        for element in self.path.elements:
            symcache = self._from_element(element, pdb, label, looked)
            if symcache is not None:
                self.status[label]["status"] = "loaded"
                self._modules[module.base] = symcache
                return symcache
        if self.status[label]["status"] not in ("server-failed", "compressed"):
            self._note(label, "not-found", f"no symbols for {label}: {pdb.relative} was not found (looked in "
                                           f"{', '.join(looked)}); its frames stay module+offset")
        return None

    def _from_element(self, element: Store | Directory, pdb: PdbId, label: str, looked: list[str]) -> Any:
        if isinstance(element, Directory):
            looked.append(str(element.path))
            ext = label.rsplit(".", 1)[-1].lower() if "." in label else "sys"
            for candidate in (element.path / "symbols" / ext / pdb.name, element.path / ext / pdb.name,
                              element.path / pdb.name, _in_store(element.path, pdb)):
                if candidate is not None and candidate.is_file():
                    symcache = self._load(candidate, pdb, label)
                    if symcache is not None:
                        return symcache
            return None
        stores = list(element.caches) + ([] if element.is_http else [element.upstream])
        for index, store in enumerate(stores):
            looked.append(str(store))
            found = _in_store(store, pdb)
            symcache = self._load(found, pdb, label) if found is not None else None
            if symcache is not None:
                for lower in stores[:index]:  # a file found further up is kept in every store below it
                    self._keep(found, lower, pdb, label)
                return symcache
        if not element.is_http:
            return None
        url = str(element.upstream)
        looked.append(url)
        if url in self._dead:
            return None
        try:
            return self._download(url, pdb, element.caches, label)
        except _Unavailable as err:
            if err.final:
                self._dead[url] = str(err)
            self._note(label, "server-failed", f"no symbols for {label} from {url}: {err}"
                       + ("; not asked again in this run" if err.final else ""))
            return None

    def _load(self, path: Path, pdb: PdbId, label: str, shown: str | None = None) -> Any:
        """The symcache of the PDB at `path` if it is the one the image was built with (else a note)."""
        from symbolic.debuginfo import Archive
        from symbolic.exceptions import SymbolicError

        shown = shown or str(path)
        try:
            with open(path, "rb") as handle:
                magic = handle.read(len(PDB_MAGIC))
            if magic != PDB_MAGIC:
                self._note(label, "not-a-pdb", f"{shown} is not a PDB (MSF 7.00) file; ignored")
                return None
            archive = Archive.open(str(path))
            ids = []
            for obj in archive.iter_objects():
                if obj.debug_id.lower() == pdb.debug_id:
                    return obj.make_symcache()
                ids.append(obj.debug_id)
        except (OSError, SymbolicError) as err:
            self._note(label, "unreadable", f"{shown} could not be read as a PDB ({first_line(err)}); ignored")
            return None
        self._note(label, "mismatch", f"{shown} does not match {label}: the image was built with {pdb.key}, the "
                                      f"PDB is {', '.join(ids) or 'without an identity'}; ignored")
        return None

    # -- stores -----------------------------------------------------------------------------------

    def _download(self, url: str, pdb: PdbId, caches: tuple[Path, ...], label: str) -> Any:
        """Fetches `<url>/<pdb>/<key>/<pdb>`, checks it, and only then renames it into the first cache
        (then copies it into the others). A cache that cannot be written only costs the keeping."""
        pdb_url = f"{url}/{quote(pdb.name)}/{pdb.key}/{quote(pdb.name)}"
        cache: Path | None = caches[0]
        try:
            cache.mkdir(parents=True, exist_ok=True)
            spool = tempfile.NamedTemporaryFile(dir=cache, prefix=f".{pdb.name}.partial-", delete=False)
        except OSError as err:
            self._note(label, "cache-write", f"the symbol cache {cache} cannot be written ({first_line(err)}); "
                                             "symbols are used without keeping them")
            spool = tempfile.NamedTemporaryFile(prefix="crashcart-pdb-", delete=False)
            cache = None
        partial = Path(spool.name)
        try:
            with spool:
                found = self._get_into(pdb_url, spool)
            if not found:
                compressed = f"{url}/{quote(pdb.name)}/{pdb.key}/{quote(pdb.name[:-1] + '_')}"
                if self._probe_cab(compressed):
                    self._note(label, "compressed", f"no symbols for {label}: {url} has only the compressed "
                               f"{pdb.name[:-1]}_ (CAB), which crashcart does not expand; expand it (cabextract, or "
                               f"expand.exe on Windows) to <cache>/{pdb.relative} and re-run")
                return None
            symcache = self._load(partial, pdb, label, shown=pdb_url)
            if symcache is None or cache is None:
                return symcache
            target = cache / pdb.name / pdb.key / pdb.name
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(partial, target)
            except OSError as err:
                self._note(label, "cache-write", f"{pdb.name} could not be kept in {cache} ({first_line(err)})")
                return symcache
            for other in caches[1:]:
                self._keep(target, other, pdb, label)
            return symcache
        finally:
            partial.unlink(missing_ok=True)

    def _get_into(self, url: str, handle: Any) -> bool:
        """GET `url` into `handle`: False on 404, _Unavailable for any other failure."""
        started = time.monotonic()
        try:
            self.requests += 1
            with self._http().get(url, stream=True, timeout=self._timeout) as response:
                if response.status_code == 404:
                    return False
                if response.status_code != 200:
                    final = response.status_code >= 500 or response.status_code in (401, 403, 429)
                    raise _Unavailable(f"HTTP {response.status_code} {response.reason or ''}".strip()
                                       + f" for {url}", final)
                size = 0
                for chunk in response.iter_content(1 << 16):
                    size += len(chunk)
                    if size > MAX_PDB_BYTES:
                        raise _Unavailable(f"{url} is larger than {MAX_PDB_BYTES >> 20} MiB; not used", False)
                    if time.monotonic() - started > self._deadline:
                        raise _Unavailable(f"{url} took longer than {self._deadline:g} s to download", True)
                    handle.write(chunk)
                self.downloaded += size
                return True
        except requests.Timeout as err:
            raise _Unavailable(f"no answer within {self._timeout[1]:g} s ({first_line(err)})", True) from None
        except requests.RequestException as err:
            raise _Unavailable(f"the request failed ({first_line(err)})", True) from None
        except OSError as err:
            raise _Unavailable(f"the download could not be written ({first_line(err)})", True) from None

    def _probe_cab(self, url: str) -> bool:
        try:
            self.requests += 1
            with self._http().get(url, stream=True, timeout=self._timeout) as response:
                return response.status_code == 200 and response.raw.read(4) == CAB_MAGIC
        except (requests.RequestException, OSError):
            return False

    def _keep(self, source: Path, store: Path, pdb: PdbId, label: str) -> None:
        """Copies a PDB into a (further downstream) store, atomically; a store that cannot be written is noted."""
        target = store / pdb.name / pdb.key / pdb.name
        if target.is_file():
            return
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".partial-", delete=False) as handle:
                partial = Path(handle.name)
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, handle)
            os.replace(partial, target)
        except OSError as err:
            if "partial" in locals():
                partial.unlink(missing_ok=True)
            self._note(label, "cache-write", f"{pdb.name} could not be kept in {store} ({first_line(err)})")

    def _http(self) -> requests.Session:
        if self._session is None:
            self._session = requests.Session()
            self._session.headers["User-Agent"] = "crashcart-symbols"
        return self._session

    def _note(self, label: str, state: str, text: str) -> None:
        self.status.setdefault(label, {})["status"] = state
        if text not in self.notes:
            self.notes.append(text)


def _in_store(store: Path, pdb: PdbId) -> Path | None:
    """`<store>/<pdb>/<key>/<pdb>`; a store copied from Windows may differ in case, which is matched too."""
    exact = store / pdb.name / pdb.key / pdb.name
    if exact.is_file():
        return exact
    try:
        names = _casefold_child(store, pdb.name)
        keys = _casefold_child(names, pdb.key) if names else None
        found = _casefold_child(keys, pdb.name) if keys else None
    except OSError:
        return None
    return found if found is not None and found.is_file() else None


def _casefold_child(directory: Path, name: str) -> Path | None:
    if not directory.is_dir():
        return None
    wanted = name.casefold()
    for child in directory.iterdir():
        if child.name.casefold() == wanted:
            return child
    return None
