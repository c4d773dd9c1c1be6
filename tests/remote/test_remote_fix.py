"""The fix scripts (scripts/remote/fix.{sh,ps1}.j2).

bash: run for real here, as the Linux Run Command handler runs it (parameters as environment variables),
against disk images of a broken Windows VM with real NTFS (ntfs-3g) and real hives (hivebuilder), the
Generation 2 ESP a real FAT volume; every result is read back independently (dissect.ntfs, dissect.regf,
mtools). PowerShell cannot run here: it is parsed (tree-sitter) and held to the 5.1 cmdlet signatures and
lint rules like the other templates (tests/remote/pslint.py).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
from pathlib import Path

import pytest

from scripts.devkit import diskimage as windisk
from scripts.devkit.hivebuilder import REG_BINARY, REG_DWORD, REG_EXPAND_SZ, REG_MULTI_SZ, REG_SZ, HiveBuilder
from scripts.remediate import recipes
from tests.remote.bashrun import run_for_result
from tests.remote.test_remote_prepare import (BOOTMGR, DEFAULT_ENTRY, SYSTEM_PATH, build_gen1, build_gen2, fat_file,
                                              fat_tools, leftovers, ntfs_exists, ntfs_file, partitions, sha256)

RUN = "fix-20250517T031245Z"
BAD = "C-00000291-00000000-00000032.sys"


def services_hive(*, current: int = 2, lkg: int | None = None, extra: dict | None = None) -> bytes:
    """SYSTEM with two control sets, each holding csagent (the culprit, Start 1), a boot-start driver and
    storvsc; Select\\Current = `current`, LastKnownGood = `lkg`."""
    h = HiveBuilder()
    for name, value in (("Current", current), ("Default", current), ("Failed", 0),
                        ("LastKnownGood", lkg if lkg is not None else current)):
        h.set("Select", name, value, REG_DWORD)
    for n in (1, 2):
        base = f"ControlSet{n:03d}"
        h.set(base + r"\Control\CrashControl", "CrashDumpEnabled", 7, REG_DWORD)
        h.set(base + r"\Services\CSAgent", "Start", 1, REG_DWORD)
        h.set(base + r"\Services\CSAgent", "Type", 2, REG_DWORD)
        h.set(base + r"\Services\CSAgent", "Group", "FSFilter Activity Monitor", REG_SZ)
        h.set(base + r"\Services\CSAgent", "ImagePath", r"system32\drivers\CrowdStrike\csagent.sys", REG_EXPAND_SZ)
        h.set(base + r"\Services\elamvendor", "Start", 0, REG_DWORD)
        h.set(base + r"\Services\storvsc", "Start", 0, REG_DWORD)
        h.set(base + r"\Services\storvsc", "Group", "SCSI miniport", REG_SZ)
        for key, (name, value) in (extra or {}).items():
            h.set(base + "\\" + key, name, value, REG_DWORD)
    return h.to_bytes()


def csagent_files() -> dict[str, bytes]:
    d = "Windows/System32/drivers/CrowdStrike/"
    return {d + BAD: b"\xaa" * 4000, d + "C-00000291-00000000-00000033.sys": b"\xbb" * 100,
            d + "C-00000290-00000000-00000001.sys": b"keep", d + "csagent.sys": b"MZdriver"}


def disk(tmp: Path, hive: bytes | None = None, gen: int = 1, files: dict | None = None) -> Path:
    hive = hive if hive is not None else services_hive()
    if gen == 2 and fat_tools() is None:
        image = build_gen2(tmp, hive)
    else:
        image = build_gen1(tmp, hive)
    if files:
        _put_files(image, files)
    return image


def _put_files(image: Path, files: dict[str, bytes]) -> None:
    start, sectors = windows_volume(image)
    loop = subprocess.run(["losetup", "--find", "--show", "--offset", str(start * 512), "--sizelimit",
                           str(sectors * 512), str(image)], capture_output=True, text=True, check=True).stdout.strip()
    mount = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip())
    try:
        subprocess.run(["ntfs-3g", loop, str(mount)], check=True, capture_output=True)
        try:
            for rel, data in files.items():
                (mount / rel).parent.mkdir(parents=True, exist_ok=True)
                (mount / rel).write_bytes(data)
        finally:
            subprocess.run(["umount", str(mount)], check=True, capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        mount.rmdir()


def windows_volume(image: Path) -> tuple[int, int]:
    for start, sectors in partitions(image):
        if ntfs_exists(image, start, sectors, SYSTEM_PATH):
            return start, sectors
    raise AssertionError("no Windows volume")


def hive_of(image: Path) -> bytes:
    return ntfs_file(image, *windows_volume(image), SYSTEM_PATH)


def value(hive: bytes, key: str, name: str):
    from dissect.regf import RegistryHive

    return RegistryHive(io.BytesIO(hive)).open(key).value(name).value


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fix") / "fix.sh"
    path.write_text(recipes.render_script("linux"))
    return path


def run_fix(script: Path, image: Path, **params: str) -> tuple[subprocess.CompletedProcess, dict]:
    return run_for_result(script, image, timeout=90, **{"RunId": RUN, **params})


pytestmark_bash = [pytest.mark.slow, pytest.mark.root]


# ---- disable-driver -----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.root
def test_disable_driver_sets_start_4_in_every_control_set_and_undoes(script, tmp_path):
    image = disk(tmp_path / "d")
    original = hive_of(image)
    # dry run: the plan names both control sets, nothing is written
    before = sha256(image)
    proc, plan = run_fix(script, image, Recipe="disable-driver", Driver="csagent", Mode="plan")
    assert (proc.returncode, plan["status"]) == (0, "planned"), proc.stderr
    assert sorted(c["key"] for c in plan["changes"]) == [r"ControlSet001\Services\csagent", r"ControlSet002\Services\csagent"]
    assert sha256(image) == before and plan["hive"]["written"] is False

    proc, result = run_fix(script, image, Recipe="disable-driver", Driver="csagent")
    assert (proc.returncode, result["status"]) == (0, "applied"), proc.stderr
    hive = hive_of(image)
    for cs in ("ControlSet001", "ControlSet002"):
        assert value(hive, rf"{cs}\Services\CSAgent", "Start") == 4
        assert value(hive, rf"{cs}\Services\CSAgent", "Group") == "FSFilter Activity Monitor"  # carried over
        assert value(hive, rf"{cs}\Services\elamvendor", "Start") == 0  # another driver: untouched
    assert {(c["old"]["value"], c["new"]["value"], c["changed"]) for c in result["changes"]} == {(1, 4, True)}
    assert result["hive"]["sha256_before"] == hashlib.sha256(original).hexdigest()
    assert result["hive"]["sha256_after"] == hashlib.sha256(hive).hexdigest() and result["hive"]["written"]
    assert ntfs_file(image, *windows_volume(image), SYSTEM_PATH + f".crashcart-{RUN}.bak") == original
    assert leftovers(image) == ""

    # idempotent: a second run changes nothing and writes nothing
    proc, again = run_fix(script, image, Recipe="disable-driver", Driver="csagent")
    assert proc.returncode == 0 and [c for c in again["changes"] if c["changed"]] == []
    assert hive_of(image) == hive

    # the undo made from the first answer puts Start 1 back in both sets
    undo = recipes.undo_parameters(recipes.Recipe("disable-driver", driver="csagent"), result, run_id="undo-1",
                                   disk_lun=None)
    assert undo["StartValues"] == "ControlSet001=1,ControlSet002=1"
    proc, undone = run_fix(script, image, **{k: v for k, v in undo.items()})
    assert (proc.returncode, undone["status"]) == (0, "applied"), proc.stderr
    for cs in ("ControlSet001", "ControlSet002"):
        assert value(hive_of(image), rf"{cs}\Services\CSAgent", "Start") == 1


@pytest.mark.slow
@pytest.mark.root
def test_boot_critical_and_unknown_drivers_are_refused(script, tmp_path):
    image = disk(tmp_path / "d")
    before = sha256(image)
    for driver, words in (("storvsc", "boot-critical"), ("elamvendor", "Start is 0"), ("nosuchdrv", "no service")):
        proc, result = run_fix(script, image, Recipe="disable-driver", Driver=driver)
        assert (proc.returncode, result["status"]) == (12, "refused"), (driver, result)
        assert words in result["message"]
    assert sha256(image) == before
    proc, result = run_fix(script, image, Recipe="disable-driver", Driver="elamvendor", Force="1")
    assert proc.returncode == 0, proc.stderr
    assert value(hive_of(image), r"ControlSet002\Services\elamvendor", "Start") == 4
    assert any("boot-critical" in n for n in result["notes"])


# ---- remove-file ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.root
def test_remove_file_quarantines_with_hashes_and_moves_back(script, tmp_path):
    files = csagent_files()
    image = disk(tmp_path / "d", files=files)
    vol = windows_volume(image)
    pattern = r"C:\Windows\System32\drivers\CrowdStrike\c-00000291*.sys"  # case-insensitive, as Windows matches
    proc, plan = run_fix(script, image, Recipe="remove-file", Pattern=pattern, Mode="plan")
    assert proc.returncode == 0 and len(plan["files"]) == 2 and not any(f["moved"] for f in plan["files"])
    assert ntfs_exists(image, *vol, "Windows/System32/drivers/CrowdStrike/" + BAD)

    proc, result = run_fix(script, image, Recipe="remove-file", Pattern=pattern)
    assert (proc.returncode, result["status"]) == (0, "applied"), proc.stderr
    moved = {f["path"]: f for f in result["files"]}
    src = "C:\\Windows\\System32\\drivers\\CrowdStrike\\" + BAD
    assert moved[src]["sha256"] == hashlib.sha256(files["Windows/System32/drivers/CrowdStrike/" + BAD]).hexdigest()
    assert moved[src]["quarantine"] == f"C:\\crashcart-quarantine\\{RUN}\\Windows\\System32\\drivers\\CrowdStrike\\{BAD}"
    assert not ntfs_exists(image, *vol, "Windows/System32/drivers/CrowdStrike/" + BAD)
    assert ntfs_file(image, *vol, f"crashcart-quarantine/{RUN}/Windows/System32/drivers/CrowdStrike/{BAD}") == \
        files["Windows/System32/drivers/CrowdStrike/" + BAD]  # moved whole, never deleted
    assert ntfs_file(image, *vol, "Windows/System32/drivers/CrowdStrike/C-00000290-00000000-00000001.sys") == b"keep"

    proc, again = run_fix(script, image, Recipe="remove-file", Pattern=pattern)  # idempotent
    assert proc.returncode == 0 and again["files"] == [] and any("no file matches" in n for n in again["notes"])

    undo = recipes.undo_parameters(recipes.Recipe("remove-file", pattern=pattern), result, run_id="undo-1",
                                   disk_lun=None)
    proc, back = run_fix(script, image, **undo)
    assert (proc.returncode, back["status"]) == (0, "applied"), proc.stderr
    assert ntfs_file(image, *vol, "Windows/System32/drivers/CrowdStrike/" + BAD) == files[
        "Windows/System32/drivers/CrowdStrike/" + BAD]
    assert leftovers(image) == ""


@pytest.mark.slow
@pytest.mark.root
def test_remove_file_refuses_what_windows_needs_and_hostile_patterns(script, tmp_path):
    canary = tmp_path / "canary"
    image = disk(tmp_path / "d")
    before = sha256(image)
    proc, result = run_fix(script, image, Recipe="remove-file", Pattern=r"C:\Windows\System32\config\SYS*")
    assert (proc.returncode, result["status"]) == (12, "refused") and "cannot boot without" in result["message"]
    for bad in (rf"C:\Windows\$(touch {canary})\*", r"C:\Windows\*\x.sys", r"D:\x\*.sys", r"C:\..\x\*.sys",
                f"C:\\x\\`touch {canary}`\n*.sys"):
        proc, result = run_fix(script, image, Recipe="remove-file", Pattern=bad)
        assert proc.returncode in (0, 2), (bad, result)
        assert result.get("files", []) == []
    assert not canary.exists() and sha256(image) == before


# ---- safe-mode, last-known-good, revert-pending -----------------------------------------------------------------------
SAFE_MODE = "crashcart safe mode (once)"


def bcd_tree(data: bytes) -> dict[str, dict]:
    """Every key of a BCD hive, by path, with its values as (type, value): the whole store, to compare."""
    from dissect.regf import RegistryHive

    out: dict[str, dict] = {}

    def walk(key, path: str) -> None:
        out[path] = {v.name: (v.type, v.value) for v in key.values()}
        for sub in key.subkeys():
            walk(sub, f"{path}\\{sub.name}" if path else sub.name)

    walk(RegistryHive(io.BytesIO(data)).root(), "")
    return {path.lower(): values for path, values in out.items()}


def store_of(image: Path, tmp: Path):
    """A function reading the image's BCD store (the ESP's on Generation 2, System Reserved's on 1)."""
    first = partitions(image)[0]

    def read() -> bytes:
        try:
            return fat_file(image, first[0], "EFI/Microsoft/Boot/BCD", tmp)
        except subprocess.CalledProcessError:
            return ntfs_file(image, *first, "Boot/BCD")
    return read


