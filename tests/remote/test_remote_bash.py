"""The Linux rescue script (scripts/remote/collect.sh.j2), run for real on this machine.

A real NTFS disk image (GPT, ESP/MSR/Windows/Recovery) is the disk copy; the script finds the Windows
volume on it, mounts it read-only (read-only loop device + ntfs-3g ro), reads CrashControl from a copy
of the offline SYSTEM hive with its own python3 regf reader (no hivex: test_remote_no_downloads.py runs it
as on a stock Ubuntu image), and uploads the dumps with a managed identity token from a
fake IMDS to Azurite over HTTPS with OAuth. The test then downloads every blob and compares it byte
for byte (SHA-256) with what is on the disk, and checks the manifests. Failures are injected with a
TLS proxy in front of Azurite.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import urllib.parse

import pytest

from tests.remote.bashrun import download, result_of
from tests.support.rescue import (  # noqa: F401 - fixtures
    HOSTILE, azurite_https, broken_disk, container, dumpless_disk, imds, linux_script, loop_devices_of,
    mounted_fuse_under, non_windows_disk, run_bash, script_env, sha256_file, tls,
)
from tests.evidence.test_crc64 import table_reference
from tests.support.storagefakes import AUTHORIZATION_PERMISSION_MISMATCH, INTERNAL_ERROR, SERVER_BUSY, FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.root]

PREFIX = "web-01/20250517T031245Z"
SMALL_BLOCKS = {"BlockSize": "65536", "Parallel": "3", "MaxAttempts": "4"}



def test_dumps_reach_azurite_byte_identical(linux_script, broken_disk, container, azurite_https, imds, tls):
    image_before = sha256_file(broken_disk.image)
    env = script_env(azurite_https, container, imds, tls, broken_disk.image, PREFIX,
                     DiskCopyId="/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/disks/copy",
                     SourceDiskId="/subscriptions/s/resourceGroups/prod-web/providers/Microsoft.Compute/disks/web-01_OsDisk_1",
                     **SMALL_BLOCKS)
    proc = run_bash(linux_script, env)
    result = result_of(proc)
    assert proc.returncode == 0, proc.stderr
    assert result["status"] == "collected"

    # CrashControl came from the current control set (Select\Current = 2), not the decoy ControlSet001
    assert result["crash_control"]["control_set"] == "ControlSet002"
    assert result["crash_control"]["DumpFile"] == r"%SystemRoot%\Crash Dumps\LATEST.DMP"
    assert result["volume"]["mounted_read_only"] is True

    names = {b.name for b in container.list_blobs()}
    expected = {f"{PREFIX}/{suffix}" for suffix in broken_disk.dumps}
    assert names == expected | {f"{n}.manifest.json" for n in expected}

    for suffix, local in broken_disk.dumps.items():
        name = f"{PREFIX}/{suffix}"
        data = download(container, name)
        assert hashlib.sha256(data).hexdigest() == sha256_file(local), name
        manifest = json.loads(download(container, f"{name}.manifest.json"))
        assert manifest["blob"] == name
        assert manifest["size"] == len(data) == local.stat().st_size
        assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
        assert manifest["source"]["source_disk_id"].endswith("web-01_OsDisk_1")
        assert manifest["header"]["signature"] in ("PAGEDU64", "PAGEDUMP")
        assert container.get_blob_client(name).get_blob_properties().metadata["sha256"] == manifest["sha256"]
        # the same proof as snapshot-export's: the CRC-64 Azure Storage computes, here by the VM while it read
        assert manifest["crc64"] == table_reference(data) and manifest["crc64_by"] == "rescue-vm"
        assert container.get_blob_client(name).get_blob_properties().metadata["crc64"] == manifest["crc64"]

    # `pipenv run verify` on a stored blob agrees with the VM's manifest: CRC-64 and SHA-256 both
    from scripts.evidence import verify

    later = verify.verify_file(container, {"blob": f"{PREFIX}/MEMORY.DMP"}, full_hash=True)
    assert later.ok and later.crc64_checked and later.sha256_checked and later.crc64_by == "rescue-vm", later.problems

    x86 = json.loads(download(container, f"{PREFIX}/Minidump/010203-4567-01.dmp.manifest.json"))
    assert x86["header"]["signature"] == "PAGEDUMP" and x86["header"]["dump_type"] == 4
    assert x86["header"]["bugcheck_code"] == "0x0000008E"  # DUMP_HEADER32 offsets, not DUMP_HEADER64's
    assert x86["header"]["bugcheck_parameters"][0] == "0xC0000005"
    memory = json.loads(download(container, f"{PREFIX}/MEMORY.DMP.manifest.json"))
    assert memory["source"]["path"] == r"%SystemRoot%\Crash Dumps\LATEST.DMP"
    assert memory["header"]["bugcheck_code"] == "0x0000007E"
    assert memory["header"]["dump_type"] == 5
    assert memory["header"]["bugcheck_parameters"][0] == "0x00000000C0000005"

    # the page file held a dump Windows never converted: exactly its RequiredDumpSpace bytes were taken
    pagefile = json.loads(download(container, f"{PREFIX}/PAGEFILE.DMP.manifest.json"))
    assert pagefile["kind"] == "pagefile"
    assert pagefile["size"] == broken_disk.pagefile_dump_size < pagefile["source"]["file_size"]
    assert pagefile["header"]["bugcheck_code"] == "0x1000007E"
    assert any("pagefile.sys" in n and "never turned into a dump file" in n for n in result["notes"])
    assert any("broken.dmp is not a kernel dump" in n for n in result["notes"])

    # several blocks per dump, all of at most BlockSize, each with Content-MD5 (plain HTTP here: over HTTPS the service's CRC-64 instead)
    assert memory["block_size"] == 65536
    blocks = container.get_blob_client(f"{PREFIX}/MEMORY.DMP").get_block_list("committed")[0]
    assert len(blocks) == -(-memory["size"] // 65536) and all(b.size <= 65536 for b in blocks)
    assert len({len(b.id) for b in blocks}) == 1  # block IDs of equal length

    # the evidence disk was only read, and nothing is left mounted or attached
    assert sha256_file(broken_disk.image) == image_before
    assert loop_devices_of(broken_disk.image) == ""
    assert mounted_fuse_under() == []
    assert all(r["metadata"] == "true" for r in imds.requests)


def test_hostile_values_stay_data(linux_script, broken_disk, container, azurite_https, imds, tls, tmp_path):
    canary = tmp_path / "canary"
    hostile = HOSTILE.format(canary=canary)
    prefix = "web-01/run $(touch {c}) `touch {c}`; 'q' \"dq\" & | > <".format(c=canary)
    env = script_env(azurite_https, container, imds, tls, broken_disk.image, prefix,
                     SourceDiskId=hostile, DiskCopyId=hostile, SnapshotId="$(id)", **SMALL_BLOCKS)
    proc = run_bash(linux_script, env)
    result = result_of(proc)
    assert proc.returncode == 0, proc.stderr
    assert not canary.exists()
    assert result["prefix"] == prefix
    manifest = json.loads(download(container, f"{prefix}/MEMORY.DMP.manifest.json"))
    assert manifest["source"]["source_disk_id"] == hostile
    assert manifest["source"]["disk_copy_id"] == hostile
    assert manifest["source"]["snapshot_id"] == "$(id)"
    assert download(container, f"{prefix}/MEMORY.DMP") == broken_disk.dumps["MEMORY.DMP"].read_bytes()
    url = next(f["url"] for f in result["files"] if f["kind"] == "memory")
    assert urllib.parse.unquote(url).endswith(f"/{prefix}/MEMORY.DMP") and " " not in url


def test_no_dump_on_the_disk(linux_script, dumpless_disk, container, azurite_https, imds, tls):
    proc = run_bash(linux_script, script_env(azurite_https, container, imds, tls, dumpless_disk.image, PREFIX))
    result = result_of(proc)
    assert (proc.returncode, result["status"]) == (10, "no_dump")
    assert "no memory dump" in result["message"]
    assert any("no dump at %SystemRoot%\\MEMORY.DMP" in n for n in result["notes"])
    assert any("page file is configured on D:" in n and "temporary disk" in n for n in result["notes"])
    assert list(container.list_blobs()) == []


def test_no_windows_volume(linux_script, non_windows_disk, container, azurite_https, imds, tls):
    proc = run_bash(linux_script, script_env(azurite_https, container, imds, tls, non_windows_disk.image, PREFIX))
    result = result_of(proc)
    assert (proc.returncode, result["status"]) == (11, "disk_not_found")
    assert "Windows\\System32\\config\\SYSTEM" in result["message"]
    assert loop_devices_of(non_windows_disk.image) == ""


def test_transient_failures_are_retried(linux_script, broken_disk, container, azurite_https, imds, tls):
    """The role assignment is not effective for the first request (403 AuthorizationPermissionMismatch),
    then two block PUTs meet 503/500: every one is retried and the dump still arrives whole."""
    seen = {"n": 0, "blocks": 0}

    def rule(req):
        seen["n"] += 1
        if seen["n"] == 1:
            return AUTHORIZATION_PERMISSION_MISMATCH
        if req.query.get("comp") == "block":
            seen["blocks"] += 1
            if seen["blocks"] in (2, 3):
                return SERVER_BUSY if seen["blocks"] == 2 else INTERNAL_ERROR
        return None

    with FaultProxy(azurite_https.blob_endpoint, tls, rule) as proxy:
        env = script_env(azurite_https, container, imds, tls, broken_disk.image, PREFIX, **SMALL_BLOCKS)
        env["BlobEndpoint"] = proxy.blob_endpoint
        proc = run_bash(linux_script, env)
    result = result_of(proc)
    assert proc.returncode == 0, proc.stderr
    assert "AuthorizationPermissionMismatch" in proc.stderr and "retrying" in proc.stderr
    assert [r.answered for r in proxy.requests[:1]] == [403]
    assert sorted(r.answered for r in proxy.calls("block") if r.answered >= 500) == [500, 503]
    for suffix, local in broken_disk.dumps.items():
        assert hashlib.sha256(download(container, f"{PREFIX}/{suffix}")).hexdigest() == sha256_file(local)
    assert result["status"] == "collected"


def test_upload_failing_midway_commits_nothing_and_a_rerun_restarts_cleanly(
        linux_script, broken_disk, container, azurite_https, imds, tls):
    # block 2 of MEMORY.DMP keeps failing: the script gives up after MaxAttempts and commits no list
    def rule(req):
        if req.query.get("comp") == "block" and req.path.endswith("/MEMORY.DMP"):
            block = int(base64.b64decode(req.query["blockid"]).decode().split("-")[1])  # crashcart-00000002
            if block == 2:
                return INTERNAL_ERROR
        return None

    env = script_env(azurite_https, container, imds, tls, broken_disk.image, PREFIX,
                     **{**SMALL_BLOCKS, "MaxAttempts": "2"})
    with FaultProxy(azurite_https.blob_endpoint, tls, rule) as proxy:
        env["BlobEndpoint"] = proxy.blob_endpoint
        proc = run_bash(linux_script, env)
    result = result_of(proc)
    assert (proc.returncode, result["status"]) == (12, "upload_failed")
    assert "500 InternalError" in result["message"]
    memory = next(f for f in result["files"] if f["kind"] == "memory")
    assert memory["uploaded"] is False
    assert not [r for r in proxy.calls("blocklist") if r.path.endswith("/MEMORY.DMP")]
    names = {b.name for b in container.list_blobs()}
    assert f"{PREFIX}/MEMORY.DMP" not in names and f"{PREFIX}/MEMORY.DMP.manifest.json" not in names
    # the other dumps were still collected, each complete
    assert f"{PREFIX}/Minidump/052424-11234-01.dmp" in names

    # a second run into the same folder (the proxy gone) commits MEMORY.DMP whole: the stale uncommitted
    # blocks do no harm. What the first run stored is never overwritten (#13: If-None-Match: * on every
    # blob): those blobs keep their ETag, and the run says which ones it did not store.
    stored = {b.name: b.etag for b in container.list_blobs()}
    env["BlobEndpoint"] = azurite_https.blob_endpoint
    proc = run_bash(linux_script, env)
    result = result_of(proc)
    assert download(container, f"{PREFIX}/MEMORY.DMP") == broken_disk.dumps["MEMORY.DMP"].read_bytes()
    assert (proc.returncode, result["status"]) == (12, "upload_failed")
    assert "already exists and was not overwritten" in result["message"]
    assert {b.name: b.etag for b in container.list_blobs() if b.name in stored} == stored
    assert {n.split(" already exists")[0] for n in result["notes"] if "already exists" in n} == \
        {name for name in stored if not name.endswith(".manifest.json")}


def test_role_never_effective_fails_after_the_wait(linux_script, broken_disk, container, azurite_https, imds, tls):
    with FaultProxy(azurite_https.blob_endpoint, tls, lambda req: AUTHORIZATION_PERMISSION_MISMATCH) as proxy:
        env = script_env(azurite_https, container, imds, tls, broken_disk.image, PREFIX, AuthWaitSeconds="1")
        env["BlobEndpoint"] = proxy.blob_endpoint
        proc = run_bash(linux_script, env)
    result = result_of(proc)
    assert (proc.returncode, result["status"]) == (12, "upload_failed")
    assert "403 AuthorizationPermissionMismatch" in result["message"]
    assert list(container.list_blobs()) == []


@pytest.mark.parametrize("change, message", [
    ({"BlobEndpoint": ""}, "BlobEndpoint is missing"),
    ({"BlobEndpoint": "http://127.0.0.1:1/devstoreaccount1"}, "https://"),
    ({"BlockSize": "1; rm -rf /"}, "BlockSize must be a whole number"),
    ({"Parallel": "99"}, "Parallel must be 1 to 16"),
])
def test_bad_parameters_are_refused(linux_script, broken_disk, container, azurite_https, imds, tls, change, message):
    env = script_env(azurite_https, container, imds, tls, broken_disk.image, PREFIX)
    env.update(change)
    proc = run_bash(linux_script, env, timeout=30)
    result = result_of(proc)
    assert (proc.returncode, result["status"]) == (2, "error")
    assert message in result["message"]
    assert imds.requests == [] or all(r["metadata"] == "true" for r in imds.requests)


def test_script_is_plain_bash_without_template_leftovers(linux_script):
    text = linux_script.read_text()
    assert "{{" not in text and "{%" not in text
    assert os.system(f"bash -n {linux_script}") == 0


# ---- the CRC-64 the VM records (#15): Azure Storage's, composed from the blocks the upload jobs hashed ----------
def _crc64_program(script) -> str:
    text = script.read_text()
    start = text.index("readonly CRC64_PY='") + len("readonly CRC64_PY='")
    return text[start:text.index("\n'\n", start)]


@pytest.mark.parametrize("length, block", [(0, 65536), (1, 65536), (9, 4096), (3 * 65536 + 17, 65536),
                                           ((1 << 20) * 2 + 4099, 1 << 21)])
def test_the_vms_crc64_per_block_and_composed_is_azure_storages(linux_script, tmp_path, length, block):
    """The VM's own python3 (no kit code there): every block's CRC, and the file's composed from them in
    order, equal an independent CRC-64 of the whole file (tests.evidence.test_crc64.reference)."""
    import random
    import subprocess

    from tests.evidence.test_crc64 import reference

    program = _crc64_program(linux_script)
    assert "'" not in program  # it lives in a single-quoted bash string
    data = random.Random(length).randbytes(length)
    count = max(1, -(-length // block))
    for i in range(count):
        part = tmp_path / f"block.{i}"
        part.write_bytes(data[i * block:(i + 1) * block])
        out = subprocess.run(["python3", "-I", "-S", "-c", program, "block", str(part)], capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == f"{reference(part.read_bytes()):016x}"
        (tmp_path / f"crc.{i}").write_text(out + "\n")
    composed = subprocess.run(["python3", "-I", "-S", "-c", program, "compose", str(tmp_path), str(count), str(block),
                               str(length)], capture_output=True, text=True, check=True).stdout.strip()
    assert composed == f"{reference(data):016x}"
