"""Paths and values an operator types, as a person types them: a file where a folder belongs, a pipe where a file
belongs (refused before it is opened: reading it would block forever), Notepad's byte-order mark, a VM name for a
resource ID, a pasted blob URL, a bad --shard. Each is one line on stderr, exit 2, no traceback - and said before
the slow steps (preflight, synth, disk images), not after them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.cli.rollback import blob_name
from scripts.base.errors import CrashcartError, ExitCode

REPO = Path(__file__).resolve().parents[2]
SUB = "00000000-0000-0000-0000-000000000001"
VM = f"/subscriptions/{SUB}/resourceGroups/prod-web/providers/Microsoft.Compute/virtualMachines/web-01"
ENDPOINT = "https://acct.blob.core.windows.net/"


def verb(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRASHCART_", "AZURE_"))}
    return subprocess.run([sys.executable, "-m", "scripts", *args], cwd=cwd, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(REPO)}, timeout=timeout, stdin=subprocess.DEVNULL)


def usage_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


@pytest.fixture
def where(tmp_path) -> Path:
    (tmp_path / "afile").write_text("not a folder\n")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "vms.txt").write_bytes(b"\xef\xbb\xbf" + VM.encode() + b"\r\n")  # Notepad: BOM and CRLF
    return tmp_path


def test_a_vm_list_with_a_byte_order_mark_is_read(where):
    done = verb("fleet", "plan", "--vms", "vms.txt", "--shards", "2", "--out", "plan", cwd=where)
    assert done.returncode == 0, done.stderr
    assert (where / "plan" / "matrix-azure.json").exists()


@pytest.mark.parametrize("args, words", [
    (("fleet", "plan", "--vms", "fifo", "--shards", "2"), ("--vms", "not a regular file")),
    (("rollback", "--manifest", "fifo"), ("--manifest", "not a regular file")),
    (("rollback", "--manifest", "afile", "--evidence-blob", "x/y/rollback-manifest.json"), ("--manifest", "one of")),
])
def test_a_pipe_is_refused_without_waiting_and_one_manifest_source_at_most(where, args, words):
    usage_error(verb(*args, cwd=where, timeout=30), *words)


@pytest.mark.parametrize("args, words", [
    (("repair-run", "--project-dir", "afile"), ("--project-dir", "not a folder")),
    (("repair-run", "--project-dir", "gone"), ("--project-dir", "does not exist")),
    (("repair-run", "--out-dir", "afile", "--skip-synth"), ("--out-dir", "not a folder")),
    (("repair-run", "--out-dir", "afile/sub", "--skip-synth"), ("--out-dir", "is a file")),
    (("fleet", "plan", "--vms", "vms.txt", "--shards", "2", "--out", "afile"), ("--out", "not a folder")),
    (("fleet", "run", "--vms", "vms.txt", "--work-dir", "afile"), ("--work-dir", "not a folder")),
    (("demo", "--work-dir", "afile", "--memory-mib", "32"), ("--work-dir", "not a folder")),
    (("summary", "--config", str(REPO / "repair.example.toml"), "--outdir", "afile"), ("--outdir", "not a folder")),
])
def test_a_file_where_a_folder_belongs_is_a_usage_error_up_front(where, args, words):
    usage_error(verb(*args, cwd=where), *words)


@pytest.mark.parametrize("given", ["web-01", f"{VM}/extra"])
def test_repair_run_checks_the_vm_shape_at_once(where, given):
    """A VM name used to be found out only after the preflight and synth."""
    usage_error(verb("repair-run", "--vm", given, "--skip-synth", cwd=where), "--vm", "not a VM resource ID",
                "az vm show")


@pytest.mark.parametrize("shard", ["3/2", "x"])
def test_fleet_run_checks_the_shard_before_anything_else(where, shard):
    usage_error(verb("fleet", "run", "--vms", "vms.txt", "--shard", shard, cwd=where), "--shard")


def test_prepare_dump_leave_stopped_without_swap_is_refused(where):
    usage_error(verb("prepare-dump", "--leave-stopped", cwd=where), "--leave-stopped", "--swap")


def test_rollback_refuses_the_url_of_another_container(where):
    (where / "repair.toml").write_text((REPO / "repair.example.toml").read_text())
    done = verb("rollback", "--evidence-blob",
                "https://other.blob.core.windows.net/dumps/web-01-1a2b3c4d/20250517T031245Z/rollback-manifest.json",
                cwd=where)
    usage_error(done, "give the blob name <vm key>/<stamp>/rollback-manifest.json")


def test_a_pasted_url_of_the_evidence_container_gives_its_blob_name():
    name = "web-01-1a2b3c4d/20250517T031245Z/rollback-manifest.json"
    assert blob_name(name, ENDPOINT, "dumps") == name
    assert blob_name(f"https://acct.blob.core.windows.net/dumps/{name}", ENDPOINT, "dumps") == name
    assert blob_name(f"HTTPS://ACCT.blob.core.windows.net/dumps/{name}", ENDPOINT.rstrip("/"), "dumps") == name
    azurite = "http://127.0.0.1:10000/devstoreaccount1"
    assert blob_name(f"{azurite}/dumps/{name.replace('T', '%54')}", azurite, "dumps") == name
    for other in (f"https://acct.blob.core.windows.net/other/{name}", f"https://evil.example.com/dumps/{name}",
                  "https://acct.blob.core.windows.net/dumps/", f"https://acct.blob.core.windows.net/dumps/{name}?sv=x"):
        with pytest.raises(CrashcartError) as caught:
            blob_name(other, ENDPOINT, "dumps")
        assert caught.value.exit_code == ExitCode.USAGE
