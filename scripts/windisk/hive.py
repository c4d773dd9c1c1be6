"""CrashControl of the broken Windows, read from the offline SYSTEM hive (dissect.regf).

Where Windows writes its crash dump is configuration, not a fixed path: Select\\Current names the current
control set, and its Control\\CrashControl holds DumpFile, MinidumpDir, CrashDumpEnabled and
DedicatedDumpFile, while Control\\Session Manager\\Memory Management holds PagingFiles (a dump is first
written into the page file). These are the same fields the rescue VM's scripts report, in the same shape
(`CrashSettings.to_dict`), so a report reads the same whichever strategy collected the dump.

The hive is read as last flushed: a SYSTEM hive whose transaction logs were not replayed (the VM stopped
mid-write) is said so in the notes, not refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from scripts.base.errors import ExitCode, first_line
from scripts.windisk.disk import SYSTEM_HIVE, Volume
from scripts.windisk.errors import ExtractError, damaged
from scripts.windisk.ntfspath import find


@dataclass(frozen=True)
class CrashSettings:
    control_set: str
    dump_file: str
    minidump_dir: str
    dedicated_dump_file: str
    crash_dump_enabled: int | None
    paging_files: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The same shape as the rescue VM's script reports (`crash_control`)."""
        return {"control_set": self.control_set, "DumpFile": self.dump_file,
                "CrashDumpEnabled": self.crash_dump_enabled, "MinidumpDir": self.minidump_dir,
                "DedicatedDumpFile": self.dedicated_dump_file, "PagingFiles": ";".join(self.paging_files)}


def read_crash_control(volume: Volume) -> tuple[CrashSettings, list[str]]:
    """CrashControl of the current control set (Select\\Current), read from the offline SYSTEM hive."""
    from dissect.regf import RegistryHive

    for name in ("dissect.regf", "dissect.ntfs", "dissect.volume"):  # their warnings are ours to phrase
        logging.getLogger(name).setLevel(logging.ERROR)
    notes: list[str] = []
    try:
        hive = RegistryHive(find(volume.ntfs, SYSTEM_HIVE).open())
    except damaged() as err:
        raise ExtractError(f"the SYSTEM hive on the Windows volume cannot be read: {first_line(err)}",
                           "the hive may be damaged; try repair.strategy = \"rescue-vm\"",
                           ExitCode.COLLECT_FAILED) from None
    if hive.header.Sequence1 != hive.header.Sequence2:
        notes.append("the SYSTEM hive was being written when the VM stopped (its transaction logs were not "
                     "replayed): CrashControl is read as last flushed")

    def value(path: str, name: str) -> Any:
        try:
            return hive.open(path).value(name).value
        except damaged():  # RegistryKeyNotFoundError / RegistryValueNotFoundError, or a damaged cell
            return None

    current = value("Select", "Current")
    if not isinstance(current, int) or current <= 0:
        notes.append("SYSTEM hive has no Select\\Current; assuming ControlSet001")
        current = 1
    control_set = f"ControlSet{current:03d}"
    base = f"{control_set}\\Control\\CrashControl"
    enabled = value(base, "CrashDumpEnabled")
    paging = value(f"{control_set}\\Control\\Session Manager\\Memory Management", "PagingFiles")
    if isinstance(paging, str):
        paging = [paging]
    elif not isinstance(paging, list):  # absent, or a value of the wrong type
        paging = []
    settings = CrashSettings(
        control_set=control_set,
        dump_file=_text(value(base, "DumpFile")),
        minidump_dir=_text(value(base, "MinidumpDir")),
        dedicated_dump_file=_text(value(base, "DedicatedDumpFile")),
        crash_dump_enabled=enabled if isinstance(enabled, int) else None,
        paging_files=[p for p in (paging or []) if isinstance(p, str) and p],
    )
    if settings.crash_dump_enabled == 0:
        notes.append("CrashDumpEnabled is 0 on the broken VM: Windows was set to write no dump")
    notes += _paging_notes(settings.paging_files)
    return settings, notes


def _text(value: Any) -> str:
    return value.strip("\0").strip() if isinstance(value, str) else ""


def _paging_notes(entries: list[str]) -> list[str]:
    """What a page file on another drive means for the crash data: on Azure, D: is the temporary disk."""
    notes = []
    for entry in entries:
        drive = entry[:2].upper()
        if len(drive) == 2 and drive[1] == ":" and drive[0].isalpha() and drive != "C:":
            notes.append(f"the page file is configured on {drive} ({entry.split(' ')[0]}), not on the OS disk: on "
                         "Azure that is usually the temporary disk, which does not survive a stop/redeploy and is "
                         "not part of the snapshot, so any crash data written to it is gone")
        elif drive == "?:":
            notes.append(f"the page file is system-managed on any drive ({entry.split(' ')[0]}): if Windows placed "
                         "it on the temporary disk, crash data written there is gone")
    return notes
