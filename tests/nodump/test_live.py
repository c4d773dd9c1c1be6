"""scripts.nodump.live and the page file rule it shares with the offline prepare (scripts.nodump.prepare):
the plan for each dump type, the manifest and its create-only series in evidence (Azurite)."""

from __future__ import annotations

import json

import pytest

from scripts.base.errors import CrashcartError
from scripts.nodump import live, prepare

RAM = 16384  # MB
KERNEL_NEEDS = (RAM + 2) // 3 + 257  # 5718
COMPLETE_NEEDS = RAM + 257


@pytest.mark.parametrize("dump_type, paging, dedicated, sufficient, size", [
    (1, [r"D:\pagefile.sys 0 0"], "auto", False, COMPLETE_NEEDS),  # Azure: the page file on the temporary disk
    (2, [r"D:\pagefile.sys 0 0"], "auto", False, KERNEL_NEEDS),
    (2, [r"C:\pagefile.sys 0 0"], "auto", True, 0),  # system-managed grows for a kernel dump
    (7, [r"C:\pagefile.sys"], "auto", True, 0),
    (1, [r"C:\pagefile.sys 0 0"], "auto", False, COMPLETE_NEEDS),  # ... not for a complete one
    (1, [rf"C:\pagefile.sys {COMPLETE_NEEDS} {COMPLETE_NEEDS}"], "auto", True, 0),  # exactly enough
    (1, [rf"C:\pagefile.sys {COMPLETE_NEEDS - 1} 99999"], "auto", False, COMPLETE_NEEDS),
    (2, [r"%SystemDrive%\pagefile.sys 8000 8000", r"D:\pagefile.sys 0 0"], "auto", True, 0),
    (2, [r"C:\pagefile.sys 0 0"], "always", True, KERNEL_NEEDS),
    (1, [r"D:\pagefile.sys 0 0"], "never", False, 0),
    (2, [r"?:\pagefile.sys"], "auto", False, KERNEL_NEEDS),  # "all drives, system-managed": not the system volume
])
def test_the_page_file_rule(dump_type, paging, dedicated, sufficient, size):
    choice = prepare.choose_dump_target(dump_type, RAM, paging, dedicated)
    assert (choice.sufficient, choice.size_mb, choice.dedicated) == (sufficient, size, size > 0)
    assert choice.required_mb == (COMPLETE_NEEDS if dump_type == 1 else KERNEL_NEEDS)
    assert bool(choice.notes) == (not sufficient)


def facts(**values) -> live.LiveFacts:
    return live.LiveFacts(values={n: values.get(n) for n in live.NAMES}, paging_files=[r"D:\pagefile.sys 0 0"],
                          memory_mb=RAM, free_mb=100_000)


def test_plan_sets_the_offline_values_and_keeps_the_dump():
    settings = prepare.PrepareSettings(memory_mb=RAM, dump_type=1)
    the_plan = live.plan(settings, facts(CrashDumpEnabled={"type": "REG_DWORD", "value": 7},
                                         Overwrite={"type": "REG_DWORD", "value": "1"}))
    new = {c.name: c.new["value"] for c in the_plan.changes}
    assert new == {"CrashDumpEnabled": 1, "DumpFile": r"%SystemRoot%\MEMORY.DMP", "NMICrashDump": 1, "AutoReboot": 0,
                   "Overwrite": 1, "DedicatedDumpFile": r"C:\DedicatedDump.sys", "DumpFileSize": COMPLETE_NEEDS,
                   "AlwaysKeepMemoryDump": 1}
    assert "Overwrite" not in {c.name for c in the_plan.changed}  # "1" and 1 are the same DWORD
    assert the_plan.reboot_needed and the_plan.to_dict()["reboot_reason"]
    assert the_plan.changed[0].line() == r"HKLM\SYSTEM\CurrentControlSet\Control\CrashControl\CrashDumpEnabled: 7 -> 1"


def test_plan_with_nothing_to_change_needs_no_restart():
    settings = prepare.PrepareSettings(memory_mb=RAM, dump_type=2, dedicated="never")
    wanted = {**prepare.crash_control_values(settings, prepare.choose_dump_target(2, RAM, [], "never")),
              "AlwaysKeepMemoryDump": {"type": "REG_DWORD", "value": 1}}
    the_plan = live.plan(settings, facts(**wanted))
    assert the_plan.changed == [] and not the_plan.reboot_needed


def test_a_dedicated_dump_file_that_does_not_fit_is_refused():
    settings = prepare.PrepareSettings(memory_mb=RAM, dump_type=1)
    tight = live.LiveFacts(values={}, paging_files=[], memory_mb=RAM, free_mb=COMPLETE_NEEDS + 255)
    with pytest.raises(CrashcartError, match="does not fit") as err:
        live.plan(settings, tight)
    assert err.value.exit_code == 12


def test_an_old_value_the_script_could_not_put_back_is_refused():
    settings = prepare.PrepareSettings(memory_mb=RAM, dump_type=1)
    with pytest.raises(CrashcartError, match=r"AutoReboot \(REG_BINARY\)") as err:
        live.plan(settings, facts(AutoReboot={"type": "REG_BINARY", "hex": "01,00,00,00"}))
    assert err.value.exit_code == 12


