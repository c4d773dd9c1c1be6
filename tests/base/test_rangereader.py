"""The range reader's fetching over a concurrent backend: coalescing, the cache, read-ahead that stays bounded,
concurrency that stays bounded, errors and short reads surfacing in the read that needs the bytes, the stop
request. The backend is in memory and counts what it is asked; every number asserted is a request or a byte,
never a time."""

from __future__ import annotations

import random
import threading
import time

import pytest

from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.rangereader import Backend, RangeReader
from scripts.base.stop import StopRun

BLOCK = 4096
DATA = random.Random(5).randbytes(2 << 20)  # 512 blocks


class MemoryBackend(Backend):
    """DATA, fetched by up to `concurrency` threads; each fetch takes `delay` seconds (a round trip)."""

    failure_code = ExitCode.AZURE_FAILED

    def __init__(self, concurrency: int = 4, delay: float = 0.0, data: bytes = DATA):
        super().__init__()
        self.concurrency = concurrency
        self.name, self.size, self._data = "memory", len(data), data
        self.delay = delay
        self.fetches: list[tuple[int, int]] = []
        self.in_flight = self.most_in_flight = 0
        self.fail_at: dict[int, BaseException] = {}  # block index -> raised by any fetch covering it
        self.short_by = 0
        self._lock = threading.Lock()

    def fetch(self, offset: int, length: int) -> bytes:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.fetches.append((offset, length))
        try:
            self.counted(requests=1)
            if self.delay:
                time.sleep(self.delay)
            for index, error in self.fail_at.items():
                if offset <= index * BLOCK < offset + length:
                    raise error
            data = self._data[offset:offset + length - self.short_by]
            self.counted(nbytes=len(data))
            return data
        finally:
            with self._lock:
                self.in_flight -= 1


def reader_over(backend: Backend, **options) -> RangeReader:
    return RangeReader(backend, block_size=BLOCK, **options)


# -- coalescing and concurrency -------------------------------------------------------------------


def test_independent_reads_go_out_together_and_adjacent_ones_in_one_request():
    backend = MemoryBackend(concurrency=4, delay=0.05)
    with reader_over(backend, readahead=0) as reader:
        spots = [(i * 37 * BLOCK + 100, 200) for i in range(12)]  # 12 blocks far apart
        adjacent = [(300 * BLOCK, BLOCK), (301 * BLOCK, BLOCK), (302 * BLOCK + 5, 10)]  # one run of 3 blocks
        got = reader.read_many(spots + adjacent)
        assert got == [DATA[o:o + n] for o, n in spots + adjacent]
        assert reader.requests == 13  # 12 scattered blocks + one request for the run
        assert (300 * BLOCK, 3 * BLOCK) in backend.fetches
        assert reader.round_trips == 4  # 13 requests, 4 at a time: the caller waited 4 request times, not 13
        assert 1 < backend.most_in_flight <= 4


def test_concurrency_stays_bounded_whatever_is_asked():
    backend = MemoryBackend(concurrency=3, delay=0.02)
    with reader_over(backend, readahead=0) as reader:
        reader.prefetch([(i * 8 * BLOCK, BLOCK) for i in range(20)])
        reader.read_many([(i * 8 * BLOCK + 4 * BLOCK, 1) for i in range(20)])
        assert backend.most_in_flight == 3
        assert reader.requests == 40


def test_a_later_batch_is_not_served_by_the_one_thread_left_idle():
    """After a small first batch one worker sits idle: the next batch of 8 must still go out 8 at a time."""
    backend = MemoryBackend(concurrency=8, delay=0.05)
    with reader_over(backend, readahead=0) as reader:
        reader.read_many([(0, 10)])
        reader.drain()
        backend.most_in_flight = 0
        reader.read_many([(i * 16 * BLOCK + 8 * BLOCK, 10) for i in range(1, 9)])
        assert backend.most_in_flight == 8


