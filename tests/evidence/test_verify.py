"""scripts/verify.py: what counts as "arrived whole", checked against blobs in Azurite."""

from __future__ import annotations

import hashlib
import json

import pytest

from scripts.evidence import verify
from scripts.devkit.dumpbuilder import build_bitmap_dump, build_triage_dump


@pytest.fixture
def container(azurite):
    import uuid

    return azurite.service_client().create_container(f"verify-{uuid.uuid4().hex[:8]}")


def store(container, name: str, data: bytes, *, manifest: dict | None = None, metadata: dict | None = None) -> dict:
    container.upload_blob(name, data, metadata=metadata)
    digest = hashlib.sha256(data).hexdigest()
    body = {"schema": "crashcart.manifest/1", "blob": name, "size": len(data), "sha256": digest,
            "header": {"signature": "PAGEDU64", "bugcheck_code": "0x0000007E"}}
    body.update(manifest or {})
    container.upload_blob(f"{name}.manifest.json", json.dumps(body))
    return {"blob": name, "size": len(data), "sha256": digest, "kind": "memory", "uploaded": True,
            "source_path": "%SystemRoot%\\MEMORY.DMP"}


def test_a_whole_dump_passes(container, tmp_path):
    data = build_bitmap_dump(tmp_path / "m.dmp").path.read_bytes()
    result = verify.verify_file(container, store(container, "r/MEMORY.DMP", data))
    assert result.ok, result.problems
    assert result.sha256_checked and result.size == len(data)
    assert result.header["bugcheck_code"] == "0x7e" and result.header["dump_type"] == 5


def test_missing_blob_and_manifest(container):
    result = verify.verify_file(container, {"blob": "r/MEMORY.DMP", "size": 10, "uploaded": True})
    assert not result.ok
    assert result.problems == ["r/MEMORY.DMP.manifest.json is missing", "r/MEMORY.DMP is not in the container"]


def test_size_differs_from_manifest_and_remote(container, tmp_path):
    data = build_triage_dump(tmp_path / "t.dmp").path.read_bytes()
    reported = store(container, "r/Minidump/a.dmp", data, manifest={"size": len(data) + 1})
    reported["size"] = len(data) - 1
    problems = verify.verify_file(container, reported).problems
    assert any("its manifest says" in p for p in problems)
    assert any("the rescue VM sent" in p for p in problems)


def test_not_a_kernel_dump(container):
    problems = verify.verify_file(container, store(container, "r/MEMORY.DMP", b"MDMP" + bytes(20000))).problems
    assert any("user-mode minidump" in p for p in problems)


def test_truncated_dump(container, tmp_path):
    data = build_bitmap_dump(tmp_path / "m.dmp").path.read_bytes()[:0x3000]
    problems = verify.verify_file(container, store(container, "r/MEMORY.DMP", data)).problems
    assert any("truncated" in p for p in problems)


def test_hash_and_stop_code_must_match_the_manifest(container, tmp_path):
    data = build_bitmap_dump(tmp_path / "m.dmp").path.read_bytes()
    reported = store(container, "r/MEMORY.DMP", data,
                     manifest={"sha256": "0" * 64, "header": {"bugcheck_code": "0x000000D1"}})
    problems = verify.verify_file(container, reported).problems
    assert any("SHA-256" in p for p in problems)
    assert any("stop code 0x7e in the blob, 0x000000D1 in the manifest" in p for p in problems)


def test_large_blobs_are_rehashed_only_on_request(container, tmp_path):
    data = build_bitmap_dump(tmp_path / "m.dmp").path.read_bytes()
    reported = store(container, "r/MEMORY.DMP", data, metadata={"sha256": hashlib.sha256(data).hexdigest()})
    quick = verify.verify_file(container, reported, hash_limit=1024)
    assert quick.ok and not quick.sha256_checked
    full = verify.verify_file(container, reported, hash_limit=1024, full_hash=True)
    assert full.ok and full.sha256_checked


def test_only_uploaded_files_are_verified(container, tmp_path):
    data = build_triage_dump(tmp_path / "t.dmp").path.read_bytes()
    files = [store(container, "r/a.dmp", data), {"blob": "r/MEMORY.DMP", "uploaded": False}]
    assert [v.name for v in verify.verify_files(container, files)] == ["r/a.dmp"]
