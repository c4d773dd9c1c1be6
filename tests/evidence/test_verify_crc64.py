"""scripts/evidence/verify.py with CRC-64: a manifest's crc64 is checked against the blob read back, in one
pass with its SHA-256, and a blob changed after collection (same size, one byte) is caught."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest

from scripts.devkit.dumpbuilder import build_bitmap_dump
from scripts.evidence import crc64, verify
from tests.evidence.test_crc64 import reference


@pytest.fixture
def container(azurite):
    return azurite.service_client().create_container(f"verify-{uuid.uuid4().hex[:8]}")


def _store(container, name: str, data: bytes, **manifest) -> dict:
    container.upload_blob(name, data)
    body = {"schema": "crashcart.manifest/1", "blob": name, "size": len(data), "sha256": None,
            "crc64": f"{reference(data):016x}", "crc64_by": "service", "header": {"bugcheck_code": "0x7e"}, **manifest}
    container.upload_blob(f"{name}.manifest.json", json.dumps(body))
    return {"blob": name, "size": len(data), "kind": "memory", "uploaded": True}


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> bytes:
    return build_bitmap_dump(tmp_path_factory.mktemp("d") / "m.dmp").path.read_bytes()


def test_the_crc64_alone_is_checked_when_the_manifest_has_no_sha256(container, dump):
    result = verify.verify_file(container, _store(container, "r/MEMORY.DMP", dump), full_hash=True)
    assert result.ok, result.problems
    assert result.crc64_checked and not result.sha256_checked and result.crc64_by == "service"
    assert result.computed == {"sha256": hashlib.sha256(dump).hexdigest(), "crc64": f"{reference(dump):016x}",
                               "bytes_read": len(dump)}


def test_a_blob_changed_after_collection_is_caught_by_its_crc64(container, dump):
    reported = _store(container, "r/MEMORY.DMP", dump)
    tampered = bytearray(dump)
    tampered[len(dump) // 2] ^= 0x01  # one bit, past the header: size and header still right
    container.upload_blob("r/MEMORY.DMP", bytes(tampered), overwrite=True)
    result = verify.verify_file(container, reported, full_hash=True)
    assert not result.ok and not result.crc64_checked
    assert result.problems == [f"r/MEMORY.DMP has CRC-64 {crc64.to_hex(crc64.crc64(bytes(tampered)))}, its manifest "
                               f"says {reference(dump):016x} (computed by service)"]


def test_large_blobs_are_read_back_only_on_request(container, dump):
    reported = _store(container, "r/MEMORY.DMP", dump)
    quick = verify.verify_file(container, reported, hash_limit=0)
    assert quick.ok and not quick.crc64_checked and quick.bytes_read == 0 and quick.computed is None


def test_a_manifest_with_a_malformed_or_no_hash_is_a_problem(container, dump):
    bad = verify.verify_file(container, _store(container, "a/MEMORY.DMP", dump, crc64="12ab"), hash_limit=0)
    assert "a/MEMORY.DMP.manifest.json: crc64 '12ab' is not 16 hex digits" in bad.problems
    none = verify.verify_file(container, _store(container, "b/MEMORY.DMP", dump, crc64=None), full_hash=True)
    assert "b/MEMORY.DMP.manifest.json records neither a SHA-256 nor a CRC-64: nothing to compare" in none.problems
