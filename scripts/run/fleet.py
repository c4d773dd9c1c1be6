"""`fleet run`: the per-VM job (repair-run: deploy, collect, tear down) for many VMs, with bounded
concurrency, resumable through a manifest in evidence.

    VM list -> evidence container (the project's evidence stack's outputs, read once and handed down to
       every VM's repair-run) -> manifest (create or join)
    -> skip VMs collected earlier whose evidence verifies -> at most --max-parallel jobs at a time,
       each a repair-run child in the VM's own folder (scripts.run.fleetjob) -> every end in the manifest
    -> the fleet report (scripts.run.fleetreport)

This process is the one orchestrator: it holds the stop request (SIGINT, SIGTERM), starts no new job once
one is made, forwards it once to every running child (each tears its repair stack down and releases its
lock) and waits for them; VMs never started are left for a re-run. Its undo actions (an ExitStack: wait
for the running jobs, then record what did not finish) run whatever ends the fleet, deferred against a
second signal. With --fix, the canary VMs run first and the rollout stops past the failure rate
(scripts.run.fleetcanary). Re-running the same VM list (or `--fleet-id`) resumes: collected VMs are verified and
skipped, failed and unfinished ones run again, and the VM lock keeps a second job for a VM out even when
two fleets overlap.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import dataclasses
import hashlib
import re
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.azure import ids
from scripts.azure.identity import vm_key
from scripts.base import signals, userfiles
from scripts.base.console import log
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.stop import StopRequest
from scripts.run import fleetmanifest as fm
from scripts.run import fleetsynth
from scripts.run.fleetcanary import Rollout
from scripts.run.fleetjob import JobSettings, VmJob, runner_id
from scripts.run.outputs import HandedEvidence

DEFAULT_MAX_PARALLEL = 16  # jobs at a time; each holds a rescue VM (quota) while it runs
MAX_PARALLEL = 256
MAX_VMS = 10_000
FLEET_ID = re.compile(r"[a-z0-9][a-z0-9-]{2,62}")


@dataclass(frozen=True)
class FleetSettings:
    vm_ids: tuple[str, ...]
    fleet_id: str
    job: JobSettings
    max_parallel: int = DEFAULT_MAX_PARALLEL
    retry_failed: bool = True
    fix: str | None = None  # --fix SPEC: each VM's repair-run fixes it and proves it boots
    canary: int = 0  # --canary N: these many VMs are fixed (and verified) before the rest start
    max_failure_rate: float = 0.0  # --max-failure-rate: the rollout stops when the fixed VMs' rate exceeds it


# ---- the VM list --------------------------------------------------------------------------------------------
def read_vm_file(path: Path) -> tuple[str, ...]:
    """VM resource IDs, one a line (blank lines and `#` comments skipped), each checked, duplicates (the
    same VM however spelled) dropped. A bad line is a usage error naming it."""
    text = userfiles.read_text(path, "--vms", "pass a UTF-8 text file with one VM resource ID a line",
                               "the VM list")
    return parse_vm_list(text.splitlines(), str(path))


def parse_vm_list(lines: list[str], where: str) -> tuple[str, ...]:
    found: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if ids.try_parse(line, "vm") is None:
            shown = line.encode("unicode_escape").decode()[:200]
            raise CrashcartError(f"{where} line {number}: {shown!r} is not a VM resource ID",
                                 f"write one per line: {ids.FORMS['vm']}", ExitCode.USAGE)
        found.setdefault(vm_key(line), line)
        if len(found) > MAX_VMS:
            raise CrashcartError(f"{where} lists more than {MAX_VMS} VMs", "split it into several fleets",
                                 ExitCode.USAGE)
    if not found:
        raise CrashcartError(f"{where} lists no VM", "write one VM resource ID a line", ExitCode.USAGE)
    return tuple(found.values())


def default_fleet_id(vm_ids: tuple[str, ...] | list[str]) -> str:
    """The same VM list (in any order, any case) is the same fleet: a re-run resumes it."""
    digest = hashlib.sha256("\n".join(sorted(vm_key(v) for v in vm_ids)).encode()).hexdigest()
    return f"fleet-{digest[:10]}"


def check_fleet_id(fleet_id: str) -> str:
    if not FLEET_ID.fullmatch(fleet_id):
        raise CrashcartError(f"--fleet-id {fleet_id.encode('unicode_escape').decode()[:80]!r} is not valid",
                             "use 3-63 lower-case letters, digits and hyphens, starting with a letter or digit",
                             ExitCode.USAGE)
    return fleet_id


def read_evidence(project_dir: Path, stop: StopRequest | None) -> HandedEvidence:
    """The outputs of the project's evidence stack, read once for the fleet (`terraform init` + one `output`):
    its container holds the locks, the dumps and the fleet manifest, and every VM's repair-run gets them in
    a file (scripts.run.outputs.HandedEvidence) instead of reading the state again. The fleet never deploys
    the evidence stack: one VM's repair-run (or `cdktf deploy evidence`) does."""
    from scripts.config.stackoutputs import EvidenceOutputs
    from scripts.run.outputs import evidence_state, state_identity
    from scripts.run.terraform import EvidenceStackDir

    stack = EvidenceStackDir(project_dir / "cdktf.out" / "stacks", stop)
    stack.synthesized()
    values, missing = evidence_state(stack)
    if missing:
        raise CrashcartError(
            f"the evidence stack of {project_dir} is not deployed ({len(missing)} output(s) missing)",
            "deploy it once first: `pipenv run repair-run` for one VM does, or `npx cdktf deploy evidence`",
            ExitCode.USAGE)
    return HandedEvidence(EvidenceOutputs.from_values(values), state_identity(stack))