def bcd_with_sequence(*sequence: str, persist: bool = False) -> bytes:
    """tests/remote/test_remote_prepare.py's BCD store (bcdboot's) with a one-time boot sequence already set."""
    h = HiveBuilder(root_name="NewStoreRoot", file_name=r"\Device\HarddiskVolume1\Boot\BCD")
    h.set("Description", "KeyName", "BCD00000000", REG_SZ)
    h.set(rf"Objects\{BOOTMGR}\Description", "Type", 0x10100002, REG_DWORD)
    h.set(rf"Objects\{BOOTMGR}\Elements\12000004", "Element", "Windows Boot Manager", REG_SZ)
    h.set(rf"Objects\{BOOTMGR}\Elements\23000003", "Element", DEFAULT_ENTRY, REG_SZ)
    h.set(rf"Objects\{BOOTMGR}\Elements\24000002", "Element", list(sequence), REG_MULTI_SZ)
    if persist:  # BcdBootMgrBoolean_PersistBootSequence
        h.set(rf"Objects\{BOOTMGR}\Elements\26000031", "Element", b"\x01", REG_BINARY)
    h.set(rf"Objects\{DEFAULT_ENTRY}\Description", "Type", 0x10200003, REG_DWORD)
    h.set(rf"Objects\{DEFAULT_ENTRY}\Elements\12000004", "Element", "Windows Server", REG_SZ)
    h.set(rf"Objects\{DEFAULT_ENTRY}\Elements\22000002", "Element", r"\Windows\system32\winload.exe", REG_SZ)
    h.set(rf"Objects\{DEFAULT_ENTRY}\Elements\16000010", "Element", b"\x00", REG_BINARY)
    return h.to_bytes()


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.parametrize("gen", [2, 1])
def test_safe_mode_boots_a_copy_of_default_once_and_undo_restores_the_store(script, tmp_path, gen):
    image = disk(tmp_path / "d", gen=gen)
    bcd = store_of(image, tmp_path)
    original = bcd_tree(bcd())
    objects = "objects"
    default = rf"{objects}\{DEFAULT_ENTRY.lower()}"
    sequence = rf"{objects}\{BOOTMGR}\elements\24000002"  # BcdBootMgrObjectList_BootSequence

    # --dry-run: the new entry and the one-time boot sequence are planned, the store is not written
    before = sha256(image)
    proc, plan = run_fix(script, image, Recipe="safe-mode", Mode="plan")
    assert (proc.returncode, plan["status"]) == (0, "planned"), proc.stderr
    assert [c["name"] for c in plan["changes"]] == ["entry", "Element"] and all(c["changed"] for c in plan["changes"])
    assert plan["changes"][1]["key"].lower() == sequence and sha256(image) == before

    proc, result = run_fix(script, image, Recipe="safe-mode")
    assert (proc.returncode, result["status"]) == (0, "applied"), proc.stderr
    entry = result["hive"]["safe_mode_entry"]
    assert entry.startswith("{") and entry.lower() != DEFAULT_ENTRY.lower()
    after = bcd_tree(bcd())
    copy = rf"{objects}\{entry.lower()}"
    # the copy: {default}'s type and elements, its own description, safeboot 0 (minimal)
    assert after[copy + r"\description"] == original[default + r"\description"]
    for path, values in original.items():
        if path.startswith(default + "\\elements\\") and not path.endswith("12000004"):
            assert after[copy + path[len(default):]] == values, path
    assert after[copy + r"\elements\12000004"]["Element"][1] == SAFE_MODE
    assert after[copy + r"\elements\25000080"]["Element"][1] == struct.pack("<Q", 0)  # BcdOSLoaderInteger_SafeBoot
    # the boot manager boots it ONCE (the one-time boot sequence names it); {default} and all else unchanged
    assert after[sequence]["Element"] == (REG_MULTI_SZ, [entry])
    assert {p: v for p, v in after.items() if p in original} == original
    assert set(after) - set(original) == {sequence} | {p for p in after if p.startswith(copy)}
    assert all(not p.endswith("25000080") for p in after if p.startswith(default))

    # a second run finds its entry: nothing changes, nothing is written, nothing to undo
    written = bcd()
    proc, again = run_fix(script, image, Recipe="safe-mode", RunId="fix-again")
    assert (proc.returncode, again["status"]) == (0, "applied"), proc.stderr
    assert not any(c["changed"] for c in again["changes"]) and again["hive"]["safe_mode_entry"] == entry
    assert bcd() == written
    assert recipes.undo_parameters(recipes.Recipe("safe-mode"), again, run_id="u", disk_lun=None) is None

    undo = recipes.undo_parameters(recipes.Recipe("safe-mode"), result, run_id="undo-1", disk_lun=None)
    assert (undo["SafeModeEntry"], undo["OldBootSequence"]) == (entry, "absent")
    proc, back = run_fix(script, image, **undo)
    assert (proc.returncode, back["status"]) == (0, "applied"), proc.stderr
    assert bcd_tree(bcd()) == original
    assert leftovers(image) == ""


