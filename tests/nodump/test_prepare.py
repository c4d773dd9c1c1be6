"""`prepare-dump` end to end (scripts/prepare.py), as `pipenv run prepare-dump` runs it.

The world: the ARM double holds the broken VM (Trusted Launch, Gen2, zone 1), its OS disk, and a
deployed repair stack — the Linux rescue VM with the disk copy at LUN 0 — and the evidence container is
in Azurite. The prepare Run Command really runs the rendered bash script here, against a real NTFS disk
image standing for the disk copy (LocalScript: parameters as environment, Device = the image); the
collection Run Command is scripted to upload the dump the simulated guest wrote to the copy. The VM is
simulated by tests/support/arm_vmops.py: it bugchecks when started on the prepared copy.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from scripts.azure.identity import vm_key
from scripts.evidence import blobs as evidence
from scripts.nodump import rollback
from scripts.__main__ import main
from scripts.base.errors import ExitCode
from scripts.devkit import dumpbuilder
from scripts.devkit.arm_compute import LocalScript, Scripted, install_run_commands, result_line
from scripts.devkit.arm_vmops import repair_world, write_config, write_outputs
from tests.remote.test_remote_prepare import (
    build_gen1, build_gen2, crash_control_hive, fat_tools, ntfs_exists, ntfs_file, partitions, values,
)

FAST = ["--poll-seconds", "0.02", "--agent-wait-minutes", "0.2"]
SYSTEM_PATH = "Windows/System32/config/SYSTEM"


@pytest.fixture(scope="module")
def pristine_image(tmp_path_factory) -> Path:
    """The disk copy: Generation 2 (GPT, FAT ESP) when mtools/dosfstools are here, else Generation 1 (MBR,
    System Reserved) — the prepare script handles both; the swap checks read ARM's view of the disks."""
    hive = crash_control_hive([r"C:\pagefile.sys 0 0"])
    if fat_tools() is None:
        return build_gen2(tmp_path_factory.mktemp("copy"), hive)
    return build_gen1(tmp_path_factory.mktemp("copy"), hive)


@pytest.fixture
def image(pristine_image, tmp_path) -> Path:
    target = tmp_path / "disk-copy.img"
    subprocess.run(["cp", "--sparse=always", str(pristine_image), str(target)], check=True)
    return target


@pytest.fixture
def container(evidence_container):
    return evidence_container


class Rescue:
    """The rescue VM's run commands, in the order of `plan`: "prepare" really runs the rendered script on
    the image, "collect" is scripted."""

    def __init__(self, world, container, image: Path, tmp: Path, plan=("prepare", "collect")):
        self.world, self.container, self.image, self.tmp, self.plan = world, container, image, tmp, list(plan)
        self.outcomes: list = []

    def __call__(self):
        kind = self.plan[min(len(self.outcomes), len(self.plan) - 1)]
        if kind == "prepare":
            outcome = LocalScript(env={"Device": str(self.image)})
        else:
            outcome = Scripted(["Running", "Succeeded"], effect=self.collect)
        self.outcomes.append(outcome)
        return outcome

    def collect(self, params: dict[str, str]) -> dict:
        """What collect.sh would find on the copy: the dump the guest wrote while it ran on it."""
        if self.world.copy_id not in self.world.sim.dumps_on:
            return {"output": result_line("no_dump", message="no dump on the copy"), "exit_code": 10}
        dump = dumpbuilder.build_bitmap_dump(self.tmp / "MEMORY.DMP", seed=21)
        data = dump.path.read_bytes()
        name = f"{params['Prefix']}/MEMORY.DMP"
        self.container.upload_blob(name, data, overwrite=True)
        header = {"signature": "PAGEDU64", "dump_type": dump.dump_type, "bugcheck_code": f"{dump.bugcheck_code:#010x}"}
        manifest = {"schema": "crashcart.manifest/1", "blob": name, "kind": "memory", "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "header": header}
        self.container.upload_blob(f"{name}.manifest.json", json.dumps(manifest), overwrite=True)
        files = [{"kind": "memory", "source_path": r"%SystemRoot%\MEMORY.DMP", "blob": name, "size": len(data),
                  "sha256": manifest["sha256"], "header": header, "uploaded": True}]
        return {"output": result_line("collected", files=files)}


def setup_world(arm, azurite, container, image, tmp_path, plan=("prepare", "collect"), **sim):
    world = repair_world(arm, azurite, container.container_name, **sim)
    rescue = Rescue(world, container, image, tmp_path, plan)
    commands = install_run_commands(arm, rescue)
    config = write_config(tmp_path / "repair.toml", world)
    outputs = write_outputs(tmp_path / "outputs.json", world)
    return world, commands, ["--config", str(config), "--outputs-file", str(outputs), "--out-dir", str(tmp_path / "out")]


def run_verb(args, capsys):
    code = main(["prepare-dump", *args])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out.strip() else None), out.err


