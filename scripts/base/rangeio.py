"""Seekable, read-only file objects over a local file or an Azure blob, fetching only what is read.

A memory dump is as large as the VM's RAM, and the answer an operator wants (which driver crashed the
machine) sits in a few kilobytes of it: the header, the page tables on the way to the loaded-module list,
a handful of list entries. So the dump is never downloaded. `open_source()` returns an `io.RawIOBase`
that turns reads into HTTP range requests against the blob (or `pread` on a local file), keeps what it
fetched in a small block cache, and counts every byte it actually fetched (`bytes_read`, `requests`):
the benchmark and the tests hold the triage to that number.

The same object serves every reader that needs random access to something big and remote: the dump
triage, the collection report, and dissect.ntfs reading a disk snapshot through its SAS URL.

Authentication, in the order it is tried:
- a URL carrying a SAS (`sig=` in the query) is used as is, with no other credential;
- otherwise an Azure AD bearer token for Storage (`https://storage.azure.com/.default`) from the given
  credential (a TokenCredential, or a factory returning one that is called only when a token is needed;
  the caller decides, usually `scripts.azure.clients.credential`). A token is only ever sent over HTTPS
  and only to an Azure Storage host (scripts.base.endpoints); a plain-HTTP loopback URL (Azurite) is read
  anonymously, and any other URL without a SAS is refused.

Every request after the first carries `If-Match` with the blob's ETag: if the blob is replaced while it
is being read (a collection still uploading, say), the read fails loudly instead of mixing two versions.
"""

from __future__ import annotations

import io
import os
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.base.endpoints import STORAGE_SCOPE, STORAGE_TOKEN_HOSTS, is_loopback
from scripts.base.errors import CrashcartError, ExitCode

DEFAULT_BLOCK_SIZE = 4096  # one page: dump readers jump between pages, larger blocks would waste bytes
DEFAULT_CACHE_BYTES = 16 << 20
FIRST_READ = 0x3000  # the first request fetches this much: a 64-bit dump header and what follows it
STORAGE_API_VERSION = "2021-08-06"
# Azure AD tokens go only to these hosts (public, US Government and China clouds)
TOKEN_HOST_SUFFIXES = STORAGE_TOKEN_HOSTS
_RETRIES = 3  # transient failures (connection errors, 5xx, 429) are retried this many times
_BACKOFF = 0.5  # seconds before the first retry, doubling each time


def open_source(path_or_url: str | os.PathLike[str], credential: Any = None, *,
                block_size: int = DEFAULT_BLOCK_SIZE, cache_bytes: int = DEFAULT_CACHE_BYTES,
                extra_headers: Callable[[], dict[str, str]] | None = None) -> "RangeReader":
    """Opens a local path or an http(s) blob URL for random-access reading.

    `extra_headers()` is called for every HTTP request and its headers are added (e.g. a managed disk's
    Azure AD token, which goes beside the export SAS when the disk's dataAccessAuthMode requires it).

    Raises CrashcartError with an operator-facing message for a missing file (USAGE), a missing blob
    (AZURE_NOT_FOUND), a refused request (AZURE_AUTH) or an unreachable endpoint (AZURE_FAILED).
    """
    text = os.fspath(path_or_url)
    if text.startswith(("http://", "https://")):
        backend: _Backend = _HttpBackend(text, credential, extra_headers)
    elif "://" in text:
        raise CrashcartError(
            f"cannot read '{_redact(text)}': only local paths and http(s) blob URLs are supported",
            "give a path, or the blob's https URL (with a SAS, or after `az login`)", ExitCode.USAGE,
        )
    else:
        backend = _FileBackend(Path(text))
    return RangeReader(backend, block_size=block_size, cache_bytes=cache_bytes)