@pytest.mark.slow
@pytest.mark.root
def test_safe_mode_undo_puts_back_a_boot_sequence_that_was_there(script, tmp_path):
    other = "{11111111-2222-3333-4444-555555555555}"
    store = bcd_with_sequence(other, persist=True)
    image = build_gen1(tmp_path / "d", services_hive(), bcd=store)
    bcd = store_of(image, tmp_path)
    original = bcd_tree(bcd())
    proc, result = run_fix(script, image, Recipe="safe-mode")
    assert (proc.returncode, result["status"]) == (0, "applied"), proc.stderr
    entry = result["hive"]["safe_mode_entry"]
    assert any("PersistBootSequence" in n and "repeats" in n for n in result["notes"])  # said: not once here
    assert bcd_tree(bcd())[rf"objects\{BOOTMGR}\elements\24000002"]["Element"] == (REG_MULTI_SZ, [entry])
    undo = recipes.undo_parameters(recipes.Recipe("safe-mode"), result, run_id="undo-1", disk_lun=None)
    assert undo["OldBootSequence"] == other
    proc, back = run_fix(script, image, **undo)
    assert proc.returncode == 0, proc.stderr
    assert bcd_tree(bcd()) == original
    # an undo naming an entry that is not crashcart's deletes nothing
    proc, refused = run_fix(script, image, **{**undo, "SafeModeEntry": DEFAULT_ENTRY})
    assert (proc.returncode, refused["status"]) == (12, "refused") and bcd_tree(bcd()) == original


