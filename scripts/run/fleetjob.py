"""One VM of a fleet: its own project folder, its repair-run as a child process, and what it ended as.

Each VM gets `<work dir>/<vm key>/` (scripts.azure.identity.vm_key), a project folder of its own:
`main.py` (a link to the project's), `repair.toml` (the project's config with [source] discovered for
this VM), the link `terraform.evidence.tfstate` to the project's evidence state (one evidence stack for
the fleet; its local state stays in the project), `evidence-outputs.json` (the evidence stack's outputs
as the fleet read them, handed to the repair-run with `--evidence-outputs`: it reads no evidence state
itself), its own cdktf.out, repair state, report folder (`crashcart-out/`) and log (`repair-run.log`).
repair-run keeps one run per project folder, so one folder per VM is what lets the runs proceed side by
side; the VM lock (scripts.run.lock) keeps a second job for the same VM out wherever it runs.

The repair-run runs as a child process (`python -m scripts repair-run --vm <ID> ...`, in its own
session, scripts.run.child): a crash of one VM's job is that VM's failure, not the fleet's; a stop
request is forwarded to it once (SIGTERM: it tears its repair stack down and releases its lock). ARM
throttling (429 with Retry-After) is waited out inside the child by the Azure SDK's retry policy, which
honours Retry-After; a job that still ends on throttling is left for a re-run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.azure.identity import vm_key
from scripts.base.console import log
from scripts.base.errors import CrashcartError, ExitCode, first_line
from scripts.base.stop import StopRequest
from scripts.run.child import spawn, supervise
from scripts.run.fleetcanary import fix_outcome
from scripts.run.fleetmanifest import COLLECTED, FAILED, RERUN
from scripts.run.lock import now
from scripts.run.outputs import HandedEvidence

REPO = Path(__file__).resolve().parents[2]  # the folder holding the `scripts` package
CONFIG_NAME = "repair.toml"
LOG_NAME = "repair-run.log"
EVIDENCE_STATE = "terraform.evidence.tfstate"
EVIDENCE_OUTPUTS = "evidence-outputs.json"  # written for each VM's repair-run (--evidence-outputs)
# Exit codes a later run may well not see again: throttling or a service error, a collection timeout, an
# agent not ready yet, an interrupted run. Every other failure is `failed` (retried too, but with a reason).
RERUN_CODES = {int(ExitCode.AZURE_FAILED), int(ExitCode.TIMED_OUT), int(ExitCode.AGENT_NOT_READY),
               int(ExitCode.INTERRUPTED)}
# repair-run's refusals when another run holds this VM's lock or its folder (an orphan of a killed fleet)
LOCK_HELD = ("another repair-run is working on", "another repair-run is working in this project folder")
# What a fleet passes on to every VM's repair-run untouched.
_CLEAN_ENV = ("CRASHCART_CONFIG", "CRASHCART_VM_ID", "CRASHCART_PROJECT_DIR", "CRASHCART_OUT_DIR")


@dataclass(frozen=True)
class JobSettings:
    project_dir: Path  # the project: main.py, the base config, the evidence stack's state
    work_dir: Path  # <work dir>/<vm key>/ per VM
    base_config: Path
    child_args: tuple[str, ...] = ()  # repair-run options passed on (--timeout, --strategy, --skip-synth ...)
    triage: bool = True  # triage the collected dump here when the collection did not
    fix: str | None = None  # repair-run --fix SPEC (scripts.run.fleetcanary reads its outcome)
    evidence: HandedEvidence | None = None  # the evidence outputs the fleet read: handed to each repair-run


def runner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class VmJob:
    """Prepares the VM's folder, runs its repair-run, reads what it ended as (manifest fields)."""

    def __init__(self, vm_id: str, settings: JobSettings, stop: StopRequest | None, container: Any = None):
        self.vm_id = vm_id
        self.key = vm_key(vm_id)
        self.settings = settings
        self.stop = stop
        self.container = container
        self.folder = settings.work_dir / self.key

    # ---- the folder ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        project = self.settings.project_dir
        _link(self.folder / "main.py", project / "main.py")
        _link(self.folder / EVIDENCE_STATE, project / EVIDENCE_STATE)
        if self.settings.evidence is not None:  # written again for every attempt: never one of an earlier fleet
            self.settings.evidence.write(self.folder / EVIDENCE_OUTPUTS)
        config = self.folder / CONFIG_NAME
        if config.exists() or not self.settings.base_config.exists():
            return  # kept from an earlier attempt; or none to start from: repair-run discovers the VM itself
        from scripts.run.discover import discover

        draft = self.folder / f".{CONFIG_NAME}.draft"
        shutil.copyfile(self.settings.base_config, draft)
        discover(self.vm_id, draft)  # [source] for this VM; the other sections from the project's config
        os.replace(draft, config)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "scripts", "repair-run", "--vm", self.vm_id,
                "--project-dir", str(self.folder), "--config", str(self.folder / CONFIG_NAME),
                "--out-dir", str(self.folder / "crashcart-out"), *self.settings.child_args,
                *(["--evidence-outputs", str(self.folder / EVIDENCE_OUTPUTS)] if self.settings.evidence else []),
                *(["--fix", self.settings.fix] if self.settings.fix else [])]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _CLEAN_ENV}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                           if p and p != str(REPO)])
        return env

    # ---- the run --------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """The whole job; returns the manifest fields it ended with. Never raises a CrashcartError: a
        failure to prepare is this VM's failure."""
        started = now()
        try:
            self.prepare()
        except CrashcartError as err:
            return self._ended(RERUN if err.exit_code in RERUN_CODES else FAILED, int(err.exit_code),
                               f"preparing its folder: {err.message}", started)
        except OSError as err:
            return self._ended(FAILED, int(ExitCode.USAGE), f"preparing its folder {self.folder}: {first_line(err)}",
                               started)
        proc = spawn(self.command(), cwd=self.folder, env=self.environment())
        code, out, err, _ = supervise(proc, self.key, self.stop, graceful=False)
        log_path = self.folder / LOG_NAME
        with log_path.open("a", encoding="utf-8") as handle:
            handle.write(f"==== {started} repair-run for {self.vm_id} (exit {code})\n{err}\n")
        try:
            report = json.loads(out) if out.strip() else {}
        except ValueError:
            report = {}
        fields = self.classify(code, report if isinstance(report, dict) else {}, err, self.settings.fix)
        fields.update(run_id=report.get("run_id") if isinstance(report, dict) else None, log=str(log_path),
                      started_at=started, finished_at=now())
        if fields["state"] == COLLECTED and self.settings.triage and not fields.get("culprit"):
            fields.update(self.triage(fields))
        return fields

    def _ended(self, state: str, code: int, reason: str, started: str) -> dict[str, Any]:
        log.warning("    %s: %s", self.key, reason)
        return {"state": state, "exit_code": code, "reason": reason, "started_at": started, "finished_at": now()}

    @staticmethod
    def classify(code: int, report: dict[str, Any], stderr: str, fix: str | None = None) -> dict[str, Any]:
        """The manifest fields for how the child ended: its exit code, its report (stdout JSON), its log, and
        with --fix whether the VM booted on the fixed disk."""
        collect = report.get("collect") if isinstance(report.get("collect"), dict) else {}
        dumps = [{"blob": b.get("name"), "url": b.get("url"), "size": b.get("size"), "sha256": b.get("sha256"),
                  "kind": b.get("kind")} for b in collect.get("blobs") or [] if isinstance(b, dict) and b.get("ok")]
        fields: dict[str, Any] = {"exit_code": code, "dumps": dumps, "reason": None, "fix": fix_outcome(report, fix)}
        if code == 0 and collect.get("status") == "collected" and dumps:
            fields["state"] = COLLECTED
            run = collect.get("run")
            fields["report_blob"] = f"{run}/report.json" if run and (collect.get("report_blobs") or {}) else None
            fields.update(stop_code_of(collect))
            fields["culprit"] = culprit_of(collect.get("triage"))
            return fields
        error = report.get("error") if isinstance(report.get("error"), dict) else {}
        reason = error.get("message") or _error_line(stderr) or (
            f"the repair-run process was killed (signal {-code})" if code < 0 else f"repair-run exit code {code}")
        fields["reason"] = reason
        if code == int(ExitCode.USAGE) and any(held in stderr for held in LOCK_HELD):
            fields["state"] = RERUN  # another job holds this VM's lock: it is being handled elsewhere
        elif code < 0 or code in RERUN_CODES:
            fields["state"] = RERUN
        else:
            fields["state"] = FAILED
        return fields

    def triage(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The stop code and culprit driver of the primary dump, when the collection did not triage it (the
        rescue-vm strategy): read where it lies in evidence, by range reads. A dump triage cannot read is
        a note in the log, the collection stands."""
        if self.container is None:
            return {}
        from scripts.collection.server_copy import read_url
        from scripts.dumpfile.errors import BadDump
        from scripts.dumpfile.triage import triage

        order = {"full": 0, "kernel": 1, "memory": 1, "minidump": 2}
        primary = sorted(fields["dumps"], key=lambda d: order.get(str(d.get("kind")), 3))[0]
        try:
            verdict = triage(read_url(self.container, primary["blob"]),
                             getattr(self.container, "credential", None)).to_dict()
        except (BadDump, CrashcartError, OSError, ValueError) as err:
            log.warning("    %s: triage of %s failed (%s); the collection stands", self.key, primary["blob"],
                        getattr(err, "message", None) or first_line(err))
            return {}
        found = {"culprit": culprit_of(verdict)}
        bugcheck = verdict.get("bugcheck") or {}
        if not fields.get("stop_code") and bugcheck.get("code") is not None:
            found.update(stop_code=_hex(bugcheck.get("code")), stop_name=bugcheck.get("name"))
        return found


def stop_code_of(collect: dict[str, Any]) -> dict[str, Any]:
    """The stop code of the first verified dump with one, and its name."""
    for blob in collect.get("blobs") or []:
        code = ((blob or {}).get("header") or {}).get("bugcheck_code")
        if blob.get("ok") and code:
            return {"stop_code": _hex(code), "stop_name": _bugcheck_name(code)}
    triaged = ((collect.get("triage") or {}).get("bugcheck") or {})
    if triaged.get("code") is not None:
        return {"stop_code": _hex(triaged["code"]), "stop_name": triaged.get("name")}
    return {"stop_code": None, "stop_name": None}


def culprit_of(verdict: dict[str, Any] | None) -> str | None:
    """The driver a triage verdict blames: the culprit's module, else the faulting module."""
    if not isinstance(verdict, dict):
        return None
    culprit = verdict.get("culprit") or {}
    module = culprit.get("module") if isinstance(culprit, dict) else None
    if not module:
        module = (verdict.get("faulting_module") or {}).get("name")
    return str(module).lower() if module else None


def _hex(code: Any) -> str | None:
    try:
        return f"0x{int(str(code), 0):08X}"
    except ValueError:
        return str(code)


def _bugcheck_name(code: Any) -> str | None:
    from scripts.dumpfile.bugcheck import bugcheck_name

    try:
        return bugcheck_name(int(str(code), 0))
    except ValueError:
        return None


def _error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip().startswith("error:")]
    return lines[-1][len("error:"):].strip() if lines else ""


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        return
    link.symlink_to(target)
