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
