"""`prepare-dump`, step 2: configure the crash dump on the disk copy (never on the source VM's disk).

Microsoft's article ends with "if you cannot find Memory.dmp, generate one with an NMI": configure the
crash dump on the disk, boot it, make it crash, and collect the dump. This module is the first part:
on the rescue VM, as a managed Run Command (scripts/remote/prepare.*.j2, every value a parameter), the
disk copy gets CrashDumpEnabled (kernel 2 by default; complete 1, automatic 7), DumpFile
%SystemRoot%\\MEMORY.DMP, NMICrashDump 1, AutoReboot (0 by default: the VM stays on the stop screen once
the dump is written, so the next crash of the loop cannot overwrite it), Overwrite 1, a
DedicatedDumpFile when the system volume's page file is too small (complete: RAM + 257 MB), and EMS in
the BCD store for the serial console. The script answers with the old and new values.

The swap, trigger and rollback are scripts.nodump.swap / .rollback; the verb's flow is
scripts.run.prepare_dump.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from scripts import remote
from scripts.azure import runcommand
from scripts.azure.runcommand import Answer, RemoteCommand, RunCommandRunner, run_for_answer, show_agent_wait
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.stop import StopRequest
from scripts.config.stackoutputs import RepairOutputs
from scripts.evidence import blobs as evidence
from scripts.remote.winpaths import DEDICATED_DUMP_FILE, DEFAULT_DUMP_FILE, file_path, parameter_path

log = logging.getLogger("crashcart.prepare")

DUMP_TYPES = {"kernel": 2, "complete": 1, "automatic": 7}
TEMPLATES = {"windows": "prepare.ps1.j2", "linux": "prepare.sh.j2"}
PREPARED = ("prepared", "planned")  # the remote statuses of success (prepare; inspect = --dry-run)
PREPARE_TIMEOUT_MINUTES = 20


# ---- settings -------------------------------------------------------------------------------------------------
def check_windows_path(name: str, value: str) -> None:
    """Refused here, before any VM is touched, by the rule the remote scripts apply again
    (scripts.remote.winpaths.parameter_path): a file on the broken system volume, plain characters."""
    if parameter_path(value) is None:
        raise CrashcartError(f"{name} {value!r} is not a file path on the system volume",
                             r"use %SystemRoot%\..., %SystemDrive%\... or C:\... (4-240 characters, no \" * ? < > |)",
                             ExitCode.USAGE)


@dataclass(frozen=True)
class PrepareSettings:
    """What the remote script writes; each field becomes one Run Command parameter."""

    dump_type: int = 2
    memory_mb: int = 0
    dump_file: str = DEFAULT_DUMP_FILE
    auto_reboot: bool = False
    nmi_crash_dump: bool = True
    overwrite: bool = True
    dedicated: str = "auto"  # auto | always | never
    dedicated_file: str = DEDICATED_DUMP_FILE
    ems: bool = True
    ems_port: int = 1
    ems_baud_rate: int = 115200
    allow_dirty_hive: bool = False

    def __post_init__(self) -> None:
        if self.dump_type not in DUMP_TYPES.values():
            raise CrashcartError(f"dump type {self.dump_type} is not 1, 2 or 7", "use --type kernel|complete|automatic",
                                 ExitCode.USAGE)
        if self.memory_mb <= 0:
            raise CrashcartError(
                "the VM's RAM is unknown (source.memory_gb = 0): the page file and dedicated dump file cannot be sized",
                "re-run `pipenv run discover --vm <id>` (it reads the VM size's RAM), set source.memory_gb, or pass "
                "--memory-gb", ExitCode.USAGE)
        if self.dedicated not in ("auto", "always", "never"):
            raise CrashcartError(f"--dedicated-dump {self.dedicated!r}", "use auto, always or never", ExitCode.USAGE)
        check_windows_path("--dump-file", self.dump_file)
        check_windows_path("--dedicated-dump-file", self.dedicated_file)

    @property
    def dump_type_name(self) -> str:
        return {v: k for k, v in DUMP_TYPES.items()}[self.dump_type]

    def parameters(self, *, run_id: str, mode: str, disk_lun: int | None) -> dict[str, str]:
        params = {
            "Mode": mode, "CrashDumpEnabled": str(self.dump_type), "DumpFile": self.dump_file,
            "AutoReboot": str(int(self.auto_reboot)), "NmiCrashDump": str(int(self.nmi_crash_dump)),
            "Overwrite": str(int(self.overwrite)), "MemoryMB": str(self.memory_mb), "DedicatedDump": self.dedicated,
            "DedicatedDumpFile": self.dedicated_file, "EnableEms": str(int(self.ems)), "EmsPort": str(self.ems_port),
            "EmsBaudRate": str(self.ems_baud_rate), "AllowDirtyHive": str(int(self.allow_dirty_hive)), "RunId": run_id,
        }
        if disk_lun is not None:
            params["DiskLun"] = str(disk_lun)
        return params


# ---- what to set for a dump type, given the RAM and the page file (offline and live) ---------------------------
def required_mb(dump_type: int, memory_mb: int) -> int:
    """How much room the dump needs, in MB: a complete dump RAM + 257 MB, a kernel or automatic dump about a
    third of RAM + 257 MB (the page file or dedicated dump file sizes Microsoft gives); 0 when RAM is unknown."""
    if memory_mb <= 0:
        return 0
    return memory_mb + 257 if dump_type == 1 else (memory_mb + 2) // 3 + 257


@dataclass(frozen=True)
class DumpChoice:
    """Where Windows can write the dump: the page file on the system volume when it is large enough,
    else (or always, with --dedicated-dump always) a DedicatedDumpFile of `size_mb`."""

    required_mb: int
    system_entry: str | None  # the PagingFiles entry on the system volume, if any
    system_managed: bool
    initial_mb: int  # -1: no page file on the system volume; 0: system-managed
    sufficient: bool
    dedicated: bool
    size_mb: int  # the DumpFileSize of the dedicated dump file (0 without one)
    notes: tuple[str, ...] = ()


def choose_dump_target(dump_type: int, memory_mb: int, paging_files: list[str], dedicated: str) -> DumpChoice:
    """The page file rule of prepare-dump, one place for the live kit (scripts.nodump.live); the offline
    scripts apply the same rule to the disk copy's hive (Get-PageFilePlan / plan_pagefile in
    scripts/remote/prepare.*.j2). A system-managed page file grows to hold a kernel or automatic dump, not
    a complete one; a sized one must start at `required_mb`."""
    required = required_mb(dump_type, memory_mb)
    entries = [str(e) for e in paging_files if str(e).strip()]
    system_entry, initial, managed = None, -1, False
    for entry in entries:
        parts = entry.split()
        if parts and file_path(parts[0]) is not None:
            system_entry = entry
            sized = len(parts) >= 2 and parts[1].isascii() and parts[1].isdigit() and len(parts[1]) <= 9
            managed = not sized or int(parts[1]) == 0
            initial = 0 if managed else int(parts[1])
            break
    sufficient = system_entry is not None and (dump_type != 1 if managed else 0 < required <= initial)
    use_dedicated = dedicated == "always" or (dedicated == "auto" and not sufficient)
    notes = []
    if system_entry is None:
        notes.append("no page file is configured on the system volume (PagingFiles: " + "; ".join(entries)
                     + "): Windows writes the dump into a page file on the boot volume or a dedicated dump file")
    elif not sufficient:
        notes.append(f"the page file on the system volume ({system_entry}) is too small for this dump type with "
                     f"{memory_mb} MB of RAM (needs {required} MB)")
    size = (required or memory_mb + 257) if use_dedicated else 0
    return DumpChoice(required, system_entry, managed, initial, sufficient, use_dedicated, size, tuple(notes))


def crash_control_values(settings: PrepareSettings, choice: DumpChoice) -> dict[str, dict[str, Any]]:
    """The CrashControl values prepare-dump writes for `settings`, as registry records {type, value}."""
    values: dict[str, dict[str, Any]] = {
        "CrashDumpEnabled": {"type": "REG_DWORD", "value": settings.dump_type},
        "DumpFile": {"type": "REG_EXPAND_SZ", "value": settings.dump_file},
        "NMICrashDump": {"type": "REG_DWORD", "value": int(settings.nmi_crash_dump)},
        "AutoReboot": {"type": "REG_DWORD", "value": int(settings.auto_reboot)},
        "Overwrite": {"type": "REG_DWORD", "value": int(settings.overwrite)},
    }
    if choice.dedicated:
        values["DedicatedDumpFile"] = {"type": "REG_SZ", "value": settings.dedicated_file}
        values["DumpFileSize"] = {"type": "REG_DWORD", "value": choice.size_mb}
    return values


@functools.lru_cache(maxsize=1)
def render_script(os_name: str) -> str:
    """The prepare script for the rescue VM's OS. Takes no user value: those are Run Command parameters."""
    if os_name not in TEMPLATES:
        raise ValueError(f"no prepare script for rescue OS {os_name!r}: expected one of {sorted(TEMPLATES)}")
    return remote.render_template(TEMPLATES[os_name])


