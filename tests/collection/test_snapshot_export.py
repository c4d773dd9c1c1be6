"""The snapshot-export strategy end to end, driven through the real SDK clients:

- ARM: azure-mgmt-compute against the loopback ARM double (scripts/devkit/arm_snapshot.py: snapshot create,
  grant/revoke access with long-running operations, delete);
- storage: azure-storage-blob against Azurite, through scripts/devkit/copyshim.py, which implements Put
  Block From URL the way the service does (Azurite 3.35 answers it 501);
- the "exported snapshot": an Azurite page blob holding a real disk image (ntfs-3g volumes) as a fixed VHD.

Every test checks what matters to an operator: the stored blob is byte-identical to the dump on the disk,
the bytes went server-side, access was revoked and a snapshot the kit made was deleted, whatever happened."""

from __future__ import annotations

import dataclasses
import datetime as dt
import base64
import functools
import hashlib
import os
import signal
import json
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from scripts.azure.identity import vm_key
from scripts.collection import server_copy, snapshot_access
from scripts.collection.contract import CollectError, CollectRequest
from scripts.collection.snapshot_export import ExportOptions, SnapshotExportCollector
from scripts.config.model import Config
from scripts.base.errors import ExitCode
from scripts.config.stackoutputs import RepairOutputs
from scripts.devkit import arm_resources, arm_snapshot
from scripts.devkit import arm_vm
from scripts.devkit import gptdisk
from scripts.devkit.copyshim import CopyShim

pytestmark = pytest.mark.skipif(gptdisk.can_build() is not None, reason=str(gptdisk.can_build()))
SUB = arm_vm.SUB


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x9A6C9329AC4BC9B5 if c & 1 else c >> 1
        table.append(c)
    return table


_T = _table()


@functools.lru_cache(maxsize=8)
def _crc(data: bytes) -> str:
    """An independent CRC-64 (Azure Storage's, CRC-64/NVME): byte by byte from its definition, no composition."""
    c = 0xFFFFFFFFFFFFFFFF
    for b in data:
        c = _T[(c ^ b) & 0xFF] ^ (c >> 8)
    return f"{c ^ 0xFFFFFFFFFFFFFFFF:016x}"


@pytest.fixture(scope="module")
def shim(azurite):
    with CopyShim(azurite) as instance:
        yield instance


@pytest.fixture(scope="module")
def exported(azurite):
    """recipe -> SAS URL of the disk image as an exported fixed VHD (uploaded once per module)."""
    urls: dict[str, str] = {}

    def get(recipe: str) -> str:
        if recipe not in urls:
            urls[recipe] = arm_snapshot.export_page_blob(azurite, gptdisk.shared_disk(recipe).image)
        return urls[recipe]

    return get


@dataclasses.dataclass
class Env:
    arm: Any
    shim: CopyShim
    azurite: Any
    vm: arm_vm.BrokenVm
    container: str
    config: Config
    routes: arm_snapshot.SnapshotRoutes
    sas: dict[str, str]
    groups: arm_resources.ResourceGroups

    def outputs(self, snapshot_id: str) -> RepairOutputs:
        return RepairOutputs(
            subscription_id=SUB, resource_group_name="crashcart-repair-web-01", rescue_vm_id="", rescue_vm_name="",
            rescue_vm_principal_id="", rescue_os="windows", disk_copy_id="", disk_copy_lun=0, snapshot_id=snapshot_id,
            source_vm_id=self.vm.vm_id, source_os_disk_id=self.vm.disk_id, evidence_account_name="devstoreaccount1",
            evidence_blob_endpoint=self.shim.blob_endpoint, evidence_container=self.container)

    def target(self, snapshot_id: str = "") -> snapshot_access.ExportTarget:
        if snapshot_id:
            return snapshot_access.ExportTarget.from_outputs(self.outputs(snapshot_id), self.config)
        return snapshot_access.ExportTarget.from_config(self.config, self.shim.blob_endpoint, self.container)

    def blob(self, name: str) -> bytes:
        return self.azurite.service_client().get_blob_client(self.container, name).download_blob().readall()

    def names(self) -> list[str]:
        return [b.name for b in self.azurite.service_client().get_container_client(self.container).list_blobs()]


@pytest.fixture
def env(arm, shim, azurite, exported, monkeypatch, tmp_path):
    monkeypatch.setenv("CRASHCART_STORAGE_CONNECTION_STRING", shim.connection_string)
    container = f"dumps-{uuid.uuid4().hex[:10]}"
    azurite.service_client().create_container(container)
    vm = arm_vm.add_broken_vm(arm)
    config = Config.from_dict({
        "source": {"subscription_id": SUB, "resource_group": "prod-web", "vm_name": "web-01", "location": "westeurope",
                   "os_disk_id": vm.disk_id, "os_disk_size_gb": 127},
        "evidence": {"container": container}, "repair": {"strategy": "snapshot-export"}})
    sas: dict[str, str] = {}
    routes = arm_snapshot.install_snapshot_routes(arm, lambda snapshot_id, body: sas["url"])
    groups = arm_resources.add_resource_group_routes(arm)
    return Env(arm, shim, azurite, vm, container, config, routes, sas, groups)


