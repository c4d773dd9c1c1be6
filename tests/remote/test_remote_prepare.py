"""The prepare scripts (scripts/remote/prepare.{sh,ps1}.j2).

bash: run for real on this machine, as the Linux Run Command handler would (parameters as environment
variables), against disk images of a broken Windows VM built with real NTFS (mkntfs/ntfs-3g) and, for
Generation 2, a real FAT ESP (mkfs.fat/mtools) holding the BCD store. The script mounts the Windows
volume read-write with ntfs-3g through a loop device over the image file (the `Device` parameter) and
edits the hives with hivexsh; the test reads the result back independently: the NTFS volume with
dissect.ntfs, the hives with dissect.regf, the ESP with mtools.

PowerShell: cannot run here; it is rendered and parsed with tree-sitter-powershell (zero ERROR/MISSING
nodes), and both scripts declare every parameter the kit passes. Hostile values only ever travel as
parameters: the scripts hold no value from outside, and hostile parameters are refused or stored
verbatim, never run.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from scripts.nodump import prepare
from tests.remote.bashrun import run_for_result
from scripts.devkit import hivebuilder
from scripts.devkit import diskimage as windisk
from scripts.devkit.hivebuilder import REG_BINARY, REG_DWORD, REG_EXPAND_SZ, REG_SZ, HiveBuilder

BOOTMGR = "{9dea862c-5cdd-4e70-acc1-f32b344d4795}"
DEFAULT_ENTRY = "{5fa5a6a1-7e1c-11ee-9a8c-000d3a2b4c5d}"
EMSSETTINGS = "{0ce4991b-e6b3-4b16-b23c-5e0d9250e5d9}"
SYSTEM_PATH = "Windows/System32/config/SYSTEM"
MIB = 1 << 20


# ---- building disks ---------------------------------------------------------------------------------------------
def bcd_hive(with_ems_settings: bool = True) -> bytes:
    """A BCD store as bcdboot writes one: {bootmgr} naming the default loader, the loader, {emssettings}."""
    h = HiveBuilder(root_name="NewStoreRoot", file_name=r"\Device\HarddiskVolume1\EFI\Microsoft\Boot\BCD")
    h.set("Description", "KeyName", "BCD00000000", REG_SZ)
    h.set(rf"Objects\{BOOTMGR}\Description", "Type", 0x10100002, REG_DWORD)
    h.set(rf"Objects\{BOOTMGR}\Elements\12000004", "Element", "Windows Boot Manager", REG_SZ)
    h.set(rf"Objects\{BOOTMGR}\Elements\23000003", "Element", DEFAULT_ENTRY, REG_SZ)
    h.set(rf"Objects\{BOOTMGR}\Elements\25000004", "Element", struct.pack("<Q", 30), REG_BINARY)
    h.set(rf"Objects\{DEFAULT_ENTRY}\Description", "Type", 0x10200003, REG_DWORD)
    h.set(rf"Objects\{DEFAULT_ENTRY}\Elements\12000004", "Element", "Windows Server", REG_SZ)
    h.set(rf"Objects\{DEFAULT_ENTRY}\Elements\22000002", "Element", r"\Windows\system32\winload.efi", REG_SZ)
    if with_ems_settings:
        h.set(rf"Objects\{EMSSETTINGS}\Description", "Type", 0x20100000, REG_DWORD)
        h.set(rf"Objects\{EMSSETTINGS}\Elements\16000020", "Element", b"\x00", REG_BINARY)
    return h.to_bytes()


def dirty(hive: bytes) -> bytes:
    """The same hive with its base block saying the logs hold unmerged changes (sequence numbers differ)."""
    block = bytearray(hive[:4096])
    seq = struct.unpack_from("<I", block, 4)[0]
    struct.pack_into("<I", block, 8, seq + 1)
    checksum = 0
    for (word,) in struct.iter_unpack("<I", bytes(block[:0x1FC])):
        checksum ^= word
    struct.pack_into("<I", block, 0x1FC, checksum or 1)
    return bytes(block) + hive[4096:]


def crash_control_hive(paging_files: list[str], *, extra: dict | None = None) -> bytes:
    values = {"CrashDumpEnabled": (REG_DWORD, 7), "DumpFile": (REG_EXPAND_SZ, r"%SystemRoot%\MEMORY.DMP"),
              "MinidumpDir": (REG_EXPAND_SZ, r"%SystemRoot%\Minidump"), "LogEvent": (REG_DWORD, 1),
              "AutoReboot": (REG_DWORD, 1), **(extra or {})}
    return hivebuilder.system_hive(current=1, crash_control=values, paging_files=paging_files)


def fat_tools() -> str | None:
    for tool in ("mkfs.fat", "mcopy", "mmd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian packages dosfstools and mtools: the Generation 2 ESP)"
    return None


MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def partitions(image: Path) -> list[tuple[int, int]]:
    out = subprocess.run(["partx", "-g", "-r", "-o", "START,SECTORS", str(image)], capture_output=True, text=True,
                         check=True).stdout
    return [tuple(int(x) for x in line.split()) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


def build_gen2(folder: Path, system_hive: bytes, *, windows_mib: int = 24, bcd: bytes | None = None) -> Path:
    """GPT: ESP (FAT, EFI/Microsoft/Boot/BCD), MSR, Windows (NTFS), Recovery (NTFS)."""
    reason = windisk.can_build() or fat_tools()
    if reason:
        pytest.skip(reason)
    folder.mkdir(parents=True, exist_ok=True)
    files = {SYSTEM_PATH: system_hive, "Windows/System32/ntoskrnl.exe": b"MZ" + bytes(2000)}
    image = windisk.build_disk(folder / "gen2.img", windisk.windows_gpt_layout(files, windows_mib))
    esp_start = partitions(image)[0][0]
    subprocess.run(["mkfs.fat", "--offset", str(esp_start), str(image), str(4 * 1024)], check=True, capture_output=True)
    target = f"{image}@@{esp_start * 512}"
    (folder / "BCD").write_bytes(bcd if bcd is not None else bcd_hive())
    for d in ("::/EFI", "::/EFI/Microsoft", "::/EFI/Microsoft/Boot"):
        subprocess.run(["mmd", "-i", target, d], check=True, capture_output=True, env=MTOOLS_ENV)
    subprocess.run(["mcopy", "-i", target, str(folder / "BCD"), "::/EFI/Microsoft/Boot/BCD"], check=True,
                   capture_output=True, env=MTOOLS_ENV)
    # as on a real ESP: system, hidden, read-only
    subprocess.run(["mattrib", "+s", "+h", "+r", "-i", target, "::/EFI/Microsoft/Boot/BCD"], check=True,
                   capture_output=True, env=MTOOLS_ENV)
    return image


def fat_attributes(image: Path, start: int, path: str) -> str:
    out = subprocess.run(["mattrib", "-i", f"{image}@@{start * 512}", f"::/{path}"], check=True, capture_output=True,
                         text=True, env=MTOOLS_ENV).stdout
    return out.split("::", 1)[0].replace(" ", "")


def build_gen1(folder: Path, system_hive: bytes, *, windows_mib: int = 24, bcd: bytes | None = None) -> Path:
    """MBR: System Reserved (NTFS, bootmgr and Boot/BCD), then Windows (NTFS)."""
    reason = windisk.can_build()
    if reason:
        pytest.skip(reason)
    folder.mkdir(parents=True, exist_ok=True)
    layout = [
        windisk.Partition(8, name="System Reserved", ntfs_label="System Reserved",
                          files={"bootmgr": b"BOOTMGR", "Boot/BCD": bcd if bcd is not None else bcd_hive()}),
        windisk.Partition(windows_mib, name="Windows", ntfs_label="Windows",
                          files={SYSTEM_PATH: system_hive, "Windows/System32/ntoskrnl.exe": b"MZ" + bytes(2000)}),
    ]
    image = windisk.build_disk(folder / "gen1.img", layout, "mbr")
    (start, sectors), _ = partitions(image)
    ntfs_attributes(image, start, sectors, "Boot/BCD", set_to=0x27)  # as on a real disk: archive, system, hidden, read-only
    return image


def ntfs_attributes(image: Path, start: int, sectors: int, path: str, set_to: int | None = None) -> int:
    """A file's DOS attributes through an ntfs-3g mount (system.ntfs_attrib_be), optionally setting them first."""
    loop = subprocess.run(["losetup", "--find", "--show", "--offset", str(start * 512), "--sizelimit",
                           str(sectors * 512), str(image)], capture_output=True, text=True, check=True).stdout.strip()
    mount = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip())
    try:
        subprocess.run(["ntfs-3g", loop, str(mount)], check=True, capture_output=True)
        try:
            target = str(mount / path)
            if set_to is not None:
                os.setxattr(target, "system.ntfs_attrib_be", struct.pack(">I", set_to))
            return struct.unpack(">I", os.getxattr(target, "system.ntfs_attrib_be"))[0]
        finally:
            subprocess.run(["umount", str(mount)], check=True, capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        mount.rmdir()


# ---- reading disks back -----------------------------------------------------------------------------------------
def ntfs_file(image: Path, start: int, sectors: int, path: str) -> bytes:
    from dissect.ntfs import NTFS
    from dissect.util.stream import RangeStream

    with open(image, "rb") as f:
        fs = NTFS(RangeStream(f, start * 512, sectors * 512))
        return fs.mft.get(path).open().read()


def ntfs_exists(image: Path, start: int, sectors: int, path: str) -> bool:
    try:
        ntfs_file(image, start, sectors, path)
        return True
    except Exception:  # noqa: BLE001 - dissect raises its own not-found errors
        return False


def fat_file(image: Path, start: int, path: str, tmp: Path) -> bytes:
    out = tmp / f"fat-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    out.unlink(missing_ok=True)
    subprocess.run(["mcopy", "-n", "-i", f"{image}@@{start * 512}", f"::/{path}", str(out)], check=True,
                   capture_output=True, env=MTOOLS_ENV)
    return out.read_bytes()


def values(hive: bytes, key: str) -> dict:
    from dissect.regf import RegistryHive

    return {v.name: v.value for v in RegistryHive(io.BytesIO(hive)).open(key).values()}


def element(bcd: bytes, obj: str, element_type: str):
    from dissect.regf import RegistryHive

    return RegistryHive(io.BytesIO(bcd)).open(rf"Objects\{obj}\Elements\{element_type}").value("Element").value


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- running the bash script --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prepare") / "prepare.sh"
    path.write_text(prepare.render_script("linux"))
    return path


def run_script(script: Path, image: Path, **params: str) -> tuple[subprocess.CompletedProcess, dict]:
    return run_for_result(script, image, timeout=60, **{"RunId": "20250517T031245Z", "MemoryMB": "16384", **params})


def leftovers(image: Path) -> str:
    loops = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout.strip()
    with open("/proc/mounts") as f:
        mounts = [line for line in f if "/tmp/crashcart." in line]
    return loops + "".join(mounts)




# ---- bash: the happy paths ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.root
def test_gen2_kernel_dump_written_to_the_offline_hive_and_ems_to_the_esp(script, tmp_path):
    original = crash_control_hive([r"C:\pagefile.sys 0 0"])
    image = build_gen2(tmp_path / "disk", original)
    (esp_start, _), _msr, (win_start, win_sectors), *_ = partitions(image)
    proc, result = run_script(script, image)
    assert proc.returncode == 0, proc.stderr
    assert result["status"] == "prepared"
    assert result["control_set"] == "ControlSet001"

    hive = ntfs_file(image, win_start, win_sectors, SYSTEM_PATH)
    crash = values(hive, r"ControlSet001\Control\CrashControl")
    assert crash["CrashDumpEnabled"] == 2 and crash["DumpFile"] == r"%SystemRoot%\MEMORY.DMP"
    assert crash["NMICrashDump"] == 1 and crash["AutoReboot"] == 0 and crash["Overwrite"] == 1
    assert crash["MinidumpDir"] == r"%SystemRoot%\Minidump" and crash["LogEvent"] == 1  # carried over
    assert "DedicatedDumpFile" not in crash  # a system-managed page file on C: holds a kernel dump
    # the decoy control set and the page file settings are untouched
    assert values(hive, r"ControlSet002\Control\CrashControl")["DumpFile"] == r"%SystemRoot%\DECOY.DMP"
    assert values(hive, r"ControlSet001\Control\Session Manager\Memory Management")["PagingFiles"] == [r"C:\pagefile.sys 0 0"]
    # the hive as it was is kept beside it, byte for byte
    backup = ntfs_file(image, win_start, win_sectors, SYSTEM_PATH + ".crashcart-20250517T031245Z.bak")
    assert backup == original

    bcd = fat_file(image, esp_start, "EFI/Microsoft/Boot/BCD", tmp_path)
    assert element(bcd, BOOTMGR, "16000020") == b"\x01"  # bootems yes
    assert element(bcd, DEFAULT_ENTRY, "260000b0") == b"\x01"  # ems on
    assert element(bcd, EMSSETTINGS, "15000022") == struct.pack("<Q", 1)  # EMSPORT:1
    assert element(bcd, EMSSETTINGS, "15000023") == struct.pack("<Q", 115200)  # EMSBAUDRATE:115200
    assert element(bcd, EMSSETTINGS, "16000020") == b"\x00"  # an element of another key: untouched
    assert element(bcd, BOOTMGR, "23000003") == DEFAULT_ENTRY
    assert fat_file(image, esp_start, "EFI/Microsoft/Boot/BCD.crashcart-20250517T031245Z.bak", tmp_path) == bcd_hive()
    assert set(fat_attributes(image, esp_start, "EFI/Microsoft/Boot/BCD")) >= {"S", "H", "R"}  # kept

    # the result records old and new values for the manifest
    by_name = {(c["store"], c["name"] if c["store"] == "SYSTEM" else c["key"].rsplit("\\", 1)[-1]): c
               for c in result["changes"]}
    assert by_name[("SYSTEM", "CrashDumpEnabled")]["old"] == {"type": "REG_DWORD", "value": 7}
    assert by_name[("SYSTEM", "CrashDumpEnabled")]["new"] == {"type": "REG_DWORD", "value": 2}
    assert by_name[("SYSTEM", "NMICrashDump")]["old"] is None
    assert by_name[("SYSTEM", "DumpFile")]["changed"] is False
    assert by_name[("BCD", "260000b0")]["new"] == {"type": "REG_BINARY", "hex": "01"}
    assert result["bcd"]["applied"] is True and result["bcd"]["volume"] == "fat"
    assert result["pagefile"]["sufficient"] is True
    assert leftovers(image) == ""

    # a second run is idempotent: nothing changes any more, and the first backup is kept
    proc, again = run_script(script, image)
    assert proc.returncode == 0, proc.stderr
    assert [c for c in again["changes"] if c["changed"]] == []
    assert ntfs_file(image, win_start, win_sectors, SYSTEM_PATH + ".crashcart-20250517T031245Z.bak") == original


@pytest.mark.slow
@pytest.mark.root
def test_gen1_complete_dump_gets_a_dedicated_dump_file_and_ems_on_system_reserved(script, tmp_path):
    # complete dump of 64 MB of RAM: the page file is on D: (the temporary disk), so a dedicated dump file
    # of RAM + 257 MB goes on C:, which has room for it
    image = build_gen1(tmp_path / "disk", crash_control_hive([r"D:\pagefile.sys 0 0"]), windows_mib=600)
    (sr_start, sr_sectors), (win_start, win_sectors) = partitions(image)
    proc, result = run_script(script, image, CrashDumpEnabled="1", MemoryMB="64", AutoReboot="1")
    assert proc.returncode == 0, proc.stderr
    crash = values(ntfs_file(image, win_start, win_sectors, SYSTEM_PATH), r"ControlSet001\Control\CrashControl")
    assert crash["CrashDumpEnabled"] == 1 and crash["AutoReboot"] == 1
    assert crash["DedicatedDumpFile"] == r"C:\DedicatedDump.sys"
    assert crash["DumpFileSize"] == 64 + 257
    assert result["pagefile"]["sufficient"] is False and result["pagefile"]["dump_file_size_mb"] == 321
    assert any("D:" in note for note in result["notes"])
    bcd = ntfs_file(image, sr_start, sr_sectors, "Boot/BCD")
    assert element(bcd, DEFAULT_ENTRY, "260000b0") == b"\x01"
    assert result["bcd"]["volume"] == "ntfs" and result["bcd"]["path"] == "Boot/BCD"
    assert ntfs_attributes(image, sr_start, sr_sectors, "Boot/BCD") & 0x7 == 0x7  # still read-only, hidden, system
    assert leftovers(image) == ""


@pytest.mark.slow
@pytest.mark.root
def test_missing_ems_settings_object_is_created(script, tmp_path):
    image = build_gen1(tmp_path / "disk", crash_control_hive([r"C:\pagefile.sys 0 0"]),
                       bcd=bcd_hive(with_ems_settings=False))
    (sr_start, sr_sectors), _ = partitions(image)
    proc, _ = run_script(script, image)
    assert proc.returncode == 0, proc.stderr
    bcd = ntfs_file(image, sr_start, sr_sectors, "Boot/BCD")
    assert element(bcd, EMSSETTINGS, "15000023") == struct.pack("<Q", 115200)
    from dissect.regf import RegistryHive

    assert RegistryHive(io.BytesIO(bcd)).open(rf"Objects\{EMSSETTINGS}\Description").value("Type").value == 0x20100000


# ---- bash: refusing, inspecting, hostile input ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.root
def test_refusals_write_nothing(script, tmp_path):
    # 1. no room for the dedicated dump file a complete dump needs
    image = build_gen1(tmp_path / "small", crash_control_hive([r"D:\pagefile.sys 0 0"]))
    before = sha256(image)
    proc, result = run_script(script, image, CrashDumpEnabled="1")
    assert proc.returncode == 12 and result["status"] == "refused"
    assert "does not fit" in result["message"]
    assert sha256(image) == before and leftovers(image) == ""
    # 2. a dirty SYSTEM hive (unmerged transaction logs) is not written on Linux...
    image = build_gen1(tmp_path / "dirty", dirty(crash_control_hive([r"C:\pagefile.sys 0 0"])))
    before = sha256(image)
    proc, result = run_script(script, image)
    assert proc.returncode == 12 and result["status"] == "refused" and "dirty" in result["message"]
    assert sha256(image) == before
    # ... unless the operator says so
    proc, result = run_script(script, image, AllowDirtyHive="1")
    assert proc.returncode == 0, proc.stderr
    assert any("dirty" in n for n in result["notes"])


@pytest.mark.slow
@pytest.mark.root
def test_inspect_plans_without_writing_and_disk_not_found(script, tmp_path):
    image = build_gen1(tmp_path / "disk", crash_control_hive([r"C:\pagefile.sys 0 0"]))
    before = sha256(image)
    proc, result = run_script(script, image, Mode="inspect")
    assert proc.returncode == 0, proc.stderr
    assert result["status"] == "planned" and result["bcd"]["applied"] is False
    assert {c["name"] for c in result["changes"] if c["store"] == "SYSTEM" and c["changed"]} == \
        {"CrashDumpEnabled", "NMICrashDump", "AutoReboot", "Overwrite"}
    assert sha256(image) == before
    empty = windisk.build_disk(tmp_path / "nowin.img", windisk.windows_mbr_layout({}, 16)[:1], "mbr")
    proc, result = run_script(script, empty)
    assert proc.returncode == 11 and result["status"] == "disk_not_found"


HOSTILE = "x'; $(touch {canary}) `touch {canary}` \"q\" ; echo pwned\n&& rm -rf / #"


@pytest.mark.slow
@pytest.mark.root
def test_hostile_parameters_are_inert(script, tmp_path):
    canary = tmp_path / "canary"
    image = build_gen1(tmp_path / "disk", crash_control_hive([r"C:\pagefile.sys 0 0"]))
    before = sha256(image)
    hostile = HOSTILE.format(canary=canary)
    for name in ("DumpFile", "CrashDumpEnabled", "RunId", "MemoryMB", "DedicatedDumpFile", "EmsBaudRate", "Mode"):
        proc, result = run_script(script, image, **{name: hostile})
        assert proc.returncode == 2 and result["status"] == "error", (name, result)
    assert not canary.exists() and sha256(image) == before
    # a legal Windows path that looks like shell code is stored as text, never run
    odd = rf"%SystemRoot%\$(touch {canary.name})`id`;x\MEMORY.DMP"
    proc, result = run_script(script, image, DumpFile=odd)
    assert proc.returncode == 0, proc.stderr
    _, (win_start, win_sectors) = partitions(image)
    assert values(ntfs_file(image, win_start, win_sectors, SYSTEM_PATH), r"ControlSet001\Control\CrashControl")["DumpFile"] == odd
    assert not canary.exists() and not Path(canary.name).exists()


# ---- PowerShell: parse, parameters, no values in the text --------------------------------------------------------------
def ps_errors(source: str) -> list[str]:
    """Every ERROR or MISSING node tree-sitter-powershell finds, with its line."""
    import tree_sitter
    import tree_sitter_powershell

    tree = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language())).parse(source.encode("utf-8"))
    lines, problems, stack = source.splitlines(), [], [tree.root_node]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            row = node.start_point[0]
            problems.append(f"{node.type} at line {row + 1}: {lines[row].strip() if row < len(lines) else ''}")
        stack.extend(node.children)
    return problems


