"""`pipenv run demo` (`make demo`): the kit's main job on this machine, no Azure account needed.

The world (a crashed VM's disk, Azurite, the ARM double) is scripts.devkit.demo; this verb checks the
options, runs it and prints what a person wants to see: the triage table, the report, and whether the
stored blob is byte-identical to the MEMORY.DMP that was put on the disk. Exit code 0 when the dump was
collected, triaged and identical; otherwise the collection's exit code (or 15, or 20).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from scripts.base import userfiles
from scripts.base.console import emit_json, is_interactive
from scripts.base.errors import CrashcartError, ExitCode
from scripts.cli.triage import render
from scripts.devkit import demo
from scripts.run import numbers
from scripts.run.numbers import Range

WIDTH = 26


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-mib", default=demo.DEFAULT_MEMORY_MIB,
                        help="RAM of the pretend VM, so the size of its complete dump (default: %(default)s)")
    parser.add_argument("--scheme", choices=("gpt", "mbr"), default="gpt",
                        help="partition table: gpt (Generation 2, default) or mbr (Generation 1)")
    parser.add_argument("--out-dir", type=Path, default=demo.DEFAULT_OUT_DIR,
                        help="where the report goes (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, help="keep the disk image and dumps here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="also write the result as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    numbers.check_options(args, {"memory_mib": Range(32, 16 * 1024, integer=True, unit="MiB")})
    if args.memory_mib < 32 or args.memory_mib % 2:
        raise CrashcartError(f"--memory-mib {args.memory_mib} is not usable", "give an even number of MiB, at least 32",
                             ExitCode.USAGE)
    if args.work_dir is not None:  # a file in the way: told now, not after the disk image is built
        userfiles.require_folder(args.work_dir, "--work-dir", create=True)
    userfiles.require_folder(args.out_dir, "--out-dir", create=True)
    demo.check_prerequisites()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="crashcart-demo-"))
    try:
        done = demo.run_demo(work, memory_mib=args.memory_mib, scheme=args.scheme, out_dir=args.out_dir,
                             progress=is_interactive())
    except CrashcartError as err:
        partial = getattr(err, "result", None)
        if partial is not None and partial.report_files.get("markdown"):
            sys.stderr.write(Path(partial.report_files["markdown"]).read_text(encoding="utf-8"))
        raise
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if done.verdict is not None:
        render(done.verdict)
    _print(done)
    if args.json:
        emit_json({**done.summary, "result": done.result.to_dict()})
    if not done.summary["identical"]:
        raise CrashcartError("the stored blob differs from the MEMORY.DMP on the disk",
                             "this is a bug in crashcart: please report it with the log (-v)", ExitCode.VERIFY_FAILED)
    if done.summary["faulting_driver"] is None:
        raise CrashcartError("the dump was collected but triage could not name the faulting driver",
                             "see the triage table above", ExitCode.BAD_DUMP)
    return int(ExitCode.OK)


def _print(done: demo.DemoRun) -> None:
    """The report, then the demo's verdict lines, on stderr."""
    s = done.summary
    report_md = Path(done.result.report_files["markdown"]).read_text(encoding="utf-8")
    sys.stderr.write("\n" + report_md + "\n")
    kit_copy = s["kit_bytes_for_the_copy"]
    lines = [
        ("faulting driver", s["faulting_driver"] or "(not named)"),
        ("verdict", s["verdict"] or "-"),
        ("MEMORY.DMP on the disk", f"SHA-256 {s['original_sha256']}, CRC-64 {s['original_crc64']}"),
        ("stored blob", f"SHA-256 {s['blob_sha256']} (downloaded by the demo)  ({s['blob']})"),
        ("proof in the manifest", f"CRC-64 {s['blob_crc64']}, computed by the {s['crc64_by']} (no read-back)"),
        ("byte-identical", "yes" if s["identical"] else "NO"),
        ("bytes through the kit", f"{kit_copy} for the copy ({100 * kit_copy / max(1, s['dump_bytes']):.2f}% "
                                  f"of the dump), {s['kit_bytes_for_the_sha256']} read back for the SHA-256"),
        ("snapshot", f"access revoked: {s['snapshot_access_revoked']}, deleted: {s['snapshot_deleted']}"),
        ("time", f"export {s['export_seconds']} s, whole demo {s['total_seconds']} s"),
        ("report", f"{done.result.report_files.get('markdown')}"),
    ]
    sys.stderr.write("crashcart demo: result\n" + "".join(f"  {k:<{WIDTH}} {v}\n" for k, v in lines))