def _run(env: Env, recipe: str, tmp_path: Path, snapshot_id: str = "", sas_days: int | None = None,
         now: dt.datetime | None = None, config: Config | None = None, **options: Any):
    """One export of `recipe`'s disk (env.sas["url"] is what the grant hands out); `options` are ExportOptions.
    `config` another source VM's (default: env.config's web-01 in prod-web), `now` the run stamp's clock."""
    config = config or env.config
    request = CollectRequest(None, config, progress=False, out_dir=tmp_path / "out", poll_seconds=0.01,
                             sas_days=sas_days, now=now)
    target = (env.target(snapshot_id) if config is env.config
              else snapshot_access.ExportTarget.from_config(config, env.shim.blob_endpoint, env.container))
    export = ExportOptions(target=target, **{"block_bytes": 1 << 20, "spot_checks": 4, **options})
    return SnapshotExportCollector(export).collect(request)


def _manifest(env: Env, name: str) -> dict:
    return json.loads(env.blob(f"{name}.manifest.json"))


# ---- the main path ----------------------------------------------------------------------------------------
def test_fragmented_dump_is_copied_server_side_byte_identical_and_everything_is_cleaned_up(env, exported, tmp_path):
    disk = gptdisk.shared_disk("gpt-fragmented")
    env.sas["url"] = exported("gpt-fragmented")
    body_before, copied_before = env.shim.stats.client_body_bytes, env.shim.stats.copied_bytes
    read_before = env.shim.stats.client_response_bytes
    result = _run(env, "gpt-fragmented", tmp_path)
    read_by_kit = env.shim.stats.client_response_bytes - read_before

    assert result.status == "collected" and result.exit_code == 0
    prefix = result.run
    assert prefix.startswith(vm_key(env.vm.vm_id) + "/")  # the VM's key: name + hash of its resource ID
    by_kind = {b.kind: b for b in result.blobs}
    memory = by_kind["memory"]
    assert memory.name == f"{prefix}/MEMORY.DMP" and memory.ok
    original = disk.originals["Windows/MEMORY.DMP"].read_bytes()
    # byte-identical, proven without reading the blob back: the CRC-64 composed from the service's per-block
    # answers is that of the original file and of the blob as stored (computed here independently)
    stored = env.blob(memory.name)
    assert stored == original
    assert memory.crc64 == _crc(original) and memory.crc64_by == "service"
    assert memory.sha256 is None and memory.crc64_checked is False  # nothing was read back to check it
    mini = by_kind["minidump"]
    mini_original = disk.originals["Windows/Minidump/051724-21453-01.dmp"].read_bytes()
    assert env.blob(mini.name) == mini_original
    assert mini.crc64 == _crc(mini_original) and mini.crc64_by == "service"
    # what the kit read through the Blob endpoint: header probes, spot checks, triage - never the whole dump
    assert read_by_kit < len(original) // 2

    manifest = _manifest(env, memory.name)
    assert manifest["schema"] == "crashcart.manifest/1" and manifest["collector"] == "snapshot-export"
    assert manifest["size"] == len(original) and manifest["header"]["bugcheck_code"] == "0x7e"
    assert manifest["source"]["source_disk_id"] == env.vm.disk_id
    assert manifest["source"]["snapshot_id"].endswith(result.export["snapshot"]["id"].rsplit("/", 1)[-1])
    assert manifest["crc64"] == _crc(original) and manifest["crc64_by"] == "service"
    assert "x-ms-content-crc64" in manifest["crc64_how"]
    assert base64.b64decode(manifest["crc64_base64"]) == int(_crc(original), 16).to_bytes(8, "little")
    assert manifest["sha256"] is None and manifest["sha256_by"]["party"] is None
    assert "verify" in manifest["sha256_by"]["how"]
    assert manifest["copy"]["fragments"] > 200 and manifest["copy"]["blocks_from_snapshot"] >= 200
    assert manifest["spot_check"]["matched"] is True

    # server-side: the shim (the "service") fetched the dump; the kit uploaded only manifests and the report
    assert env.shim.stats.copied_bytes - copied_before >= len(original)
    assert env.shim.stats.client_body_bytes - body_before < 64 * 1024
    kit = result.export["bytes_through_kit"]
    assert kit["hash"] == 0 and kit["dump_bytes"] == len(original) + mini.size
    assert result.export["kit_bytes"]["metadata"] < 1 << 20 and result.export["kit_bytes"]["uploaded"] == 0

    # the snapshot the kit made: read access granted once, revoked, snapshot deleted
    (grant,) = env.routes.grants
    assert grant["access"] == "Read" and grant["duration"] >= 3600
    snapshot_id = grant["snapshot"]
    # the source side is only read (issue 12): the snapshot goes in the VM's repair group, never prod-web
    repair_group = f"crashcart-repair-{vm_key(env.vm.vm_id)}"
    assert f"/resourceGroups/{repair_group}/" in snapshot_id and f"crashcart-export-{vm_key(env.vm.vm_id)}-" in snapshot_id
    assert [(c.method, c.path) for c in env.arm.requests if "/resourcegroups/prod-web" in c.path.lower()
            and c.method != "GET"] == []
    # no repair stack, so no repair group: made for the snapshot, tagged for sweep, deleted after it
    (made,) = [c for c in env.arm.calls("PUT") if c.path.lower().endswith(f"/resourcegroups/{repair_group}")]
    assert made.body["location"] == "westeurope" and made.body["tags"]["crashcart"] == "repair"
    assert made.body["tags"]["crashcart-source-vm"] == env.vm.vm_id and "crashcart-expires-at" in made.body["tags"]
    assert env.arm.get(arm_resources.group_id(SUB, repair_group)) is None
    assert result.export["snapshot"]["resource_group"] == {"name": repair_group, "made_by_kit": True, "deleted": True}
    assert env.routes.creates == [snapshot_id] and env.routes.revokes == [snapshot_id] == env.routes.deletes
    assert env.arm.get(snapshot_id) is None and not env.routes.active
    create = env.arm.calls("PUT", "/snapshots/")[0].body
    assert create["properties"]["creationData"] == {"createOption": "Copy", "sourceResourceId": env.vm.disk_id}
    assert create["tags"]["crashcart"] == "export-snapshot" and "crashcart-expires-at" in create["tags"]
    assert result.export["access"]["revoked"] is True and result.export["snapshot"]["deleted"] is True

    # triage names the faulting driver; the report is stored beside the dumps
    assert result.export["triage"]["faulting_module"]["name"] == "contosoflt.sys"
    assert any("contosoflt.sys" in n for n in result.notes)
    assert {f"{prefix}/report.json", f"{prefix}/report.md"} <= set(env.names())
    assert not any(n.endswith(server_copy.ZERO_SOURCE) for n in env.names())
    report = json.loads(env.blob(f"{prefix}/report.json"))
    assert report["status"] == "collected" and report["bugcheck"]["code"] == "0x7e"
    (reported,) = [d for d in report["dumps"] if d["blob"] == memory.name]
    assert reported["crc64"] == _crc(original) and reported["crc64_by"] == "service" and reported["sha256"] is None


