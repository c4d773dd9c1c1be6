"""Triage over a slow link: the range reader with concurrency and read-ahead against the strictly sequential one.

    .venv/bin/python bench/rangeread_bench.py [--sizes 4G,64G] [--modules 200] [--layout measured|scattered]
                                              [--no-other-layout] [--rtt-ms 20] [--mbit 100]

Builds complete bitmap dumps (scripts/devkit/triagesetup.py over dumpbuilder.py: --modules loaded modules,
the faulting one last, so the walk of the module list goes all the way) of machines with --sizes of RAM,
uploads each to Azurite as a sparse page blob (only the written pages: the run prints the disk Azurite
used), and puts scripts/devkit/latencyproxy.py in front of Azurite (--rtt-ms per request, one more for a
new connection, --mbit shared by all connections). Each dump is triaged twice over the proxy: with the
reader as it was (`concurrency=1, readahead=0`: every request waits for the one before) and as it is now.
The verdict (the faulting module and offset) is checked against the local file's and the builder's: exit 1
on a wrong one (or over the 4 MiB read budget on a 4 GiB dump). In the table too: the first triage's reads
all known ahead and handed over in one `read_many` (no dependent chain left: what the bound on requests in
flight alone costs), and a sequential windisk-like walk (1 KiB records over 4 MiB of a 16 MiB blob, 64 KiB
blocks).

Prints a table, then exactly one final line per figure:
`triage over 20 ms RTT: N sequential round trips, S s  [what was measured; goal ...: met/NOT met]` - one per
size with the module list laid out as --layout (default "measured"), and one labelled line for the first
size with the other layout (--no-other-layout skips it). N is the times the triage waited for the network,
the opening probe included; S its wall time. The issue's goal: N <= 12, S <= 0.5 s. The bracket says how long
the bytes alone take at --mbit (the issue names only the RTT: at the default 100 Mbit/s a 64 GiB dump's 2 MiB
bitmap is 0.17 s of the 0.5, and 12 waits of 20 ms plus the probe's handshake another 0.26 s, so that goal
leaves ~0.07 s for the server and the triage's own work) and splits S by what the proxy saw (its per-request
`timings`): Azurite busy (one Node thread serves a batch one request after the other, ~3 ms each on this
machine, where Blob storage serves them side by side), else the link model (some request held for the RTT or
a handshake, or a body paced through the link: measured, it comes to the model's figure), else the triage's
own work (no request out). The reader opens its pool's connections while its probe is out, so its batches pay no
handshakes (the "connections" column: the pool's size, whatever the number of requests).

Why S <= 0.5 is out of reach here, whatever the reader does (measured on this 2-core machine): the triage needs
~78 range requests (the module list alone is ~56 pages scattered over the pool: Get Blob takes one range per
request, and reading the gaps between them would cost megabytes), and Azurite serves them one after the other
at ~3 ms each (0.22-0.32 s; the "its reads known ahead" row: every read known, 4 waits, and still ~0.3 s of
Azurite). With 12 waits of 20 ms (0.24 s), the probe's handshake and the bytes, that is past 0.5 s before the
triage's own work. Tried: a replica of the blob serving the same answers side by side (its own process, each
request held ~3 ms): the three local parties (client, proxy, replica) then cost ~2 ms of CPU a request between
them on two cores, and S came to 0.58-0.70 s. Against Blob storage, which serves a client's requests in parallel,
the server's share of a batch is one request's latency, not the batch's sum.

The module list's layout. A real kernel's list, measured in ../shared/realdumps/ (the only real dump there
with the list's addresses is eolaruhagen_083125-14875-01.dmp, a Windows 10 19041 x64 small dump whose
DUMP_DRIVER_ENTRY64 copies keep InLoadOrderLinks: each entry's virtual address is its predecessor's Flink;
the rizin triage dumps zero the links, imhex's full dump is its first 16 KiB, and there is no real kernel
or bitmap dump there, so the *physical* pages behind the entries could not be measured):
- 156 entries on 54 distinct 4 KiB pages, spread over 88 MiB of pool (16 2-MiB regions); of the 155
  steps in list order 42 stay on the page, 52 go to a page within 16 either way, 61 go far;
- the 62 boot-loaded ones (ntoskrnl.exe to CLASSPNP.SYS) on 13 pages within 136 KiB, up to 9 to a page,
  0x1B0-0x1D0 apart in load order: the entry and its BaseDllName in one allocation (name at +0x148);
- the 94 loaded later on 42 pages over 88 MiB, 59 of their 93 steps to an unrelated page, pages shared
  by entries far apart in the list (freed pool reused), at most 7 to a page.
The builder's "measured" layout (dumpkernel.MEASURED_LAYOUT) reproduces these ratios: for 156 modules 56
pages, the boot part on 14 pages within 124 KiB, the later part on 42 pages over 53 MiB in 14 regions
with 85 of 93 far steps (less locality than measured: pessimistic). Not measured (a small dump has no
physical pages) but documented: its pool is mapped with 2 MiB pages, as Windows maps the initial
non-paged pool on machines with more than 2 GiB of RAM (Windows Internals, 7th ed., part 1, ch. 5, "Large
and small pages"), and its PML4 is at 0x1ad000, the System process's DirectoryTableBase in the two real x64
dumps whose header holds the kernel's (rizin_triage_x64.dmp, the imhex full dump; the third real one,
0x7108e000, crashed in a process's context). "scattered" is the older, pessimistic layout: every entry on
a 4 KiB page of its own, half of them on random pages of a 1 GiB direct map, the PML4 anywhere in RAM.

Where the round trips go (measured layout, 200 modules, 32 requests in flight; the same for 4 and 64 GiB):
the probe; the PML4 with the whole bitmap (physical.py: the PML4's bit is in the probe's bytes); the
kernel half's PDPT pages, whole; its page directories, whole (paging.py `_tables_ahead`); the list's head
(ntoskrnl's 2 MiB page; the stack the bug check's records are on is translated with it, its bytes come in
the background); the first and the last entries with the 31 pages after the first (one request on a
large page); then the list breadth-first (readahead.ListAhead: every fetched page scanned for entries,
the pages their links point to in the next batch), ~6 steps, all data (the pool's large pages need no
page table). 12 in all; the scattered layout's entries, each a page apart and known only from its
neighbours' links, still need ~60. What each change bought (4 GiB, measured): 29 at 0d8226f; 25 with 16
requests in flight; 23 with the upper tables whole; 15 with the pool on large pages, the whole bitmap in
the first batch that needs it and no blind sequential read-ahead; 14 with the records and module names
in the background; 13 with 32 in flight; 12 with the PML4 low and the bitmap in its batch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from triage_bench import human, parse_size  # noqa: E402

from scripts.base.rangeio import open_source  # noqa: E402
from scripts.devkit.azurite import start_azurite  # noqa: E402
from scripts.devkit.latencyproxy import LatencyProxy  # noqa: E402
from scripts.devkit.triagesetup import LAYOUTS, ReadAtOnly, build_triage_target, upload_sparse  # noqa: E402
from scripts.dumpfile.triage import triage  # noqa: E402

BEFORE = {"concurrency": 1, "readahead": 0}
BUDGET = 4 << 20  # the triage's read budget for a 4 GiB dump, the unwinding included (bench/triage_bench.py)
NOW: dict = {}
GOAL_TRIPS, GOAL_SECONDS = 12, 0.5  # issue 15


def run(proxy: LatencyProxy, url: str, options: dict, work, **open_options) -> dict:
    proxy.reset()
    start = time.monotonic()  # the proxy's clock
    with open_source(url, **open_options, **options) as reader:
        result = work(reader)
        end = time.monotonic()
        reader.drain()
        stats = proxy.stats
        return {"seconds": end - start, "requests": reader.requests, "bytes": reader.bytes_read,
                "waits": reader.round_trips + 1, "result": result, "in_flight": stats.most_in_flight,
                "connections": stats.connections, "split": split(stats.timings, start, end)}


def split(timings: list, start: float, end: float) -> dict[str, float]:
    """Where the wall time from `start` to `end` went, from the proxy's record of each request: "server" while
    the upstream server had a request (Azurite: one Node thread, so a batch's requests are served one after
    the other, where Blob storage serves them side by side), "link" while it had none but some request was
    held for the link's latency or its body paced by the bandwidth (the model: 12 waits come to 12 RTTs,
    the probe's handshake and the bytes at the bandwidth), "client" while none was in the proxy (the
    triage's and the reader's own work, the client's HTTP included)."""
    intervals = []
    for t in timings:
        forwarded = t.arrived + t.held
        intervals += [(t.arrived, forwarded, "link"), (forwarded, forwarded + t.upstream, "server"),
                      (forwarded + t.upstream, forwarded + t.upstream + t.relay, "link")]
    cuts = sorted({start, end, *(x for a, b, _ in intervals for x in (a, b) if start < x < end)})
    out = {"link": 0.0, "server": 0.0, "client": 0.0}
    for a, b in zip(cuts, cuts[1:]):
        active = {kind for lo, hi, kind in intervals if lo <= a and b <= hi and hi > lo}
        out["server" if "server" in active else "link" if "link" in active else "client"] += b - a
    return out


