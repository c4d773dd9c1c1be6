"""`make demo`: the whole local run, small (a 32 MiB VM), as the verb runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.__main__ import main
from scripts.devkit import gptdisk

pytestmark = pytest.mark.skipif(gptdisk.can_build() is not None, reason=str(gptdisk.can_build()))


def test_demo_collects_triages_and_proves_the_blob_identical(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CRASHCART_ARM_ENDPOINT", raising=False)
    monkeypatch.delenv("CRASHCART_STORAGE_CONNECTION_STRING", raising=False)
    code = main(["demo", "--memory-mib", "32", "--out-dir", str(tmp_path / "out"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    summary = json.loads(captured.out)
    assert summary["faulting_driver"] == "contosoflt.sys"
    assert summary["identical"] is True and summary["blob_sha256"] == summary["original_sha256"]
    # the proof in the manifest is the service's CRC-64, composed without reading the dump back (#15)
    assert summary["blob_crc64"] == summary["original_crc64"] and summary["crc64_by"] == "service"
    assert summary["kit_bytes_for_the_sha256"] == 0
    assert summary["snapshot_access_revoked"] is True and summary["snapshot_deleted"] is True
    assert summary["arm_calls"] == {"grants": 1, "revokes": 1, "deletes": 1}
    # the dump went server-side; the kit's own traffic for the copy is a small fraction of it
    assert summary["server_side_bytes"] >= summary["dump_bytes"]
    assert summary["client_upload_bytes_seen_by_the_service"] < 64 * 1024
    assert summary["kit_bytes_for_the_copy"] < summary["dump_bytes"] // 10
    report = Path(summary["report"]["markdown"]).read_text(encoding="utf-8")
    assert "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED" in report and "contosoflt.sys" in report
    assert "| Strategy | snapshot-export" in report and "Read access: granted yes, revoked yes" in report
    assert "## Run command" not in report and "| Rescue VM |" not in report
    # what a person sees: the triage table, the report and the verdict lines
    assert "faulting module   contosoflt.sys+0x1a2b" in captured.err
    assert "byte-identical             yes" in captured.err
    # the environment the demo pointed the kit at is gone again
    import os

    assert "CRASHCART_ARM_ENDPOINT" not in os.environ


def test_demo_refuses_an_unusable_size(capsys):
    assert main(["demo", "--memory-mib", "7"]) == 2
    err = capsys.readouterr().err
    assert "--memory-mib" in err and '"7" is not valid' in err and "32 to 16384" in err