def test_the_sequential_reader_is_one_request_at_a_time():
    """concurrency=1, readahead=0: the reader as it was before batching (the benchmark's "before")."""
    backend = MemoryBackend(concurrency=8, delay=0.01)
    with reader_over(backend, concurrency=1, readahead=0) as reader:
        assert reader.read_many([(i * 8 * BLOCK, 10) for i in range(6)]) == [DATA[i * 8 * BLOCK:i * 8 * BLOCK + 10]
                                                                           for i in range(6)]
        for offset in range(0, 64 * BLOCK, 1024):
            reader.read_at(offset, 1024)
        assert backend.most_in_flight == 1 and reader.prefetch([(400 * BLOCK, BLOCK)]) == 0
    assert reader.requests == 6 + 64 - 6  # blocks 0, 8, ... 40 were read by read_many already
    assert reader.round_trips == 6 + 64 - 6  # one wait per request


def test_a_local_file_reads_as_before(tmp_path):
    """FileBackend declares no concurrency: no threads, no read-ahead, the old request counts."""
    from scripts.base.rangeio import open_source

    path = tmp_path / "f.bin"
    path.write_bytes(DATA[:64 * BLOCK])
    with open_source(path) as reader:
        for offset in range(0, 64 * BLOCK, BLOCK):
            assert reader.read_at(offset, BLOCK) == DATA[offset:offset + BLOCK]
        assert reader.requests == 64 and reader.bytes_read == 64 * BLOCK


# -- the cache ------------------------------------------------------------------------------------


def test_a_cached_block_costs_nothing_and_one_in_flight_is_not_fetched_twice():
    backend = MemoryBackend(concurrency=4, delay=0.05)
    with reader_over(backend, readahead=0) as reader:
        assert reader.prefetch([(100 * BLOCK, 3 * BLOCK)]) == 3 * BLOCK
        assert reader.read_at(101 * BLOCK + 7, 50) == DATA[101 * BLOCK + 7:101 * BLOCK + 57]  # waits for it
        for _ in range(5):
            reader.read_at(100 * BLOCK, 3 * BLOCK)
        assert backend.fetches == [(100 * BLOCK, 3 * BLOCK)]
        assert reader.round_trips <= 1


# -- read-ahead -----------------------------------------------------------------------------------


def test_a_sequential_walk_reads_ahead_in_few_requests_and_bounded():
    backend = MemoryBackend(concurrency=4, delay=0.002)
    limit = 256 << 10
    with reader_over(backend, readahead=limit) as reader:
        walked = 300 * BLOCK
        for offset in range(0, walked, 1024):  # MFT records, one at a time
            assert reader.read_at(offset, 1024) == DATA[offset:offset + 1024]
        waits = reader.round_trips
        reader.drain()
        assert reader.requests < 40  # 300 blocks; one request each without read-ahead
        assert waits < 20
        # what was fetched beyond the walk's end is at most one read-ahead window
        assert walked <= reader.bytes_read <= walked + limit