def test_powershell_variant_parses_clean_and_holds_no_values():
    script = prepare.render_script("windows")
    assert ps_errors(script) == []
    assert "{{" not in script and "{%" not in script and "{##" not in script
    broken = script.replace("function Edit-Bcd {", "function Edit-Bcd {{", 1)
    assert ps_errors(broken)  # the check can fail
    # bcdedit and reg run through Invoke-Native (#12: their stderr must not end the script under 5.1)
    assert "Invoke-Native 'bcdedit.exe' (@('/store', $Store)" in script and "Invoke-Native 'reg.exe' @('load'" in script


def _ps_params(script: str) -> set[str]:
    block = script[script.index("param(") : script.index(")\n\nSet-StrictMode")]
    return set(re.findall(r"\[string\]\$(\w+)", block))


def _bash_params(script: str) -> set[str]:
    return set(re.findall(r"\$\{(\w+):-", script)) - {"PATH"}


def test_both_scripts_declare_every_parameter_the_kit_passes():
    settings = prepare.PrepareSettings(memory_mb=16384)
    passed = set(settings.parameters(run_id="20250517T031245Z", mode="prepare", disk_lun=0))
    assert passed <= _ps_params(prepare.render_script("windows"))
    assert passed <= _bash_params(prepare.render_script("linux"))


def test_hostile_settings_are_refused_before_anything_runs():
    from scripts.base.errors import CrashcartError

    for value in (r"D:\MEMORY.DMP", r"%SystemRoot%\..\x.dmp", "%SystemRoot%\\a\"b.dmp", "%SystemRoot%\\a\nb.dmp",
                  r"\\server\share\x.dmp", "x"):
        with pytest.raises(CrashcartError) as err:
            prepare.PrepareSettings(memory_mb=1024, dump_file=value)
        assert err.value.exit_code == 2
    with pytest.raises(CrashcartError, match="RAM is unknown"):
        prepare.PrepareSettings(memory_mb=0)
    # what passes goes out as a parameter, verbatim; the rendered scripts never contain it
    odd = r"%SystemRoot%\$(calc)`x`;'q'\MEMORY.DMP"
    params = prepare.PrepareSettings(memory_mb=1024, dump_file=odd).parameters(run_id="r", mode="prepare", disk_lun=0)
    assert params["DumpFile"] == odd
    for os_name in ("windows", "linux"):
        assert "$(calc)" not in prepare.render_script(os_name)