@pytest.mark.parametrize("data, said", [
    ({"schema": "crashcart.rollback/1"}, "not a crashcart live manifest"),
    ({"schema": live.SCHEMA, "source_vm_id": "x", "old": [], "new": {}}, "lacks"),
    ({"schema": live.SCHEMA, "source_vm_id": "x", "old": {"Start": None}, "new": {}}, "never sets: Start"),
])
def test_a_bad_manifest_is_a_usage_error(tmp_path, data, said):
    path = tmp_path / "live-manifest.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CrashcartError, match=said) as err:
        live.load_local(path)
    assert err.value.exit_code == 2
    path.write_bytes(b"\xff\xfe not json")
    with pytest.raises(CrashcartError) as err:
        live.load_local(path)
    assert err.value.exit_code == 2


def test_each_state_is_a_new_blob_and_the_newest_is_read_back(evidence_container, tmp_path):
    settings = prepare.PrepareSettings(memory_mb=RAM, dump_type=1)
    the_plan = live.plan(settings, facts())
    manifest = live.LiveManifest.for_plan(the_plan, vm_id="/subscriptions/s/resourceGroups/g/providers/"
                                          "Microsoft.Compute/virtualMachines/web-01", run="web-01-abc/20250517T031245Z",
                                          out_dir=tmp_path / "run", blob_endpoint="https://x", container="dumps")
    for state in ("ready", "applied", "restored"):
        if state != "ready":
            manifest.mark(state)
        live.save(manifest, evidence_container, require_evidence=True)
    names = sorted(b.name for b in evidence_container.list_blobs())
    assert names == ["web-01-abc/20250517T031245Z/live-manifest.01-applied.json",
                     "web-01-abc/20250517T031245Z/live-manifest.02-restored.json",
                     "web-01-abc/20250517T031245Z/live-manifest.json"]
    assert json.loads(evidence_container.download_blob(names[2]).readall())["state"] == "ready"
    again = live.load_from_evidence(evidence_container, names[2], tmp_path / "out")
    assert again.state == "restored" and again.old == manifest.old and again.evidence_blob == names[1]
    assert json.loads((tmp_path / "run" / "live-manifest.json").read_text())["state"] == "restored"


OFFLINE_CASES = [([r"D:\pagefile.sys 0 0"], 1), ([r"C:\pagefile.sys 0 0"], 2), ([r"C:\pagefile.sys 0 0"], 1),
                 ([rf"C:\pagefile.sys {COMPLETE_NEEDS} {COMPLETE_NEEDS}"], 1),
                 ([rf"C:\pagefile.sys {COMPLETE_NEEDS - 1} 99999"], 1), ([r"%SystemRoot%\..\pagefile.sys 9000 9000"], 2),
                 ([r"%SystemDrive%\pagefile.sys 8000 8000", r"D:\pagefile.sys 0 0"], 2), ([r"?:\pagefile.sys"], 7),
                 ([r"C:\pagefile.sys x y"], 1), ([], 2)]


@pytest.mark.parametrize("dedicated", ["auto", "always", "never"])
def test_the_rule_is_the_offline_scripts_rule(tmp_path, dedicated):
    """The live kit's choice (Python) and the offline prepare's (plan_pagefile in prepare.sh.j2, run here with
    bash against the same PagingFiles) agree on every case: sufficient, dedicated, its size."""
    import shutil
    import subprocess

    if shutil.which("bash") is None or shutil.which("python3") is None:
        pytest.skip("bash and python3 run the offline script's rule")
    rendered = prepare.render_script("linux")
    assert rendered.rstrip().endswith("\nmain")
    library = tmp_path / "prepare.sh"
    library.write_text(rendered.rstrip()[: -len("main")])  # every function, without running the script
    for paging, dump_type in OFFLINE_CASES:
        driver = "\n".join([
            f"source {library}", "trap - EXIT INT TERM", "note() { :; }",
            "hivexget() { for e in \"${PF[@]}\"; do printf '%s\\n' \"$e\"; done; }",
            f"TMP={tmp_path}; CONTROL_SET=ControlSet001; DUMP_TYPE={dump_type}; MEMORY_MB={RAM}",
            f"DEDICATED_MODE={dedicated}; DEDICATED_FILE='C:\\DedicatedDump.sys'; DUMP_SIZE_MB=0",
            "plan_pagefile /", 'printf \'%s\\n\' "$DEDICATED $DUMP_SIZE_MB" "$PAGEFILE_JSON"'])
        done = subprocess.run(["bash", "-c", 'PF=("$@"); ' + driver, "bash", *paging], capture_output=True,
                              text=True, timeout=30)
        first, plan_json = done.stdout.splitlines()[:2]
        offline_dedicated, offline_size = (int(x) for x in first.split())
        offline = json.loads(plan_json)
        choice = prepare.choose_dump_target(dump_type, RAM, paging, dedicated)
        assert (choice.dedicated, choice.size_mb) == (bool(offline_dedicated), offline_size), (paging, dump_type)
        assert (choice.sufficient, choice.required_mb, choice.initial_mb, choice.system_entry) == (
            offline["sufficient"], offline["required_mb"], offline["initial_mb"], offline["system_volume_entry"]), \
            (paging, dump_type, offline)
