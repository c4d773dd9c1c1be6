"""Range reads over a slow link: the reader with concurrency and read-ahead against the strictly sequential one.

    .venv/bin/python bench/rangeread_bench.py [--size 4G] [--modules 200] [--rtt-ms 25] [--mbit 100]

Builds a complete bitmap dump (scripts/devkit/dumpbuilder.py, --modules loaded modules, the faulting one
last, pages scattered over RAM), uploads it to Azurite as a sparse page blob, and puts
scripts/devkit/latencyproxy.py in front of Azurite (--rtt-ms per request, one more for a new connection,
--mbit shared by all connections). Then, in the same run, each figure with the reader as it was
(`concurrency=1, readahead=0`: every request waits for the one before) and as it is now (the defaults):

1. the triage of the dump (scripts.dumpfile.triage over the blob URL): requests, bytes, waits, seconds;
2. the same reads the triage made, known in advance and asked for in one `read_many` - what the dump
   reader would get by handing the reader independent reads together (it reads one address at a time,
   each one found in the bytes of the one before; see the report of issue 15);
3. a sequential walk (1 KiB records over the first 4 MiB of a 16 MiB blob, 64 KiB blocks: windisk reading
   the MFT over the export URL); the walk stops there, so what read-ahead fetched past it shows as bytes.

Prints a table, then one line per figure; the first is
`triage over 25 ms link: N requests, T s (was N0 requests, T0 s: R× faster)`, and a last line with the
triage's round trips (times it waited for the network, the opening probe included) and bytes, checked
against the 4 MiB budget (exit 1 over it, or on a wrong verdict).

The triage's reads are batched by the dump reader (scripts/dumpfile/readahead.py): page-table walks level
by level, the module list from both ends with read-ahead over neighbouring pages, a module's names and
header together. What stays is the module list's dependent chain: the builder puts half of the entries on
random pages of a 1 GiB direct map, each one's address found only in its neighbours' links, so at least
half of those entries cost a round trip each whatever the reader does (see the report of issue 15).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from triage_bench import human, module_list, parse_size, upload_sparse  # noqa: E402

from scripts.base.rangeio import open_source  # noqa: E402
from scripts.devkit.azurite import start_azurite  # noqa: E402
from scripts.devkit.dumpbuilder import build_bitmap_dump  # noqa: E402
from scripts.devkit.latencyproxy import LatencyProxy  # noqa: E402
from scripts.dumpfile.triage import triage  # noqa: E402

BEFORE = {"concurrency": 1, "readahead": 0}
BUDGET = 4 << 20  # the triage's read budget for a 4 GiB dump, the unwinding included (bench/triage_bench.py)
NOW: dict = {}


class Recording:
    """A dump source for the triage that remembers what it read (read_at/size/name/counters over a reader)."""

    def __init__(self, reader):
        self._reader, self.name, self.size = reader, reader.name, reader.size
        self.spots: list[tuple[int, int]] = []

    def read_at(self, offset: int, size: int) -> bytes:
        self.spots.append((offset, size))
        return self._reader.read_at(offset, size)

    @property
    def bytes_read(self) -> int:
        return self._reader.bytes_read

    @property
    def requests(self) -> int:
        return self._reader.requests

    def close(self) -> None:
        pass


def run(proxy: LatencyProxy, url: str, options: dict, work, **open_options) -> dict:
    proxy.reset()
    start = time.perf_counter()
    with open_source(url, **open_options, **options) as reader:
        result = work(reader)
        seconds = time.perf_counter() - start
        reader.drain()
        return {"seconds": seconds, "requests": reader.requests, "bytes": reader.bytes_read,
                "waits": reader.round_trips + 1, "result": result, "in_flight": proxy.stats.most_in_flight}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4G", help="RAM of the dumped machine (sparse: 4G costs little disk)")
    parser.add_argument("--modules", type=int, default=200)
    parser.add_argument("--rtt-ms", type=float, default=25.0)
    parser.add_argument("--mbit", type=float, default=100.0, help="the link's bandwidth (0: no cap)")
    args = parser.parse_args(argv)
    rtt = args.rtt_ms / 1000

    with tempfile.TemporaryDirectory(prefix="rangeread-bench-") as tmp, start_azurite() as azurite:
        built = build_bitmap_dump(Path(tmp) / "MEMORY.DMP", memory_size=parse_size(args.size),
                                  modules=module_list(args.modules), complete=True)
        walk_file = Path(tmp) / "disk.bin"
        walk_file.write_bytes(bytes(range(256)) * (16 << 12))  # 16 MiB, of which the walk reads 4
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        container = azurite.service_client().create_container("bench")
        upload_sparse(container, "MEMORY.DMP", built.path)
        container.upload_blob("disk.bin", walk_file.read_bytes())
        urls = {}
        for name in ("MEMORY.DMP", "disk.bin"):
            sas = generate_blob_sas(azurite.account, "bench", name, account_key=azurite.key,
                                    permission=BlobSasPermissions(read=True),
                                    expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
            urls[name] = f"{azurite.blob_endpoint}/bench/{name}?{sas}"

        local = Recording(open_source(built.path))
        expected = triage(local).faulting_symbol
        spots = local.spots

        with LatencyProxy(azurite.blob_endpoint.rsplit("/", 1)[0], rtt=rtt,
                          bytes_per_second=args.mbit * 125_000 or None) as proxy:
            dump, disk = proxy.url(urls["MEMORY.DMP"]), proxy.url(urls["disk.bin"])
            figures = {
                "triage": [run(proxy, dump, o, lambda r: triage(r).faulting_symbol) for o in (BEFORE, NOW)],
                "the triage's reads, together": [
                    run(proxy, dump, BEFORE, lambda r: [r.read_at(o, n) for o, n in spots]),
                    run(proxy, dump, NOW, lambda r: r.read_many(spots))],
                "sequential walk": [run(proxy, disk, o, lambda r: sum(len(r.read_at(at, 1024)) for at in range(0, 4 << 20, 1024)),
                                        block_size=64 << 10) for o in (BEFORE, NOW)],
            }

    wrong = [f for f in figures["triage"] if f["result"] != expected]
    same = figures["the triage's reads, together"]
    if same[0]["result"] != same[1]["result"]:
        wrong.append(same[1])
    print(f"{human(built.file_size)} complete bitmap dump, {args.modules} modules (the faulting one last); "
          f"{len(spots)} reads by the triage; link: {args.rtt_ms:g} ms RTT, "
          f"{f'{args.mbit:g} Mbit/s' if args.mbit else 'no bandwidth cap'}\n")
    header = ("figure", "reader", "requests", "waits", "most at once", "bytes", "seconds")
    rows = [header]
    for name, (old, new) in figures.items():
        for label, f in (("sequential", old), ("concurrent + read-ahead", new)):
            rows.append((name, label, str(f["requests"]), str(f["waits"]), str(f["in_flight"]),
                         f"{f['bytes']:,} ({human(f['bytes'])})", f"{f['seconds']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(widths[j]) if j < 2 else c.rjust(widths[j]) for j, c in enumerate(row)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("(waits: times the caller waited for the network, the opening probe included)\n")

    link = f"{args.rtt_ms:g} ms link"
    for name, (old, new) in figures.items():
        print(f"{name} over {link}: {new['requests']} requests, {new['seconds']:.2f} s "
              f"(was {old['requests']} requests, {old['seconds']:.2f} s: {old['seconds'] / new['seconds']:.1f}× faster)")
    old, new = figures["triage"]
    print(f"triage over {link}: {new['waits']} round trips, {new['bytes']:,} bytes read "
          f"(was {old['waits']} round trips, {old['bytes']:,} bytes; budget {human(BUDGET)})")
    if new["bytes"] > BUDGET:
        wrong.append(new)
    if wrong:
        print(f"WRONG results: {[f['result'] for f in wrong][:3]} (expected {expected})")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