# ---- the remote preparation -------------------------------------------------------------------------------------
@dataclass
class Timing(runcommand.Timing):
    timeout_s: int = PREPARE_TIMEOUT_MINUTES * 60


class PrepareFailed(runcommand.ScriptFailed):
    """The script ran and answered, but did not prepare the copy; `remote_result` is what it said."""


def prepare_disk(compute: Any, container: Any, outputs: RepairOutputs, settings: PrepareSettings, *, prefix: str,
                 run_id: str, inspect: bool, timing: Timing, stop: StopRequest | None = None) -> dict[str, Any]:
    """Runs the prepare script on the rescue VM against the disk copy; returns its result (old and new
    values). Raises CrashcartError unless it says prepared (or planned, with `inspect`)."""
    rg, name = outputs.rescue_vm
    runner = RunCommandRunner(compute, rg, name, poll_s=timing.poll_s, stop=stop)
    show_agent_wait(runner, timing.agent_wait_s, f"rescue VM {name}")
    output_blob, error_blob = f"{prefix}/prepare/runcommand/output.log", f"{prefix}/prepare/runcommand/error.log"
    command = RemoteCommand(
        name=f"crashcart-prepare-{run_id.lower()}", script=render_script(outputs.rescue_os),
        parameters=settings.parameters(run_id=run_id, mode="inspect" if inspect else "prepare",
                                       disk_lun=outputs.disk_copy_lun),
        timeout_s=timing.timeout_s, output_blob_uri=outputs.blob_url(output_blob),
        error_blob_uri=outputs.blob_url(error_blob))
    answer = Answer(
        parse=lambda text: remote.parse_marked(text, remote.RESULT_MARKER), ran="the prepare run command",
        unfinished="preparing the disk copy",
        timeout_hint=f"see {error_blob} in the evidence container; re-run prepare-dump (it is idempotent)",
        failure_hint=f"see {error_blob} in the evidence container and the rescue VM's extension status",
        read_log=lambda: evidence.read_tail(container, output_blob), log_name=output_blob)
    # the runner translates what it knows; a dropped connection while creating is an Azure error too
    found, _ = run_for_answer(runner, command, answer, what=f"rescue VM {name}",
                              doing=f"run the prepare script on rescue VM {name}", shown=f"prepare on {name}",
                              step_text=f"{'inspect' if inspect else 'prepare'} the disk copy on {name} "
                                        f"(run command {command.name})")
    status = str(found.get("status", "error"))
    if status not in PREPARED:
        raise _not_prepared(status, found, outputs, name, error_blob)
    return found


