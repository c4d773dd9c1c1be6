"""`pipenv run verify <blob URL>` as an operator types it: exit 0 and the proof in JSON for a stored dump that
is what its manifest says, 15 for one changed since, 2 for a URL that names no blob."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from scripts.cli.verify import split_blob_url
from scripts.base.errors import CrashcartError
from scripts.devkit.dumpbuilder import build_bitmap_dump
from tests.evidence.test_crc64 import reference

REPO = Path(__file__).resolve().parents[2]


def _verify(azurite, url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CRASHCART_STORAGE_CONNECTION_STRING": azurite.connection_string, "CI": "1"}
    return subprocess.run([sys.executable, "-m", "scripts", "verify", url], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)


def test_verify_agrees_then_catches_a_tampered_blob(azurite, tmp_path):
    container = azurite.service_client().create_container(f"verify-{uuid.uuid4().hex[:8]}")
    data = build_bitmap_dump(tmp_path / "m.dmp").path.read_bytes()
    name = "web-01-3f2a/20250517T031245Z/MEMORY.DMP"
    container.upload_blob(name, data)
    container.upload_blob(f"{name}.manifest.json", json.dumps({
        "schema": "crashcart.manifest/1", "blob": name, "size": len(data), "sha256": None, "collector": "snapshot-export",
        "crc64": f"{reference(data):016x}", "crc64_by": "service", "header": {"bugcheck_code": "0x7e"}}))
    url = container.get_blob_client(name).url

    good = _verify(azurite, url)
    assert good.returncode == 0, good.stderr[-2000:]
    doc = json.loads(good.stdout)
    assert doc["ok"] is True and doc["crc64_checked"] is True and doc["manifest"]["crc64_by"] == "service"
    assert doc["computed"]["crc64"] == f"{reference(data):016x}" and doc["computed"]["bytes_read"] == len(data)
    assert len(doc["computed"]["sha256"]) == 64  # the SHA-256 the manifest did not have, for the ticket

    tampered = bytearray(data)
    tampered[-1] ^= 0x80
    container.upload_blob(name, bytes(tampered), overwrite=True)
    bad = _verify(azurite, url)
    assert bad.returncode == 15, bad.stderr[-2000:]
    assert json.loads(bad.stdout)["ok"] is False
    assert "CRC-64" in bad.stderr and "Traceback" not in bad.stderr

    missing = _verify(azurite, url.replace("MEMORY.DMP", "OTHER.DMP"))
    assert missing.returncode == 15 and "is not in the container" in missing.stderr


def test_a_url_that_names_no_blob_is_a_usage_error(azurite):
    result = _verify(azurite, "not a url")
    assert result.returncode == 2 and "not a blob URL" in result.stderr and "Traceback" not in result.stderr
    assert _verify(azurite, "https://acct.blob.core.windows.net/onlycontainer").returncode == 2


def test_blob_urls_split_into_account_container_and_name():
    assert split_blob_url("https://acct.blob.core.windows.net/dumps/vm/run/MEMORY.DMP?sv=1&sig=x") == (
        "https://acct.blob.core.windows.net", "dumps", "vm/run/MEMORY.DMP", "sv=1&sig=x")
    assert split_blob_url("http://127.0.0.1:10000/devstoreaccount1/dumps/a%20b.dmp") == (
        "http://127.0.0.1:10000/devstoreaccount1", "dumps", "a b.dmp", "")
    with pytest.raises(CrashcartError):
        split_blob_url("ftp://x/y/z")


@pytest.mark.parametrize("url, said", [
    ("http://example.com/dumps/MEMORY.DMP", "refusing to send an Azure AD token over plain HTTP to example.com"),
    ("https://evil.example.com/dumps/MEMORY.DMP", "refusing to send an Azure AD token to evil.example.com"),
    ("https://[::1/x", "is not a valid URL"),
    ("https://acct.blob.core.windows.net:99999/dumps/MEMORY.DMP", "is not a valid URL"),
    ("https://acct.blob.core.windows.net:abc/dumps/MEMORY.DMP", "is not a valid URL"),
])
def test_a_url_triage_would_refuse_is_a_usage_error(url, said):
    """The same URL checks as triage (scripts.base.rangeio.check_url, scripts.base.endpoints.token_refusal)."""
    with pytest.raises(CrashcartError) as caught:
        split_blob_url(url)
    assert caught.value.exit_code == 2 and said in caught.value.message


def test_a_sas_url_may_name_any_host():
    """A SAS carries its own authorization: no Azure AD token is sent, so the token-host rule does not apply."""
    assert split_blob_url("https://files.example.com/dumps/MEMORY.DMP?sv=1&sig=x")[1:3] == ("dumps", "MEMORY.DMP")
