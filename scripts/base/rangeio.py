"""Seekable, read-only file objects over a local file or an Azure blob, fetching only what is read.

A memory dump is as large as the VM's RAM, and the answer an operator wants (which driver crashed the
machine) sits in a few kilobytes of it: the header, the page tables on the way to the loaded-module list,
a handful of list entries. So the dump is never downloaded. `open_source()` returns an `io.RawIOBase`
that turns reads into HTTP range requests against the blob (or `pread` on a local file), keeps what it
fetched in a small block cache, and counts every byte it actually fetched (`bytes_read`, `requests`):
the benchmark and the tests hold the triage to that number. The reader and its cache are
scripts.base.rangereader; this module opens one and holds the HTTP range backend.

The same object serves every reader that needs random access to something big and remote: the dump
triage, the collection report, and dissect.ntfs reading a disk snapshot through its SAS URL.

Authentication, in the order it is tried:
- a URL carrying a SAS (`sig=` in the query) is used as is, with no other credential;
- otherwise an Azure AD bearer token for Storage (`https://storage.azure.com/.default`) from the given
  credential (a TokenCredential, or a factory returning one that is called only when a token is needed;
  the caller decides, usually `scripts.azure.clients.credential`). A token is only ever sent over HTTPS
  and only to an Azure Storage host or a loopback one (scripts.base.endpoints.token_refusal); a plain-HTTP
  loopback URL (Azurite) is read anonymously, and any other URL without a SAS is refused.

Over a network the reader keeps up to `concurrency` range requests in flight (the runs one read misses,
`read_many`, `prefetch`, and the read-ahead of a sequential walk: scripts.base.rangereader), each on its
thread's own HTTP session, all of them drawing on one pool of `concurrency` kept-alive connections; retries,
the status translation and the token refresh below are the same for every one of them, and a `stop`
request (scripts.base.stop) ends a read between requests and retries. While the first request is out, the
other `concurrency - 1` connections are opened (connected, TLS included, no request sent), as browsers and
azcopy do: the reader's first batch finds them ready instead of paying a handshake round trip each.

Every request after the first carries `If-Match` with the blob's ETag: if the blob is replaced while it
is being read (a collection still uploading, say), the read fails loudly instead of mixing two versions.
"""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.base.endpoints import STORAGE_SCOPE, STORAGE_UNREACHABLE_HINT, is_loopback, token_refusal
from scripts.base.errors import CrashcartError, ExitCode, first_line
from scripts.base.rangereader import DEFAULT_BLOCK_SIZE, DEFAULT_CACHE_BYTES, Backend, FileBackend, RangeReader
from scripts.base.stop import StopRequest, check

__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_CACHE_BYTES", "FIRST_READ", "HTTP_CONCURRENCY", "RangeReader", "check_url",
           "open_source"]

FIRST_READ = 0x3000  # the first request fetches this much: a 64-bit dump header and what follows it
STORAGE_API_VERSION = "2021-08-06"
_RETRIES = 3  # transient failures (connection errors, 5xx, 429) are retried this many times
_BACKOFF = 0.5  # seconds before the first retry, doubling each time
# range requests in flight at once over HTTP: a triage's batches are tens of pages (scripts/dumpfile/readahead.py);
# Blob storage serves far more per client (azcopy runs 32 and more)
HTTP_CONCURRENCY = 32
_CONNECT_TIMEOUT = 10  # seconds


def open_source(path_or_url: str | os.PathLike[str], credential: Any = None, *,
                block_size: int = DEFAULT_BLOCK_SIZE, cache_bytes: int = DEFAULT_CACHE_BYTES,
                extra_headers: Callable[[], dict[str, str]] | None = None, concurrency: int | None = None,
                readahead: int | None = None, stop: StopRequest | None = None) -> RangeReader:
    """Opens a local path or an http(s) blob URL for random-access reading.

    `extra_headers()` is called for every HTTP request and its headers are added (e.g. a managed disk's
    Azure AD token, which goes beside the export SAS when the disk's dataAccessAuthMode requires it); it
    may be called from several threads at once. `concurrency` (HTTP_CONCURRENCY over HTTP, 1 for a local
    file) and `readahead` (bytes, scripts.base.rangereader.DEFAULT_READAHEAD) are the reader's; with
    `concurrency=1, readahead=0` every request waits for the one before it.

    Raises CrashcartError with an operator-facing message for a missing file (USAGE), a missing blob
    (AZURE_NOT_FOUND), a refused request (AZURE_AUTH) or an unreachable endpoint (AZURE_FAILED).
    """
    text = os.fspath(path_or_url)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise CrashcartError("no dump path or URL was given", "give the path of the .dmp file, or its blob URL",
                             ExitCode.USAGE)
    if text[:8].lower().startswith(("http://", "https://")):  # (a URL's scheme is case-insensitive)
        check_url(text)
        segments = [part for part in urllib.parse.urlsplit(text).path.split("/") if part]
        if len(segments) < (1 if is_loopback(text) else 2):
            raise CrashcartError(f"'{_redact(text)}' names no blob", "give the blob's full URL: https://<account>."
                                 "blob.core.windows.net/<container>/<blob>", ExitCode.USAGE)
        connections = HTTP_CONCURRENCY if concurrency is None else max(1, concurrency)
        backend: Backend = _HttpBackend(text, credential, extra_headers, stop, connections=connections)
    elif "://" in text:
        raise CrashcartError(
            f"cannot read '{_redact(text)}': only local paths and http(s) blob URLs are supported",
            "give a path, or the blob's https URL (with a SAS, or after `az login`)", ExitCode.USAGE,
        )
    else:
        backend = FileBackend(Path(text))
    return RangeReader(backend, block_size=block_size, cache_bytes=cache_bytes, concurrency=concurrency,
                       readahead=readahead, stop=stop)