def _not_prepared(status: str, found: dict[str, Any], outputs: RepairOutputs, rescue_name: str,
                  error_blob: str) -> PrepareFailed:
    """What a refusal or failure of the prepare script means for the operator. The copy missing is the
    same outcome (exit code) as for a collection; anything else is the remote side's failure."""
    if status == "disk_not_found":
        return PrepareFailed(f"the disk copy was not prepared ({status}): {found.get('message', '')}",
                             f"check that the disk copy is attached to {rescue_name} at LUN {outputs.disk_copy_lun}; "
                             "an encrypted OS disk (BitLocker/ADE) must be unlocked first",
                             ExitCode.DISK_NOT_FOUND, found)
    hint = ("nothing was written to the disk copy; follow the message, then re-run prepare-dump" if status == "refused"
            else f"see {error_blob} in the evidence container and re-run prepare-dump")
    return PrepareFailed(f"the disk copy was not prepared ({status}): {found.get('message', '')}", hint,
                         ExitCode.COLLECT_FAILED, found)


def changed_values(remote_result: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in remote_result.get("changes") or [] if c.get("changed")]


def shown(record: Any) -> str:
    """A registry value as the log shows it (old -> new)."""
    if not record:
        return "(absent)"
    return str(record.get("value", record.get("hex", record)))
