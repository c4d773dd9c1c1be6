"""Azurite (the Azure Storage emulator from npm) started on a free loopback port for one test session.

Used by the tests, the benchmarks and the local demo. The account is Azurite's built-in
`devstoreaccount1`; its key is public and documented, not a secret.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (https://learn.microsoft.com/azure/storage/common/storage-use-azurite)
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@dataclass(frozen=True)
class Azurite:
    blob_endpoint: str  # http://127.0.0.1:PORT/devstoreaccount1
    account: str = ACCOUNT
    key: str = KEY

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};AccountKey={self.key};"
            f"BlobEndpoint={self.blob_endpoint};"
        )

    def service_client(self):
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def azurite_binary() -> str:
    local = REPO / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    found = shutil.which("azurite-blob")
    if not found:
        raise RuntimeError("azurite-blob not found: run `npm ci` in the repository (make test does)")
    return found


@contextlib.contextmanager
def start_azurite(extra_args: tuple[str, ...] = ()) -> Iterator[Azurite]:
    """Starts azurite-blob in a temporary folder and stops it (and removes its data) afterwards."""
    workdir = tempfile.mkdtemp(prefix="azurite-")
    port = free_port()
    cmd = [
        azurite_binary(), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", workdir,
        "--silent", "--skipApiVersionCheck", "--disableProductStyleUrl", *extra_args,
    ]
    log = open(os.path.join(workdir, "azurite.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"azurite exited with {proc.returncode}: see {workdir}/azurite.log")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("azurite did not start listening within 60 s")
            time.sleep(0.1)
        yield Azurite(blob_endpoint=f"http://127.0.0.1:{port}/{ACCOUNT}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