@pytest.mark.slow
@pytest.mark.root
def test_last_known_good_selects_the_older_control_set(script, tmp_path):
    image = disk(tmp_path / "d", hive=services_hive(current=2, lkg=1))
    proc, result = run_fix(script, image, Recipe="last-known-good")
    assert proc.returncode == 0, proc.stderr
    assert (value(hive_of(image), "Select", "Default"), value(hive_of(image), "Select", "Current")) == (1, 1)
    undo = recipes.undo_parameters(recipes.Recipe("last-known-good"), result, run_id="undo-1", disk_lun=None)
    assert undo["SelectValues"] == "Current=2,Default=2"
    proc, _ = run_fix(script, image, **undo)
    assert value(hive_of(image), "Select", "Default") == 2


@pytest.mark.slow
@pytest.mark.root
def test_revert_pending_is_refused_on_linux_with_what_to_do(script, tmp_path):
    image = disk(tmp_path / "d")
    before = sha256(image)
    proc, result = run_fix(script, image, Recipe="revert-pending")
    assert (proc.returncode, result["status"]) == (12, "refused")
    assert "DISM" in result["message"] and 'rescue.os = "windows"' in result["message"]
    assert sha256(image) == before


def test_parameters_are_checked_before_anything_runs():
    assert recipes.check_pattern(r"Windows\System32\drivers\CrowdStrike\C-00000291*.sys") == \
        r"C:\Windows\System32\drivers\CrowdStrike\C-00000291*.sys"
    for bad in (r"C:\Windows\*\x.sys", r"D:\x\y.sys", r"C:\..\x\*.sys", "C:\\x\\a\"b", "", r"C:\x\\"):
        with pytest.raises(recipes.CrashcartError):
            recipes.check_pattern(bad)
    for bad in ("", "a b", "$(id)", "x;y", "../x"):
        with pytest.raises(recipes.CrashcartError):
            recipes.Recipe("disable-driver", driver=bad)
    assert recipes.parse("disable-driver:csagent").driver == "csagent"
    with pytest.raises(recipes.CrashcartError):
        recipes.parse("safe-mode:x")
    script = recipes.render_script("linux")
    assert "csagent" not in script.lower() and "{{" not in script