def evidence_container(evidence: HandedEvidence) -> Any:
    """The evidence container the outputs name: where the locks, the dumps and the fleet manifest live."""
    from scripts.evidence.blobs import container_client

    return container_client(evidence.outputs.blob_endpoint, evidence.outputs.container_name)


# ---- the run ------------------------------------------------------------------------------------------------
class FleetRun:
    def __init__(self, settings: FleetSettings, stop: StopRequest, container: Any, job: Callable[..., Any] = VmJob):
        self.settings = settings
        self.stop = stop
        self.container = container
        self.make_job = job  # (vm_id, JobSettings, stop, container) -> .run() -> manifest fields
        self.rollout = Rollout(settings.fix, settings.canary, settings.max_failure_rate) if settings.fix else None
        self.todo: list[str] = []
        self.manifest = fm.FleetManifest(container, settings.fleet_id)
        self.runner = runner_id()
        self.skipped: list[str] = []  # keys collected earlier, verified
        self.ran: list[str] = []
        self.mine: set[str] = set()  # keys this runner marked running and has not finished
        self.synthesized: set[str] = set()  # keys whose stacks the fleet's one synth wrote (scripts.run.fleetsynth)

    def plan(self) -> list[str]:
        """The VMs to run now: all of this list but those collected earlier whose evidence verifies."""
        entries = self.manifest.entries()
        todo = []
        for vm_id in self.settings.vm_ids:
            key = vm_key(vm_id)
            entry = entries.get(key) or fm.new_entry(vm_id)
            if entry["state"] == fm.COLLECTED:
                problem = fm.verify_collected(self.container, entry)
                if problem is None and self.settings.fix and not (entry.get("fix") or {}).get("booted"):
                    log.info("    %s: collected earlier, not fixed yet: running it with --fix", key)
                elif problem is None:
                    log.info("    %s: collected earlier, its evidence verifies: skipped", key)
                    self.skipped.append(key)
                    continue
                log.warning("    %s: collected earlier, but %s: running it again", key, problem)
            elif entry["state"] == fm.FAILED and not self.settings.retry_failed:
                log.info("    %s: failed earlier (%s): skipped (--skip-failed)", key, entry.get("reason"))
                self.skipped.append(key)
                continue
            todo.append(vm_id)
        return todo

    def execute(self) -> dict[str, Any]:
        self.manifest.open(self.settings.vm_ids, created_by=self.runner)
        self.todo = todo = self.plan()
        log.info("fleet %s: %d VM(s), %d to run, at most %d at a time", self.settings.fleet_id,
                 len(self.settings.vm_ids), len(todo), self.settings.max_parallel)
        canary = todo[:self.rollout.canary] if self.rollout else []
        if canary:
            log.info("fleet %s: canary: --fix %s on %d VM(s) first; the rest start when at most %.0f%% of the fixed "
                     "VMs failed to boot", self.settings.fleet_id, self.settings.fix, len(canary),
                     self.settings.max_failure_rate * 100)
        with contextlib.ExitStack() as undo:
            undo.callback(self.leave_unfinished)  # runs last: after every started job has ended
            pool = futures.ThreadPoolExecutor(max_workers=self.settings.max_parallel,
                                              thread_name_prefix="crashcart-fleet")
            undo.callback(pool.shutdown, wait=True)
            try:
                self.synthesized = self.synth(todo)
                for batch in ([canary, todo[len(canary):]] if canary else [todo]):
                    if self.stop.reason or (self.rollout and self.rollout.stopped):
                        break
                    pending = {pool.submit(self.job, vm_id) for vm_id in batch}
                    while pending:
                        _, pending = futures.wait(pending, timeout=0.5)
                    if batch is canary:
                        self.rollout.canary_done()
            finally:
                with signals.deferred("the fleet's running jobs"):
                    undo.close()
        return self.result()

    def synth(self, todo: list[str]) -> set[str]:
        """Every VM's stacks in one synth (scripts.run.fleetsynth) before the jobs start, unless the children
        skip their synth anyway; each VM's folder prepared first (its config), side by side."""
        settings = self.settings.job
        if not todo or self.make_job is not VmJob or "--skip-synth" in settings.child_args or self.stop.reason:
            return set()

        def prepared(vm_id: str) -> VmJob | None:
            job = VmJob(vm_id, settings, self.stop, self.container)
            try:
                job.prepare()
            except Exception:  # its job prepares it again and records why it cannot (VmJob.run, FleetRun.job)
                return None
            return job

        with futures.ThreadPoolExecutor(max_workers=self.settings.max_parallel) as pool:
            jobs = [job for job in pool.map(prepared, todo) if job is not None]
        if not jobs:
            return set()
        return fleetsynth.synth_all({job.key: job.folder for job in jobs}, settings.project_dir,
                                    jobs[0].environment(), self.stop)

    def job(self, vm_id: str) -> None:
        key = vm_key(vm_id)
        if self.stop.reason or (self.rollout and self.rollout.stopped):
            return  # never started: leave_unfinished records it
        previous = self.manifest.entries().get(key) or {}
        self.mine.add(key)
        self.manifest.update(key, state=fm.RUNNING, runner=self.runner, reason=None,
                             attempts=int(previous.get("attempts") or 0) + 1)
        log.info("    %s: started (%s)", key, vm_id)
        settings = self.settings.job
        if key in self.synthesized:  # its stacks are written: its repair-run skips its own synth
            settings = dataclasses.replace(settings, child_args=(*settings.child_args, "--skip-synth"))
        try:
            fields = self.make_job(vm_id, settings, self.stop, self.container).run()
        except Exception as exc:  # a bug in this job: the VM fails with it, the fleet goes on
            log.exception("    %s: the job failed unexpectedly", key)
            fields = {"state": fm.FAILED, "exit_code": int(ExitCode.BUG), "reason": f"crashcart bug: {exc!r}"[:300]}
        self.manifest.update(key, **fields)
        self.mine.discard(key)
        self.ran.append(key)
        log.info("    %s: %s%s", key, fields["state"], f" ({fields['reason']})" if fields.get("reason") else "")
        if self.rollout:
            self.rollout.ended(key, fields.get("fix"))

    def leave_unfinished(self) -> None:
        """VMs this fleet did not start (it was stopped) or did not see end are left for a re-run."""
        halted = self.rollout.stopped if self.rollout else None
        why = (f"the fleet stopped ({self.stop.reason})" if self.stop.reason else halted or "the fleet ended before it")
        started = set(self.ran)
        todo = {vm_key(v) for v in self.todo}
        for vm_id in self.settings.vm_ids:
            key = vm_key(vm_id)
            if key in started or key in self.skipped:
                continue
            entry = self.manifest.entries().get(key) or {}
            if key in self.mine or entry.get("state") == fm.PENDING or (halted and key in todo):
                try:
                    self.manifest.update(key, state=fm.RERUN, reason=f"not run: {why}")
                except CrashcartError as err:
                    log.error("    %s: could not record it in the manifest (%s)", key, err.message)

    def result(self) -> dict[str, Any]:
        keys = {vm_key(v) for v in self.settings.vm_ids}
        entries = {k: v for k, v in self.manifest.entries().items() if k in keys}
        counts = fm.counts(entries)
        return {"fleet_id": self.settings.fleet_id, "manifest_blob": self.manifest.name,
                "vms": len(keys), "ran": len(self.ran), "skipped": len(self.skipped), "counts": counts,
                "stopped": self.stop.reason, "exit_code": fleet_exit_code(entries, self.stop.reason),
                "rollout": self.rollout.summary() if self.rollout else None, "entries": entries}


def fleet_exit_code(entries: dict[str, dict[str, Any]], stopped: str | None) -> int:
    """0 when every VM is collected; 31 when a VM's teardown failed (resources left: look first); 130 when
    the fleet was stopped; else 12: some VMs failed or are left for a re-run (the report says which)."""
    if any(e.get("exit_code") == int(ExitCode.TEARDOWN_FAILED) for e in entries.values()):
        return int(ExitCode.TEARDOWN_FAILED)
    if stopped:
        return int(ExitCode.INTERRUPTED)
    if all(e.get("state") == fm.COLLECTED for e in entries.values()):
        return int(ExitCode.OK)
    return int(ExitCode.COLLECT_FAILED)