def system_hive(image: Path) -> bytes:
    for start, sectors in partitions(image):
        if ntfs_exists(image, start, sectors, SYSTEM_PATH):
            return ntfs_file(image, start, sectors, SYSTEM_PATH)
    raise AssertionError("no Windows volume on the image")


def blobs(container) -> set[str]:
    return {b.name for b in container.list_blobs()}


pytestmark = [pytest.mark.slow, pytest.mark.root]


def test_prepare_writes_the_settings_and_leaves_the_vm_alone(arm, azurite, container, image, tmp_path, capsys):
    world, commands, base = setup_world(arm, azurite, container, image, tmp_path)
    code, doc, err = run_verb([*base, *FAST], capsys)
    assert code == 0, err
    assert doc["status"] == "prepared" and doc["next"] == "pipenv run prepare-dump --swap"
    crash = values(system_hive(image), r"ControlSet001\Control\CrashControl")
    assert (crash["CrashDumpEnabled"], crash["NMICrashDump"], crash["AutoReboot"]) == (2, 1, 0)
    prefix = doc["run"]
    assert {f"{prefix}/bootdiag/screenshot.bmp", f"{prefix}/bootdiag/serial.log",
            f"{prefix}/prepare/manifest.json"} <= blobs(container)
    manifest = json.loads(evidence.read_bytes(container, f"{prefix}/prepare/manifest.json"))
    changes = {c["name"]: c for c in manifest["prepare"]["changes"] if c["store"] == "SYSTEM"}
    assert changes["CrashDumpEnabled"]["old"]["value"] == 7 and changes["CrashDumpEnabled"]["new"]["value"] == 2
    assert doc["symptoms"]["status"] == "captured"
    # values went as Run Command parameters; the script holds none of them
    body = commands.created[0]
    params = {p["name"]: p["value"] for p in body["properties"]["parameters"]}
    assert params["CrashDumpEnabled"] == "2" and params["MemoryMB"] == "16384" and params["DiskLun"] == "0"
    assert params["RunId"] not in body["properties"]["source"]["script"]
    assert world.source_writes() == []


def test_swap_trigger_collect_and_roll_back(arm, azurite, container, image, tmp_path, capsys):
    world, commands, base = setup_world(arm, azurite, container, image, tmp_path, crash_after=2)
    world.ops.write_probe = lambda: any(n.endswith("/rollback-manifest.json") for n in blobs(container))
    code, doc, err = run_verb([*base, *FAST, "--swap", "--dump-wait-minutes", "0", "--nmi-after-minutes", "-1"], capsys)
    assert code == 0, err
    prefix = doc["run"]
    swap = doc["swap"]
    assert swap["watch"]["crashed"] and swap["watch"]["bugcheck"]["code"] == "0x0000007E"
    assert world.sim.dumps_on == [world.copy_id]  # the guest crashed on the prepared copy
    # the new dump came through the normal collection path, into the same run folder, and was verified
    assert doc["status"] == "collected" and doc["collect"]["status"] == "collected"
    assert [b["name"] for b in doc["collect"]["blobs"] if b["ok"]] == [f"{prefix}/MEMORY.DMP"]
    # the stop screen after the crash is kept too
    assert f"{prefix}/bootdiag/after-crash/serial.log" in blobs(container)
    assert swap["symptoms_after_crash"]["bugcheck"]["code"] == "0x0000007E"
    # the end state: the original disk is back, the copy is on the rescue VM again, the VM runs as before
    assert world.os_disk() == world.original_disk_id
    assert world.rescue_data_disks() == [world.copy_id]
    assert world.sim.power == "running" and swap["rollback"]["started"] is True
    # the rollback manifest existed in evidence before the first change to the VM, and says restored
    assert world.ops.probed and all(world.ops.probed)
    local = json.loads((tmp_path / "out" / prefix / "rollback-manifest.json").read_text())
    # in evidence every state is a blob of its own (nothing the kit writes is replaced); the newest says restored
    first = json.loads(evidence.read_bytes(container, f"{prefix}/rollback-manifest.json"))
    stored = rollback.load_from_evidence(container, f"{prefix}/rollback-manifest.json", tmp_path / "elsewhere")
    assert first["state"] == "ready" and local["state"] == stored.state == "restored"
    assert sorted(n.rsplit("/", 1)[-1] for n in blobs(container) if "/rollback-manifest" in n) == [
        "rollback-manifest.01-swapping.json", "rollback-manifest.02-swapped.json",
        "rollback-manifest.03-restored.json", "rollback-manifest.json"]
    assert [h["state"] for h in local["history"]] == ["ready", "swapping", "swapped", "restored"]
    assert local["original_os_disk_id"] == world.original_disk_id and local["prepared_disk_id"] == world.copy_id
    # the order of changes to the source VM
    ops = [h for h in world.sim.history]
    assert ops[:4] == ["powerOff", "deallocate", "put", "start"]
    assert "put" in ops[4:] and ops[-1] == "start"


