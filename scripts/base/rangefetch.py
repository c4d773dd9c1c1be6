"""The fetching behind `scripts.base.rangereader.RangeReader`: the `Backend` interface, the block cache
(`BlockFetcher`), fetch tasks, a bounded pool of fetch threads, and the detector of sequential walks that
drives read-ahead.

Over a network every request costs a round trip (20-30 ms from an operator's machine to a region), so the
reader must not issue them one after another when it does not have to:

- `BlockFetcher` keeps fetched blocks in a bounded LRU cache, knows which blocks are on their way, and
  turns what is missing into one request per run of consecutive blocks, all in flight together;
- `FetchTask` is one range request (a run of consecutive blocks). Whoever claims it first runs it: a pool
  thread, or the caller who needs its bytes now (a caller never waits behind a speculative read that has
  not started: it takes the task over);
- `FetchPool` runs tasks on at most `workers` daemon threads (daemon: a request stuck in a dead network
  cannot keep the interpreter alive; the reader's close() says what happens to what is in flight);
- `Streams` watches where reads land and says when a walk is sequential (a read starting in the block
  the previous one ended in, or the next, and reaching a new block - twice in a row), and how far ahead
  to fetch: a window that starts at `first` blocks and doubles up to `limit`, so what a walk that stops
  has fetched in vain is at most one window.
"""

from __future__ import annotations

import collections
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.stop import StopRequest, check

QUEUED, RUNNING, DONE = "queued", "running", "done"
DEFAULT_READAHEAD = 1 << 20  # most bytes fetched ahead of one sequential walk (when the backend is concurrent)
MAX_REQUEST = 4 << 20  # a longer run is split into requests of this size, fetched in parallel
_WAIT_SLICE = 0.2  # seconds between looks at the stop request while waiting for a fetch


class Backend:
    """Fetches exact byte ranges and counts them. `fetch` may be called from several threads at once when
    `concurrency` > 1; count with `counted()`, which is safe from any thread."""

    name: str
    size: int
    concurrency = 1  # requests worth having in flight at once (1: no threads, no read-ahead)
    failure_code = ExitCode.USAGE  # the exit code of a read that comes back short
    wait_on_close = True  # close() waits for running fetches (a local descriptor must not close under a pread)

    def __init__(self) -> None:
        self.bytes_read = 0
        self.requests = 0
        self._count_lock = threading.Lock()

    def counted(self, requests: int = 0, nbytes: int = 0) -> None:
        with self._count_lock:
            self.requests += requests
            self.bytes_read += nbytes

    def fetch(self, offset: int, length: int) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def prefetched(self) -> list[tuple[int, bytes]]:
        return []

    def close(self) -> None:
        pass


class FetchTask:
    """One range request: `length` bytes at `start`, covering blocks `first`..`last`."""

    __slots__ = ("start", "length", "first", "last", "speculative", "blocks", "error", "_state", "_lock", "_done")

    def __init__(self, start: int, length: int, first: int, last: int, speculative: bool):
        self.start, self.length, self.first, self.last = start, length, first, last
        self.speculative = speculative  # read-ahead or prefetch: nobody is waiting for it yet
        self.blocks: dict[int, bytes] = {}
        self.error: BaseException | None = None
        self._state = QUEUED
        self._lock = threading.Lock()
        self._done = threading.Event()

    def claim(self) -> bool:
        """True for the one caller that gets to run the task (it was still queued)."""
        with self._lock:
            if self._state != QUEUED:
                return False
            self._state = RUNNING
            return True

    def finish(self, blocks: dict[int, bytes] | None, error: BaseException | None) -> None:
        self.blocks, self.error = blocks or {}, error
        with self._lock:
            self._state = DONE
        self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()