class RangeReader(io.RawIOBase):
    """A read-only, seekable binary file over a `_Backend`, with a block cache and fetch counters.

    `read_at(offset, size)` reads without moving the file position (what parsers jumping around a
    dump want); `read`/`readinto`/`seek`/`tell` make it a normal file object for libraries.
    """

    def __init__(self, backend: "_Backend", *, block_size: int = DEFAULT_BLOCK_SIZE,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        super().__init__()
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError("block_size must be a power of two")
        self._backend = backend
        self._block = block_size
        self._max_blocks = max(1, cache_bytes // block_size)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._pos = 0
        for offset, data in backend.prefetched():
            self._store_range(offset, data)

    # -- what callers measure ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Where the bytes come from, safe to print (a SAS signature is never shown)."""
        return self._backend.name

    @property
    def size(self) -> int:
        return self._backend.size

    @property
    def bytes_read(self) -> int:
        """Bytes actually fetched from the file or the network (cache hits cost nothing)."""
        return self._backend.bytes_read

    @property
    def requests(self) -> int:
        """Reads issued to the file or the network (HTTP range requests for a URL)."""
        return self._backend.requests

    # -- io.RawIOBase -----------------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def write(self, data: Any) -> int:
        raise io.UnsupportedOperation(f"{self.name} is opened read-only")

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation(f"{self.name} is opened read-only")

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END:
            target = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        self._pos = target
        return target

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read_at(self._pos, len(view))
        view[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        data = self.read_at(self._pos, size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        data = self.read_at(self._pos, max(0, self.size - self._pos))
        self._pos += len(data)
        return data

    def close(self) -> None:
        if not self.closed:
            self._backend.close()
            self._cache.clear()
        super().close()

    # -- random access ----------------------------------------------------------------------------

    def read_at(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`; fewer only when the end of the file is reached."""
        self._check_open()
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        end = min(offset + size, self.size)
        if end <= offset:
            return b""
        first, last = offset // self._block, (end - 1) // self._block
        blocks: dict[int, bytes] = {}
        missing: list[int] = []
        for index in range(first, last + 1):
            cached = self._cache.get(index)
            if cached is None:
                missing.append(index)
            else:
                self._cache.move_to_end(index)
                blocks[index] = cached
        # one request per run of consecutive missing blocks
        run_start = 0
        for i in range(1, len(missing) + 1):
            if i == len(missing) or missing[i] != missing[i - 1] + 1:
                lo, hi = missing[run_start], missing[i - 1]
                start = lo * self._block
                length = min((hi + 1) * self._block, self.size) - start
                data = self._backend.fetch(start, length)
                blocks.update(self._store_range(start, data))
                run_start = i
        joined = b"".join(blocks[index] for index in range(first, last + 1))
        skip = offset - first * self._block
        return joined[skip:skip + end - offset]

    def _store_range(self, start: int, data: bytes) -> dict[int, bytes]:
        stored = {}
        for at in range(0, len(data), self._block):
            index = (start + at) // self._block
            block = data[at:at + self._block]
            if len(block) < self._block and start + at + len(block) < self.size:
                break  # a partial block that is not the file's last: do not cache it
            stored[index] = block
            self._cache[index] = block
            self._cache.move_to_end(index)
        while len(self._cache) > self._max_blocks:
            self._cache.popitem(last=False)
        return stored

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def __repr__(self) -> str:
        return f"<RangeReader {self.name} size={self.size} bytes_read={self.bytes_read}>"


class _Backend:
    """Fetches exact byte ranges and counts them."""

    name: str
    size: int

    def __init__(self) -> None:
        self.bytes_read = 0
        self.requests = 0

    def fetch(self, offset: int, length: int) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def prefetched(self) -> list[tuple[int, bytes]]:
        return []

    def close(self) -> None:
        pass


class _FileBackend(_Backend):
    def __init__(self, path: Path):
        super().__init__()
        self.name = str(path)
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            raise CrashcartError(
                f"no such file: {path}",
                "check the path; a dump in Azure storage is read by its blob URL (with a SAS, or after `az login`)",
                ExitCode.USAGE,
            ) from None
        except IsADirectoryError:
            raise CrashcartError(f"{path} is a directory, not a dump file", "give the path of the .dmp file",
                                 ExitCode.USAGE) from None
        except PermissionError:
            raise CrashcartError(f"permission denied reading {path}",
                                 "run as a user who can read the file, or copy it somewhere readable",
                                 ExitCode.USAGE) from None
        stat = os.fstat(self._fd)
        if not _is_regular_or_device(stat.st_mode):
            os.close(self._fd)
            what = "a directory" if os.path.isdir(path) else "not a regular file"
            raise CrashcartError(f"{path} is {what}, not a dump file", "give the path of the .dmp file", ExitCode.USAGE)
        self.size = stat.st_size if stat.st_size else _device_size(self._fd)

    def fetch(self, offset: int, length: int) -> bytes:
        self.requests += 1
        chunks = []
        done = 0
        while done < length:
            chunk = os.pread(self._fd, length - done, offset + done)
            if not chunk:
                raise CrashcartError(
                    f"short read from {self.name}: expected {length} bytes at offset {offset}, got {done} "
                    "(the file shrank while it was being read)",
                    "make sure nothing is still writing or truncating the file, then re-run",
                    ExitCode.USAGE,
                )
            chunks.append(chunk)
            done += len(chunk)
        self.bytes_read += done
        return b"".join(chunks)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _is_regular_or_device(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def _device_size(fd: int) -> int:
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.lseek(fd, 0, os.SEEK_SET)


class _HttpBackend(_Backend):
    """Range GETs against the Blob service (or any server honouring `Range`)."""

    def __init__(self, url: str, credential: Any, extra_headers: Callable[[], dict[str, str]] | None = None):
        super().__init__()
        import requests

        self._extra_headers = extra_headers
        self.url = url
        self.name = _redact(url)
        parsed = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parsed.query)
        self._sas = "sig" in query
        self._credential = None
        self._token: Any = None
        if not self._sas:
            if parsed.scheme == "https":
                if not (parsed.hostname or "").endswith(TOKEN_HOST_SUFFIXES):
                    raise CrashcartError(
                        f"refusing to send an Azure AD token to {parsed.hostname}: it is not an Azure Storage endpoint",
                        "give the URL with a SAS, or the blob's *.blob.core.windows.net URL", ExitCode.USAGE,
                    )
                if callable(credential) and not hasattr(credential, "get_token"):
                    credential = credential()  # a factory: signing in only when a token is really needed
                if credential is None:
                    raise CrashcartError(
                        f"{self.name} has no SAS and no Azure AD credential was given to read it",
                        "give the blob URL with a SAS, or read it through `pipenv run triage` signed in "
                        "with `az login`", ExitCode.AZURE_AUTH)
                self._credential = credential
            elif not is_loopback(url):
                raise CrashcartError(
                    f"refusing to send an Azure AD token over plain HTTP to {parsed.hostname}",
                    "use the blob's https:// URL, or a URL with a SAS", ExitCode.USAGE,
                )
        self._session = requests.Session()
        self._etag: str | None = None
        self._first: tuple[int, bytes] | None = None
        self.size = 0
        try:
            self._probe()
        except BaseException:
            self._session.close()
            raise

    # the first request learns the size and ETag and keeps the bytes it got
    def _probe(self) -> None:
        response = self._get(0, FIRST_READ, allow_416=True)
        if response.status_code == 416:
            self.size = _total_from_content_range(response.headers.get("Content-Range", "")) or 0
            self._etag = response.headers.get("ETag")
            response.close()
            return
        self._etag = response.headers.get("ETag")
        if response.status_code == 206:
            total = _total_from_content_range(response.headers.get("Content-Range", ""))
            if total is None:
                raise self._failed("the server's answer to a range request had no usable Content-Range")
            self.size = total
        else:  # 200: the server ignored Range and would send everything; reading a dump that way is no option
            response.close()
            raise self._failed("the server does not support range requests (it answered 200 to a Range GET)")
        data = self._body(response, min(FIRST_READ, self.size))
        self._first = (0, data)

    def prefetched(self) -> list[tuple[int, bytes]]:
        first, self._first = self._first, None
        return [first] if first else []

    def fetch(self, offset: int, length: int) -> bytes:
        response = self._get(offset, length)
        if response.status_code == 206:
            start = _start_from_content_range(response.headers.get("Content-Range", ""))
            if start != offset:
                response.close()
                raise self._failed(f"asked for bytes from {offset}, the server answered from {start}")
            return self._body(response, length)
        response.close()  # 200: the whole blob would follow; do not read it
        raise self._failed("the server does not support range requests (it answered 200 to a Range GET)")

    def _body(self, response: Any, length: int) -> bytes:
        chunks = []
        got = 0
        try:
            for chunk in response.iter_content(1 << 16):
                chunks.append(chunk)
                got += len(chunk)
                self.bytes_read += len(chunk)
                if got >= length:
                    break
        except Exception as err:  # connection dropped mid-body
            raise self._failed(f"the connection broke while reading: {err}") from None
        finally:
            response.close()
        data = b"".join(chunks)[:length]
        if len(data) < length:
            raise self._failed(f"short read: expected {length} bytes, the server sent {len(data)}")
        return data

    def _headers(self, offset: int, length: int) -> dict[str, str]:
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "x-ms-version": STORAGE_API_VERSION}
        if self._etag:
            headers["If-Match"] = self._etag
        if self._credential is not None:
            headers["Authorization"] = f"Bearer {self._bearer()}"
        if self._extra_headers is not None:
            headers.update(self._extra_headers())
        return headers

    def _bearer(self) -> str:
        if self._token is None or self._token.expires_on - 300 < time.time():
            try:
                self._token = self._credential.get_token(STORAGE_SCOPE)
            except Exception as err:  # azure-identity raises ClientAuthenticationError and kin
                raise CrashcartError(
                    f"could not get an Azure AD token to read {self.name}: {_first_line(err)}",
                    "sign in with `az login` (or set AZURE_CLIENT_ID/AZURE_TENANT_ID for workload identity), "
                    "or give the blob URL with a SAS", ExitCode.AZURE_AUTH,
                ) from None
        return self._token.token

    def _get(self, offset: int, length: int, allow_416: bool = False) -> Any:
        import requests

        delay = _BACKOFF
        for attempt in range(_RETRIES + 1):
            self.requests += 1
            try:
                response = self._session.get(self.url, headers=self._headers(offset, length), stream=True,
                                             timeout=(10, 60))
            except requests.RequestException as err:
                if attempt < _RETRIES:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise CrashcartError(
                    f"could not reach {self.name}: {_first_line(err)}",
                    "check the network path to the storage account (firewall, private endpoint, proxy) and re-run",
                    ExitCode.AZURE_FAILED,
                ) from None
            status = response.status_code
            if status in (200, 206) or (status == 416 and allow_416):
                return response
            if (status >= 500 or status == 429) and attempt < _RETRIES:
                response.close()
                time.sleep(_retry_after(response.headers.get("Retry-After"), delay))
                delay *= 2
                continue
            raise self._http_error(response, offset, length)
        raise AssertionError("unreachable")  # pragma: no cover

    def _http_error(self, response: Any, offset: int, length: int) -> CrashcartError:
        status = response.status_code
        code = response.headers.get("x-ms-error-code", "")
        response.close()
        what = f"{status}{' ' + code if code else ''}"
        if status in (401, 403):
            hint = ("the SAS may have expired, or lacks read (r) permission: generate a new one"
                    if self._sas else
                    "the signed-in identity needs the 'Storage Blob Data Reader' role on the container "
                    "(or give a URL with a SAS)")
            return CrashcartError(f"not allowed to read {self.name} ({what})", hint, ExitCode.AZURE_AUTH)
        if status == 404:
            return CrashcartError(
                f"{self.name} was not found ({what or 'BlobNotFound'})",
                "check the storage account, container and blob name (az storage blob list --auth-mode login ...)",
                ExitCode.AZURE_NOT_FOUND,
            )
        if status == 412:
            return CrashcartError(
                f"{self.name} changed while it was being read ({what}): its ETag no longer matches",
                "wait until the upload has finished, then re-run", ExitCode.AZURE_FAILED,
            )
        if status == 416:
            return CrashcartError(
                f"{self.name}: bytes {offset}-{offset + length - 1} are beyond the end of the blob ({what}); "
                "the blob is shorter than when it was opened",
                "wait until the upload has finished, then re-run", ExitCode.AZURE_FAILED,
            )
        return CrashcartError(
            f"reading {self.name} failed ({what})",
            "retry in a few minutes; if it persists, re-run with -v and check the storage account",
            ExitCode.AZURE_FAILED,
        )

    def _failed(self, detail: str) -> CrashcartError:
        return CrashcartError(f"reading {self.name} failed: {detail}",
                              "retry; if it persists, check the endpoint serves Azure Blob storage",
                              ExitCode.AZURE_FAILED)

    def close(self) -> None:
        self._session.close()


def _retry_after(value: str | None, default: float) -> float:
    try:
        return min(float(value), 30.0) if value else default
    except ValueError:  # an HTTP date: not worth parsing for a short back-off
        return default


def _total_from_content_range(value: str) -> int | None:
    # "bytes 0-8191/67108864" or "bytes */0"
    total = value.rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


def _start_from_content_range(value: str) -> int | None:
    spec = value.partition(" ")[2]
    start = spec.partition("-")[0]
    return int(start) if start.isdigit() else None


def _redact(url: str) -> str:
    """The URL without its query string: a SAS signature must never reach a log or a report."""
    parsed = urllib.parse.urlsplit(url)
    if not parsed.query:
        return url
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path, "", "")) + " (SAS)"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
