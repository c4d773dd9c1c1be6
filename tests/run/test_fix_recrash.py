"""`fix --verify` when the fixed copy crashes again (#16 items 2-4): the automatic rollback, exit 16, and the dump
that crash wrote collected from the copy beside the first, end to end against the strict ARM double and Azurite.

Everything runs for real, as on a Linux rescue VM: HTTPS Azurite with OAuth and the fake IMDS (the collect script
uploads with a managed identity token, tests/support/rescue.py), the rendered collect and fix scripts as Run
Commands (LocalScript) against a real NTFS image that is the disk copy's content. The double's guest
(scripts/devkit/arm_guest.ImageDisk) reads that image when the VM boots from the copy: CSAgent still loads, so it
bugchecks, and writes the dump its CrashControl asks for onto the image, as Windows would.

First the operator's collection (the first crash's MEMORY.DMP, already on the copy), then `fix remove-file` (the
quarantine does not stop CSAgent from loading) with --verify.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from pathlib import Path

import pytest

from scripts.__main__ import main
from scripts.base.errors import ExitCode
from scripts.collection.contract import CollectRequest
from scripts.collection.rescue_vm import RescueVmCollector
from scripts.config.stackoutputs import RepairOutputs
from scripts.devkit.arm_compute import LocalScript, install_run_commands
from scripts.devkit.arm_guest import ImageDisk
from scripts.devkit.arm_vmops import repair_world, write_outputs
from scripts.devkit.dumpbuilder import build_bitmap_dump
from scripts.evidence import blobs as evidence
from tests.remote.test_remote_fix import _put_files, csagent_files, services_hive
from tests.remote.test_remote_prepare import build_gen1, ntfs_file
from tests.run.test_fix import windows_volume
from tests.support.rescue import azurite_https, imds, tls  # noqa: F401 - fixtures
from tests.support.storagefakes import service_client

pytestmark = [pytest.mark.slow, pytest.mark.root]

FAST = ["--poll-seconds", "0.02", "--agent-wait-minutes", "0.2"]
QUARANTINE = r"Windows\System32\drivers\CrowdStrike\C-00000291*.sys"
FIRST_RUN = dt.datetime(2025, 5, 17, 3, 12, 45, tzinfo=dt.timezone.utc)


def _copy_image(folder: Path, *, crash_dump_enabled: int) -> Path:
    """The disk copy: CSAgent loading in both control sets, the first crash's MEMORY.DMP on it."""
    hive = services_hive(extra={r"Control\CrashControl": ("CrashDumpEnabled", crash_dump_enabled)})
    image = build_gen1(folder, hive)
    first = build_bitmap_dump(folder / "first.dmp", seed=5).path.read_bytes()
    _put_files(image, {**csagent_files(), "Windows/MEMORY.DMP": first})
    return image