def test_a_failure_half_way_still_leaves_the_original_disk(arm, azurite, container, image, tmp_path, capsys):
    world, commands, base = setup_world(arm, azurite, container, image, tmp_path)
    world.sim.fail["start"] = {"code": "AllocationFailed",
                               "message": "Allocation failed. We do not have sufficient capacity for the requested VM "
                                          "size in this region."}
    code, doc, err = run_verb([*base, *FAST, "--swap", "--dump-wait-minutes", "0"], capsys)
    assert code == ExitCode.AZURE_FAILED
    assert "AllocationFailed" in err and "rolled back" in err and "Traceback" not in err
    assert doc["status"] == "failed" and doc["swap"]["state"] == "restored"
    assert doc["swap"]["rollback"]["os_disk_id"] == world.original_disk_id
    assert world.os_disk() == world.original_disk_id
    assert world.rescue_data_disks() == [world.copy_id]
    assert world.sim.power == "running"  # started again on its own disk, as it was
    assert len(commands.created) == 1  # no collection after a failed swap
    [manifest] = (tmp_path / "out").glob(f"{vm_key(world.vm_id)}/*/rollback-manifest.json")
    assert json.loads(manifest.read_text())["state"] == "restored"



def test_a_failed_rollback_says_so_and_names_the_rollback_command(arm, azurite, container, image, tmp_path, capsys):
    world, commands, base = setup_world(arm, azurite, container, image, tmp_path)
    refusal = {"code": "AllocationFailed", "message": "Allocation failed."}
    world.ops.write_probe = lambda: world.sim.fail.setdefault("start", dict(refusal))  # every start fails
    code, doc, err = run_verb([*base, *FAST, "--swap", "--dump-wait-minutes", "0"], capsys)
    assert code == ExitCode.AZURE_FAILED
    assert "ROLLBACK FAILED" in err and "the run had failed before" in err and "AllocationFailed" in err
    assert "pipenv run rollback --manifest" in err and "Traceback" not in err
    assert doc["status"] == "failed" and doc["swap"]["rollback"] is None
    assert "ROLLBACK FAILED" in doc["swap"]["error"]
    assert len(commands.created) == 1  # no collection after a failed swap

def test_no_manifest_in_evidence_means_no_swap(arm, azurite, container, image, tmp_path, capsys):
    world, commands, base = setup_world(arm, azurite, container, image, tmp_path)
    container.delete_container()  # evidence unreachable: the manifest cannot be stored there
    code, doc, err = run_verb([*base, *FAST, "--swap"], capsys)
    assert code != 0
    assert "rollback manifest could not be stored in evidence" in err and "nothing was changed" in err
    assert world.source_writes() == []
    assert world.os_disk() == world.original_disk_id and world.rescue_data_disks() == [world.copy_id]


def test_a_mismatching_copy_is_refused_before_anything_runs(arm, azurite, container, image, tmp_path, capsys):
    world, commands, base = setup_world(arm, azurite, container, image, tmp_path,
                                        copy_overrides={"hyperVGeneration": "V1"})
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    code, doc, err = run_verb([*base, *FAST, "--swap"], capsys)
    assert code == ExitCode.USAGE and "Hyper-V generation differs" in err
    assert commands.created == [] and world.source_writes() == []
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_dry_run_and_usage_errors(arm, azurite, container, image, tmp_path, capsys):
    world, commands, base = setup_world(arm, azurite, container, image, tmp_path, plan=("prepare",))
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    code, doc, err = run_verb([*base, *FAST, "--dry-run"], capsys)
    assert code == 0, err
    assert doc["status"] == "planned" and doc["dump_type"] == "kernel"
    assert {c["name"] for c in doc["prepare"]["changes"] if c["changed"] and c["store"] == "SYSTEM"} == \
        {"CrashDumpEnabled", "NMICrashDump", "AutoReboot", "Overwrite"}
    # a complete dump of 16 GB needs a dedicated dump file the 24 MB test volume cannot hold: refused, exit 12
    code, doc, err = run_verb([*base, *FAST, "--dry-run", "--type", "complete"], capsys)
    assert code == ExitCode.COLLECT_FAILED and doc["status"] == "not_prepared"
    assert "does not fit" in err and "nothing was written" in err
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
    assert main(["prepare-dump", *base, "--memory-gb", "0"]) == ExitCode.USAGE
    assert "RAM is unknown" in capsys.readouterr().err
    assert main(["prepare-dump", *base, "--dump-file", r"D:\MEMORY.DMP"]) == ExitCode.USAGE
    assert main(["prepare-dump", *base, "--swap", "--dry-run"]) == ExitCode.USAGE
    assert world.source_writes() == []
