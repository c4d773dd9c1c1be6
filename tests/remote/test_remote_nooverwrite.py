"""Nothing the rescue VM writes ever replaces a blob (#13 deliver 1, the remote side).

Every blob collect.sh creates (a dump's Put Block List, a manifest's Put Blob) carries If-None-Match: *.
A blob already there answers 409 BlobAlreadyExists (412 ConditionNotMet for other conditions): the run
fails with upload_failed (exit 12) naming the blob, and the blob keeps its bytes. Only when an earlier
attempt of the same request may have gone through (its answer lost) does the script read the blob back,
and it counts as stored only when it holds exactly what was sent. Run for real against HTTPS Azurite with
the Linux script and a disk image of a broken VM (tests/support/rescue.py).
"""

from __future__ import annotations

import http.client
import json
from http.server import BaseHTTPRequestHandler

import pytest

from tests.remote.bashrun import download, result_of
from tests.support.rescue import (  # noqa: F401 - fixtures
    azurite_https, broken_disk, container, imds, linux_script, run_bash, script_env, sha256_file, tls,
)
from tests.support.storagefakes import SERVER_BUSY, Fault, FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.root]

PREFIX = "web-01/20250517T031245Z"
SMALL_BLOCKS = {"BlockSize": "65536", "Parallel": "3", "MaxAttempts": "4"}
EARLIER = b"evidence stored by an earlier run: must never be replaced\n"
CONDITION_NOT_MET = Fault(412, "ConditionNotMet", "The condition specified using HTTP conditional header(s) is not met.")



def creates(request) -> bool:
    """A request that creates a blob: Put Block List, or a Put Blob (a PUT without comp)."""
    return request.method == "PUT" and request.query.get("comp") in ("blocklist", None)


def test_an_existing_dump_blob_keeps_its_bytes(linux_script, broken_disk, container, azurite_https, imds, tls):
    container.upload_blob(f"{PREFIX}/MEMORY.DMP", EARLIER)
    proc = run_bash(linux_script, script_env(azurite_https, container, imds, tls, broken_disk.image, PREFIX, **SMALL_BLOCKS))
    result = result_of(proc)
    assert (proc.returncode, result["status"]) == (12, "upload_failed")
    assert f"{PREFIX}/MEMORY.DMP already exists and was not overwritten" in result["message"]
    assert "409 BlobAlreadyExists" in result["message"]
    assert download(container, f"{PREFIX}/MEMORY.DMP") == EARLIER
    memory = next(f for f in result["files"] if f["kind"] == "memory")
    assert memory["uploaded"] is False and memory["blob"] == f"{PREFIX}/MEMORY.DMP"
    names = {b.name for b in container.list_blobs()}
    assert f"{PREFIX}/MEMORY.DMP.manifest.json" not in names
    # the other dumps are stored all the same, each with its manifest
    for suffix, local in broken_disk.dumps.items():
        if suffix != "MEMORY.DMP":
            assert sha256_file(local) == json.loads(download(container, f"{PREFIX}/{suffix}.manifest.json"))["sha256"]


def test_an_existing_manifest_keeps_its_bytes(linux_script, broken_disk, container, azurite_https, imds, tls):
    manifest = f"{PREFIX}/Minidump/052424-11234-01.dmp.manifest.json"
    container.upload_blob(manifest, EARLIER)
    proc = run_bash(linux_script, script_env(azurite_https, container, imds, tls, broken_disk.image, PREFIX, **SMALL_BLOCKS))
    result = result_of(proc)
    assert (proc.returncode, result["status"]) == (12, "upload_failed")
    assert f"{manifest} already exists and was not overwritten" in result["message"]
    assert download(container, manifest) == EARLIER
    assert any(n.startswith(f"{manifest} already exists in the evidence container") for n in result["notes"])


def test_every_created_blob_carries_if_none_match(linux_script, broken_disk, container, azurite_https, imds, tls):
    with FaultProxy(azurite_https.blob_endpoint, tls) as proxy:
        env = script_env(azurite_https, container, imds, tls, broken_disk.image, PREFIX, **SMALL_BLOCKS)
        env["BlobEndpoint"] = proxy.blob_endpoint
        proc = run_bash(linux_script, env)
    assert proc.returncode == 0, proc.stderr
    created = [r for r in proxy.requests if creates(r)]
    assert len(created) == 2 * len(broken_disk.dumps)  # a block list and a manifest per dump
    assert all(r.headers.get("if-none-match") == "*" for r in created), [(r.path, r.headers) for r in created]