def test_sparse_dump_at_a_non_default_path_on_mbr_reusing_the_repair_stacks_snapshot(env, exported, tmp_path):
    disk = gptdisk.shared_disk("mbr-sparse")
    env.sas["url"] = exported("mbr-sparse")
    snapshot_id = arm_snapshot.add_snapshot(env.arm, env.vm.disk_id)
    body_before = env.shim.stats.client_body_bytes
    result = _run(env, "mbr-sparse", tmp_path, snapshot_id=snapshot_id)

    (memory,) = result.blobs
    original = disk.originals["CrashDumps/web-01.dmp"].read_bytes()
    assert memory.source_path == r"C:\CrashDumps\web-01.dmp" and memory.name.endswith("/MEMORY.DMP")
    assert env.blob(memory.name) == original
    assert memory.crc64 == _crc(original) and memory.crc64_by == "service"
    manifest = _manifest(env, memory.name)
    assert manifest["copy"]["zero_blocks"] > 0 and manifest["copy"]["zero_bytes"] > len(original) // 2
    assert manifest["copy"]["sparse_source"] is True
    # zeros were staged server-side from the empty page blob, not uploaded by the kit
    zero_copies = [c for c in env.shim.stats.copies if c.source.endswith(server_copy.ZERO_SOURCE)
                   and c.blob == f"{env.container}/{memory.name}"]
    assert len(zero_copies) == manifest["copy"]["zero_blocks"] and all(c.status == 201 for c in zero_copies)
    assert env.shim.stats.client_body_bytes - body_before < 64 * 1024
    # the repair stack's snapshot: revoked, not deleted (the stack's teardown owns it)
    assert env.routes.revokes == [snapshot_id] and env.routes.deletes == [] and env.routes.creates == []
    assert env.arm.get(snapshot_id) is not None
    assert result.export["snapshot"]["made_by_kit"] is False
    assert result.crash_control["DumpFile"] == r"C:\CrashDumps\web-01.dmp"
    assert result.volume["scheme"] == "mbr" and result.volume["vhd_footer"] is True


# ---- outcomes that are not a dump ---------------------------------------------------------------------------
def test_no_dump_on_the_disk_exits_10_and_points_at_prepare_dump(env, exported, tmp_path):
    env.sas["url"] = exported("gpt-no-dump")
    with pytest.raises(CollectError) as caught:
        _run(env, "gpt-no-dump", tmp_path)
    err = caught.value
    assert err.exit_code == ExitCode.NO_DUMP == 10
    assert "holds no memory dump" in err.message and "pipenv run prepare-dump" in err.hint
    assert err.result.status == "no_dump"
    snapshot_id = env.routes.grants[0]["snapshot"]
    assert env.routes.revokes == [snapshot_id] == env.routes.deletes
    report = json.loads(env.blob(f"{err.result.run}/report.json"))
    assert report["status"] == "no_dump" and report["exit_code"] == 10


