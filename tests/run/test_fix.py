"""`pipenv run fix` end to end, as the operator runs it, against the ARM double and Azurite.

The world (scripts/devkit/arm_vmops.repair_world): the broken VM, its OS disk, a deployed repair stack
with the Linux rescue VM holding the disk copy at LUN 0. Every fix Run Command really runs the rendered
bash script here against a real NTFS disk image standing for the copy (LocalScript, Device = the image),
whose SYSTEM hive loads the culprit driver `CSAgent` (Start 1) in two control sets.

The guest decides from the disk itself (the double's guest model, scripts/devkit/arm_guest.ImageDisk: the
image is the copy's content): when the VM is started on the copy, it bugchecks if the copy's hive still
starts CSAgent, writing the dump its CrashControl asks for onto the image, and boots (the double's guest agent
Ready in the instance view) once CSAgent is disabled. No instance view is routed by hand.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
from pathlib import Path

import pytest

from scripts.__main__ import main
from scripts.azure.identity import vm_key
from scripts.base.errors import ExitCode
from scripts.devkit.arm_compute import LocalScript, install_run_commands
from scripts.devkit.arm_guest import ImageDisk
from scripts.devkit.arm_vmops import repair_world, write_outputs
from scripts.evidence import blobs as evidence
from tests.remote.test_remote_fix import csagent_files, services_hive, value
from tests.remote.test_remote_prepare import build_gen1, ntfs_exists, ntfs_file, partitions

pytestmark = [pytest.mark.slow, pytest.mark.root]

FAST = ["--poll-seconds", "0.02", "--agent-wait-minutes", "0.2"]
SYSTEM_PATH = "Windows/System32/config/SYSTEM"
QUARANTINE_SPEC = r"remove-file:Windows\System32\drivers\CrowdStrike\C-00000291*.sys"


@pytest.fixture(scope="module")
def pristine_image(tmp_path_factory) -> Path:
    from tests.remote.test_remote_fix import _put_files

    image = build_gen1(tmp_path_factory.mktemp("copy"), services_hive())
    _put_files(image, csagent_files())
    return image


@pytest.fixture
def image(pristine_image, tmp_path) -> Path:
    target = tmp_path / "disk-copy.img"
    subprocess.run(["cp", "--sparse=always", str(pristine_image), str(target)], check=True)
    return target


def windows_volume(image: Path) -> tuple[int, int]:
    for start, sectors in partitions(image):
        if ntfs_exists(image, start, sectors, SYSTEM_PATH):
            return start, sectors
    raise AssertionError("no Windows volume")


def csagent_start(image: Path) -> list[int]:
    hive = ntfs_file(image, *windows_volume(image), SYSTEM_PATH)
    return [value(hive, rf"ControlSet00{n}\Services\CSAgent", "Start") for n in (1, 2)]


def setup(arm, azurite, container, image, tmp_path, **sim):
    world = repair_world(arm, azurite, container.container_name, copy_content=ImageDisk(image), **sim)
    commands = install_run_commands(arm, lambda: LocalScript(env={"Device": str(image)}))
    outputs = write_outputs(tmp_path / "outputs.json", world)
    return world, commands, ["--outputs-file", str(outputs), "--out-dir", str(tmp_path / "out")]


def run_fix(args, capsys):
    code = main(["fix", *args])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out.strip() else None), out.err


def blobs(container) -> set[str]:
    return {b.name for b in container.list_blobs()}


def triage_report(tmp_path: Path, world, module: str = "csagent.sys") -> Path:
    folder = tmp_path / "out" / vm_key(world.vm_id) / "20250517T031245Z"
    folder.mkdir(parents=True)
    report = {"status": "collected", "triage": {
        "summary": "PAGE_FAULT_IN_NONPAGED_AREA (0x50): read at 0x9c in csagent.sys",
        "culprit": {"module": module, "symbol": "csagent+0xe14ed", "frame": 0, "found_by": "unwind"},
        "faulting_module": {"name": module}}}
    (folder / "report.json").write_text(json.dumps(report))
    return folder / "report.json"


# ---- the done-when of #16 ------------------------------------------------------------------------------------
def test_from_triage_disables_exactly_the_culprit_and_a_boot_that_succeeds_keeps_the_fixed_disk(
        arm, azurite, evidence_container, image, tmp_path, capsys):
    world, commands, base = setup(arm, azurite, evidence_container, image, tmp_path)
    triage_report(tmp_path, world)
    before = ntfs_file(image, *windows_volume(image), SYSTEM_PATH)
    code, doc, err = run_fix(["disable-driver", "--from-triage", *base, *FAST, "--verify", "--settle-seconds", "0.1"],
                             capsys)
    assert code == 0, err
    assert doc["status"] == "booted" and doc["recipes"] == [{"name": "disable-driver", "driver": "csagent",
                                                            "pattern": None, "force": False}]
    # exactly that driver, in every control set (the hive read back from the image)
    assert csagent_start(image) == [4, 4]
    hive = ntfs_file(image, *windows_volume(image), SYSTEM_PATH)
    assert value(hive, r"ControlSet001\Services\elamvendor", "Start") == 0
    # the boot was judged from evidence and the fixed disk stays
    verify = doc["verify"]
    assert verify["kept_fixed_disk"] and verify["verdict"]["reason"] == "agent-ready"
    assert world.os_disk() == world.copy_id and world.sim.power == "running" and not world.sim.crashed
    # every change is in the fix manifest, locally and in evidence (create-only: one blob per state)
    manifest = json.loads(Path(doc["manifest"]).read_text())
    [entry] = manifest["entries"]
    assert {(c["key"], c["old"]["value"], c["new"]["value"]) for c in entry["result"]["changes"]} == {
        (r"ControlSet001\Services\csagent", 1, 4), (r"ControlSet002\Services\csagent", 1, 4)}
    assert entry["result"]["hive"]["sha256_before"] == hashlib.sha256(before).hexdigest()
    assert entry["result"]["hive"]["sha256_after"] == hashlib.sha256(hive).hexdigest()
    assert entry["undo"]["StartValues"] == "ControlSet001=1,ControlSet002=1"
    assert manifest["state"] == "kept"
    prefix = doc["run"]
    names = blobs(evidence_container)
    assert f"{prefix}/fix/fix-manifest.json" in names and f"{prefix}/rollback-manifest.json" in names
    newest = sorted(n for n in names if n.startswith(f"{prefix}/fix/fix-manifest.0"))[-1]
    assert json.loads(evidence.read_bytes(evidence_container, newest))["state"] == "kept"
    assert f"{prefix}/bootdiag/after-fix/serial.log" in names
    # the driver name went as a parameter, never in the script
    body = commands.created[0]
    params = {p["name"]: p["value"] for p in body["properties"]["parameters"]}
    assert params["Driver"] == "csagent" and "csagent" not in body["properties"]["source"]["script"].lower()

    # `fix rollback` undoes it: the original OS disk back, Start 1 again on the copy
    code, undone, err = run_fix(["rollback", "--manifest", doc["manifest"], *base, *FAST], capsys)
    assert code == 0, err
    assert world.os_disk() == world.original_disk_id and world.rescue_data_disks() == [world.copy_id]
    assert csagent_start(image) == [1, 1] and undone["status"] == "undone"


def test_a_boot_that_crashes_again_rolls_back_to_the_original_disk(arm, azurite, evidence_container, image,
                                                                   tmp_path, capsys):
    world, _, base = setup(arm, azurite, evidence_container, image, tmp_path, crash_after=1)
    # a fix that does not remove the cause: the file quarantined, but the driver still loads
    code, doc, err = run_fix(["remove-file", r"Windows\System32\drivers\CrowdStrike\C-00000291*.sys", *base, *FAST,
                              "--verify", "--settle-seconds", "0.1"], capsys)
    # its own exit code (#16 item 3: 15 is a collected blob that fails verification)
    assert code == ExitCode.CRASHED_AGAIN == 16, err
    assert "crashed again" in err and "rolled back" in err and "Traceback" not in err
    assert doc["status"] == "not_booted" and doc["verify"]["verdict"]["reason"] == "bugcheck"
    assert world.sim.dumps_on == [world.copy_id]  # it did crash on the fixed copy
    # the guest model read the copy: CSAgent still loads; the crash wrote a new MEMORY.DMP onto the copy
    [crash] = world.sim.crashes
    assert crash["why"] == "CSAgent loads (Start 1 in ControlSet002)" and crash["dump"]["path"] == "Windows/MEMORY.DMP"
    on_copy = ntfs_file(image, *windows_volume(image), "Windows/MEMORY.DMP")
    assert hashlib.sha256(on_copy).hexdigest() == crash["dump"]["sha256"] and on_copy[:8] == b"PAGEDU64"
    # the kit tried to collect it from the copy (back on the rescue VM); this evidence account is plain HTTP,
    # which the collect script refuses (bearer tokens never go over HTTP): said, with the command to run
    new_dump = doc["new_dump"]
    assert new_dump["collected"] is False and new_dump["strategy"] == "rescue-vm" and new_dump["dumps"] == []
    assert "could not be collected" in new_dump["message"] and "pipenv run collect --strategy rescue-vm" in err
    assert world.os_disk() == world.original_disk_id and world.rescue_data_disks() == [world.copy_id]
    assert world.sim.power == "running"  # back as it was
    manifest = json.loads(Path(doc["manifest"]).read_text())
    assert manifest["state"] == "rolled-back" and manifest["verify"]["rollback"]["os_disk_id"] == world.original_disk_id
    assert manifest["new_dump"] == new_dump
    moved = manifest["entries"][0]["result"]["files"]
    assert len(moved) == 2 and all(f["moved"] and len(f["sha256"]) == 64 for f in moved)
    bad = "Windows/System32/drivers/CrowdStrike/C-00000291-00000000-00000032.sys"
    assert not ntfs_exists(image, *windows_volume(image), bad)
    # `fix rollback` from the manifest in evidence moves the quarantined files back, byte for byte
    code, undone, err = run_fix(["rollback", "--evidence-blob", doc["manifest_blob"], *base, *FAST], capsys)
    assert code == 0, err
    assert ntfs_file(image, *windows_volume(image), bad) == csagent_files()[bad]
    assert world.os_disk() == world.original_disk_id  # already there: left as it is


def test_a_failure_in_the_middle_leaves_the_vm_on_its_bootable_original_disk(arm, azurite, evidence_container,
                                                                             image, tmp_path, capsys):
    world, _, base = setup(arm, azurite, evidence_container, image, tmp_path)
    world.sim.fail["start"] = {"code": "AllocationFailed", "message": "Allocation failed. We do not have sufficient "
                               "capacity for the requested VM size in this region."}
    code, doc, err = run_fix(["disable-driver", "csagent", *base, *FAST, "--verify"], capsys)
    assert code == ExitCode.AZURE_FAILED, err
    assert "AllocationFailed" in err and "rolled back" in err and "Traceback" not in err
    assert world.os_disk() == world.original_disk_id and world.rescue_data_disks() == [world.copy_id]
    assert world.sim.power == "running" and doc["verify"]["rollback"]["started"] is True
    assert json.loads(Path(doc["manifest"]).read_text())["state"] == "rolled-back"


def test_boot_timeout_rolls_back(arm, azurite, evidence_container, image, tmp_path, capsys):
    # safe-mode leaves CSAgent loading: the boot hangs (mode "hang"), never crashes, the agent is never Ready
    world, _, base = setup(arm, azurite, evidence_container, image, tmp_path, mode="hang")
    code, doc, err = run_fix(["safe-mode", *base, *FAST, "--verify", "--boot-timeout-minutes", "0.01"], capsys)
    assert code == ExitCode.TIMED_OUT, err
    assert doc["verify"]["verdict"]["reason"] == "timeout" and world.os_disk() == world.original_disk_id
    assert "Not Ready" in doc["verify"]["verdict"]["agent"] and world.sim.crashes == []
    assert doc["new_dump"]["message"] == "no new bugcheck was seen (timeout): no new dump to collect"


def test_the_swap_back_refused_once_says_exactly_what_to_run_and_that_command_restores_the_vm(
        arm, azurite, evidence_container, image, tmp_path, capsys):
    world, _, base = setup(arm, azurite, evidence_container, image, tmp_path)
    original = world.original_disk_id.rsplit("/", 1)[-1].lower()
    world.sim.fail[f"put-os-disk:{original}"] = {"status": 409, "code": "OperationNotAllowed", "message":
                                                 "Operation 'Update' is not allowed since another operation is in progress."}
    code, doc, err = run_fix(["remove-file", r"Windows\System32\drivers\CrowdStrike\C-00000291*.sys", *base, *FAST,
                              "--verify", "--settle-seconds", "0.1"], capsys)
    assert code == ExitCode.AZURE_FAILED and "ROLLBACK FAILED" in err and "Traceback" not in err, err
    rollback_manifest = doc["verify"]["rollback_manifest"]
    command = f"pipenv run rollback --manifest {rollback_manifest}"
    assert command in err
    assert world.os_disk() == world.copy_id and world.sim.power == "deallocated"  # where the failure left it
    assert json.loads(Path(doc["manifest"]).read_text())["state"] == "rollback-failed"
    assert "not collected" in doc["new_dump"]["message"] and world.sim.crashes  # it did crash; nothing read yet
    # the command the message names puts the VM back on its original disk, running, the copy on the rescue VM
    assert main([*command.split()[2:], "--poll-seconds", "0.02"]) == 0
    assert world.os_disk() == world.original_disk_id and world.rescue_data_disks() == [world.copy_id]
    assert world.sim.power == "running" and world.sim.boot_problem is None and not world.sim.crashed


def test_dry_run_shows_the_change_and_touches_nothing(arm, azurite, evidence_container, image, tmp_path, capsys):
    world, _, base = setup(arm, azurite, evidence_container, image, tmp_path)
    before = image.read_bytes()
    code, doc, err = run_fix(["disable-driver", "csagent", "--dry-run", *base, *FAST], capsys)
    assert code == 0, err
    assert doc["status"] == "planned" and len(doc["entries"][0]["changes"]) == 2
    assert image.read_bytes() == before and world.source_writes() == []


def test_refusals_and_a_failing_second_recipe_undo_the_first(arm, azurite, evidence_container, image, tmp_path,
                                                            capsys):
    world, _, base = setup(arm, azurite, evidence_container, image, tmp_path)
    code, doc, err = run_fix(["disable-driver", "storvsc", *base, *FAST], capsys)
    assert code == ExitCode.COLLECT_FAILED and "boot-critical" in err and doc["status"] == "not_fixed"
    # the second recipe is refused (revert-pending needs a Windows rescue VM): the first is undone
    code, doc, err = run_fix(["disable-driver", "csagent", "--then", "revert-pending", *base, *FAST], capsys)
    assert code == ExitCode.COLLECT_FAILED and "DISM" in err
    assert csagent_start(image) == [1, 1]
    assert doc["entries"][0]["undone"] is True
    assert world.source_writes() == []


@pytest.mark.parametrize("module, said", [
    ("ntoskrnl.exe", "names no third-party driver"),
    ("win32kfull.sys", "names no third-party driver"),  # a Windows driver beyond the kernel and HAL (CLI review)
    ("amdppm.sys", "names no third-party driver"),  # an inbox driver: disabled only when named (disable-driver amdppm)
    ("<unnamed module at 0xfffff8048b580000>", "whose name is not in the dump"),
])
def test_from_triage_refuses_a_windows_module(arm, azurite, evidence_container, image, tmp_path, capsys, module,
                                              said):
    world, commands, base = setup(arm, azurite, evidence_container, image, tmp_path)
    triage_report(tmp_path, world, module=module)
    code, _, err = run_fix(["disable-driver", "--from-triage", *base, *FAST], capsys)
    assert code == ExitCode.USAGE and said in err and commands.created == []
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("error")]) == 1


def test_what_a_user_can_type_wrong_is_one_line_and_exit_2(arm, azurite, evidence_container, image, tmp_path, capsys):
    world, commands, base = setup(arm, azurite, evidence_container, image, tmp_path)
    cases = {("disable-driver", "$(touch /tmp/x)"): "is not a service name", ("disable-driver",): "needs a driver name",
             ("remove-file", r"D:\x\*.sys"): "is not on the system volume", ("remove-file", r"C:\Windows\*\x.sys"): "file name only",
             ("disable-driver", "csagent", "--from-triage"): "--from-triage goes with",
             ("safe-mode", "--then", "bogus"): "unknown fix recipe", ("safe-mode", "--then", "safe-mode:x"): "takes no argument",
             ("rollback",): "rollback needs the fix manifest", ("disable-driver", "csagent", "--verify", "--dry-run"):
             "--verify and --dry-run", ("safe-mode", "--boot-timeout-minutes", "nan"): "--boot-timeout-minutes",
             ("disable-driver", "--from-triage"): "no collection report for this VM"}
    for args, said in cases.items():
        code, _, err = run_fix([*args, *base, *FAST], capsys)
        assert code == ExitCode.USAGE, (args, err)
        assert said in err and "Traceback" not in err, (args, err)
    assert commands.created == [] and world.source_writes() == []


def test_a_run_stopping_after_the_crash_does_not_start_a_collection_and_says_what_to_run(
        arm, azurite, evidence_container, image, tmp_path):
    """A stop requested while the boot crashed (Ctrl-C, repair-run's deadline): the rollback still ran, the
    dump the crash wrote is left on the copy for a collection by hand, and the report says which command."""
    from scripts.config.stackoutputs import RepairOutputs
    from scripts.remediate import apply, recipes
    from scripts.run.fix import FixRequest, fix
    from scripts.run.fix_verify import BootOptions

    world, commands, _ = setup(arm, azurite, evidence_container, image, tmp_path)

    class StopOnceCrashed:  # asked to stop the moment the guest has crashed
        is_deadline = False

        @property
        def reason(self):
            return "interrupted (SIGINT)" if world.sim.crashes else None

    report = fix(FixRequest(
        outputs=RepairOutputs(**world.outputs), recipes=(recipes.parse(QUARANTINE_SPEC),),
        verify=BootOptions(timeout_s=30, settle_s=0.1, poll_s=0.02), timing=apply.Timing(agent_wait_s=12, poll_s=0.02),
        out_dir=tmp_path / "out", stop=StopOnceCrashed()))
    assert report.exit_code == ExitCode.CRASHED_AGAIN and world.os_disk() == world.original_disk_id
    assert world.sim.crashes[0]["dump"]["path"] == "Windows/MEMORY.DMP"
    message = report.document["new_dump"]["message"]
    assert "not collected (the run is stopping: interrupted (SIGINT))" in message
    assert "pipenv run collect --strategy rescue-vm" in message and "pipenv run collect" in report.error.message
    assert len(commands.created) == 1  # the fix's own run command; no collection was started
