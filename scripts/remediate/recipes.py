"""`fix`'s recipes: what each one changes on the disk copy, its parameters, and its undo.

A recipe runs on the rescue VM as one Run Command (scripts/remote/fix.sh.j2 on a Linux rescue VM,
fix.ps1.j2 on a Windows one); every value reaches the script as a parameter, never as text of the script.
The script answers with every change it made, old and new, which is what the fix manifest records and
what the undo is made from (`undo_parameters`):

- disable-driver NAME: Services\\NAME\\Start = 4 in every control set of the SYSTEM hive; refused for a
  boot-critical driver (Start 0, a boot group, or BOOT_CRITICAL) unless forced. Undo: each Start back.
- remove-file GLOB: the matching files moved (never deleted) to \\crashcart-quarantine\\<run>\\ on the same
  volume, with their SHA-256. Undo: moved back.
- safe-mode: minimal safe mode for ONE boot, as bcdedit /copy {default}, /set {copy} safeboot minimal and
  /bootsequence {copy} do: a copy of the default entry ("crashcart safe mode (once)", safeboot 0x25000080 =
  0) named by the boot manager's one-time boot sequence (0x24000002); {default} is untouched, so the boot
  after it is the normal one (element types: Microsoft's BcdBootMgrElementTypes / BcdOSLoaderElementTypes;
  semantics: "BCDEdit /bootsequence"). A rerun finds its entry by that description. The persistent form
  ({default} safeboot, which stays until undone) is gone. Undo: the copy deleted, the boot sequence put back.
- last-known-good: Select\\Default and Current = Select\\LastKnownGood. Undo: both back.
- revert-pending: DISM /Image /Cleanup-Image /RevertPendingActions (Windows rescue VM only). Undo: none
  (DISM reverts pending actions; there is nothing to put back), said so in the manifest.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from scripts import remote
from scripts.base.errors import CrashcartError, ExitCode
from scripts.remote import winpaths

RECIPES = ("disable-driver", "remove-file", "safe-mode", "last-known-good", "revert-pending")
TEMPLATES = {"windows": "fix.ps1.j2", "linux": "fix.sh.j2"}
DONE = ("applied", "planned")  # the remote statuses of success (apply; plan = --dry-run)

# Drivers Windows needs to reach the desktop on an Azure VM: disabling one turns a crash into a VM that
# cannot find its disk (INACCESSIBLE_BOOT_DEVICE) or cannot start at all. Start 0 (boot) and the boot groups
# are refused as well; --force overrides all three.
BOOT_CRITICAL = (
    "acpi", "acpiex", "atapi", "cng", "disk", "ehstorclass", "fltmgr", "fvevol", "hyperkbd", "intelide", "ksecdd",
    "ksecpkg", "mountmgr", "msisadrv", "mup", "ndis", "netvsc", "ntfs", "partmgr", "pci", "pciide", "pcw", "pdc",
    "refs", "spaceport", "storahci", "stornvme", "storvsc", "storflt", "tcpip", "tpm", "vdrvroot", "vmbus",
    "vmbusr", "vmgid", "volmgr", "volmgrx", "volsnap", "volume", "wdf01000", "wdfldr", "wof", "clfs", "cldflt",
)
BOOT_GROUPS = ("Boot Bus Extender", "System Bus Extender", "SCSI miniport", "Boot File System", "Core", "Filter",
               "Base", "FSFilter Infrastructure", "FSFilter Bottom", "Cryptography")
# files remove-file refuses to quarantine without --force (relative to the system volume, '/'-separated)
PROTECTED_FILES = ("Windows/System32/ntoskrnl.exe", "Windows/System32/hal.dll", "Windows/System32/winload.exe",
                   "Windows/System32/winload.efi", "Windows/System32/ci.dll", "bootmgr",
                   "Windows/System32/drivers/disk.sys", "Windows/System32/drivers/storvsc.sys",
                   "Windows/System32/drivers/ntfs.sys", "Windows/System32/drivers/vmbus.sys")

_DRIVER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
_GLOB_FORBIDDEN = set('"<>|:/') | {chr(c) for c in range(32)}


def usage(message: str, hint: str) -> CrashcartError:
    return CrashcartError(message, hint, ExitCode.USAGE)


@dataclass(frozen=True)
class Recipe:
    """One recipe and its argument: `driver` for disable-driver, `pattern` for remove-file."""

    name: str
    driver: str = ""
    pattern: str = ""
    force: bool = False

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise usage(f"unknown fix recipe {self.name!r}", f"use one of: {', '.join(RECIPES)}")
        if self.name == "disable-driver":
            check_driver(self.driver)
        if self.name == "remove-file":
            object.__setattr__(self, "pattern", check_pattern(self.pattern))

    @property
    def label(self) -> str:
        return f"{self.name} {self.driver or self.pattern}".strip()

    @property
    def boot_critical(self) -> bool:
        return self.name == "disable-driver" and normal_driver(self.driver) in BOOT_CRITICAL

    def parameters(self, *, run_id: str, mode: str, disk_lun: int | None) -> dict[str, str]:
        params = {"Recipe": self.name, "Action": "apply", "Mode": mode, "Force": str(int(self.force)), "RunId": run_id}
        if self.driver:
            params["Driver"] = self.driver
        if self.pattern:
            params["Pattern"] = self.pattern
        if disk_lun is not None:
            params["DiskLun"] = str(disk_lun)
        return params

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "driver": self.driver or None, "pattern": self.pattern or None, "force": self.force}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        return cls(str(data.get("name", "")), driver=str(data.get("driver") or ""),
                   pattern=str(data.get("pattern") or ""), force=bool(data.get("force")))


def normal_driver(name: str) -> str:
    """A driver as triage names its file (csagent.sys) or as its service key is named (CSAgent)."""
    base = name.rsplit("\\", 1)[-1]
    return (base[:-4] if base.lower().endswith(".sys") else base).lower()


def check_driver(name: str) -> None:
    if not _DRIVER.fullmatch(name or ""):
        raise usage(f"driver name {name!r} is not a service name",
                    "give the service key's name (letters, digits, '_', '.', '-'), e.g. csagent; "
                    "or use --from-triage")


def check_pattern(pattern: str) -> str:
    """A file pattern on the system volume: C:\\ (or %SystemRoot%\\) folder, then a file name with * or ?.
    A pattern without a prefix is taken as relative to C:\\. Returned in the form the scripts take."""
    text = (pattern or "").replace("/", "\\")
    other_drive = re.match(r"[A-Za-z]:", text) is not None and winpaths.split(text) is None
    if text and winpaths.split(text) is None and not other_drive:
        text = "C:\\" + text.lstrip("\\")
    folder, _, name = text.rpartition("\\")
    problem = None
    if other_drive:
        problem = "is not on the system volume (C:): the disk copy holds only the OS disk"
    elif not text or len(text) > 240 or not folder or name in ("", ".", ".."):
        problem = "must be a folder and a file name"
    elif ":" in text[2:] or set(text) & (_GLOB_FORBIDDEN - {":"}) or set(name) & _GLOB_FORBIDDEN:
        problem = "holds characters a Windows path cannot"
    elif set(folder) & set("*?"):
        problem = "may have wildcards (* ?) in the file name only"
    elif winpaths.volume_path(folder + "\\") is None:
        problem = "is not on the system volume (or climbs out with '..')"
    if problem:
        raise usage(f"remove-file pattern {pattern!r} {problem}",
                    r"e.g. 'Windows\System32\drivers\CrowdStrike\C-00000291*.sys' (C:\ is the broken VM's system volume)")
    return text


def parse(spec: str, *, force: bool = False) -> Recipe:
    """`disable-driver:NAME`, `remove-file:GLOB`, `safe-mode`, ... (repair-run's --fix form)."""
    name, _, arg = spec.partition(":")
    if name == "disable-driver":
        return Recipe(name, driver=arg, force=force)
    if name == "remove-file":
        return Recipe(name, pattern=arg, force=force)
    if arg:
        raise usage(f"fix recipe {name!r} takes no argument (got {arg!r})", f"use --fix {name}")
    return Recipe(name, force=force)


@functools.lru_cache(maxsize=2)
def render_script(os_name: str) -> str:
    """The fix script for the rescue VM's OS; its context is kit constants only (no user value)."""
    if os_name not in TEMPLATES:
        raise ValueError(f"no fix script for rescue OS {os_name!r}: expected one of {sorted(TEMPLATES)}")
    return remote.render_template(TEMPLATES[os_name], boot_critical=BOOT_CRITICAL, boot_groups=BOOT_GROUPS,
                                  protected_files=PROTECTED_FILES)


# ---- undo -----------------------------------------------------------------------------------------------------
def undo_parameters(recipe: Recipe, result: dict[str, Any], *, run_id: str, disk_lun: int | None) -> dict[str, str] | None:
    """The parameters that put back what `result` (the script's answer to applying `recipe`) changed; None
    when nothing changed or the recipe has no undo (revert-pending)."""
    changes = [c for c in result.get("changes") or [] if c.get("changed")]
    params = {"Recipe": recipe.name, "Action": "undo", "Mode": "apply", "Force": "1", "RunId": run_id}
    if disk_lun is not None:
        params["DiskLun"] = str(disk_lun)
    if recipe.name == "disable-driver":
        pairs = [f"{c['key'].split(chr(92))[0]}={_number(c.get('old'))}" for c in changes
                 if _number(c.get("old")) is not None]
        return {**params, "Driver": recipe.driver, "StartValues": ",".join(pairs)} if pairs else None
    if recipe.name == "last-known-good":
        old = {c["name"]: _number(c.get("old")) for c in changes}
        if not changes or None in old.values():
            return None
        current = old.get("Current", result.get("select", {}).get("Current"))
        default = old.get("Default", current)
        return {**params, "SelectValues": f"Current={current},Default={default}"}
    if recipe.name == "safe-mode":
        entry = [c for c in changes if c.get("name") == "entry" and c.get("old") is None]
        sequence = [c for c in changes if str(c.get("key", "")).endswith("\\Elements\\24000002")]
        if not entry and not sequence:
            return None
        if entry:
            params["SafeModeEntry"] = str(entry[0]["key"]).rsplit("\\", 1)[-1]
        if sequence:
            params["OldBootSequence"] = ",".join(_guids(sequence[0].get("old"))) or "absent"
        return params
    if recipe.name == "remove-file":
        moved = [f for f in result.get("files") or [] if f.get("moved")]
        return {**params, "Pattern": recipe.pattern, "QuarantineId": str(result.get("run_id"))} if moved else None
    return None


def _guids(record: Any) -> list[str]:
    """The GUIDs of a REG_MULTI_SZ record: as text (the PowerShell script) or as hex bytes (the bash one)."""
    if not isinstance(record, dict):
        return []
    if isinstance(record.get("value"), list):
        return [str(v) for v in record["value"] if v]
    try:
        text = bytes.fromhex(str(record.get("hex") or "").replace(",", "")).decode("utf-16-le")
    except ValueError:
        return []
    return [part for part in text.split("\0") if part]


def _number(record: Any) -> int | None:
    if isinstance(record, dict) and isinstance(record.get("value"), int):
        return int(record["value"])
    return None