def test_412_is_a_failure_never_retried(linux_script, broken_disk, container, azurite_https, imds, tls):
    def rule(req):
        if req.query.get("comp") == "blocklist" and req.path.endswith("/MEMORY.DMP"):
            return CONDITION_NOT_MET
        return None

    with FaultProxy(azurite_https.blob_endpoint, tls, rule) as proxy:
        env = script_env(azurite_https, container, imds, tls, broken_disk.image, PREFIX, **SMALL_BLOCKS)
        env["BlobEndpoint"] = proxy.blob_endpoint
        proc = run_bash(linux_script, env)
    result = result_of(proc)
    assert (proc.returncode, result["status"]) == (12, "upload_failed")
    assert f"412 ConditionNotMet: {PREFIX}/MEMORY.DMP already exists" in result["message"]
    assert len([r for r in proxy.calls("blocklist") if r.path.endswith("/MEMORY.DMP")]) == 1
    assert f"{PREFIX}/MEMORY.DMP" not in {b.name for b in container.list_blobs()}


class LostAnswerProxy(FaultProxy):
    """Carries out the first request for each blob in `names` at Azurite, then answers 500 as if the
    answer had been lost on the way back: the script's retry then meets its own blob."""

    def __init__(self, upstream, tls, names):
        super().__init__(upstream, tls)
        self.pending = set(names)

    def handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        name = h.path.split("?")[0]
        if h.command != "PUT" or not any(name.endswith(n) for n in self.pending) or "comp=block&" in h.path:
            return super().handle(h, body)
        self.pending -= {n for n in self.pending if name.endswith(n)}
        conn = http.client.HTTPSConnection(self.upstream.hostname, self.upstream.port, context=self.tls.context(),
                                           timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection", "expect")}
            conn.request(h.command, h.path, body=body, headers=headers)
            assert conn.getresponse().status == 201  # it went through...
        finally:
            conn.close()
        error = b"<Error><Code>InternalError</Code></Error>"  # ... but the script hears a 500
        h.send_response(500)
        h.send_header("x-ms-error-code", "InternalError")
        h.send_header("Content-Length", str(len(error)))
        h.end_headers()
        h.wfile.write(error)


def test_a_create_whose_answer_was_lost_is_recognised_as_ours(linux_script, broken_disk, container, azurite_https,
                                                              imds, tls):
    with LostAnswerProxy(azurite_https.blob_endpoint, tls, ["/MEMORY.DMP", "/MEMORY.DMP.manifest.json"]) as proxy:
        env = script_env(azurite_https, container, imds, tls, broken_disk.image, PREFIX, **SMALL_BLOCKS)
        env["BlobEndpoint"] = proxy.blob_endpoint
        proc = run_bash(linux_script, env)
    result = result_of(proc)
    assert (proc.returncode, result["status"]) == (0, "collected"), proc.stderr
    assert proc.stderr.count("an earlier attempt went through") == 2
    assert download(container, f"{PREFIX}/MEMORY.DMP") == broken_disk.dumps["MEMORY.DMP"].read_bytes()
    assert json.loads(download(container, f"{PREFIX}/MEMORY.DMP.manifest.json"))["blob"] == f"{PREFIX}/MEMORY.DMP"


def test_a_lost_answer_does_not_pass_off_someone_elses_blob(linux_script, broken_disk, container, azurite_https,
                                                            imds, tls):
    """The retry after a 503 meets a blob that is not what the script sent: a conflict, not a success."""
    container.upload_blob(f"{PREFIX}/MEMORY.DMP", EARLIER, metadata={"sha256": "0" * 64})
    seen = []

    def rule(req):
        if req.query.get("comp") == "blocklist" and req.path.endswith("/MEMORY.DMP") and not seen:
            seen.append(req)
            return SERVER_BUSY
        return None

    with FaultProxy(azurite_https.blob_endpoint, tls, rule) as proxy:
        env = script_env(azurite_https, container, imds, tls, broken_disk.image, PREFIX, **SMALL_BLOCKS)
        env["BlobEndpoint"] = proxy.blob_endpoint
        proc = run_bash(linux_script, env)
    result = result_of(proc)
    assert (proc.returncode, result["status"]) == (12, "upload_failed")
    assert [r.answered for r in proxy.calls("blocklist") if r.path.endswith("/MEMORY.DMP")] == [503, 409]
    assert download(container, f"{PREFIX}/MEMORY.DMP") == EARLIER