def test_scattered_reads_fetch_nothing_ahead():
    """Pointer chasing (page tables, list entries) must not pay for read-ahead: the triage's byte budget."""
    backend = MemoryBackend(concurrency=4)
    rng = random.Random(9)
    with reader_over(backend) as reader:
        touched = set()
        for _ in range(200):
            offset = rng.randrange(len(DATA) - 200)
            reader.read_at(offset, 72)
            reader.read_at(offset, 104)  # the same entry again, a bit longer: still no walk
            touched.update({offset // BLOCK, (offset + 103) // BLOCK})
        reader.drain()
        assert reader.bytes_read == len(touched) * BLOCK


def test_interleaved_walks_are_each_recognised():
    backend = MemoryBackend(concurrency=4, delay=0.002)
    with reader_over(backend, readahead=128 << 10) as reader:
        for i in range(100):
            reader.read_at(i * BLOCK, BLOCK)  # a walk from 0 ...
            reader.read_at(256 * BLOCK + i * BLOCK, BLOCK)  # ... and one from 1 MiB, in turns
        reader.drain()
        assert reader.requests < 50


# -- failures -------------------------------------------------------------------------------------


def test_an_error_in_a_concurrent_fetch_reaches_the_caller_as_is():
    backend = MemoryBackend(concurrency=4, delay=0.01)
    backend.fail_at[50] = CrashcartError("reading memory failed (503)", "retry later", ExitCode.AZURE_FAILED)
    with reader_over(backend, readahead=0) as reader:
        with pytest.raises(CrashcartError, match=r"failed \(503\)") as caught:
            reader.read_many([(10 * BLOCK, 1), (30 * BLOCK, 1), (50 * BLOCK, 1), (70 * BLOCK, 1)])
        assert caught.value.exit_code == ExitCode.AZURE_FAILED
        assert reader.read_at(10 * BLOCK, 1) == DATA[10 * BLOCK:10 * BLOCK + 1]  # the others were kept


def test_a_failed_read_ahead_fails_only_the_read_that_needs_its_bytes():
    backend = MemoryBackend(concurrency=4, delay=0.002)
    with reader_over(backend, readahead=64 << 10) as reader:
        backend.fail_at[40] = CrashcartError("reading memory failed (412)", "re-run", ExitCode.AZURE_FAILED)
        for offset in range(0, 20 * BLOCK, BLOCK):  # the walk's read-ahead reaches block 40 and fails there
            reader.read_at(offset, BLOCK)
        assert reader.read_at(300 * BLOCK, 10) == DATA[300 * BLOCK:300 * BLOCK + 10]  # elsewhere: fine
        reader.drain()
    backend = MemoryBackend(concurrency=4)
    backend.fail_at[3] = CrashcartError("reading memory failed (412)", "re-run", ExitCode.AZURE_FAILED)
    with reader_over(backend) as reader:
        reader.prefetch([(0, 8 * BLOCK)])
        with pytest.raises(CrashcartError, match="412"):
            reader.read_at(3 * BLOCK, 10)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_short_fetch_is_an_error_never_short_data(concurrency):
    """Before: a backend answering short made read_at fail with a bare KeyError (a traceback, exit 70)."""
    backend = MemoryBackend(concurrency=concurrency)
    backend.short_by = 100
    with reader_over(backend) as reader:
        with pytest.raises(CrashcartError, match=r"short read from memory: expected 8192 bytes at offset 4096, got 8092"):
            reader.read_at(BLOCK + 10, BLOCK)
        with pytest.raises(CrashcartError, match="short read") as caught:
            reader.read_at(len(DATA) - 10, 10)  # the last block
        assert caught.value.exit_code == ExitCode.AZURE_FAILED
        with pytest.raises(CrashcartError, match="short read"):
            reader.read_many([(0, 10), (200 * BLOCK, 10)])


class Stop:
    def __init__(self):
        self.reason = None
        self.is_deadline = False


def test_a_stop_request_ends_a_read_that_is_waiting():
    backend = MemoryBackend(concurrency=2, delay=0.5)
    stop = Stop()
    with reader_over(backend, stop=stop, readahead=0) as reader:
        threading.Timer(0.05, lambda: setattr(stop, "reason", "SIGTERM")).start()
        with pytest.raises(StopRun, match="SIGTERM"):
            reader.read_many([(0, 1), (100 * BLOCK, 1), (200 * BLOCK, 1), (300 * BLOCK, 1)])
        with pytest.raises(StopRun):
            reader.read_at(400 * BLOCK, 1)  # nothing new is fetched once a stop was asked for
    assert (400 * BLOCK, BLOCK) not in backend.fetches


def test_reads_after_close_are_refused_and_close_waits_for_local_fetches():
    backend = MemoryBackend(concurrency=4, delay=0.05)
    reader = reader_over(backend)
    reader.prefetch([(0, 64 * BLOCK), (200 * BLOCK, BLOCK)])
    reader.close()
    assert backend.in_flight == 0  # Backend.wait_on_close (a local descriptor is not closed under a pread)
    with pytest.raises(ValueError):
        reader.read_at(0, 1)


def test_a_caller_that_fetches_ahead_itself_turns_the_blind_read_ahead_off():
    """`fetching_ahead()` (the dump reader, whose batches know where its walks go): a walk that looks sequential
    fetches nothing beyond what it reads; `cached(ranges)` says whether a read would wait."""
    backend = MemoryBackend(concurrency=4)
    with reader_over(backend, readahead=256 << 10) as reader:
        assert not reader.cached([(0, 10)])
        reader.fetching_ahead()
        walked = 40 * BLOCK
        for offset in range(0, walked, 1024):
            assert reader.read_at(offset, 1024) == DATA[offset:offset + 1024]
        reader.drain()
        assert reader.bytes_read == walked  # with the read-ahead on: a window more (the test above)
        assert reader.cached([(0, 10), (walked - BLOCK, BLOCK)]) and not reader.cached([(walked, 1)])
