"""`pipenv run demo` (`make demo`): the kit's main job on this machine, no Azure account needed.

It plays a broken Azure VM and Azure itself, then runs the snapshot-export collection through exactly the
code path used against Azure:

1. builds the OS disk of a Windows VM that died with stop 0x7E: GPT with an EFI system partition, a
   Microsoft reserved partition, the Windows NTFS volume and a recovery volume; on the Windows volume a
   SYSTEM hive whose CrashControl names the dump, a complete MEMORY.DMP (from the test dump builder, the
   faulting address inside contosoflt.sys) written into a fragmented free space, a minidump, a page file;
2. starts Azurite (the storage emulator, from npm) with a loopback shim in front that implements Put Block
   From URL as the service does (Azurite 3.35 answers it 501), and a loopback ARM double that answers the
   snapshot's create / grant access / revoke access / delete like Azure Resource Manager;
3. uploads the image as a page blob in the form Azure exports a snapshot (a fixed VHD: the raw disk and a
   512-byte footer); the ARM double hands out that blob's read SAS as the grant's `accessSAS`;
4. runs `scripts.snapshot_export.collect_from_snapshot` (real azure-mgmt-compute and azure-storage-blob
   clients, pointed at the doubles by CRASHCART_ARM_ENDPOINT and CRASHCART_STORAGE_CONNECTION_STRING);
5. triages the stored dump and prints the report, the faulting driver, and whether the stored blob is
   byte-identical to the MEMORY.DMP that was put on the disk (SHA-256 of both).

The doubles live in tests/support (they are test fixtures; the runtime package never imports them except
here). Needs what the tests need: root and /dev/fuse for ntfs-3g, and `npm ci` for Azurite. Exit code 0
when the dump was collected, triaged and identical; otherwise the collection's exit code (or 15).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scripts.base.console import emit_json, environment, is_interactive, log, step
from scripts.base.errors import CrashcartError, ExitCode

DEFAULT_MEMORY_MIB = 256
DEFAULT_OUT_DIR = Path("crashcart-out") / "demo"
REPO = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-mib", type=int, default=DEFAULT_MEMORY_MIB,
                        help="RAM of the pretend VM, so the size of its complete dump (default: %(default)s)")
    parser.add_argument("--scheme", choices=("gpt", "mbr"), default="gpt",
                        help="partition table: gpt (Generation 2, default) or mbr (Generation 1)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the report goes (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, help="keep the disk image and dumps here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="also write the result as JSON on stdout")


def _prerequisites() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        from scripts.devkit import gptdisk
        from scripts.devkit.azurite import azurite_binary
    except ImportError as err:
        raise CrashcartError(f"the demo needs the repository's tests/support folder: {err}",
                             "run it from a checkout of the repository (make demo)", ExitCode.USAGE) from None
    reason = gptdisk.can_build()
    if reason:
        raise CrashcartError(f"the demo cannot build its NTFS disk image here: {reason}",
                             "run `make demo` as root on a machine with /dev/fuse (a container needs --device /dev/fuse "
                             "--cap-add SYS_ADMIN), with the Debian package ntfs-3g installed", ExitCode.USAGE)
    try:
        azurite_binary()
    except RuntimeError as err:
        raise CrashcartError(str(err), "run `npm ci` in the repository (make demo does)", ExitCode.USAGE) from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def run(args: argparse.Namespace) -> int:
    if args.memory_mib < 32 or args.memory_mib % 2:
        raise CrashcartError(f"--memory-mib {args.memory_mib} is not usable", "give an even number of MiB, at least 32",
                             ExitCode.USAGE)
    _prerequisites()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="crashcart-demo-"))
    try:
        return _demo(args, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def _demo(args: argparse.Namespace, work: Path) -> int:
    from scripts.devkit import arm_snapshot
    from scripts.devkit import arm_vm
    from scripts.devkit import gptdisk
    from scripts.devkit.armdouble import ArmDouble
    from scripts.devkit.azurite import start_azurite
    from scripts.devkit.copyshim import CopyShim

    started = time.monotonic()
    memory = args.memory_mib << 20
    with step(f"build the OS disk of a VM that crashed with stop 0x7E ({args.scheme.upper()}, {args.memory_mib} MiB "
              "complete dump, fragmented)"):
        disk = gptdisk.windows_disk(work, scheme=args.scheme, dump="full", memory_size=memory, layout="fragmented",
                                    slot=max(1 << 20, memory // 64), noise=True, name="osdisk")
        original = disk.originals["Windows/MEMORY.DMP"]
        original_sha = _sha256(original)
        log.info("    %s: %d MiB disk image; Windows volume at %d MiB; MEMORY.DMP %d bytes, SHA-256 %s",
                 disk.image.path.name, disk.image.size >> 20, disk.image.windows_offset >> 20, original.stat().st_size,
                 original_sha)
    with contextlib.ExitStack() as stack:
        with step("start Azurite (+ the Put Block From URL shim) and the ARM double"):
            azurite = stack.enter_context(start_azurite())
            shim = stack.enter_context(CopyShim(azurite))
            arm = stack.enter_context(ArmDouble())
            container = "dumps"
            azurite.service_client().create_container(container)
            vm = arm_vm.add_broken_vm(arm)
        with step("publish the disk as Azure exports a snapshot (page blob, fixed VHD)"):
            sas = arm_snapshot.export_page_blob(azurite, disk.image, name="osdisk.vhd")
        routes = arm_snapshot.install_snapshot_routes(arm, lambda snapshot_id, body: sas)
        from scripts.config.model import Config
        from scripts.collection.snapshot_export import ExportTarget, collect_from_snapshot

        config = Config.from_dict({
            "source": {"subscription_id": vm.subscription_id, "resource_group": vm.resource_group, "vm_name": vm.name,
                       "location": "westeurope", "zone": "1", "os_disk_id": vm.disk_id, "os_disk_size_gb": 127,
                       "memory_gb": args.memory_mib / 1024},
            "evidence": {"container": container}, "repair": {"strategy": "snapshot-export"},
        })
        env = {"CRASHCART_ARM_ENDPOINT": arm.url, "CRASHCART_STORAGE_CONNECTION_STRING": shim.connection_string}
        with environment(env):
            target = ExportTarget.from_config(config, shim.blob_endpoint, container)
            body_before = shim.stats.client_body_bytes
            export_started = time.monotonic()
            try:
                result = collect_from_snapshot(None, config, target=target, out_dir=args.out_dir,
                                               progress=is_interactive(), poll_seconds=0.05)
            except CrashcartError as err:
                partial = getattr(err, "result", None)
                if partial is not None and partial.report_files.get("markdown"):
                    sys.stderr.write(Path(partial.report_files["markdown"]).read_text(encoding="utf-8"))
                raise
            export_seconds = time.monotonic() - export_started
            uploaded_through_shim = shim.stats.client_body_bytes - body_before
            memory_blob = next((b for b in result.blobs if b.kind == "memory"), None)
            verdict = None
            if memory_blob is not None:
                from scripts.dumpfile.triage import render, triage

                with step(f"triage {memory_blob.name} (what `pipenv run triage <blob URL>` prints)"):
                    verdict = triage(_read_url(shim, azurite, container, memory_blob.name))
                render(verdict)
    report_md = Path(result.report_files["markdown"]).read_text(encoding="utf-8")
    sys.stderr.write("\n" + report_md + "\n")
    identical = memory_blob is not None and memory_blob.sha256 == original_sha
    module = verdict.module.name if verdict is not None and verdict.module is not None else None
    kit = result.export["bytes_through_kit"]
    summary = {
        "faulting_driver": module,
        "verdict": verdict.summary if verdict else None,
        "blob": memory_blob.name if memory_blob else None,
        "original_sha256": original_sha,
        "blob_sha256": memory_blob.sha256 if memory_blob else None,
        "identical": identical,
        "dump_bytes": original.stat().st_size,
        "kit_bytes_for_the_copy": kit["copy"],
        "kit_bytes_for_the_sha256": kit["hash"],
        "client_upload_bytes_seen_by_the_service": uploaded_through_shim,
        "server_side_bytes": sum(c.length for c in shim.stats.copies if c.status == 201),
        "snapshot_access_revoked": result.export["access"]["revoked"],
        "snapshot_deleted": result.export["snapshot"].get("deleted"),
        "arm_calls": {"grants": len(routes.grants), "revokes": len(routes.revokes), "deletes": len(routes.deletes)},
        "export_seconds": round(export_seconds, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "report": result.report_files,
    }
    width = 26
    lines = [
        ("faulting driver", module or "(not named)"),
        ("verdict", summary["verdict"] or "-"),
        ("MEMORY.DMP on the disk", f"SHA-256 {original_sha}"),
        ("stored blob", f"SHA-256 {summary['blob_sha256']}  ({summary['blob']})"),
        ("byte-identical", "yes" if identical else "NO"),
        ("bytes through the kit", f"{kit['copy']} for the copy ({100 * kit['copy'] / max(1, summary['dump_bytes']):.2f}% "
                                  f"of the dump), {kit['hash']} read back for the SHA-256"),
        ("snapshot", f"access revoked: {summary['snapshot_access_revoked']}, deleted: {summary['snapshot_deleted']}"),
        ("time", f"export {summary['export_seconds']} s, whole demo {summary['total_seconds']} s"),
        ("report", f"{result.report_files.get('markdown')}"),
    ]
    sys.stderr.write("crashcart demo: result\n" + "".join(f"  {k:<{width}} {v}\n" for k, v in lines))
    if args.json:
        emit_json({**summary, "result": result.to_dict()})
    if not identical:
        raise CrashcartError("the stored blob differs from the MEMORY.DMP on the disk",
                             "this is a bug in crashcart: please report it with the log (-v)", ExitCode.VERIFY_FAILED)
    if module is None:
        raise CrashcartError("the dump was collected but triage could not name the faulting driver",
                             "see the triage table above", ExitCode.BAD_DUMP)
    return int(ExitCode.OK)


def _read_url(shim: Any, azurite: Any, container: str, name: str) -> str:
    import datetime as dt

    from azure.storage.blob import BlobSasPermissions, generate_blob_sas

    token = generate_blob_sas(azurite.account, container, name, account_key=azurite.key,
                              permission=BlobSasPermissions(read=True),
                              expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    return f"{shim.blob_endpoint}/{container}/{name}?{token}"


def main(argv: list[str] | None = None) -> int:
    """`python -m scripts.demo` until the verb is registered in scripts/__main__.py."""
    from scripts.base.console import run_verb, setup_logging

    parser = argparse.ArgumentParser(prog="pipenv run demo", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_verb(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