def test_a_compressed_dump_fails_clearly_after_storing_what_can_be_copied(env, exported, tmp_path):
    env.sas["url"] = exported("gpt-compressed")
    with pytest.raises(CollectError) as caught:
        _run(env, "gpt-compressed", tmp_path)
    err = caught.value
    assert err.exit_code == ExitCode.COLLECT_FAILED
    assert "NTFS-compressed" in err.message and "1 other dump(s) are stored" in err.message
    assert "rescue-vm" in err.hint
    assert [b.kind for b in err.result.blobs] == ["minidump"] and err.result.blobs[0].ok
    assert env.routes.revokes and env.routes.revokes == env.routes.deletes


def test_bitlocker_volume_exits_11_naming_the_ways_to_unlock_and_access_is_revoked(env, exported, tmp_path):
    env.sas["url"] = exported("gpt-bitlocker")
    with pytest.raises(CollectError) as caught:
        _run(env, "gpt-bitlocker", tmp_path)
    err = caught.value
    assert err.exit_code == ExitCode.DISK_NOT_FOUND
    assert "BitLocker" in err.message and "manage-bde" in err.hint and "Key Vault" in err.hint
    assert env.routes.revokes and env.routes.revokes == env.routes.deletes and not env.routes.active


def test_deny_all_snapshot_cannot_be_exported_and_nothing_is_granted(env, tmp_path):
    snapshot_id = arm_snapshot.add_snapshot(env.arm, env.vm.disk_id, network_access_policy="DenyAll")
    env.sas["url"] = "http://127.0.0.1:9/never"
    with pytest.raises(CollectError) as caught:
        _run(env, "", tmp_path, snapshot_id=snapshot_id)
    err = caught.value
    assert err.exit_code == ExitCode.USAGE
    assert "DenyAll" in err.message and "rescue-vm" in err.hint and "never changes" in err.hint
    assert env.routes.grants == [] and env.routes.revokes == [] and env.routes.deletes == []


def test_deny_all_disk_is_refused_before_a_snapshot_is_made(env, tmp_path):
    env.arm.get(env.vm.disk_id)["properties"]["networkAccessPolicy"] = "DenyAll"
    env.sas["url"] = "http://127.0.0.1:9/never"
    with pytest.raises(CollectError, match="network access policy is DenyAll") as caught:
        _run(env, "", tmp_path)
    assert caught.value.exit_code == ExitCode.USAGE
    assert env.routes.creates == [] and env.routes.grants == []


def test_an_existing_repair_group_holds_the_kits_snapshot_and_is_left_in_place(env, exported, tmp_path):
    """A kept repair stack's group (or one an operator made): the snapshot goes there, the group stays."""
    repair_group = f"crashcart-repair-{vm_key(env.vm.vm_id)}"
    env.groups.add(SUB, repair_group, tags={"crashcart": "repair"})
    env.sas["url"] = exported("gpt-small")
    result = _run(env, "gpt-small", tmp_path)
    assert result.status == "collected"
    (created,) = env.routes.creates
    assert f"/resourceGroups/{repair_group}/" in created and env.routes.deletes == [created]
    assert not [c for c in env.arm.calls("PUT") + env.arm.calls("DELETE") if c.path.lower().endswith(repair_group)]
    assert env.arm.get(arm_resources.group_id(SUB, repair_group)) is not None
    assert result.export["snapshot"]["resource_group"] == {"name": repair_group, "made_by_kit": False}


def test_a_repair_group_that_is_the_source_group_is_refused_before_anything_is_written(env, tmp_path):
    config = Config.from_dict({
        "source": {"subscription_id": SUB, "resource_group": "prod-web", "vm_name": "web-01", "location": "westeurope",
                   "os_disk_id": env.vm.disk_id, "os_disk_size_gb": 127},
        "evidence": {"container": env.container}, "repair": {"strategy": "snapshot-export", "resource_group": "prod-web"}})
    env.sas["url"] = "http://127.0.0.1:9/never"
    with pytest.raises(CollectError, match="is the source VM's own group") as caught:
        _run(env, "", tmp_path, config=config)
    assert caught.value.exit_code == ExitCode.USAGE
    assert env.routes.creates == [] and env.arm.calls("PUT") == []


# ---- failures: access is revoked and the kit's snapshot deleted anyway -------------------------------------
def test_a_failed_server_side_copy_still_revokes_and_deletes(env, exported, tmp_path):
    env.sas["url"] = exported("gpt-small")
    env.shim.fail_next_copy = (403, "CannotVerifyCopySource")
    with pytest.raises(CollectError) as caught:
        _run(env, "gpt-small", tmp_path, parallel=1)
    err = caught.value
    assert err.exit_code == ExitCode.COLLECT_FAILED
    assert "could not read the snapshot" in err.message and "AllowPrivate" in err.hint
    snapshot_id = env.routes.grants[0]["snapshot"]
    assert env.routes.revokes == [snapshot_id] == env.routes.deletes
    assert err.result.export["access"]["revoked"] is True


