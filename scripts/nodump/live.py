"""`prepare-dump --live`: set the crash dump up on the RUNNING source VM, and `rollback --live` to undo it.

For a VM that crashes now and then but still boots, swapping disks is the wrong tool: the dump settings
go straight onto the running system, through a managed Run Command on the source VM
(scripts/remote/prepare_live.ps1.j2, Windows PowerShell 5.1; every value a parameter). The steps:

1. read: the current CrashControl values, PagingFiles, the RAM and the system drive's free space;
2. plan (here, in the kit): the values of scripts.nodump.prepare for the dump type - the same page file
   rule as the offline prepare (`choose_dump_target`: DedicatedDumpFile + DumpFileSize when the page file on
   the system volume cannot hold the dump) - plus AlwaysKeepMemoryDump 1 (Windows otherwise deletes
   MEMORY.DMP when the disk is low on space); each value old -> new;
3. manifest: the old value of every value the plan changes, locally and in evidence (create-only blobs, a
   new one per state: `live-manifest.json`, then `live-manifest.<n>-<state>.json`), BEFORE anything is written;
4. apply: the script sets the values only if they still are what step 1 read (else nothing is written),
   reads each back, and puts back what it already changed when a write fails midway;
5. report: Windows reads CrashControl when it boots, so any change needs a restart to take effect.

`restore` (rollback --live) puts every value the manifest names back to its old value (removing those that
were absent), refusing a value someone else changed since (neither crashcart's value nor the old one).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scripts import remote
from scripts.azure.runcommand import Answer, RemoteCommand, RunCommandRunner, ScriptFailed, run_for_answer
from scripts.base.errors import CrashcartError, ExitCode
from scripts.evidence import series
from scripts.nodump import prepare

log = logging.getLogger("crashcart.prepare")

TEMPLATE = "prepare_live.ps1.j2"
SCHEMA = "crashcart.live/1"
MANIFEST_NAME = "live-manifest.json"
KEY = r"HKLM\SYSTEM\CurrentControlSet\Control\CrashControl"
NAMES = ("CrashDumpEnabled", "DumpFile", "NMICrashDump", "AutoReboot", "Overwrite", "DedicatedDumpFile",
         "DumpFileSize", "AlwaysKeepMemoryDump")  # the values the script may touch (its $script:Names)
REBOOT_REASON = "Windows reads CrashControl when it boots: restart the VM for the new settings to take effect"
RESTORABLE = ("REG_DWORD", "REG_SZ", "REG_EXPAND_SZ")  # the types the script writes (and so can put back)
MANIFEST_HINT = "pass the live-manifest.json prepare-dump --live wrote (--manifest or --evidence-blob)"

Record = dict[str, Any] | None  # {type, value} as the script reports a registry value; None: absent


@functools.lru_cache(maxsize=1)
def render_script() -> str:
    """The live script. Takes no user value: those are Run Command parameters."""
    return remote.render_template(TEMPLATE)


def same(a: Record, b: Record) -> bool:
    """Two registry records hold the same value (a DWORD compared as a number)."""
    if a is None or b is None:
        return a is None and b is None
    if a.get("type") != b.get("type"):
        return False
    if a.get("type") == "REG_DWORD":
        return str(a.get("value")) == str(b.get("value"))
    return a.get("value", a.get("hex")) == b.get("value", b.get("hex"))


def shown(record: Record) -> str:
    return "(absent)" if record is None else str(record.get("value", record.get("hex", record)))


# ---- 1. what the VM holds -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LiveFacts:
    values: dict[str, Record]
    paging_files: list[str]
    memory_mb: int
    free_mb: int
    system_drive: str = "C:"
    os: str = ""

    @classmethod
    def from_result(cls, found: dict[str, Any]) -> "LiveFacts":
        facts = found.get("facts") or {}
        values = found.get("values") or {}
        return cls(values={n: values.get(n) for n in NAMES}, paging_files=[str(p) for p in facts.get("paging_files") or []],
                   memory_mb=int(facts.get("memory_mb") or 0), free_mb=int(facts.get("free_mb", -1)),
                   system_drive=str(facts.get("system_drive") or "C:"), os=str(facts.get("os") or ""))


# ---- 2. the plan ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    name: str
    old: Record
    new: Record

    @property
    def changed(self) -> bool:
        return not same(self.old, self.new)

    def to_dict(self) -> dict[str, Any]:
        return {"key": KEY, "name": self.name, "old": self.old, "new": self.new, "changed": self.changed}

    def line(self) -> str:
        return f"{KEY}\\{self.name}: {shown(self.old)} -> {shown(self.new)}"


@dataclass(frozen=True)
class LivePlan:
    changes: tuple[Change, ...]
    choice: prepare.DumpChoice
    settings: prepare.PrepareSettings

    @property
    def changed(self) -> list[Change]:
        return [c for c in self.changes if c.changed]

    @property
    def reboot_needed(self) -> bool:
        return bool(self.changed)

    def to_dict(self) -> dict[str, Any]:
        return {"dump_type": self.settings.dump_type_name, "memory_mb": self.settings.memory_mb,
                "page_file": dataclasses.asdict(self.choice), "changes": [c.to_dict() for c in self.changes],
                "reboot_needed": self.reboot_needed, "reboot_reason": REBOOT_REASON if self.reboot_needed else ""}


def plan(settings: prepare.PrepareSettings, facts: LiveFacts) -> LivePlan:
    """The values to set on the running VM for `settings`, given what it holds now. A dedicated dump file
    that does not fit on the system drive (with 256 MB to spare) is refused, as the offline prepare does."""
    choice = prepare.choose_dump_target(settings.dump_type, settings.memory_mb, facts.paging_files, settings.dedicated)
    if choice.dedicated and 0 <= facts.free_mb < choice.size_mb + 256:
        raise CrashcartError(
            f"the system drive {facts.system_drive} has {facts.free_mb} MB free: a {choice.size_mb} MB dedicated dump "
            "file (plus 256 MB to spare) does not fit; nothing was written",
            "free space on the VM's system drive (or grow its OS disk), or use a smaller --type, then re-run",
            ExitCode.COLLECT_FAILED)
    wanted = {**prepare.crash_control_values(settings, choice),
              "AlwaysKeepMemoryDump": {"type": "REG_DWORD", "value": 1}}
    the_plan = LivePlan(tuple(Change(name, facts.values.get(name), record) for name, record in wanted.items()),
                        choice, settings)
    odd = [f"{c.name} ({c.old.get('type')})" for c in the_plan.changed if c.old is not None and c.old.get("type") not in RESTORABLE]
    if odd:
        raise CrashcartError(f"CrashControl holds {', '.join(odd)}: a registry type crashcart could not put back, so "
                             "nothing was written", f"check {KEY} on the VM (Windows expects REG_DWORD / REG_SZ / "
                             "REG_EXPAND_SZ there) and fix it by hand", ExitCode.COLLECT_FAILED)
    return the_plan


# ---- 3. the manifest ----------------------------------------------------------------------------------------------
@dataclass
class LiveManifest(series.Tracked):
    source_vm_id: str
    run: str  # <vm key>/<stamp>
    old: dict[str, Record]  # every value crashcart changes, as it was
    new: dict[str, Record]  # and as crashcart sets it
    evidence_blob_endpoint: str = ""
    evidence_container: str = ""
    state: str = "ready"  # ready | applied | not_applied | restored | restore_failed
    reboot_needed: bool = False
    key: str = KEY
    schema: str = SCHEMA

    @classmethod
    def for_plan(cls, the_plan: LivePlan, *, vm_id: str, run: str, out_dir: Path, blob_endpoint: str,
                 container: str) -> "LiveManifest":
        changed = the_plan.changed
        manifest = cls(source_vm_id=vm_id, run=run, old={c.name: c.old for c in changed},
                       new={c.name: c.new for c in changed}, evidence_blob_endpoint=blob_endpoint,
                       evidence_container=container, created_at=series.now(), local_path=str(out_dir / MANIFEST_NAME),
                       evidence_blob=f"{run}/{MANIFEST_NAME}")
        manifest.mark("ready", f"{len(changed)} value(s) to change")
        return manifest

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "LiveManifest":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise CrashcartError(f"{where} is not a crashcart live manifest ({SCHEMA})", MANIFEST_HINT, ExitCode.USAGE)
        if not data.get("source_vm_id") or not isinstance(data.get("old"), dict) or not isinstance(data.get("new"), dict):
            raise CrashcartError(f"{where} lacks source_vm_id, old or new", MANIFEST_HINT, ExitCode.USAGE)
        unknown = sorted(set(data["old"]) - set(NAMES))
        if unknown:
            raise CrashcartError(f"{where} names values crashcart never sets: {', '.join(unknown)}", MANIFEST_HINT,
                                 ExitCode.USAGE)
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Stored as a series (scripts.evidence.series): locally rewritten in place; in evidence a new create-only blob
# per state, the first under MANIFEST_NAME, each later one beside it numbered in the order written. With
# `require_evidence`, save raises on a failed upload (before the apply: nothing is written without both copies).
SERIES = series.Series(MANIFEST_NAME, "live manifest", MANIFEST_HINT, "the VM", LiveManifest.from_dict,
                       logger=log.name)
save, load_local, newest_local = SERIES.save, SERIES.load_local, SERIES.newest_local
load_from_evidence = SERIES.load_newest  # (container, blob, out_dir): the newest state of a run's live manifest


# ---- the script on the VM ---------------------------------------------------------------------------------------
class LiveFailed(ScriptFailed):
    """The live script answered, but not as hoped; `remote_result` is what it said."""

    @property
    def restored(self) -> bool:
        """The script put back what it had changed (or changed nothing)."""
        return self.remote_result.get("status") == "changed" or self.remote_result.get("restored") is True


def run_script(runner: RunCommandRunner, *, mode: str, run_id: str, timeout_s: int, values: dict[str, Record] | None = None,
               remove: list[str] | None = None, expect: dict[str, Record] | None = None) -> dict[str, Any]:
    """One run of the live script on the source VM; its result, or LiveFailed / CrashcartError."""
    command = RemoteCommand(
        name=f"crashcart-live-{mode}-{run_id.lower()}", script=render_script(), timeout_s=timeout_s,
        parameters={"Mode": mode, "RunId": run_id, "Values": json.dumps(values or {}),
                    # records as the script read them, in its key order: it compares them as JSON text
                    "Remove": json.dumps(remove or []), "Expect": json.dumps(expect or {})})
    vm = runner.vm_name
    answer = Answer(parse=lambda text: remote.parse_marked(text, remote.RESULT_MARKER),
                    ran=f"the live script ({mode}) on {vm}", unfinished=f"the live script ({mode}) on {vm}",
                    timeout_hint="check the VM's agent and Run Command extension in the portal; re-run",
                    failure_hint="check the VM's Run Command extension status in the portal; re-run")
    found, execution = run_for_answer(runner, command, answer, what=f"source VM {vm}",
                           doing=f"run the live prepare script ({mode}) on source VM {vm}")
    if found.get("status") not in ("read", "applied"):
        status = found.get("status")
        hint = ("nothing was written: re-run to plan from the current values" if status == "changed"
                else "bad parameters: please report this with the log" if execution.exit_code == 2
                else "see the message; `pipenv run rollback --live` puts back what the manifest names")
        raise LiveFailed(f"the live script ({mode}) on {vm} said {status}: {found.get('message', '')}", hint,
                         ExitCode.COLLECT_FAILED, found)
    return found


def read(runner: RunCommandRunner, *, run_id: str, timeout_s: int) -> LiveFacts:
    return LiveFacts.from_result(run_script(runner, mode="read", run_id=run_id, timeout_s=timeout_s))


def apply(runner: RunCommandRunner, the_plan: LivePlan, *, run_id: str, timeout_s: int) -> dict[str, Any]:
    """Writes the planned changes, provided the VM still holds what the plan was made from."""
    changed = the_plan.changed
    return run_script(runner, mode="prepare", run_id=run_id, timeout_s=timeout_s,
                      values={c.name: c.new for c in changed}, expect={c.name: c.old for c in changed})


@dataclass
class RestoreOutcome:
    restored: list[str] = field(default_factory=list)  # lines "name: now -> old"
    already: list[str] = field(default_factory=list)

    @property
    def reboot_needed(self) -> bool:
        return bool(self.restored)

    def to_dict(self) -> dict[str, Any]:
        return {"restored": self.restored, "already_as_before": self.already, "reboot_needed": self.reboot_needed,
                "reboot_reason": REBOOT_REASON if self.reboot_needed else ""}


def restore(runner: RunCommandRunner, manifest: LiveManifest, *, run_id: str, timeout_s: int) -> RestoreOutcome:
    """Puts back the old values the manifest names (idempotent). A value that is neither crashcart's nor the
    old one was changed by someone else since: refused, and nothing is written."""
    facts = read(runner, run_id=run_id, timeout_s=timeout_s)
    outcome, values, remove, expect, foreign = RestoreOutcome(), {}, [], {}, []
    for name, old in manifest.old.items():
        now = facts.values.get(name)
        if same(now, old):
            outcome.already.append(name)
        elif same(now, manifest.new.get(name)):
            expect[name] = now
            outcome.restored.append(f"{KEY}\\{name}: {shown(now)} -> {shown(old)}")
            if old is None:
                remove.append(name)
            else:
                values[name] = old
        else:
            foreign.append(f"{name} is {shown(now)} (crashcart set {shown(manifest.new.get(name))}, it was {shown(old)})")
    if foreign:
        raise CrashcartError("someone changed CrashControl after crashcart: " + "; ".join(foreign) + "; nothing was "
                             "restored", f"set the values by hand ({KEY}) if the old ones are wanted, see "
                             f"{manifest.local_path}", ExitCode.USAGE)
    if values or remove:
        run_script(runner, mode="prepare", run_id=run_id, timeout_s=timeout_s, values=values, remove=remove,
                   expect=expect)
    return outcome
