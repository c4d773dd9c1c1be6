"""`RangeReader`: a seekable, read-only file object over something read in byte ranges, with a block cache
that fetches ahead and in parallel.

What is behind it is a `Backend` that fetches exact byte ranges and counts them: `FileBackend` (pread on
a local file or block device, here) or the HTTP range backend of scripts.base.rangeio. The reader turns
arbitrary reads into whole-block fetches, one request per run of consecutive missing blocks, keeps the
blocks in a bounded LRU cache, and reports what was really fetched (`bytes_read`, `requests`, and
`round_trips`: how many times a caller had to wait for the backend), which is what the triage budget is
measured in. Open one with `scripts.base.rangeio.open_source`.

Over a network the wait, not the bytes, is what costs (20-30 ms a request from an operator's machine), so
a backend that says it can (`Backend.concurrency` > 1: the HTTP backend) gets, from the same reader:

- concurrency: the runs one read is missing are fetched at the same time, at most `concurrency` requests
  in flight (the caller's own and `concurrency - 1` daemon threads: scripts.base.rangefetch);
- read-ahead: a walk that goes sequential (two reads in a row reaching the next block: MFT records, a
  file's runs, a bitmap) has the blocks after it fetched in the background, in a window that starts small
  and doubles up to `readahead` bytes - the most a walk that stops there has fetched in vain;
- `read_many(ranges)` (independent reads in one round trip) and `prefetch(ranges)` (start fetching what
  will be read soon, return at once) for callers that know more than one address ahead.

Nothing is returned short: a fetch that brings fewer bytes than asked fails the read with a CrashcartError
(the backends raise their own first), and a failed read-ahead fails only the read that needed its bytes.
`RangeReader(..., concurrency=1, readahead=0)` is the strictly sequential reader (the benchmark's "before").
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path
from typing import Any

from scripts.base.errors import CrashcartError, ExitCode, printable
from scripts.base.rangefetch import DEFAULT_READAHEAD, MAX_REQUEST, Backend, BlockFetcher
from scripts.base.stop import StopRequest

__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_CACHE_BYTES", "DEFAULT_READAHEAD", "MAX_REQUEST", "Backend",
           "FileBackend", "RangeReader"]

DEFAULT_BLOCK_SIZE = 4096  # one page: dump readers jump between pages, larger blocks would waste bytes
DEFAULT_CACHE_BYTES = 16 << 20


class RangeReader(io.RawIOBase):
    """A read-only, seekable binary file over a `Backend`, with a block cache and fetch counters.

    `read_at(offset, size)` reads without moving the file position (what parsers jumping around a
    dump want); `read`/`readinto`/`seek`/`tell` make it a normal file object for libraries. One caller
    thread at a time; `stop` (scripts.base.stop) is looked at before every fetch and while waiting.
    """

    def __init__(self, backend: Backend, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, concurrency: int | None = None,
                 readahead: int | None = None, stop: StopRequest | None = None):
        super().__init__()
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError("block_size must be a power of two")
        self._backend = backend
        self._block = block_size
        self._pos = 0
        self._blocks = BlockFetcher(backend, block_size, cache_bytes,
                                    backend.concurrency if concurrency is None else concurrency, readahead, stop)

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

    @property
    def round_trips(self) -> int:
        """Times a caller waited for the file or the network (requests in flight together count once)."""
        return self._blocks.round_trips

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
            self._blocks.close()
            self._backend.close()
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
        blocks = self._blocks.gather([(first, last)])
        self._blocks.after_read(first, last)
        return self._slice(blocks, offset, end)

    def read_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """`read_at` of each (offset, size), the missing blocks of all of them fetched at once (adjacent ones in
        one request): independent reads a caller already knows of cost one round trip, not one each."""
        self._check_open()
        spans, bounds = [], []
        for offset, size in ranges:
            if offset < 0 or size < 0:
                raise ValueError("offset and size must not be negative")
            end = min(offset + size, self.size)
            bounds.append((offset, end))
            if end > offset:
                spans.append((offset // self._block, (end - 1) // self._block))
        blocks = self._blocks.gather(spans)
        return [self._slice(blocks, offset, end) if end > offset else b"" for offset, end in bounds]

    def prefetch(self, ranges: list[tuple[int, int]]) -> int:
        """Starts fetching the blocks of each (offset, size) that are neither cached nor on their way and
        returns at once; a later read of them waits only for what has not arrived yet. Advisory: a reader
        without threads (concurrency 1) ignores it, and one call fetches at most half the cache (more would
        evict itself). Errors surface in the read that needs the bytes. Returns the bytes asked for."""
        self._check_open()
        budget = self._blocks.max_blocks // 2
        asked = 0
        for offset, size in sorted(ranges):
            end = min(offset + size, self.size)
            if offset < 0 or end <= offset or budget <= 0:
                continue
            first = offset // self._block
            last = min((end - 1) // self._block, first + budget - 1)
            for task in self._blocks.request(first, last + 1):
                budget -= task.last - task.first + 1
                asked += task.length
        return asked

    def cached(self, ranges: list[tuple[int, int]]) -> bool:
        """Whether `read_many(ranges)` would be served from the cache, without waiting for the backend."""
        self._check_open()
        spans = [(offset // self._block, (min(offset + size, self.size) - 1) // self._block)
                 for offset, size in ranges if min(offset + size, self.size) > offset >= 0]
        return self._blocks.cached(spans)

    def fetching_ahead(self) -> None:
        """Says that the caller fetches ahead itself (`read_many`/`prefetch`: the dump reader's readahead.py,
        which knows where its walks go): the read-ahead of sequential walks is turned off, its guesses would
        only add bytes (a module list on a large page reads like a sequential walk)."""
        self._check_open()
        self._blocks.stop_readahead()

    def drain(self) -> None:
        """Waits for the read-ahead and prefetches in flight to end, so that `bytes_read` and `requests` are
        final (a benchmark's or a test's measurement; reading never needs it)."""
        self._check_open()
        self._blocks.drain()

    def _slice(self, blocks: dict[int, bytes], offset: int, end: int) -> bytes:
        first, last = offset // self._block, (end - 1) // self._block
        joined = b"".join(blocks[index] for index in range(first, last + 1))
        skip = offset - first * self._block
        return joined[skip:skip + end - offset]

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def __repr__(self) -> str:
        return f"<RangeReader {self.name} size={self.size} bytes_read={self.bytes_read}>"


class FileBackend(Backend):
    """pread on a local file or block device; refuses what is not one with a message saying what to give.

    The type is checked before the file is opened (opening a FIFO for reading waits for a writer forever,
    and opening some devices does something), and again on the open descriptor, which is opened
    non-blocking so that a path swapped for a pipe in between cannot hang the read either."""

    def __init__(self, path: Path):
        super().__init__()
        self.name = _shown(path)
        self._fd = -1
        _check_type(path, _guarded(path, os.stat).st_mode)
        self._fd = _guarded(path, _open_nonblocking)
        try:
            mode = os.fstat(self._fd).st_mode
            _check_type(path, mode)
            _blocking(self._fd)
            self.size = os.fstat(self._fd).st_size if stat.S_ISREG(mode) else _device_size(self._fd)
        except BaseException:
            self.close()
            raise

    def fetch(self, offset: int, length: int) -> bytes:
        self.counted(requests=1)
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
        self.counted(nbytes=done)
        return b"".join(chunks)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _is_regular_or_device(mode: int) -> bool:
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def _guarded(path: Path, call: Any) -> Any:
    """`call(path)` (os.stat, or the open), with every way a user-given path can fail told as a usage error."""
    try:
        return call(path)
    except OSError as err:
        raise _open_error(path, err) from None
    except ValueError:  # an embedded NUL: no file can have that name
        raise CrashcartError(f"{_shown(path)} is not a usable file name (it holds a NUL character)",
                             "give the path of the .dmp file", ExitCode.USAGE) from None


def _open_nonblocking(path: Path) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))


def _check_type(path: Path, mode: int) -> None:
    if not _is_regular_or_device(mode):
        raise CrashcartError(f"{_shown(path)} is {_kind(mode)}, not a dump file",
                             "give the path of a regular .dmp file (copy a dump out of a pipe or device into a "
                             "file first)", ExitCode.USAGE)


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device")):
        if test(mode):
            return what
    return "not a regular file"


def _open_error(path: Path, err: OSError) -> CrashcartError:
    """The operator's version of why a local file cannot be opened (every OSError: the path is user input)."""
    shown = _shown(path)
    if isinstance(err, FileNotFoundError):
        return CrashcartError(
            f"no such file: {shown}",
            "check the path; a dump in Azure storage is read by its blob URL (with a SAS, or after `az login`)",
            ExitCode.USAGE)
    if isinstance(err, IsADirectoryError):
        return CrashcartError(f"{shown} is a directory, not a dump file", "give the path of the .dmp file",
                              ExitCode.USAGE)
    if isinstance(err, PermissionError):
        return CrashcartError(f"permission denied reading {shown}",
                              "run as a user who can read the file, or copy it somewhere readable", ExitCode.USAGE)
    if err.errno == errno.ENXIO:  # a socket, or a device without a driver behind it
        return CrashcartError(f"{shown} is not a file that can be read (a socket or an absent device)",
                              "give the path of a regular .dmp file", ExitCode.USAGE)
    reason = err.strerror or type(err).__name__
    return CrashcartError(f"cannot open {shown}: {reason}", "check the path and give the path of the .dmp file",
                          ExitCode.USAGE)


def _shown(path: Path) -> str:
    """The path as a message may print it: one line, control characters escaped."""
    return printable(os.fsdecode(path) if isinstance(path, bytes) else str(path))


def _blocking(fd: int) -> None:
    """Clears O_NONBLOCK again (it only mattered for the open) where the platform has fcntl."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no O_NONBLOCK was set
        return
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)


def _device_size(fd: int) -> int:
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