def test_a_failed_grant_is_still_revoked(env, exported, tmp_path):
    env.sas["url"] = exported("gpt-small")
    env.routes.fail_grant = {"code": "InternalDiskManagementError", "message": "An internal error occurred."}
    with pytest.raises(CollectError) as caught:
        _run(env, "gpt-small", tmp_path)
    assert caught.value.exit_code == ExitCode.AZURE_FAILED
    snapshot_id = env.routes.grants[0]["snapshot"]
    assert env.routes.revokes == [snapshot_id] == env.routes.deletes


def test_a_revoke_that_fails_is_reported_with_what_is_left(env, exported, tmp_path):
    env.sas["url"] = exported("gpt-small")
    env.routes.fail_revoke = (409, "Conflict")
    with pytest.raises(CollectError) as caught:
        _run(env, "gpt-small", tmp_path)
    err = caught.value
    assert err.exit_code == ExitCode.TEARDOWN_FAILED
    assert err.result.blobs and all(b.ok for b in err.result.blobs)  # the evidence is safe
    assert "az snapshot revoke-access" in err.message and "az snapshot delete" in err.message
    assert err.result.export["access"]["revoked"] is False and err.result.export["snapshot"]["deleted"] is False


def test_sas_links_that_storage_refuses_leave_the_stored_dump_collected_and_reported(env, exported, tmp_path):
    """SAS links are best effort: a link storage will not sign (here: storage reached with the emulator key,
    which cannot get a user delegation key, as an identity without Storage Blob Delegator cannot) is a
    note; the stored dump stays collected, exit 0, with its report."""
    env.sas["url"] = exported("gpt-small")
    result = _run(env, "gpt-small", tmp_path, sas_days=7)
    assert result.status == "collected" and result.exit_code == 0
    assert result.blobs and all(b.ok for b in result.blobs)
    assert result.sas == {} and result.sas_expiry is None
    assert any(n.startswith("no SAS links") for n in result.notes)
    report = json.loads(env.blob(f"{result.run}/report.json"))
    assert report["status"] == "collected" and report["exit_code"] == 0
    assert "no SAS links" in Path(result.report_files["markdown"]).read_text()
    snapshot_id = env.routes.grants[0]["snapshot"]
    assert env.routes.revokes == [snapshot_id] == env.routes.deletes


# ---- Azure AD data access (dataAccessAuthMode AzureActiveDirectory) -----------------------------------------
class _Token:
    def __init__(self, token: str):
        self.token, self.expires_on = token, 2 ** 40


class _Credential:
    def __init__(self) -> None:
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> _Token:
        self.scopes += scopes
        return _Token("disk-token" if scopes[0].startswith("https://disk.azure.com") else "other-token")