@pytest.fixture
def recrash(arm, azurite_https, imds, tls, tmp_path, monkeypatch, capsys):
    """world(crash_dump_enabled): the world with the copy's image, after the operator's first collection (what
    it logged is dropped: the tests read what `fix` says)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls.cert))
    monkeypatch.setenv(evidence.CONNECTION_STRING_ENV, azurite_https.connection_string)

    def make(crash_dump_enabled: int = 7):
        made = _world(arm, azurite_https, imds, tls, tmp_path, crash_dump_enabled)
        capsys.readouterr()
        return made

    return make


def _world(arm, azurite_https, imds, tls, tmp_path: Path, crash_dump_enabled: int):
    image = _copy_image(tmp_path / "copy", crash_dump_enabled=crash_dump_enabled)
    name = f"ev{uuid.uuid4().hex[:10]}"
    container = service_client(azurite_https, tls).create_container(name)
    world = repair_world(arm, azurite_https, name, copy_content=ImageDisk(image))
    install_run_commands(arm, lambda: LocalScript(env={"Device": str(image), "ImdsEndpoint": imds.url,
                                                       "CURL_CA_BUNDLE": str(tls.cert)}))
    outputs = write_outputs(tmp_path / "outputs.json", world)
    first = RescueVmCollector().collect(CollectRequest(
        RepairOutputs(**world.outputs), None, progress=False, out_dir=tmp_path / "out", poll_seconds=0.02,
        agent_wait_minutes=0.2, now=FIRST_RUN))
    [first_dump] = [b for b in first.blobs if b.name.endswith("/MEMORY.DMP")]
    return world, image, container, first_dump, ["--outputs-file", str(outputs), "--out-dir", str(tmp_path / "out")]


def _fix(args, capsys):
    code = main(["fix", "remove-file", QUARANTINE, *args, *FAST, "--verify", "--settle-seconds", "0.1"])
    out = capsys.readouterr()
    return code, json.loads(out.out), out.err


def _sha(container, blob: str) -> str:
    return hashlib.sha256(container.download_blob(blob).readall()).hexdigest()


def test_a_crash_again_rolls_back_exits_16_and_the_new_dump_is_collected_beside_the_first(recrash, capsys):
    world, image, container, first_dump, base = recrash()
    first_bytes_sha = _sha(container, first_dump.name)
    assert first_dump.sha256 == first_bytes_sha

    code, doc, err = _fix(base, capsys)
    assert code == ExitCode.CRASHED_AGAIN == 16, err
    assert "crashed again" in err and "rolled back" in err and "Traceback" not in err
    # the VM is back on its original disk, running; the fixed copy back on the rescue VM at its LUN
    assert world.os_disk() == world.original_disk_id and world.sim.power == "running"
    assert world.rescue_data_disks() == [world.copy_id]
    # the crash wrote a new MEMORY.DMP onto the copy; the kit collected exactly that one, under its own prefix
    [crash] = world.sim.crashes
    written = crash["dump"]
    assert written["path"] == "Windows/MEMORY.DMP"
    assert hashlib.sha256(ntfs_file(image, *windows_volume(image), "Windows/MEMORY.DMP")).hexdigest() == written["sha256"]
    new_dump = doc["new_dump"]
    assert new_dump["collected"] is True and new_dump["strategy"] == "rescue-vm" and new_dump["same_as_first"] == []
    [stored] = [d for d in new_dump["dumps"] if d["kind"] == "memory"]
    assert stored["name"] != first_dump.name and stored["name"].endswith("/MEMORY.DMP")
    assert stored["name"].split("/")[0] == first_dump.name.split("/")[0]  # beside the first: the same VM's folder
    assert stored["sha256"] == written["sha256"] == _sha(container, stored["name"]) and stored["crc64"]
    assert stored["size"] == written["size"]
    # both in the manifest (locally and its newest state in evidence), the first untouched
    assert new_dump["first_dumps"] == [{"name": first_dump.name, "kind": "memory", "size": first_dump.size,
                                        "sha256": first_dump.sha256, "crc64": first_dump.crc64,
                                        "crc64_by": first_dump.crc64_by, "source_path": first_dump.source_path}]
    manifest = json.loads(Path(doc["manifest"]).read_text())
    assert manifest["state"] == "rolled-back" and manifest["new_dump"] == new_dump
    newest = sorted(b.name for b in container.list_blobs(name_starts_with=f"{doc['run']}/fix/fix-manifest.0"))[-1]
    assert json.loads(evidence.read_bytes(container, newest))["new_dump"] == new_dump
    assert _sha(container, first_dump.name) == first_bytes_sha
    assert stored["name"] in err  # the message says where the new dump is


def test_a_crash_that_writes_no_dump_says_so(recrash, capsys):
    world, image, container, first_dump, base = recrash(crash_dump_enabled=0)
    code, doc, err = _fix(base, capsys)
    assert code == ExitCode.CRASHED_AGAIN, err
    assert world.sim.crashes[0]["dump"] == {"path": None, "why": "CrashDumpEnabled is 0: Windows writes no dump"}
    # the copy still holds the first crash's MEMORY.DMP: collected again, it is recognised as that one, not new
    new_dump = doc["new_dump"]
    assert new_dump["collected"] is False and new_dump["dumps"] == []
    assert [d["first"] for d in new_dump["same_as_first"]] == [first_dump.name]
    assert new_dump["message"].startswith("the crash wrote no new dump") and "the crash wrote no new dump" in err
    assert world.os_disk() == world.original_disk_id