class FetchPool:
    """Runs tasks with `run(task)` on at most `workers` daemon threads, started when first needed."""

    def __init__(self, workers: int, run: Callable[[FetchTask], None], name: str = "rangefetch"):
        self.workers = workers
        self._run = run
        self._name = name
        self._queue: collections.deque[FetchTask] = collections.deque()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def submit(self, task: FetchTask) -> None:
        with self._cond:
            if self._closed:
                task.finish(None, RuntimeError("the reader is closed"))
                return
            self._queue.append(task)
            if len(self._queue) > self._idle and len(self._threads) < self.workers:  # one idle thread must not serve a whole batch
                thread = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
            self._cond.notify()

    def _work(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                while not self._queue and not self._closed:
                    self._cond.wait()
                self._idle -= 1
                if self._closed:
                    return
                task = self._queue.popleft()
            if task.claim():
                self._run(task)

    def close(self, wait: bool) -> None:
        """Drops what has not started; with `wait`, also waits for the fetches that are running."""
        with self._cond:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for task in dropped:
            if task.claim():
                task.finish(None, RuntimeError("the reader was closed before this read was made"))
        if wait:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join()


@dataclass
class _Stream:
    last: int  # the last block the walk has read
    advances: int = 0  # reads in a row that reached a new block
    window: int = 0  # blocks to keep fetched ahead of `last` (0: not sequential yet)
    ahead: int = 0  # read-ahead has been issued up to this block (exclusive)


class Streams:
    """Recognises sequential walks among interleaved reads (up to `tracked` at once) and says which blocks
    to fetch ahead of each: `after_read(first, last)` returns a block range (lo, hi) to prefetch, or None."""

    def __init__(self, first: int, limit: int, tracked: int = 4):
        self.first = max(1, min(first, limit)) if limit > 0 else 0
        self.limit = limit  # blocks; 0 disables read-ahead
        self.tracked = tracked
        self._streams: list[_Stream] = []

    def after_read(self, first: int, last: int) -> tuple[int, int] | None:
        stream = next((s for s in self._streams if s.last <= first <= s.last + 1), None)
        if stream is None:
            stream = _Stream(last=last)
            self._streams.insert(0, stream)
            del self._streams[self.tracked:]
            return None
        self._streams.remove(stream)
        self._streams.insert(0, stream)
        if last <= stream.last:
            return None  # still inside the block the walk is in
        stream.last = last
        stream.advances += 1
        if self.limit <= 0 or stream.advances < 2:
            return None
        if stream.window == 0:
            stream.window = self.first
            stream.ahead = last + 1
        # issue more once the walk has eaten into the second half of what was fetched ahead of it
        if stream.ahead - (last + 1) > stream.window // 2:
            return None
        lo, hi = max(stream.ahead, last + 1), last + 1 + stream.window
        stream.ahead = hi
        stream.window = min(stream.window * 2, self.limit)
        return (lo, hi) if hi > lo else None


class BlockFetcher:
    """Blocks of `block` bytes of `backend`: cached (LRU, `cache_bytes`), on their way, or fetched on demand.

    `gather(spans)` returns the blocks of (first, last) spans, fetching what is missing with at most
    `concurrency` requests in flight (the caller's thread runs one, a pool of `concurrency - 1` threads
    the rest); `after_read(first, last)` feeds the sequential-walk detector and starts read-ahead (at most
    `readahead` bytes ahead of a walk, never more than a quarter of the cache); `request(lo, hi)` starts
    fetching blocks in the background. `round_trips` counts the times a caller had to wait."""

    def __init__(self, backend: Backend, block: int, cache_bytes: int, concurrency: int, readahead: int | None,
                 stop: StopRequest | None):
        self._backend = backend
        self._block = block
        self.max_blocks = max(1, cache_bytes // block)
        self._blocks_in_file = -(-backend.size // block)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._inflight: dict[int, FetchTask] = {}
        self._lock = threading.Lock()  # the cache and the in-flight map (pool threads store into them)
        self._stop = stop
        self._closed = False
        self.round_trips = 0
        concurrency = self._concurrency = max(1, concurrency)
        self._slots = threading.BoundedSemaphore(concurrency)
        self.pool = FetchPool(concurrency - 1, self._run, "rangereader") if concurrency > 1 else None
        if readahead is None:
            readahead = DEFAULT_READAHEAD
        ahead = min(readahead, cache_bytes // 4) // block if self.pool else 0
        self._streams = Streams(first=max(2, (64 << 10) // block), limit=ahead)
        self._per_request = max(1, MAX_REQUEST // block)
        for offset, data in backend.prefetched():
            self._store(offset // block, data)

    def gather(self, spans: list[tuple[int, int]]) -> dict[int, bytes]:
        """The blocks of every (first, last) span: from the cache, from fetches already on their way, and
        from new requests (one per run of consecutive missing blocks), all in flight together."""
        blocks: dict[int, bytes] = {}
        waiting: dict[int, FetchTask] = {}
        missing: list[int] = []
        with self._lock:
            for index in sorted({i for first, last in spans for i in range(first, last + 1)}):
                cached = self._cache.get(index)
                if cached is not None:
                    self._cache.move_to_end(index)
                    blocks[index] = cached
                elif index in self._inflight:
                    task = self._inflight[index]
                    waiting[id(task)] = task
                else:
                    missing.append(index)
            fresh = self._tasks(missing, speculative=False)
        if not fresh and not waiting:
            return blocks
        # sequential request times the caller waits: its own fetches run `concurrency` at a time
        self.round_trips += max(1, -(-len(fresh) // self._concurrency))
        if self.pool is not None:
            for task in fresh[1:]:
                self.pool.submit(task)
        tasks = [*fresh, *waiting.values()]
        for task in tasks:  # run what no thread has started (a caller never queues behind read-ahead)
            if task.claim():
                self._run(task)
            while not task.wait(_WAIT_SLICE):
                check(self._stop)
        for task in tasks:
            if task.error is not None:
                raise task.error
            blocks.update(task.blocks)
        return blocks

    def drain(self) -> None:
        """Waits until nothing is in flight (the counters are then final)."""
        while True:
            with self._lock:
                tasks = list({id(t): t for t in self._inflight.values()}.values())
            if not tasks:
                return
            for task in tasks:
                while not task.wait(_WAIT_SLICE):
                    check(self._stop)

    def after_read(self, first: int, last: int) -> None:
        ahead = self._streams.after_read(first, last)
        if ahead is not None:
            self.request(*ahead)

    def cached(self, spans: list[tuple[int, int]]) -> bool:
        """Whether every block of the (first, last) spans is in the cache (a `gather` of them would not wait)."""
        with self._lock:
            return all(i in self._cache for first, last in spans for i in range(first, last + 1))

    def stop_readahead(self) -> None:
        self._streams.limit = 0

    def request(self, lo: int, hi: int) -> list[FetchTask]:
        """Starts fetching the blocks in [lo, hi) that are neither cached nor on their way (needs the pool)."""
        if self.pool is None:
            return []
        with self._lock:
            missing = [i for i in range(lo, min(hi, self._blocks_in_file))
                       if i not in self._cache and i not in self._inflight]
            tasks = self._tasks(missing, speculative=True)
        for task in tasks:
            self.pool.submit(task)
        return tasks

    def _tasks(self, missing: list[int], *, speculative: bool) -> list[FetchTask]:
        """One task per run of consecutive blocks (split every MAX_REQUEST), registered as in flight.
        Called with the lock held."""
        tasks = []
        run_start = 0
        for i in range(1, len(missing) + 1):
            if i == len(missing) or missing[i] != missing[i - 1] + 1 or i - run_start == self._per_request:
                lo, hi = missing[run_start], missing[i - 1]
                start = lo * self._block
                task = FetchTask(start, min((hi + 1) * self._block, self._backend.size) - start, lo, hi, speculative)
                for index in range(lo, hi + 1):
                    self._inflight[index] = task
                tasks.append(task)
                run_start = i
        return tasks

    def _run(self, task: FetchTask) -> None:
        """Fetches one task (in the caller's thread or a pool thread) and stores its blocks. Never raises:
        what went wrong is kept on the task, for the read that needs those bytes."""
        blocks, error = None, None
        try:
            check(self._stop)
            with self._slots:
                data = self._backend.fetch(task.start, task.length)
            if len(data) != task.length:
                raise CrashcartError(
                    f"short read from {self._backend.name}: expected {task.length} bytes at offset {task.start}, "
                    f"got {len(data)}", "re-run; if it persists, check that nothing is changing the source",
                    self._backend.failure_code)
            blocks = self._store(task.first, data)
        except BaseException as err:  # StopRun and KeyboardInterrupt too: re-raised in the reader's thread
            error = err
        finally:
            with self._lock:
                for index in range(task.first, task.last + 1):
                    if self._inflight.get(index) is task:
                        del self._inflight[index]
            task.finish(blocks, error)

    def _store(self, first: int, data: bytes) -> dict[int, bytes]:
        stored = {}
        with self._lock:
            for at in range(0, len(data), self._block):
                block = data[at:at + self._block]
                if len(block) < self._block and first * self._block + at + len(block) < self._backend.size:
                    break  # a partial block that is not the file's last: do not cache it
                index = first + at // self._block
                stored[index] = block
                if not self._closed:
                    self._cache[index] = block
                    self._cache.move_to_end(index)
            while len(self._cache) > self.max_blocks:
                self._cache.popitem(last=False)
        return stored

    def close(self) -> None:
        """Drops read-ahead that has not started; waits for running fetches if the backend asks for it
        (`wait_on_close`: a local file; over HTTP their answers are discarded, a dead network cannot hold
        the close up)."""
        if self.pool is not None:
            self.pool.close(wait=self._backend.wait_on_close)
        with self._lock:
            self._closed = True
            self._cache.clear()
            self._inflight.clear()
