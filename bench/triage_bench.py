"""How much of a dump `triage` reads, and how long it takes, from a local file and from blob storage.

    .venv/bin/python bench/triage_bench.py [--sizes 64M,1G,4G] [--modules 200] [--repeat 3] [--no-azurite]

Builds sparse synthetic dumps (scripts/devkit/dumpbuilder.py: full run-list and complete bitmap layouts,
--modules loaded modules with the faulting driver last, pages scattered over RAM), then triages each one from the local file
and through a SAS URL against Azurite, and prints a table: dump size, layout, source, seconds (median of
--repeat runs), bytes and requests. The dumps are sparse files and are uploaded as sparse page blobs
(only the written 4 KiB pages are sent), so a 4 GiB dump costs a few hundred KiB of disk.

Each dump is triaged twice: without unwinding (`unwind=False`: header, page tables, module list) and with
the stack walk and blame (#14). Where clang and lld-link are installed the dumps carry real compiled
images (tests/dumpfile/stack_sources.py) and a crashing stack ntoskrnl -> contosoflt.sys, so the walk
does real work and its culprit is checked too; without them the walk runs on the builder's random stack.

The budgets checked at the end are the issues': at most 2 MiB read for a 4 GiB dump without unwinding,
4 MiB with it (exit 1 if exceeded).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.dumpfile.triage import triage  # noqa: E402
from scripts.devkit.azurite import start_azurite  # noqa: E402
from scripts.devkit.dumpbuilder import (  # noqa: E402
    DEFAULT_MODULES, GiB, MiB, build_bitmap_dump, build_full_dump,
)
from scripts.devkit.triagesetup import module_list, upload_sparse  # noqa: E402

BUDGET_4GIB = 2 * MiB
BUDGET_4GIB_UNWIND = 4 * MiB
LAYOUTS = {
    "full (run list)": lambda path, size, modules, **stack: build_full_dump(path, memory_size=size, modules=modules,
                                                                            **stack),
    "bitmap (complete)": lambda path, size, modules, **stack: build_bitmap_dump(
        path, memory_size=size, modules=modules, complete=True, **stack),
}


def stack_options() -> dict:
    """images + stack for the builders when the toolchain is here (else {}: the plain synthetic dump)."""
    from scripts.devkit.dumpstack import Call, Image
    from scripts.devkit.pebuilder import build_pe, toolchain_problem
    from tests.dumpfile import stack_sources as src

    if toolchain_problem():
        print(f"note: {toolchain_problem()}; unwinding runs on a random stack", file=sys.stderr)
        return {}
    bases = {m.name: m.base for m in DEFAULT_MODULES}
    images = []
    for name, sources, entry in (("ntoskrnl.exe", {"nt.s": src.NTOS_ASM}, "NtEntry"),
                                 ("contosoflt.sys", {"drv.c": src.DRIVER_C, "drv.s": src.DRIVER_ASM}, "DriverEntry")):
        built = build_pe(sources, name=name, entry=entry, base=bases[name])
        images.append(Image(name, built.base, built.image, built.functions))
    stack = (Call("contosoflt.sys", "DriverEntry"), Call("contosoflt.sys", "DrvFramePointer"),
             Call("ntoskrnl.exe", "ExpDispatch"), Call("ntoskrnl.exe", "ExpFault"))
    return {"images": tuple(images), "stack": stack}


def parse_size(text: str) -> int:
    units = {"M": MiB, "G": GiB}
    return int(text[:-1]) * units[text[-1].upper()]


def human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def measure(source: str, repeat: int, unwind: bool) -> tuple[float, object]:
    times, verdict = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        verdict = triage(source, unwind=unwind)
        times.append(time.perf_counter() - start)
    return statistics.median(times), verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64M,1G,4G")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modules", type=int, default=200, help="loaded modules in each dump (a real VM: 150-250)")
    parser.add_argument("--no-azurite", action="store_true", help="local files only")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]

    rows = []
    extra = stack_options()
    with tempfile.TemporaryDirectory(prefix="triage-bench-") as tmp:
        dumps = []
        for size in sizes:
            for layout, build in LAYOUTS.items():
                path = Path(tmp) / f"{layout.split()[0]}-{size // MiB}M.dmp"
                built = build(path, size, module_list(args.modules), **extra)
                dumps.append((size, layout, built))
        azurite = None if args.no_azurite else start_azurite()
        try:
            urls = {}
            if azurite is not None:
                endpoint = azurite.__enter__()
                from azure.storage.blob import BlobSasPermissions, generate_blob_sas

                container = endpoint.service_client().create_container("bench")
                for size, layout, built in dumps:
                    name = built.path.name
                    upload_sparse(container, name, built.path)
                    sas = generate_blob_sas(endpoint.account, "bench", name, account_key=endpoint.key,
                                            permission=BlobSasPermissions(read=True),
                                            expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
                    urls[built.path] = f"{endpoint.blob_endpoint}/bench/{name}?{sas}"
            for size, layout, built in dumps:
                sources = [("local file", str(built.path))]
                if built.path in urls:
                    sources.append(("azurite (SAS)", urls[built.path]))
                for (source_name, source), unwind in ((s, u) for s in sources for u in (False, True)):
                    seconds, verdict = measure(source, args.repeat, unwind)
                    ok = verdict.faulting_symbol == built.faulting_symbol
                    if unwind and extra:
                        ok = ok and verdict.culprit is not None and verdict.culprit.frame.module.name == "contosoflt.sys"
                    culprit = verdict.culprit.frame.symbol if verdict.culprit else "-"
                    rows.append((human(built.file_size), layout, source_name + (" +unwind" if unwind else ""), seconds,
                                 verdict.bytes_read, verdict.requests,
                                 ("ok" if ok else f"WRONG: {verdict.faulting_symbol}") + (f", culprit {culprit}" if unwind else ""),
                                 size, built, unwind))
        finally:
            if azurite is not None:
                azurite.__exit__(None, None, None)

    print(f"{args.modules} loaded modules per dump, the faulting one last; median of {args.repeat} runs\n")
    header = ("dump size", "layout", "source", "seconds", "bytes read", "requests", "verdict")
    table = [header] + [(r[0], r[1], r[2], f"{r[3]:.3f}", f"{r[4]:,} ({human(r[4])})", str(r[5]), r[6]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(widths[j]) if j < 3 or j == 6 else cell.rjust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            print("  ".join("-" * w for w in widths))

    failures = [r for r in rows if not r[6].startswith("ok")]
    over = []
    for unwind, budget in ((False, BUDGET_4GIB), (True, BUDGET_4GIB_UNWIND)):
        big = [r for r in rows if r[7] >= 4 * GiB and r[9] is unwind]
        over += [r for r in big if r[4] > budget]
        if big:
            worst = max(r[4] for r in big)
            print(f"\nbudget {'with' if unwind else 'without'} unwinding: at most {human(budget)} read for a 4 GiB "
                  f"dump; worst case read {human(worst)}: {'PASS' if all(r[4] <= budget for r in big) else 'FAIL'}")
    if failures:
        print(f"{len(failures)} wrong verdict(s)")
    return 1 if over or failures else 0


if __name__ == "__main__":
    sys.exit(main())
