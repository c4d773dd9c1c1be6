"""`preflight --evidence-endpoint`: checked like every URL that may receive a token, before anything else."""

from __future__ import annotations

import argparse

import pytest

from scripts.base.errors import CrashcartError, ExitCode
from scripts.cli import preflight


@pytest.mark.parametrize("endpoint, said", [
    ("http://evil.example.com", "refusing to send an Azure AD token over plain HTTP to evil.example.com"),
    ("https://evil.example.com", "refusing to send an Azure AD token to evil.example.com"),
    ("https://[::1/x", "is not a valid URL"),
    ("https://acct.blob.core.windows.net:99999", "is not a valid URL"),
    ("notaurl", "is not an http(s) URL"),
])
def test_a_bad_evidence_endpoint_is_a_usage_error(tmp_path, endpoint, said):
    args = argparse.Namespace(config=str(tmp_path / "missing.toml"), strategy=None, evidence_endpoint=endpoint)
    with pytest.raises(CrashcartError) as caught:
        preflight.run(args)
    assert caught.value.exit_code == ExitCode.USAGE
    assert "--evidence-endpoint" in caught.value.message and said in caught.value.message


@pytest.mark.parametrize("endpoint", ["https://acct.blob.core.windows.net", "http://127.0.0.1:10000/devstoreaccount1",
                                      "https://127.0.0.1:10000/devstoreaccount1"])
def test_a_storage_or_emulator_endpoint_is_accepted(endpoint):
    assert preflight.check_endpoint(endpoint) == endpoint
