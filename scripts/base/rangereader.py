"""`RangeReader`: a seekable, read-only file object over something read in byte ranges, with a block cache.

What is behind it is a `Backend` that fetches exact byte ranges and counts them: `FileBackend` (pread on
a local file or block device, here) or the HTTP range backend of scripts.base.rangeio. The reader turns
arbitrary reads into whole-block fetches, one per run of consecutive missing blocks, keeps the blocks in
a bounded LRU cache, and reports what was really fetched (`bytes_read`, `requests`), which is what the
triage budget is measured in. Open one with `scripts.base.rangeio.open_source`.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections import OrderedDict
from pathlib import Path
from typing import Any

from scripts.base.errors import CrashcartError, ExitCode, printable

DEFAULT_BLOCK_SIZE = 4096  # one page: dump readers jump between pages, larger blocks would waste bytes
DEFAULT_CACHE_BYTES = 16 << 20


class Backend:
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


class RangeReader(io.RawIOBase):
    """A read-only, seekable binary file over a `Backend`, with a block cache and fetch counters.

    `read_at(offset, size)` reads without moving the file position (what parsers jumping around a
    dump want); `read`/`readinto`/`seek`/`tell` make it a normal file object for libraries.
    """

    def __init__(self, backend: Backend, *, block_size: int = DEFAULT_BLOCK_SIZE,
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
