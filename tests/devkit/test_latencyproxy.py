"""The latency proxy in front of Azurite, and what the range reader saves through it: counted in requests
and waits (round trips), never in wall time."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.rangeio import HTTP_CONCURRENCY, open_source
from scripts.devkit.latencyproxy import LatencyProxy

DATA = random.Random(11).randbytes(3 << 20)
BLOCK = 64 << 10  # windisk's block for metadata reads over the export URL


@pytest.fixture(scope="module")
def blob_url(azurite):
    from azure.storage.blob import BlobSasPermissions, generate_blob_sas

    container = azurite.service_client().create_container(f"latency{random.Random().randrange(10**8)}")
    container.upload_blob("disk.vhd", DATA)
    sas = generate_blob_sas(azurite.account, container.container_name, "disk.vhd", account_key=azurite.key,
                            permission=BlobSasPermissions(read=True),
                            expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    yield f"{azurite.blob_endpoint}/{container.container_name}/disk.vhd?{sas}"
    container.delete_container()


def walk(reader) -> list[bytes]:
    """What windisk does over the export URL: a sequential walk of 1 KiB records (the MFT)."""
    return [reader.read_at(offset, 1024) for offset in range(0, 1 << 20, 1024)]


@pytest.mark.slow  # Azurite
def test_fewer_round_trips_through_a_slow_link(azurite, blob_url):
    records = [DATA[o:o + 1024] for o in range(0, 1 << 20, 1024)]
    spots = [(i * 2 * BLOCK + (2 << 20), 512) for i in range(8)]  # 8 blocks, none adjacent, away from the walk
    with LatencyProxy(azurite.blob_endpoint.rsplit("/", 1)[0], rtt=0.005) as proxy:
        url = proxy.url(blob_url)
        assert "sig=" in url and proxy.endpoint in url

        with open_source(url, block_size=BLOCK, concurrency=1, readahead=0) as before:
            proxy.reset()
            assert walk(before) == records
            old_walk = proxy.reset()
            assert before.read_many(spots) == [DATA[o:o + n] for o, n in spots]
            old_spots = proxy.reset()
        assert old_walk.requests == 16 and old_walk.most_in_flight == 1  # one request per 64 KiB block
        assert old_spots.requests == 8 and old_spots.most_in_flight == 1 and before.round_trips == 16 + 8

        with open_source(url, block_size=BLOCK) as after:
            proxy.reset()
            assert walk(after) == records
            after.drain()  # the read-ahead still on its way belongs to the walk
            new_walk = proxy.reset()
            waits = after.round_trips
            assert after.read_many(spots) == [DATA[o:o + n] for o, n in spots]
            new_spots = proxy.reset()
        # the walk's blocks came in a few growing read-ahead requests, the caller waited a few times
        assert new_walk.requests <= 8 and waits <= 8
        # and what came through beyond the walk is at most one read-ahead window (DEFAULT_READAHEAD)
        assert new_walk.bytes_down <= old_walk.bytes_down + (1 << 20)
        # 8 independent blocks: 8 requests, all in flight together, one wait instead of 8
        assert new_spots.requests == 8 and 1 < new_spots.most_in_flight <= HTTP_CONCURRENCY
        assert after.round_trips - waits == 1


@pytest.mark.slow  # Azurite
def test_the_proxy_passes_answers_through(azurite, blob_url):
    with LatencyProxy(azurite.blob_endpoint.rsplit("/", 1)[0], rtt=0.001) as proxy:
        with open_source(proxy.url(blob_url)) as reader:
            assert reader.size == len(DATA) and reader.read_at(len(DATA) - 5, 5) == DATA[-5:]
        with pytest.raises(CrashcartError) as caught:
            open_source(proxy.url(blob_url.replace("sig=", "sig=AAAA")))
        assert caught.value.exit_code == ExitCode.AZURE_AUTH and "403" in caught.value.message
        assert proxy.stats.requests == 3 and proxy.stats.seen[1][2] == f"bytes={len(DATA) - 4096}-{len(DATA) - 1}"
        assert all("sig" not in path for _, path, _ in proxy.stats.seen)


def test_the_proxy_wants_an_http_upstream():
    with pytest.raises(ValueError, match="http://host:port"):
        LatencyProxy("https://example.com")


# The triage through the proxy (issue 15: the reader's round trips on a dump's module list, both layouts) is
# tests/dumpfile/test_rangereads.py::test_triage_over_a_slow_link_waits_for_the_network_a_few_dozen_times.


def _settled(proxy: LatencyProxy, connections: int) -> int:
    """The proxy's connection count once the reader's background warm-up has reached it (or after 5 s)."""
    import time

    deadline = time.monotonic() + 5
    while proxy.stats.connections < connections and time.monotonic() < deadline:
        time.sleep(0.01)
    return proxy.stats.connections


@pytest.mark.slow  # Azurite
def test_the_reader_opens_its_connections_while_the_first_request_is_out(azurite, blob_url):
    """Issue 15: a new connection costs a handshake round trip; the reader pays them all behind its probe,
    and its batches after it open none (no request is added for that either)."""
    spots = [[(i * 2 * BLOCK + (2 << 20) + shift, 512) for i in range(8)] for shift in (0, BLOCK)]
    with LatencyProxy(azurite.blob_endpoint.rsplit("/", 1)[0], rtt=0.005) as proxy:
        with open_source(proxy.url(blob_url), block_size=BLOCK, concurrency=8) as reader:
            opened = _settled(proxy, 8)
            for batch in spots:
                assert reader.read_many(batch) == [DATA[o:o + n] for o, n in batch]
                assert proxy.stats.connections == opened == 8  # the probe's and 7 warmed; none new per batch
        assert proxy.stats.requests == 1 + 8 + 8 and proxy.stats.most_in_flight > 1
        proxy.reset()
        with open_source(proxy.url(blob_url), block_size=BLOCK, concurrency=1, readahead=0) as sequential:
            assert sequential.read_many(spots[0]) == [DATA[o:o + n] for o, n in spots[0]]
        assert proxy.stats.connections == 1 and proxy.stats.requests == 1 + 8  # one connection, nothing warmed


@pytest.mark.slow  # Azurite
def test_a_connection_is_usable_one_rtt_after_it_was_opened(azurite, blob_url):
    """The proxy's model: every request waits an RTT, one on a connection opened that moment one more (the
    handshake); a connection opened ahead has done its handshake by then. Never less than the model."""
    import http.client
    import time
    import urllib.parse

    rtt = 0.2
    with LatencyProxy(azurite.blob_endpoint.rsplit("/", 1)[0], rtt=rtt) as proxy:
        target = urllib.parse.urlsplit(proxy.url(blob_url))
        path = f"{target.path}?{target.query}"
        headers = {"Range": "bytes=0-511", "x-ms-version": "2021-08-06"}
        at_once, ahead = (http.client.HTTPConnection(target.hostname, target.port) for _ in range(2))
        ahead.connect()
        time.sleep(1.5 * rtt)
        waited = []
        for conn in (at_once, ahead, ahead):  # connect and send at once; opened ahead; kept alive
            start = time.perf_counter()
            conn.request("GET", path, headers=headers)
            assert conn.getresponse().read() == DATA[:512]
            waited.append(time.perf_counter() - start)
        at_once.close(), ahead.close()
    cold, warmed, kept = waited
    assert cold >= 2 * rtt and rtt <= warmed < 2 * rtt and rtt <= kept < 2 * rtt
    assert [t.held >= rtt for t in proxy.stats.timings] == [True] * 3
    assert proxy.stats.connections == 2 and proxy.stats.requests == 3
    assert all(t.upstream > 0 and t.relay >= 0 for t in proxy.stats.timings)