class _AadExport:
    """An export URL that, like a disk in AzureActiveDirectory mode, wants the SAS *and* a disk token."""

    def __init__(self, image: Path):
        self.data = image.read_bytes() + gptdisk.fixed_vhd_footer(image.stat().st_size)
        self.seen: list[tuple[str, bool]] = []
        export = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                ok = "sig" in query and self.headers.get("Authorization") == "Bearer disk-token"
                export.seen.append((self.headers.get("User-Agent", ""), ok))
                if not ok:
                    self.send_response(401)
                    self.send_header("x-ms-error-code", "NoAuthenticationInformation")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                lo, hi = self.headers["Range"].split("=")[1].split("-")
                lo, hi = int(lo), min(int(hi), len(export.data) - 1)
                body = export.data[lo:hi + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(export.data)}")
                self.send_header("ETag", '"0x8DC0000000000AA"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/xx3cqcx53f0v/abcd?sv=2018-03-28&sr=b&sp=r&sig=FAKE"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_azure_ad_data_access_mode_sends_a_disk_token_with_reads_and_copies(env, tmp_path):
    disk = gptdisk.shared_disk("gpt-small")
    export = _AadExport(disk.image.path)
    try:
        env.sas["url"] = export.url
        snapshot_id = arm_snapshot.add_snapshot(env.arm, env.vm.disk_id, data_access_auth_mode="AzureActiveDirectory")
        credential = _Credential()
        result = _run(env, "", tmp_path, snapshot_id=snapshot_id, credential=credential)
    finally:
        export.close()
    assert "https://disk.azure.com//.default" in credential.scopes
    assert export.seen and all(ok for _, ok in export.seen)  # every read and every server-side fetch had the token
    memory = next(b for b in result.blobs if b.kind == "memory")
    assert memory.crc64 == _crc(disk.originals["Windows/MEMORY.DMP"].read_bytes()) and memory.crc64_by == "service"
    copies = [c for c in env.shim.stats.copies if c.blob == f"{env.container}/{memory.name}"]
    assert copies and all(c.authorization == "Bearer" for c in copies)
    assert result.export["access"]["aad"] is True and env.routes.revokes == [snapshot_id]


class _InterruptingCredential:
    """Ctrl-C arrives while the kit asks for a disk token: with read access granted, before any read."""

    def get_token(self, *scopes: str, **kwargs: Any) -> _Token:
        raise KeyboardInterrupt


def test_an_interrupt_after_the_grant_still_revokes_access_and_deletes_the_kits_snapshot(env, tmp_path):
    env.arm.get(env.vm.disk_id)["properties"]["dataAccessAuthMode"] = "AzureActiveDirectory"
    env.sas["url"] = "http://127.0.0.1:9/never-read"
    with pytest.raises(CollectError) as caught:
        _run(env, "", tmp_path, credential=_InterruptingCredential())
    err = caught.value
    assert err.exit_code == ExitCode.INTERRUPTED and err.result.status == "interrupted"
    snapshot_id = env.routes.grants[0]["snapshot"]
    assert env.routes.creates == [snapshot_id] and env.routes.revokes == [snapshot_id] == env.routes.deletes
    assert env.arm.get(snapshot_id) is None and not env.routes.active
    assert err.result.export["access"]["revoked"] is True and err.result.export["snapshot"]["deleted"] is True
    report = json.loads(env.blob(f"{err.result.run}/report.json"))
    assert report["status"] == "interrupted" and report["exit_code"] == 130


def test_the_shim_leaves_authentication_to_azurite(shim, azurite):
    """A Put Block From URL the service would refuse (bad SharedKey) is refused by Azurite itself, and no
    copy happens: the shim only performs operations Azurite has authorized."""
    import base64

    from azure.core.exceptions import HttpResponseError
    from azure.storage.blob import BlobServiceClient

    wrong_key = base64.b64encode(b"not the key".ljust(64, b"!")).decode()
    client = BlobServiceClient.from_connection_string(shim.connection_string.replace(azurite.key, wrong_key))
    before = len(shim.stats.copies)
    with pytest.raises(HttpResponseError) as caught:
        client.get_blob_client("anything", "blob").stage_block_from_url("id", "http://127.0.0.1:9/source", 0, 512)
    assert caught.value.status_code == 403 and len(shim.stats.copies) == before


# ---- the operator's command line ----------------------------------------------------------------------------
def test_collect_verb_with_strategy_snapshot_export_uses_the_repair_stacks_snapshot(env, exported, tmp_path):
    """`pipenv run collect --strategy snapshot-export --full-hash`, as a person types it after `cdktf deploy
    repair`: the SHA-256 on request, by reading the blob back once, its CRC-64 equal to the service's."""
    import os
    import subprocess
    import sys

    env.sas["url"] = exported("mbr-sparse")
    snapshot_id = arm_snapshot.add_snapshot(env.arm, env.vm.disk_id)
    outputs_file = tmp_path / "outputs.json"
    outputs_file.write_text(json.dumps({"repair": dataclasses.asdict(env.outputs(snapshot_id))}))
    child_env = {**os.environ, "CRASHCART_ARM_ENDPOINT": env.arm.url,
                 "CRASHCART_STORAGE_CONNECTION_STRING": env.shim.connection_string, "CI": "1"}
    child_env.pop("CRASHCART_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-m", "scripts", "collect", "--strategy", "snapshot-export", "--outputs-file",
         str(outputs_file), "--poll-seconds", "0.01", "--out-dir", str(tmp_path / "out"), "--full-hash"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, env=child_env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout)
    (memory,) = [b for b in payload["blobs"] if b["name"].endswith("/MEMORY.DMP")]
    original = gptdisk.shared_disk("mbr-sparse").originals["CrashDumps/web-01.dmp"].read_bytes()
    assert memory["sha256"] == _sha(original) == _sha(env.blob(memory["name"]))
    assert memory["crc64"] == _crc(original) and memory["crc64_by"] == "service" and memory["crc64_checked"] is True
    assert memory["bytes_read"] == len(original)  # read back once, not twice
    manifest = _manifest(env, memory["name"])
    assert manifest["sha256"] == _sha(original) and manifest["sha256_by"]["bytes_read"] == len(original)
    assert manifest["crc64_checked_by_kit"] is True
    assert env.routes.revokes == [snapshot_id]
    assert "Traceback" not in result.stderr


# ---- a VM is its resource ID; nothing is ever overwritten (#13) ----------------------------------------------
STAMP_CLOCK = dt.datetime(2025, 5, 17, 3, 12, 45, tzinfo=dt.timezone.utc)


def _config_of(env: Env, vm: arm_vm.BrokenVm, resource_group: str) -> Config:
    return Config.from_dict({
        "source": {"subscription_id": SUB, "resource_group": resource_group, "vm_name": "web-01",
                   "location": "westeurope", "os_disk_id": vm.disk_id, "os_disk_size_gb": 127},
        "evidence": {"container": env.container}, "repair": {"strategy": "snapshot-export"}})


def test_two_vms_named_web_01_in_two_groups_keep_their_own_dumps_and_a_rerun_is_refused(env, exported, tmp_path):
    """Defect 2: two VMs named web-01 (prod-web, prod-web-2), collected one after the other with the same run
    stamp, shared the prefix web-01/<stamp>/: the second collection overwrote the first MEMORY.DMP and exited 0."""
    other_vm = arm_vm.add_broken_vm(env.arm, resource_group="prod-web-2")
    assert other_vm.vm_id != env.vm.vm_id and other_vm.vm_id.endswith("/virtualMachines/web-01")
    env.sas["url"] = exported("gpt-fragmented")
    first = _run(env, "gpt-fragmented", tmp_path, now=STAMP_CLOCK)
    env.sas["url"] = exported("mbr-sparse")
    second = _run(env, "mbr-sparse", tmp_path, now=STAMP_CLOCK, config=_config_of(env, other_vm, "prod-web-2"))

    assert first.exit_code == second.exit_code == 0
    assert first.run == f"{vm_key(env.vm.vm_id)}/20250517T031245Z"
    assert second.run == f"{vm_key(other_vm.vm_id)}/20250517T031245Z" != first.run
    first_dump = _sha(gptdisk.shared_disk("gpt-fragmented").originals["Windows/MEMORY.DMP"].read_bytes())
    assert _sha(env.blob(f"{first.run}/MEMORY.DMP")) == first_dump  # untouched by the second collection
    assert _sha(env.blob(f"{second.run}/MEMORY.DMP")) == _sha(
        gptdisk.shared_disk("mbr-sparse").originals["CrashDumps/web-01.dmp"].read_bytes())
    # each dump says where it came from: its own VM's disk (the two disks' dumps happen to be the same bytes)
    assert _manifest(env, f"{first.run}/MEMORY.DMP")["source"]["source_disk_id"] == env.vm.disk_id
    assert _manifest(env, f"{second.run}/MEMORY.DMP")["source"]["source_disk_id"] == other_vm.disk_id
    assert _manifest(env, f"{second.run}/MEMORY.DMP")["source"]["path"] == r"C:\CrashDumps\web-01.dmp"
    for result, vm, group in ((first, env.vm, "prod-web"), (second, other_vm, "prod-web-2")):
        stored = json.loads(env.blob(f"{result.run}/report.json"))
        local = json.loads((tmp_path / "out" / result.run / "report.json").read_text())
        assert stored == local and stored["source"]["vm_id"] == result.source_vm_id == vm.vm_id
        assert stored["source"]["resource_group"] == group and stored["evidence"]["prefix"] == result.run
        assert f"(resource group {group})" in env.blob(f"{result.run}/report.md").decode()

    # the same VM again, same stamp: refused before anything is done, the first run's evidence untouched
    grants, creates = len(env.routes.grants), len(env.routes.creates)
    report_before = env.blob(f"{first.run}/report.json")
    env.sas["url"] = exported("gpt-fragmented")
    with pytest.raises(CollectError) as caught:
        _run(env, "gpt-fragmented", tmp_path, now=STAMP_CLOCK)
    err = caught.value
    assert err.exit_code == ExitCode.COLLECT_FAILED == 12 and err.result.status == "upload_failed"
    assert f"{first.run}/report.json" in err.message and "nothing was overwritten" in err.message
    assert "new stamp" in err.hint
    assert (len(env.routes.grants), len(env.routes.creates)) == (grants, creates)  # no snapshot, no access
    assert _sha(env.blob(f"{first.run}/MEMORY.DMP")) == first_dump
    assert env.blob(f"{first.run}/report.json") == report_before
    assert json.loads((tmp_path / "out" / first.run / "report.json").read_text())["status"] == "collected"


def test_a_dump_already_stored_under_the_run_is_never_replaced(env, exported, tmp_path):
    """An earlier run of this VM with this stamp stored MEMORY.DMP but died before its report: the commit is
    If-None-Match: *, so the run stops with exit 12 naming the blob, the earlier bytes stay, the cleanup runs
    and no report of this run is written over the earlier run's folder."""
    prefix = f"{vm_key(env.vm.vm_id)}/20250517T031245Z"
    earlier = b"PAGEDU64" + b"the earlier run's dump" * 100
    env.azurite.service_client().get_blob_client(env.container, f"{prefix}/MEMORY.DMP").upload_blob(earlier)
    env.sas["url"] = exported("mbr-sparse")
    with pytest.raises(CollectError) as caught:
        _run(env, "mbr-sparse", tmp_path, now=STAMP_CLOCK)
    err = caught.value
    assert err.exit_code == ExitCode.COLLECT_FAILED and err.result.status == "upload_failed"
    assert f"evidence blob {prefix}/MEMORY.DMP already exists" in err.message
    assert env.blob(f"{prefix}/MEMORY.DMP") == earlier
    snapshot_id = env.routes.grants[0]["snapshot"]
    assert env.routes.revokes == [snapshot_id] == env.routes.deletes and env.arm.get(snapshot_id) is None
    assert env.names() == [f"{prefix}/MEMORY.DMP"]  # no manifest, no report, the zero source deleted
    assert not (tmp_path / "out" / prefix / "report.json").exists()


def _interrupting(handler: Any) -> Any:
    """An ARM route that lets a Ctrl-C (SIGINT to this process) arrive while the kit waits for its answer."""
    def route(double: Any, req: Any, m: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        return handler(double, req, m)
    return route


def test_more_ctrl_c_during_the_cleanup_never_skip_the_revoke_or_the_delete(env, tmp_path):
    """Defect 4 (snapshot-export): after a first Ctrl-C, another one during the revoke (and one more during the
    snapshot's deletion) used to cut the cleanup short: access left granted, the snapshot left behind."""
    env.arm.get(env.vm.disk_id)["properties"]["dataAccessAuthMode"] = "AzureActiveDirectory"
    env.sas["url"] = "http://127.0.0.1:9/never-read"
    pattern = arm_snapshot._SNAPSHOT  # the double's own route pattern for one snapshot
    env.arm.route("POST", pattern + "/endGetAccess", _interrupting(env.routes.revoke))
    env.arm.route("DELETE", pattern, _interrupting(env.routes.delete))
    with pytest.raises(CollectError) as caught:
        _run(env, "", tmp_path, credential=_InterruptingCredential())
    err = caught.value
    assert err.exit_code == ExitCode.INTERRUPTED and err.result.status == "interrupted"
    snapshot_id = env.routes.grants[0]["snapshot"]
    assert env.routes.revoked(snapshot_id) and env.arm.get(snapshot_id) is None
    assert err.result.export["access"]["revoked"] is True and err.result.export["snapshot"]["deleted"] is True
    assert "left_behind" not in err.result.export
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are back


# ---- the proof without a read-back (#15) -------------------------------------------------------------------------
def test_verify_agrees_with_the_stored_blob_and_catches_it_changed(env, exported, tmp_path):
    """What any holder of read access runs later (`pipenv run verify`): it reads the blob once and finds the
    manifest's service CRC-64 (and the SHA-256 it computes); a blob changed since fails it."""
    from scripts.evidence import blobs as evidence
    from scripts.evidence import verify

    env.sas["url"] = exported("mbr-sparse")
    result = _run(env, "mbr-sparse", tmp_path, triage=False)
    (memory,) = result.blobs
    container = evidence.container_client(env.shim.blob_endpoint, env.container)
    later = verify.verify_file(container, {"blob": memory.name}, full_hash=True)
    assert later.ok and later.crc64_checked and later.crc64_by == "service", later.problems
    original = gptdisk.shared_disk("mbr-sparse").originals["CrashDumps/web-01.dmp"].read_bytes()
    assert later.computed["sha256"] == _sha(original) and later.computed["crc64"] == _crc(original)
    tampered = bytearray(original)
    tampered[len(tampered) // 3] ^= 0x10
    env.azurite.service_client().get_blob_client(env.container, memory.name).upload_blob(bytes(tampered), overwrite=True)
    again = verify.verify_file(container, {"blob": memory.name}, full_hash=True)
    assert not again.ok and any("CRC-64" in p and "its manifest says" in p for p in again.problems)


def test_a_service_that_sends_no_crc64_is_said_so_and_the_kit_hashes_only_on_request(env, exported, tmp_path):
    env.sas["url"] = exported("mbr-sparse")
    env.shim.report_crc64 = False
    try:
        plain = _run(env, "mbr-sparse", tmp_path / "a", triage=False)
        hashed = _run(env, "mbr-sparse", tmp_path / "b", triage=False, hash_blobs=True,
                      now=dt.datetime(2025, 5, 17, 4, 0, 0, tzinfo=dt.timezone.utc))
    finally:
        env.shim.report_crc64 = True
    (memory,) = plain.blobs
    manifest = _manifest(env, memory.name)
    assert memory.ok and manifest["crc64"] is None and manifest["crc64_by"] is None  # nothing is invented
    assert "returned no CRC-64" in manifest["crc64_how"] and "verify" in manifest["crc64_how"]
    original = gptdisk.shared_disk("mbr-sparse").originals["CrashDumps/web-01.dmp"].read_bytes()
    (memory,) = hashed.blobs
    manifest = _manifest(env, memory.name)
    assert manifest["crc64"] == _crc(original) and manifest["crc64_by"] == "kit"
    assert manifest["sha256"] == _sha(original)


def test_azurite_reports_no_crc64_so_the_shim_answers_put_block_from_url_as_azure_documents(shim, azurite):
    """Azurite 3.35 returns no x-ms-content-crc64 (its Put Block answers content_crc64 None); the shim's Put
    Block From URL answers the service's CRC-64 of the block it wrote, which the SDK hands back decoded."""
    from scripts.evidence import crc64

    container = azurite.service_client().create_container(f"crc-{uuid.uuid4().hex[:8]}")
    data = os.urandom(70_000)
    container.upload_blob("source", data)
    direct = container.get_blob_client("direct").stage_block("YmxvY2s=", data)
    assert direct.get("content_crc64") is None  # Azurite itself: nothing to compose
    from azure.storage.blob import BlobServiceClient

    via_shim = BlobServiceClient.from_connection_string(shim.connection_string).get_blob_client(
        container.container_name, "copied")
    source_url = server_copy.read_url(container, "source")
    answer = via_shim.stage_block_from_url("YmxvY2s=", source_url, source_offset=1000, source_length=50_000)
    assert crc64.from_header(answer["content_crc64"]) == _int_crc(data[1000:51_000])


def _int_crc(data: bytes) -> int:
    return int(_crc(data), 16)
