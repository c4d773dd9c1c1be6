"""The running source VM of `prepare-dump --live` in the ARM double: its agent, and its CrashControl registry
as scripts/remote/prepare_live.ps1.j2 sees it.

There is no PowerShell here, so the script cannot run; what the double's Run Command "does" on this VM is
the script's contract played by `LiveVm.run` (a Scripted effect): the same parameters (Mode, Values, Remove,
Expect, RunId, JSON as the kit sends them), the same checks (only the CrashControl names the script knows,
REG_DWORD/REG_SZ/REG_EXPAND_SZ, compare-and-set against Expect), the same result line and exit codes
(read/applied 0, changed 12, error 1 with `restored`, bad parameter 2). The script itself is held to
Windows PowerShell 5.1 by tests/remote (parse, cmdlet signatures, lint).

    vm = add_broken_vm(double)
    state = install_live_vm(double, vm.vm_id, paging_files=[r"D:\\pagefile.sys 0 0"], memory_mb=16384)
    install_run_commands(double, state.outcome)

`fail_after=n` makes the n+1-th registry write fail, once (the script then puts back what it wrote);
`restore_fails` makes that putting back fail too; `meanwhile(state)` changes the VM between the
read and the apply's compare; `on_apply(state)` runs as an apply starts (a test's
moment to look at what the kit had stored before). `calls` keeps every run's parameters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scripts.devkit import arm_compute
from scripts.devkit.armdouble import ArmDouble, Request, Response

NAMES = ("CrashDumpEnabled", "DumpFile", "NMICrashDump", "AutoReboot", "Overwrite", "DedicatedDumpFile",
         "DumpFileSize", "AlwaysKeepMemoryDump")
TYPES = ("REG_DWORD", "REG_SZ", "REG_EXPAND_SZ")

# CrashControl as a fresh Azure Windows Server image has it (automatic memory dump, page file on D:)
AZURE_DEFAULT = {"CrashDumpEnabled": {"type": "REG_DWORD", "value": 7},
                 "DumpFile": {"type": "REG_EXPAND_SZ", "value": r"%SystemRoot%\MEMORY.DMP"},
                 "AutoReboot": {"type": "REG_DWORD", "value": 1}, "Overwrite": {"type": "REG_DWORD", "value": 1}}


class _WriteFailed(Exception):
    pass


@dataclass
class LiveVm:
    vm_id: str
    values: dict[str, dict[str, Any]] = field(default_factory=lambda: json.loads(json.dumps(AZURE_DEFAULT)))
    paging_files: list[str] = field(default_factory=lambda: [r"D:\pagefile.sys 0 0"])
    memory_mb: int = 16384
    free_mb: int = 100_000
    os: str = "Microsoft Windows Server 2022 Datacenter"
    agent: list[str] = field(default_factory=lambda: ["Ready"])
    fail_after: int | None = None
    restore_fails: bool = False
    on_apply: Callable[["LiveVm"], None] | None = None
    meanwhile: Callable[["LiveVm"], None] | None = None  # runs before an apply compares (someone else's change)
    calls: list[dict[str, str]] = field(default_factory=list)
    writes: int = 0
    instance_view_reads: int = 0

    def outcome(self) -> arm_compute.Outcome:
        """One run command on this VM (pass the bound method to install_run_commands as the factory)."""
        return arm_compute.Scripted(["Running", "Succeeded"], effect=self.run)

    # ---- the script's contract ----------------------------------------------------------------------------
    def run(self, parameters: dict[str, str]) -> dict[str, Any]:
        self.calls.append(dict(parameters))
        mode, changes = parameters.get("Mode", "read"), []
        try:
            wanted = json.loads(parameters.get("Values", "{}"))
            removing = json.loads(parameters.get("Remove", "[]"))
            expect = json.loads(parameters.get("Expect", "{}"))
        except json.JSONDecodeError:
            return self._result("error", 2, "a parameter is not JSON", mode, changes)
        if mode not in ("read", "prepare") or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", parameters.get("RunId", "")):
            return self._result("error", 2, "bad Mode or RunId", mode, changes)
        for name, record in wanted.items():
            if name not in NAMES or record.get("type") not in TYPES:
                return self._result("error", 2, f"parameter Values names {name}", mode, changes)
        if any(n not in NAMES or n in wanted for n in removing):
            return self._result("error", 2, "parameter Remove names a value it may not", mode, changes)
        if mode == "read":
            return self._result("read", 0, "CrashControl and the page file read; nothing written", mode, changes)
        if self.meanwhile is not None:
            self.meanwhile(self)
        drift = [n for n, was in expect.items() if not _same(self.values.get(n), was)]
        if drift:
            return self._result("changed", 12, f"nothing written: {', '.join(drift)} changed since crashcart read it",
                                mode, changes)
        if self.on_apply is not None:
            self.on_apply(self)
        undo: list[tuple[str, Any]] = []
        try:
            for name, record in wanted.items():
                undo.append((name, self.values.get(name)))
                self._write(name, _typed(record))
                changes.append({"name": name, "old": undo[-1][1], "new": _typed(record)})
            for name in removing:
                if name in self.values:
                    undo.append((name, self.values[name]))
                    self._write(name, None)
                    changes.append({"name": name, "old": undo[-1][1], "new": None})
        except _WriteFailed as err:
            restored = not self.restore_fails
            if restored:
                for name, old in reversed(undo):
                    self._set(name, old)
            return self._result("error", 1, f"writing CrashControl failed midway ({err})", mode, changes,
                                restored=restored)
        return self._result("applied", 0, "crash dump settings written", mode, changes)

    def _write(self, name: str, record: dict[str, Any] | None) -> None:
        if self.fail_after is not None and self.writes >= self.fail_after:
            self.fail_after = None  # one failure: a later run (the kit's restore) writes again
            raise _WriteFailed(f"Requested registry access is not allowed ({name})")
        self.writes += 1
        self._set(name, record)

    def _set(self, name: str, record: dict[str, Any] | None) -> None:
        if record is None:
            self.values.pop(name, None)
        else:
            self.values[name] = record

    def _result(self, status: str, code: int, message: str, mode: str, changes: list[dict[str, Any]],
                restored: bool | None = None) -> dict[str, Any]:
        body = {"mode": mode, "key": r"HKLM\SYSTEM\CurrentControlSet\Control\CrashControl",
                "values": {n: self.values.get(n) for n in NAMES}, "changes": changes, "restored": restored,
                "facts": {"paging_files": list(self.paging_files), "memory_mb": self.memory_mb, "system_drive": "C:",
                          "free_mb": self.free_mb, "os": self.os}, "preparer": "prepare_live.ps1"}
        return {"exit_code": code, "states": ["Running", "Succeeded" if code == 0 else "Failed"],
                "output": arm_compute.result_line(status, message=message, **body)}


def _typed(record: dict[str, Any]) -> dict[str, Any]:
    """A record as the script reads it back (a DWORD as a number)."""
    if record["type"] == "REG_DWORD":
        return {"type": "REG_DWORD", "value": int(record["value"])}
    return {"type": record["type"], "value": str(record["value"])}


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def install_live_vm(double: ArmDouble, vm_id: str, **state: Any) -> LiveVm:
    """The source VM running with its agent (instance view with vmAgent, as a running VM reports it)."""
    vm = LiveVm(vm_id, **state)

    def instance_view(d: ArmDouble, req: Request, m: Any) -> Response:
        agent = vm.agent[min(vm.instance_view_reads, len(vm.agent) - 1)]
        vm.instance_view_reads += 1
        return Response(200, {
            "computerName": vm_id.rsplit("/", 1)[-1], "osName": vm.os, "osVersion": "10.0.20348",
            "vmAgent": {"vmAgentVersion": "2.7.41491.1102", "statuses": [
                {"code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": agent,
                 "message": "GuestAgent is running and processing the extensions."}]},
            "statuses": [{"code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Provisioning succeeded"},
                         {"code": "PowerState/running", "level": "Info", "displayStatus": "VM running"}]})

    double.route("GET", re.escape(vm_id) + "/instanceView", instance_view)
    return vm