def azurite_dirs() -> set[Path]:
    """Azurite workdirs in the temp dir (scripts.devkit.azurite makes one per run)."""
    return set(Path(tempfile.gettempdir()).glob("azurite-*"))


def disk_use(dirs: set[Path]) -> int:
    """Bytes of disk the files under `dirs` take (allocated blocks: a sparse file counts what it holds)."""
    return sum(f.stat().st_blocks * 512 for d in dirs for f in d.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4G,64G", help="RAM of the dumped machines (sparse: 64G costs little disk)")
    parser.add_argument("--modules", type=int, default=200)
    parser.add_argument("--layout", choices=LAYOUTS, default="measured",
                        help="the module list's layout for the main figures (dumpkernel.CrashedMachine.module_layout)")
    parser.add_argument("--no-other-layout", action="store_true",
                        help="skip the labelled figure of the other layout (the first size only)")
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--mbit", type=float, default=100.0, help="the link's bandwidth (0: no cap)")
    args = parser.parse_args(argv)
    rtt = args.rtt_ms / 1000
    sizes = [parse_size(text) for text in args.sizes.split(",")]
    other = next(layout for layout in LAYOUTS if layout != args.layout)
    targets = [(size, args.layout) for size in sizes] + ([] if args.no_other_layout else [(sizes[0], other)])

    others = azurite_dirs()
    with tempfile.TemporaryDirectory(prefix="rangeread-bench-") as tmp, start_azurite() as azurite:
        ours = azurite_dirs() - others  # this run's Azurite (another one started meanwhile would count too)
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        container = azurite.service_client().create_container("bench")

        def url(name: str) -> str:
            sas = generate_blob_sas(azurite.account, "bench", name, account_key=azurite.key,
                                    permission=BlobSasPermissions(read=True),
                                    expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
            return f"{azurite.blob_endpoint}/bench/{name}?{sas}"

        dumps = []
        for n, (size, layout) in enumerate(targets):
            built = build_triage_target(Path(tmp) / f"MEMORY{n}.DMP", size, args.modules, layout)
            upload_sparse(container, built.path.name, built.path)
            local = ReadAtOnly(open_source(built.path))
            expected = triage(local).faulting_symbol
            if expected != built.faulting_symbol:
                print(f"WRONG verdict on the local file: {expected} (the builder put the fault at {built.faulting_symbol})")
                return 1
            dumps.append({"size": size, "layout": layout, "built": built, "url": url(built.path.name),
                          "expected": expected, "spots": local.spots})
        walk_file = Path(tmp) / "disk.bin"
        walk_file.write_bytes(bytes(range(256)) * (16 << 12))  # 16 MiB, of which the walk reads 4
        container.upload_blob("disk.bin", walk_file.read_bytes())
        stored = disk_use(ours)
        on_disk = sum(d["built"].path.stat().st_blocks * 512 for d in dumps)

        with LatencyProxy(azurite.blob_endpoint.rsplit("/", 1)[0], rtt=rtt,
                          bytes_per_second=args.mbit * 125_000 or None) as proxy:
            for d in dumps:
                d["figures"] = [run(proxy, proxy.url(d["url"]), o, lambda r: triage(r).faulting_symbol)
                                for o in (BEFORE, NOW)]
            disk = proxy.url(url("disk.bin"))
            first = dumps[0]  # the floor of the reader's bound on requests in flight: every read known ahead
            together = [run(proxy, proxy.url(first["url"]), BEFORE, lambda r: [r.read_at(o, n) for o, n in first["spots"]]),
                        run(proxy, proxy.url(first["url"]), NOW, lambda r: r.read_many(first["spots"]))]
            walk = [run(proxy, disk, o, lambda r: sum(len(r.read_at(at, 1024)) for at in range(0, 4 << 20, 1024)),
                        block_size=64 << 10) for o in (BEFORE, NOW)]

    wrong = []
    files = ", ".join(f"{human(d['built'].file_size)} ({d['layout']})" for d in dumps)
    print(f"complete bitmap dumps of {files}, {args.modules} modules (the faulting one last); stored by Azurite "
          f"as sparse page blobs in {human(stored)} of disk (the dump files: {human(on_disk)}); this run's peak "
          f"memory {human(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}; link: {args.rtt_ms:g} ms RTT, "
          f"{f'{args.mbit:g} Mbit/s' if args.mbit else 'no bandwidth cap'}\n")
    header = ("figure", "reader", "requests", "waits", "most at once", "connections", "bytes", "seconds",
              "Azurite/link/client s")
    rows = [header]
    named = [(f"triage, {human(d['size'])} RAM, {d['layout']} list", d["figures"]) for d in dumps]
    named.append((f"its reads known ahead ({human(dumps[0]['size'])}, {dumps[0]['layout']})", together))
    for name, (old, new) in [*named, ("sequential walk (windisk)", walk)]:
        for label, f in (("sequential", old), ("concurrent + read-ahead", new)):
            rows.append((name, label, str(f["requests"]), str(f["waits"]), str(f["in_flight"]), str(f["connections"]),
                         f"{f['bytes']:,} ({human(f['bytes'])})", f"{f['seconds']:.2f}", _split(f)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(widths[j]) if j < 2 else c.rjust(widths[j]) for j, c in enumerate(row)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("(waits: times the caller waited for the network, the opening probe included; connections: opened to "
          "the proxy, each paying a handshake RTT (the reader opens its pool's while its first request is out); "
          "\"its reads known ahead\": the first triage's reads, all handed to the reader in one read_many - no "
          "dependent chain, only the bound on requests in flight; Azurite/link/client: the seconds split by what "
          "the proxy saw - Azurite busy, else the link model (RTT, handshakes, bandwidth), else no request out)\n")

    for d in dumps:
        old, new = d["figures"]
        # the bandwidth: the issue names only the RTT; at --mbit the bytes alone take this long (the 2 MiB
        # bitmap of a 64 GiB dump: 0.17 s at 100 Mbit/s)
        parts = new["split"]
        link = (f" ({new['bytes'] * 8 / (args.mbit * 1e6):.2f} s of them at {args.mbit:g} Mbit/s)" if args.mbit
                else ", no bandwidth cap")
        wrong += [f"{f['result']} (expected {d['expected']})" for f in (old, new) if f["result"] != d["expected"]]
        if d["size"] == 4 << 30 and new["bytes"] > BUDGET:
            wrong.append(f"{new['bytes']:,} bytes read, over the {human(BUDGET)} budget")
        met = new["waits"] <= GOAL_TRIPS and new["seconds"] <= GOAL_SECONDS
        label = "module list as measured in a real dump" if d["layout"] == "measured" else \
            "module list scattered: every entry a page apart, the pessimistic layout"
        print(f"triage over {args.rtt_ms:g} ms RTT: {new['waits']} sequential round trips, {new['seconds']:.2f} s"
              f"  [{human(d['size'])} complete bitmap dump, {label}; {new['bytes']:,} bytes{link}; of the "
              f"{new['seconds']:.2f} s: Azurite busy {parts['server']:.2f} (its one thread serving the {new['requests']} requests one "
              f"after the other, {1000 * parts['server'] / max(1, new['requests']):.1f} ms a request), the link alone (RTT, "
              f"handshakes, bandwidth) {parts['link']:.2f}, "
              f"the triage's own work {parts['client']:.2f}; "
              f"was {old['waits']} round trips, {old['seconds']:.2f} s; goal N <= {GOAL_TRIPS}, S <= {GOAL_SECONDS}: "
              f"{'met' if met else 'NOT met'}]")
    if together[0]["result"] != together[1]["result"]:
        wrong.append("read_many returned other bytes than the same reads one at a time")
    if wrong:
        print(f"WRONG: {wrong[:3]}")
    return 1 if wrong else 0


def _split(figure: dict) -> str:
    return "/".join(f"{figure['split'][kind]:.2f}" for kind in ("server", "link", "client"))


if __name__ == "__main__":
    sys.exit(main())