class _HttpBackend(Backend):
    """Range GETs against the Blob service (or any server honouring `Range`), from several threads at once:
    one requests.Session per thread, one pool of `connections` kept-alive connections and one token for all
    of them."""

    concurrency = HTTP_CONCURRENCY
    failure_code = ExitCode.AZURE_FAILED
    wait_on_close = False

    def __init__(self, url: str, credential: Any, extra_headers: Callable[[], dict[str, str]] | None = None,
                 stop: StopRequest | None = None, connections: int = HTTP_CONCURRENCY):
        super().__init__()
        self._extra_headers = extra_headers
        self._stop = stop
        self.url = url
        self.name = _redact(url)
        parsed = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parsed.query)
        self._sas = "sig" in query
        self._credential = None
        self._token: Any = None
        if not self._sas:
            refused = token_refusal(url)
            if refused:
                raise CrashcartError(refused, "give the URL with a SAS, or the blob's https://<account>.blob.core."
                                     "windows.net URL", ExitCode.USAGE)
            if parsed.scheme == "https":
                if callable(credential) and not hasattr(credential, "get_token"):
                    credential = credential()  # a factory: signing in only when a token is really needed
                if credential is None:
                    raise CrashcartError(
                        f"{self.name} has no SAS and no Azure AD credential was given to read it",
                        "give the blob URL with a SAS, or read it through `pipenv run triage` signed in "
                        "with `az login`", ExitCode.AZURE_AUTH)
                self._credential = credential
        self._pool = _Connections(url, max(1, connections))
        self._token_lock = threading.Lock()
        self._etag: str | None = None
        self._first: tuple[int, bytes] | None = None
        self.size = 0
        try:
            self._probe()
        except BaseException:
            self.close()
            raise

    # the first request learns the size and ETag and keeps the bytes it got
    def _probe(self) -> None:
        probed = threading.Event()
        try:
            self._pool.warm_up(self._pool.size - 1, probed)
            response = self._get(0, FIRST_READ, allow_416=True)
        finally:
            probed.set()
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
                self.counted(nbytes=len(chunk))
                if got >= length:
                    break
        except Exception as err:  # connection dropped mid-body (requests and urllib3 raise their own kinds)
            raise self._failed(f"the connection broke while reading: {_network_reason(err)}") from None
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
        with self._token_lock:  # one sign-in for all the threads that find the token stale at once
            return self._fresh_token()

    def _fresh_token(self) -> str:
        if self._token is None or self._token.expires_on - 300 < time.time():
            try:
                self._token = self._credential.get_token(STORAGE_SCOPE)
            except Exception as err:  # azure-identity raises ClientAuthenticationError and kin
                raise CrashcartError(
                    f"could not get an Azure AD token to read {self.name}: {first_line(err)}",
                    "sign in with `az login` (or set AZURE_CLIENT_ID/AZURE_TENANT_ID for workload identity), "
                    "or give the blob URL with a SAS", ExitCode.AZURE_AUTH,
                ) from None
        return self._token.token

    def _get(self, offset: int, length: int, allow_416: bool = False) -> Any:
        import requests

        delay = _BACKOFF
        for attempt in range(_RETRIES + 1):
            check(self._stop)
            self.counted(requests=1)
            try:
                response = self._pool.session().get(self.url, headers=self._headers(offset, length), stream=True,
                                             timeout=(_CONNECT_TIMEOUT, 60))
            except requests.RequestException as err:
                if attempt < _RETRIES and not isinstance(err, requests.exceptions.InvalidURL):
                    time.sleep(delay)
                    delay *= 2
                    continue
                if isinstance(err, (requests.exceptions.InvalidURL, requests.exceptions.InvalidHeader)):
                    raise CrashcartError(f"cannot read {self.name}: the URL is not valid ({_network_reason(err)})",
                                         "check the blob URL", ExitCode.USAGE) from None
                raise CrashcartError(
                    f"could not reach {self.name}: {_network_reason(err)}",
                    STORAGE_UNREACHABLE_HINT,
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
        self._pool.close()


class _Connections:
    """The HTTP sessions of a reader's threads (one each: requests.Session is not meant to be shared between
    threads), all mounted on one adapter: one pool (urllib3's, thread-safe) of `size` kept-alive connections
    to the blob's host for the whole reader, not one per thread."""

    def __init__(self, url: str, size: int):
        self.url = url
        self.size = size
        self._local = threading.local()
        self._sessions: list[Any] = []
        self._adapter: Any = None
        self._lock = threading.Lock()

    def session(self) -> Any:  # this thread's
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = self._local.session = requests.Session()
            with self._lock:
                if self._adapter is None:
                    self._adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=self.size)
                self._sessions.append(session)
            for prefix in ("http://", "https://"):
                session.mount(prefix, self._adapter)
        return session

    def warm_up(self, count: int, probed: threading.Event) -> None:
        """Opens `count` connections of the pool in the background (TCP and TLS, no request): the ones the
        first batch of concurrent reads will use. They join the pool once the probe has taken its own (else
        the probe would take one of them, and the first batch open one more). Best effort: a connection that
        fails to open is dropped, and the read that would have used it opens its own (and reports why)."""
        if count <= 0:
            return
        try:
            import requests
            session = self.session()
            settings = session.merge_environment_settings(self.url, {}, None, None, None)
            request = requests.Request("GET", self.url).prepare()
            pool = self._adapter.get_connection_with_tls_context(request, settings["verify"], settings["proxies"],
                                                                 settings["cert"])
        except Exception:  # an older requests/urllib3, or a URL it cannot pool: no warm-up, reads still work
            return

        def start() -> None:  # off the caller's thread: the probe goes out first, the connects behind it
            try:
                fresh = [pool._get_conn() for _ in range(count)]  # urllib3's pool has no public way to pre-connect
            except Exception:  # the reader was closed already (a failed probe)
                return
            for conn in fresh:
                threading.Thread(target=connect, args=(conn,), name="rangeio-connect", daemon=True).start()

        def connect(conn: Any) -> None:
            try:
                if getattr(conn, "sock", None) is None:  # (not one a read has given back to the pool already)
                    conn.timeout = _CONNECT_TIMEOUT
                    conn.connect()
            except Exception:  # reported by the read that needs a connection, not here
                conn.close()
            probed.wait()
            pool._put_conn(conn)

        threading.Thread(target=start, name="rangeio-warmup", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()


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


def check_url(url: str) -> None:
    """A URL the reader can use (a host, a valid port), or a usage error saying what is wrong with it."""
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port  # raises for a port that is not a number in 0-65535
    except ValueError as err:
        raise CrashcartError(f"'{_redact(url)}' is not a valid URL: {first_line(err)}",
                             "give the blob's URL as https://<account>.blob.core.windows.net/<container>/<blob>",
                             ExitCode.USAGE) from None
    if not parsed.hostname:
        raise CrashcartError(f"'{_redact(url)}' names no host", "give the blob's full URL", ExitCode.USAGE)


# what requests says about a failed connection names the request URL, SAS included: never repeat that part
_URL_IN_TEXT = re.compile(r"(url: )?/[^\s'\"()]*\?[^\s'\"()]*")
_OS_REASON = re.compile(r"\[Errno -?\d+\] ([^'\"()\]]+)")


def _network_reason(err: BaseException) -> str:
    """Why a request failed, short and without the request URL (it may carry a SAS)."""
    import requests

    text = _URL_IN_TEXT.sub("", first_line(err))
    if isinstance(err, requests.exceptions.SSLError):
        return "the TLS connection failed (certificate or proxy): " + text[:200]
    if isinstance(err, requests.exceptions.Timeout):
        return "the connection timed out"
    if "NameResolutionError" in text or "getaddrinfo" in text or "Name or service not known" in text:
        return "the host name could not be resolved"
    reason = _OS_REASON.search(text)
    if reason:
        return reason.group(1).strip()
    return text[:200] or type(err).__name__


def _redact(url: str) -> str:
    """The URL without its query string and user info: a SAS signature (or a password) must never reach a log
    or a report."""
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError:  # not even a URL: keep what comes before any query string
        return url.split("?", 1)[0].split("#", 1)[0] + (" (SAS)" if "?" in url else "")
    netloc = parsed.netloc.rpartition("@")[2]
    if not parsed.query and netloc == parsed.netloc and not parsed.fragment:
        return url
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", "")) + (" (SAS)" if parsed.query else "")
