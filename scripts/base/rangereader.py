"""`RangeReader`: a seekable, read-only file object over something read in byte ranges, with a block cache.

What is behind it is a `Backend` that fetches exact byte ranges and counts them: `FileBackend` (pread on
a local file or block device, here) or the HTTP range backend of scripts.base.rangeio. The reader turns
arbitrary reads into whole-block fetches, one per run of consecutive missing blocks, keeps the blocks in
a bounded LRU cache, and reports what was really fetched (`bytes_read`, `requests`), which is what the
triage budget is measured in. Open one with `scripts.base.rangeio.open_source`.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from scripts.base.errors import CrashcartError, ExitCode

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
    """pread on a local file or block device; refuses what is not one with a message saying what to give."""

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
