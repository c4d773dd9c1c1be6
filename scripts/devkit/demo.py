"""The world of `make demo`: a VM that crashed with stop 0x7E, and Azure itself, on this machine.

It plays a broken Azure VM and Azure, then runs the snapshot-export collection through exactly the code
path used against Azure:

1. builds the OS disk of a Windows VM that died with stop 0x7E: GPT with an EFI system partition, a
   Microsoft reserved partition, the Windows NTFS volume and a recovery volume; on the Windows volume a
   SYSTEM hive whose CrashControl names the dump, a complete MEMORY.DMP (from the dump builder, the
   faulting address inside contosoflt.sys) written into a fragmented free space, a minidump, a page file;
2. starts Azurite (the storage emulator, from npm) with a loopback shim in front that implements Put Block
   From URL as the service does (Azurite 3.35 answers it 501), and a loopback ARM double that answers the
   snapshot's create / grant access / revoke access / delete like Azure Resource Manager;
3. uploads the image as a page blob in the form Azure exports a snapshot (a fixed VHD: the raw disk and a
   512-byte footer); the ARM double hands out that blob's read SAS as the grant's `accessSAS`;
4. runs scripts.collection.snapshot_export.SnapshotExportCollector (real azure-mgmt-compute and
   azure-storage-blob clients, pointed at the doubles by CRASHCART_ARM_ENDPOINT and
   CRASHCART_STORAGE_CONNECTION_STRING, set for the run only);
5. triages the stored dump and compares its SHA-256 with the MEMORY.DMP that was put on the disk.

The verb (scripts.cli.demo) prints what `run_demo` returns. Needs what the tests need: root and
/dev/fuse for ntfs-3g, and `npm ci` for Azurite.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.base.console import environment, log, step
from scripts.base.errors import CrashcartError, ExitCode
from scripts.collection.contract import CollectRequest, CollectResult
from scripts.collection.snapshot_access import ExportTarget
from scripts.collection.snapshot_export import ExportOptions, SnapshotExportCollector
from scripts.config.model import Config
from scripts.devkit import arm_snapshot, arm_vm, gptdisk
from scripts.devkit.arm_resources import add_resource_group_routes
from scripts.devkit.armdouble import ArmDouble
from scripts.devkit.azurite import azurite_binary, start_azurite
from scripts.devkit.copyshim import CopyShim
from scripts.evidence import crc64
from scripts.dumpfile.triage import Verdict, triage

DEFAULT_MEMORY_MIB = 256
DEFAULT_OUT_DIR = Path("crashcart-out") / "demo"
CONTAINER = "dumps"


@dataclass
class DemoRun:
    """What the demo did: the collection's result, the verdict on the stored dump and the numbers that
    prove the copy (`summary`, the verb's JSON)."""

    result: CollectResult
    verdict: Verdict | None
    summary: dict[str, Any]


def check_prerequisites() -> None:
    """What the demo needs on this machine, refused with the way to get it."""
    reason = gptdisk.can_build()
    if reason:
        raise CrashcartError(f"the demo cannot build its NTFS disk image here: {reason}",
                             "run `make demo` as root on a machine with /dev/fuse (a container needs --device /dev/fuse "
                             "--cap-add SYS_ADMIN), with the Debian package ntfs-3g installed", ExitCode.USAGE)
    try:
        azurite_binary()
    except RuntimeError as err:
        raise CrashcartError(str(err), "run `npm ci` in the repository (make demo does)", ExitCode.USAGE) from None


def run_demo(work: Path, *, memory_mib: int, scheme: str, out_dir: Path, progress: bool) -> DemoRun:
    """Builds the broken VM's disk in `work`, serves it as an exported snapshot, collects and triages it.
    A collection that fails raises its CollectError (with the partial result)."""
    started = time.monotonic()
    memory = memory_mib << 20
    with step(f"build the OS disk of a VM that crashed with stop 0x7E ({scheme.upper()}, {memory_mib} MiB "
              "complete dump, fragmented)"):
        disk = gptdisk.windows_disk(work, scheme=scheme, dump="full", memory_size=memory, layout="fragmented",
                                    slot=max(1 << 20, memory // 64), noise=True, name="osdisk")
        original = disk.originals["Windows/MEMORY.DMP"]
        original_sha, original_crc = _digests(original)
        log.info("    %s: %d MiB disk image; Windows volume at %d MiB; MEMORY.DMP %d bytes, SHA-256 %s",
                 disk.image.path.name, disk.image.size >> 20, disk.image.windows_offset >> 20, original.stat().st_size,
                 original_sha)
    with contextlib.ExitStack() as stack:
        with step("start Azurite (+ the Put Block From URL shim) and the ARM double"):
            azurite = stack.enter_context(start_azurite())
            shim = stack.enter_context(CopyShim(azurite))
            arm = stack.enter_context(ArmDouble())
            azurite.service_client().create_container(CONTAINER)
            vm = arm_vm.add_broken_vm(arm)
        with step("publish the disk as Azure exports a snapshot (page blob, fixed VHD)"):
            sas = arm_snapshot.export_page_blob(azurite, disk.image, name="osdisk.vhd")
        routes = arm_snapshot.install_snapshot_routes(arm, lambda snapshot_id, body: sas)
        add_resource_group_routes(arm)  # the kit's snapshot goes in the repair group, which it makes and deletes
        config = Config.from_dict({
            "source": {"subscription_id": vm.subscription_id, "resource_group": vm.resource_group, "vm_name": vm.name,
                       "location": "westeurope", "zone": "1", "os_disk_id": vm.disk_id, "os_disk_size_gb": 127,
                       "memory_gb": memory_mib / 1024},
            "evidence": {"container": CONTAINER}, "repair": {"strategy": "snapshot-export"},
        })
        env = {"CRASHCART_ARM_ENDPOINT": arm.url, "CRASHCART_STORAGE_CONNECTION_STRING": shim.connection_string}
        with environment(env):
            collector = SnapshotExportCollector(ExportOptions(
                target=ExportTarget.from_config(config, shim.blob_endpoint, CONTAINER)))
            body_before = shim.stats.client_body_bytes
            export_started = time.monotonic()
            result = collector.collect(CollectRequest(None, config, out_dir=out_dir, progress=progress,
                                                      poll_seconds=0.05))
            export_seconds = time.monotonic() - export_started
            uploaded_through_shim = shim.stats.client_body_bytes - body_before
            memory_blob = next((b for b in result.blobs if b.kind == "memory"), None)
            verdict = None
            stored_sha = None
            if memory_blob is not None:
                # the demo's own check, beside the kit's proof (the service's CRC-64): download the blob and hash it
                stored_sha = _blob_sha256(azurite, memory_blob.name)
                with step(f"triage {memory_blob.name} (what `pipenv run triage <blob URL>` prints)"):
                    verdict = triage(_read_url(shim, azurite, memory_blob.name))
        server_side = sum(c.length for c in shim.stats.copies if c.status == 201)
    export = result.export or {}
    kit = export["bytes_through_kit"]
    summary = {
        "faulting_driver": verdict.module.name if verdict is not None and verdict.module is not None else None,
        "verdict": verdict.summary if verdict else None,
        "blob": memory_blob.name if memory_blob else None,
        "original_sha256": original_sha,
        "blob_sha256": stored_sha,
        "original_crc64": original_crc,
        "blob_crc64": memory_blob.crc64 if memory_blob else None,
        "crc64_by": memory_blob.crc64_by if memory_blob else None,
        "identical": (memory_blob is not None and stored_sha == original_sha
                      and memory_blob.crc64 == original_crc),
        "dump_bytes": original.stat().st_size,
        "kit_bytes_for_the_copy": kit["copy"],
        "kit_bytes_for_the_sha256": kit["hash"],
        "client_upload_bytes_seen_by_the_service": uploaded_through_shim,
        "server_side_bytes": server_side,
        "snapshot_access_revoked": export["access"]["revoked"],
        "snapshot_deleted": export["snapshot"].get("deleted"),
        "arm_calls": {"grants": len(routes.grants), "revokes": len(routes.revokes), "deletes": len(routes.deletes)},
        "export_seconds": round(export_seconds, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "report": result.report_files,
    }
    return DemoRun(result, verdict, summary)


def _blob_sha256(azurite: Any, name: str) -> str:
    digest = hashlib.sha256()
    for chunk in azurite.service_client().get_blob_client(CONTAINER, name).download_blob().chunks():
        digest.update(chunk)
    return digest.hexdigest()


def _digests(path: Path) -> tuple[str, str]:
    """SHA-256 and CRC-64 of a local file, in one pass."""
    sha, crc = hashlib.sha256(), crc64.Crc64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            crc.update(chunk)
    return sha.hexdigest(), crc.hexdigest()


def _read_url(shim: Any, azurite: Any, name: str) -> str:
    """The stored blob as the operator would hand it to `triage`: a read SAS URL."""
    from azure.storage.blob import BlobSasPermissions, generate_blob_sas

    token = generate_blob_sas(azurite.account, CONTAINER, name, account_key=azurite.key,
                              permission=BlobSasPermissions(read=True),
                              expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    return f"{shim.blob_endpoint}/{CONTAINER}/{name}?{token}"
