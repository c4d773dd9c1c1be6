"""The rescue VM's upload (scripts/remote/_upload.sh.j2) records the CRC-64 the Blob service computed.

Over HTTPS each Put Block goes without Content-MD5, so the service answers with its own CRC-64 of the block it
stored (x-ms-content-crc64, Put Block REST page: "for versions 2019-02-02 or later ... returned when the
Content-md5 header isn't present in the request"); the script composes them in block order into the blob's
CRC-64 (`crc64_by` service). Azurite 3.35 sends none, so these tests put the devkit's copy shim (which answers
as Azure documents) over HTTPS in front of Azurite with OAuth, as the rescue VM reaches storage. A service that
sends no CRC gets the VM's own (`crc64_by` rescue-vm). Each stored blob is then read back and hashed
independently: the composed CRC must equal it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess

import pytest

from scripts.devkit.copyshim import CopyShim
from scripts.devkit import uploaddriver
from scripts.remote import RESULT_MARKER
from tests.evidence.test_crc64 import table_reference
from tests.support.rescue import (  # noqa: F401 - fixtures
    azurite_https, broken_disk, container, imds, linux_script, run_bash, script_env, sha256_file, tls,
)
from tests.support.storagefakes import FaultProxy

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def upload_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("upload") / "upload.sh"
    path.write_text(uploaddriver.upload_script(max_attempts=4, auth_wait=30))
    return path


@pytest.fixture
def shim(azurite_https, tls):
    with CopyShim(azurite_https, str(tls.cert), str(tls.key)) as instance:
        yield instance


def _upload(script, endpoint: str, container, imds, tls, source, name: str, block: int = 65536, parallel: int = 3):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(source.parent), "CURL_CA_BUNDLE": str(tls.cert),
           "BlobEndpoint": endpoint, "Container": container.container_name, "ImdsEndpoint": imds.url,
           "BlockSize": str(block), "Parallel": str(parallel), "Src": str(source), "Length": str(source.stat().st_size),
           "Name": name}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "UPLOADED" in proc.stdout, proc.stderr[-3000:]
    sha, crc, by = proc.stdout.split("UPLOADED", 1)[1].split()[:3]
    return sha, crc, by  # by: who computed the CRC-64 ('-' when the script does not say)


@pytest.mark.parametrize("length", [5 * 65536, 5 * 65536 + 12345, 1000])
def test_the_blobs_crc64_is_composed_from_the_services_per_block_crcs(
        upload_script, shim, container, imds, tls, tmp_path, length):
    data = os.urandom(length)
    source = tmp_path / "MEMORY.DMP"
    source.write_bytes(data)
    sha, crc, by = _upload(upload_script, shim.blob_endpoint, container, imds, tls, source, f"b-{length}")
    stored = container.download_blob(f"b-{length}").readall()
    assert stored == data
    assert by == "service"  # every block's CRC came from the service's answer, none was computed on the VM
    assert crc == table_reference(stored)  # composed in block order, equal to an independent CRC of the stored blob
    assert sha == hashlib.sha256(data).hexdigest()
    assert container.get_blob_client(f"b-{length}").get_blob_properties().metadata["crc64"] == crc


def test_a_service_that_sends_no_crc64_gets_the_vms_own(upload_script, shim, container, imds, tls, tmp_path):
    shim.report_crc64 = False
    data = os.urandom(3 * 65536 + 7)
    source = tmp_path / "MEMORY.DMP"
    source.write_bytes(data)
    sha, crc, by = _upload(upload_script, shim.blob_endpoint, container, imds, tls, source, "vm")
    assert by == "rescue-vm" and crc == table_reference(container.download_blob("vm").readall())
    assert sha == hashlib.sha256(data).hexdigest()


def test_over_https_a_put_block_carries_no_content_md5(upload_script, shim, container, imds, tls, tmp_path):
    """TLS checks each block's bytes on the way; the missing Content-MD5 is what makes Azure return its CRC-64."""
    data = os.urandom(2 * 65536 + 1)
    source = tmp_path / "MEMORY.DMP"
    source.write_bytes(data)
    with FaultProxy(shim.blob_endpoint, tls) as proxy:
        _, crc, by = _upload(upload_script, proxy.blob_endpoint, container, imds, tls, source, "md5")
    blocks = proxy.calls("block")
    assert len(blocks) == 3 and all("content-md5" not in r.headers for r in blocks)
    assert by == "service" and crc == table_reference(data)


@pytest.mark.root
def test_collect_through_the_service_records_its_crc64_and_verify_agrees(
        linux_script, broken_disk, container, azurite_https, shim, imds, tls):
    prefix = "web-01/20250601T000000Z"
    endpoint = dataclasses.replace(azurite_https, blob_endpoint=shim.blob_endpoint)
    proc = run_bash(linux_script, script_env(endpoint, container, imds, tls, broken_disk.image, prefix,
                                             BlockSize="65536", Parallel="3"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER + " ")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stderr[-3000:]
    assert json.loads(lines[0][len(RESULT_MARKER) + 1:])["status"] == "collected"
    name = f"{prefix}/MEMORY.DMP"
    data = container.download_blob(name).readall()
    manifest = json.loads(container.download_blob(f"{name}.manifest.json").readall())
    assert manifest["crc64"] == table_reference(data) and manifest["crc64_by"] == "service"
    assert "x-ms-content-crc64" in manifest["crc64_how"]
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest() == sha256_file(broken_disk.dumps["MEMORY.DMP"])

    from scripts.evidence import verify

    later = verify.verify_file(container, {"blob": name}, full_hash=True)
    assert later.ok and later.crc64_checked and later.sha256_checked and later.crc64_by == "service", later.problems


def test_a_file_needing_more_than_50000_blocks_gets_bigger_blocks(upload_script, shim, container, imds, tls, tmp_path):
    """50,001 blocks of BLOCK_SIZE would be refused by the service: the upload takes whole MiBs instead. (1 KiB
    blocks, below what collect accepts, so that 50,001 of them stay a small file.)"""
    from scripts.evidence import crc64

    length = 50_001 * 1024
    source = tmp_path / "MEMORY.DMP"
    with open(source, "wb") as f:
        f.truncate(length)  # zeros (sparse): its CRC-64 and SHA-256 are known without reading it back
    sha, crc, by = _upload(upload_script, shim.blob_endpoint, container, imds, tls, source, "big", block=1024, parallel=8)
    blocks = container.get_blob_client("big").get_block_list("committed")[0]
    assert len(blocks) == -(-length // (1 << 20)) and {b.size for b in blocks[:-1]} == {1 << 20}
    assert container.get_blob_client("big").get_blob_properties().size == length
    assert crc == f"{crc64.zeros_crc(length):016x}" and by == "service"
    assert sha == hashlib.sha256(bytes(length)).hexdigest()
