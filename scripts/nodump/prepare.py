"""`prepare-dump`: no MEMORY.DMP on the disk — make the VM write one, trigger it, collect it, roll back.

Microsoft's article ends with "if you cannot find Memory.dmp, generate one with an NMI": configure the
crash dump on the disk, boot it, make it crash (or send a non-maskable interrupt from the serial
console), and collect the dump. By hand that is a dozen steps across RDP, regedit, bcdedit, the
portal and the serial console; here it is one command, after `cdktf deploy repair`:

    pipenv run prepare-dump                      # symptoms + prepare the disk copy (nothing else changes)
    pipenv run prepare-dump --swap               # ... then swap it in, trigger, collect, roll back

1. Symptoms: the broken VM's boot diagnostics screenshot and serial log go to evidence
   (`<vm>/<stamp>/bootdiag/`, scripts.bootdiag) — every run.
2. Prepare (the disk copy only, on the rescue VM, as a managed Run Command: scripts/remote/prepare.*.j2,
   every value a parameter): CrashDumpEnabled (kernel 2 by default; complete 1, automatic 7),
   DumpFile %SystemRoot%\\MEMORY.DMP, NMICrashDump 1, AutoReboot (0 by default: the VM stays on the stop
   screen once the dump is written, so the next crash of the loop cannot overwrite it), Overwrite 1,
   a DedicatedDumpFile when the system volume's page file is too small (complete: RAM + 257 MB), and
   EMS in the BCD store for the serial console. Old and new values: `<vm>/<stamp>/prepare/manifest.json`.
3. `--swap` (the only write crashcart ever makes to the source VM, scripts.swap): refused when the copy
   cannot boot the VM (generation, security type, controller, region/zone); otherwise the rollback
   manifest is written locally and to evidence FIRST, then: stop + deallocate the VM, detach the copy
   from the rescue VM, make it the VM's OS disk, start, wait for the bugcheck on the serial log (after
   `--nmi-after-minutes` without one: send the NMI with `--send-nmi`, or print the exact
   `az serial-console send nmi` command), give Windows `--dump-wait-minutes` to write the dump, capture
   the stop screen, then ALWAYS roll back (scripts.rollback.restore: original disk back, copy back on
   the rescue VM at its LUN, VM started again if it was running), whatever happened before.
4. Collect the new dump from the copy through the normal path (scripts.collect.collect_dump), into the
   same run folder.

Exit codes: 0 done (prepared; or dump collected), 2 usage or swap refused, 11 disk copy not found on the
rescue VM, 12 the remote preparation failed or was refused (nothing written), 13/14 timeouts, 10/15 from
the collection, 3-5 Azure errors. A failed rollback says so and prints the `pipenv run rollback` command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts import remote
from scripts.evidence import bootdiag
from scripts.collection import rescue_vm as collect
from scripts.evidence import blobs as evidence
from scripts.nodump import rollback
from scripts.azure import runcommand
from scripts.nodump import swap
from scripts.base.console import Progress, emit_json, report_error, step
from scripts.config.model import Config
from scripts.base.errors import CrashcartError, ExitCode
from scripts.config.stackoutputs import RepairOutputs, load_repair_outputs

log = logging.getLogger("crashcart.prepare")

DUMP_TYPES = {"kernel": 2, "complete": 1, "automatic": 7}
TEMPLATES = {"windows": "prepare.ps1.j2", "linux": "prepare.sh.j2"}
DEFAULT_DUMP_FILE = r"%SystemRoot%\MEMORY.DMP"
DEFAULT_DEDICATED_FILE = r"C:\DedicatedDump.sys"
REMOTE_EXIT = {"prepared": ExitCode.OK, "planned": ExitCode.OK, "disk_not_found": ExitCode.DISK_NOT_FOUND,
               "refused": ExitCode.COLLECT_FAILED, "error": ExitCode.COLLECT_FAILED}
OUT_DIR = collect.OUT_DIR
PREPARE_TIMEOUT_MINUTES = 20


# ---- settings -------------------------------------------------------------------------------------------------
_SYSTEM_VOLUME = re.compile(r"(?i)^(\\\?\?\\)?(%SystemRoot%\\|%WinDir%\\|%SystemDrive%\\|\\SystemRoot\\|C:\\)")


def check_windows_path(name: str, value: str) -> None:
    """The same rule the remote scripts apply: a file on the system volume, plain characters."""
    ok = (4 <= len(value) <= 240 and not re.search(r'[\x00-\x1f"*?<>|]', value)
          and _SYSTEM_VOLUME.match(value) is not None and ".." not in value.replace("/", "\\").split("\\")
          and not value.endswith(("\\", "/")))
    if not ok:
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
    dedicated_file: str = DEFAULT_DEDICATED_FILE
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


@functools.lru_cache(maxsize=1)
def render_script(os_name: str) -> str:
    """The prepare script for the rescue VM's OS. Takes no user value: those are Run Command parameters."""
    if os_name not in TEMPLATES:
        raise ValueError(f"no prepare script for rescue OS {os_name!r}: expected one of {sorted(TEMPLATES)}")
    return remote.render_template(TEMPLATES[os_name])


# ---- the remote preparation -------------------------------------------------------------------------------------
@dataclass
class Timing:
    timeout_s: int = 1800
    agent_wait_s: float = collect.DEFAULT_AGENT_WAIT_MINUTES * 60
    poll_s: float = collect.DEFAULT_POLL_SECONDS


def prepare_disk(compute: Any, container: Any, outputs: RepairOutputs, settings: PrepareSettings, *, prefix: str,
                 run_id: str, inspect: bool, timing: Timing) -> dict[str, Any]:
    """Runs the prepare script on the rescue VM against the disk copy; returns its result (old and new
    values). Raises CrashcartError unless it says prepared (or planned, with `inspect`)."""
    rg, name = collect.rescue_vm(outputs)
    command = f"crashcart-prepare-{run_id.lower()}"
    output_blob, error_blob = f"{prefix}/prepare/runcommand/output.log", f"{prefix}/prepare/runcommand/error.log"
    with step(f"wait for the agent of rescue VM {name}"), Progress(f"agent of {name}", every=30) as bar:
        runcommand.wait_for_agent(compute, rg, name, timeout_s=timing.agent_wait_s, poll_s=timing.poll_s,
                                  on_poll=lambda t: bar.update(status=t))
    location = swap.azure_call(lambda: runcommand.vm_location(compute, rg, name), f"rescue VM {name}")
    script = render_script(outputs.rescue_os)
    params = settings.parameters(run_id=run_id, mode="inspect" if inspect else "prepare", disk_lun=outputs.disk_copy_lun)
    with step(f"{'inspect' if inspect else 'prepare'} the disk copy on {name} (run command {command})"):
        started = time.monotonic()
        try:
            swap.azure_call(lambda: runcommand.start(
                compute, rg, name, command, location=location, script=script, parameters=params,
                timeout_s=timing.timeout_s, output_blob_uri=collect.blob_uri(outputs, output_blob),
                error_blob_uri=collect.blob_uri(outputs, error_blob), poll_s=timing.poll_s),
                f"run command on rescue VM {name}")
            execution = _wait(compute, rg, name, command, started, timing)
        finally:
            runcommand.delete(compute, rg, name, command, poll_s=timing.poll_s)
    found = collect.parse_marked(execution.output, remote.RESULT_MARKER)
    if found is None:
        try:
            found = collect.parse_marked(evidence.read_tail(container, output_blob) or "", remote.RESULT_MARKER)
        except CrashcartError as err:
            log.warning("could not read %s: %s", output_blob, err.message)
    if execution.state == "TimedOut":
        raise CrashcartError(f"preparing the disk copy did not finish within {timing.timeout_s / 60:.0f} min",
                             f"see {error_blob} in the evidence container; re-run prepare-dump (it is idempotent)",
                             ExitCode.TIMED_OUT)
    if found is None:
        tail = " | ".join((execution.error or "").strip().splitlines()[-3:])
        raise CrashcartError(f"the prepare run command ended {execution.state} (exit {execution.exit_code}) without a "
                             "result" + (f": {tail}" if tail else ""),
                             f"see {error_blob} in the evidence container and the rescue VM's extension status",
                             ExitCode.COLLECT_FAILED)
    status = str(found.get("status", "error"))
    for note in found.get("notes") or []:
        log.info("    note: %s", note)
    code = REMOTE_EXIT.get(status, ExitCode.COLLECT_FAILED)
    if code != ExitCode.OK:
        hints = {
            "disk_not_found": f"check that the disk copy is attached to {name} at LUN {outputs.disk_copy_lun}; an "
                              "encrypted OS disk (BitLocker/ADE) must be unlocked first",
            "refused": "nothing was written to the disk copy; follow the message, then re-run prepare-dump",
        }
        raise PrepareFailed(f"the disk copy was not prepared ({status}): {found.get('message', '')}",
                            hints.get(status, f"see {error_blob} in the evidence container and re-run prepare-dump"),
                            code, found)
    return found


class PrepareFailed(CrashcartError):
    def __init__(self, message: str, hint: str, exit_code: ExitCode, remote_result: dict[str, Any]):
        super().__init__(message, hint, exit_code)
        self.remote_result = remote_result


def _wait(compute: Any, rg: str, name: str, command: str, started: float, timing: Timing) -> runcommand.Execution:
    deadline = started + timing.timeout_s + min(300.0, max(5.0, timing.timeout_s * 0.25))
    with Progress(f"prepare on {name}", every=30) as bar:
        while True:
            execution = runcommand.execution(compute, rg, name, command)
            bar.update(status=execution.state)
            if execution.finished:
                return execution
            if time.monotonic() >= deadline:
                execution.state = "TimedOut"
                return execution
            time.sleep(timing.poll_s)


def changed_values(remote_result: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in remote_result.get("changes") or [] if c.get("changed")]


# ---- the swap, trigger and roll back ------------------------------------------------------------------------------
@dataclass
class TriggerOptions:
    timeout_s: float = 30 * 60
    nmi_after_s: float | None = 10 * 60
    auto_nmi: bool = False
    dump_wait_s: float = 180.0
    poll_s: float = 15.0
    leave_stopped: bool = False


@dataclass
class SwapOutcome:
    manifest: rollback.RollbackManifest
    check: dict[str, Any] = field(default_factory=dict)
    watch: swap.CrashWatch | None = None
    symptoms_after: bootdiag.Symptoms | None = None
    restore: rollback.RestoreResult | None = None
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": self.manifest.local_path, "manifest_blob": self.manifest.evidence_blob,
                "state": self.manifest.state, "check": self.check,
                "watch": self.watch.to_dict() if self.watch else None,
                "symptoms_after_crash": self.symptoms_after.to_dict() if self.symptoms_after else None,
                "rollback": self.restore.to_dict() if self.restore else None, "error": self.error}


class SwapFailed(CrashcartError):
    """The swapped run failed; `outcome` says how far it got and whether the rollback worked."""

    def __init__(self, message: str, hint: str, exit_code: ExitCode, outcome: SwapOutcome):
        super().__init__(message, hint, exit_code)
        self.outcome = outcome


def preflight(compute: Any, outputs: RepairOutputs) -> swap.SwapCheck:
    """Read-only: can the disk copy take the VM's OS disk's place? Raises SwapRefused with every reason."""
    vm = swap.VmRef.parse(outputs.source_vm_id)
    model = swap.get_vm(compute, vm)
    original = swap.get_disk(compute, outputs.source_os_disk_id)
    copy = swap.get_disk(compute, outputs.disk_copy_id)
    check = swap.check_swap(model, original, copy, expected_original_id=outputs.source_os_disk_id,
                            allowed_holder_ids=(outputs.rescue_vm_id,))
    if not check.ok:
        raise swap.SwapRefused(
            f"the disk copy cannot take VM {vm.name}'s OS disk's place: " + "; ".join(check.reasons),
            "nothing was changed. The repair stack makes the copy match the source (generation, security type, "
            "controller, zone): redeploy it from a config refreshed with `pipenv run discover`")
    return check


def swap_trigger_restore(compute: Any, container: Any, outputs: RepairOutputs, *, prefix: str, out_dir: Path,
                         check: swap.SwapCheck, options: TriggerOptions) -> SwapOutcome:
    """Stop, swap in the copy, start, wait for the crash, stop — then always put the original back."""
    vm = swap.VmRef.parse(outputs.source_vm_id)
    rescue = swap.VmRef.parse(outputs.rescue_vm_id)
    poll = options.poll_s
    manifest = rollback.RollbackManifest(
        source_vm_id=vm.id, original_os_disk_id=outputs.source_os_disk_id,
        original_os_disk_name=outputs.source_os_disk_id.rstrip("/").rsplit("/", 1)[-1],
        prepared_disk_id=outputs.disk_copy_id, rescue_vm_id=rescue.id, rescue_lun=outputs.disk_copy_lun,
        power_state_before=swap.power_state(compute, vm), run=prefix,
        evidence_blob_endpoint=outputs.evidence_blob_endpoint, evidence_container=outputs.evidence_container,
        created_at=rollback._now(), local_path=str(out_dir / rollback.MANIFEST_NAME),
        evidence_blob=f"{prefix}/{rollback.MANIFEST_NAME}")
    manifest.mark("ready", f"original OS disk {manifest.original_os_disk_name}")
    with step("write the rollback manifest (locally and in evidence) before touching the VM"):
        rollback.save(manifest, container, require_evidence=True)
        log.info("    %s and %s", manifest.local_path, manifest.evidence_blob)
    outcome = SwapOutcome(manifest=manifest, check=check.facts)
    try:
        baseline = bootdiag.read_serial_log(compute, vm.resource_group, vm.name)
    except Exception:  # noqa: BLE001 - no baseline: any stop in the log after the swap counts
        baseline = ""
    failure: BaseException | None = None
    try:
        with step(f"swap the prepared copy in as {vm.name}'s OS disk"):
            swap.stop_and_deallocate(compute, vm, poll_s=poll)
            swap.detach_data_disk(compute, rescue, outputs.disk_copy_id, poll_s=poll)
            manifest.mark("swapping")
            rollback.save(manifest, container, require_evidence=False)
            swap.swap_os_disk(compute, vm, outputs.disk_copy_id, expect_current=outputs.source_os_disk_id, poll_s=poll)
            manifest.mark("swapped", f"OS disk {outputs.disk_copy_id.rsplit('/', 1)[-1]}")
            rollback.save(manifest, container, require_evidence=False)
            swap.start(compute, vm, poll_s=poll)
        with step(f"wait for {vm.name} to crash (serial log)"), Progress(f"{vm.name}", every=60) as bar:
            outcome.watch = swap.wait_for_crash(
                compute, vm, baseline=baseline, timeout_s=options.timeout_s, poll_s=options.poll_s,
                nmi_after_s=options.nmi_after_s, auto_nmi=options.auto_nmi, on_poll=lambda t: bar.update(status=t))
        watch = outcome.watch
        if watch.crashed:
            log.info("    stop %s after %.0fs; giving Windows %.0fs to write the dump", (watch.bugcheck or {}).get("code"),
                     watch.seconds, options.dump_wait_s)
            time.sleep(options.dump_wait_s)
        else:
            log.warning("    no crash seen on the serial log (%s after %.0fs): collecting anyway", watch.reason, watch.seconds)
        outcome.symptoms_after = bootdiag.capture_symptoms(compute, container, vm.resource_group, vm.name, prefix,
                                                           out_dir=out_dir, folder="bootdiag/after-crash")
    except BaseException as err:  # noqa: BLE001 - the rollback below runs for every failure, Ctrl-C included
        failure = err
        outcome.error = err.message if isinstance(err, CrashcartError) else f"{type(err).__name__}: {err}"
        log.error("    the swapped run failed (%s): rolling back", outcome.error)
    with step(f"roll back: {vm.name} back on {manifest.original_os_disk_name}"):
        try:
            outcome.restore = rollback.restore(compute, manifest, container, leave_stopped=options.leave_stopped,
                                               poll_s=poll)
        except BaseException as err:  # noqa: BLE001
            said = err.message if isinstance(err, CrashcartError) else f"{type(err).__name__}: {err}"
            outcome.error = (f"ROLLBACK FAILED: VM {vm.name} may still run on the prepared copy ({said})"
                             + (f"; the run had failed before: {outcome.error}" if outcome.error else ""))
            raise SwapFailed(outcome.error, f"run `pipenv run rollback --manifest {manifest.local_path}` (or with "
                             f"--evidence-blob {manifest.evidence_blob}); it is safe to repeat",
                             ExitCode.AZURE_FAILED, outcome) from None
        for line in outcome.restore.steps:
            log.info("    %s", line)
    if failure is not None:
        if isinstance(failure, CrashcartError):
            raise SwapFailed(f"{failure.message} (rolled back: {vm.name} is on its original OS disk again)",
                             failure.hint, failure.exit_code, outcome) from None
        raise failure
    return outcome


# ---- the verb ---------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file (default: CRASHCART_CONFIG or repair.toml)")
    parser.add_argument("--outputs-file", type=Path, help="outputs written by `cdktf deploy repair --outputs-file`")
    parser.add_argument("--type", choices=tuple(DUMP_TYPES), default="kernel",
                        help="dump to configure: kernel (CrashDumpEnabled 2, default), complete (1), automatic (7)")
    parser.add_argument("--memory-gb", type=float, help="the VM's RAM (default: source.memory_gb)")
    parser.add_argument("--dump-file", default=DEFAULT_DUMP_FILE, help="DumpFile on the system volume (default: %(default)s)")
    parser.add_argument("--auto-reboot", action="store_true",
                        help="AutoReboot 1 (default 0: stay on the stop screen so the dump is not overwritten)")
    parser.add_argument("--no-nmi-crash-dump", action="store_true", help="leave NMICrashDump 0 (older Windows need 1)")
    parser.add_argument("--dedicated-dump", choices=("auto", "always", "never"), default="auto",
                        help="configure a DedicatedDumpFile: when the page file is too small (auto), always or never")
    parser.add_argument("--dedicated-dump-file", default=DEFAULT_DEDICATED_FILE, help="(default: %(default)s)")
    parser.add_argument("--no-ems", action="store_true", help="do not enable EMS/SAC in the BCD store")
    parser.add_argument("--allow-dirty-hive", action="store_true",
                        help="Linux rescue VM: write a SYSTEM hive whose transaction logs are not merged (loses them)")
    parser.add_argument("--dry-run", action="store_true", help="read the disk copy and show what would change; write nothing")
    parser.add_argument("--swap", action="store_true",
                        help="then swap the prepared copy in as the VM's OS disk, trigger the crash, collect the dump "
                             "and roll back (the only change crashcart makes to the source VM)")
    parser.add_argument("--trigger-timeout-minutes", type=float, default=30.0,
                        help="how long to wait for the crash after the swap (default: %(default)s)")
    parser.add_argument("--nmi-after-minutes", type=float, default=10.0,
                        help="no crash by then: send (--send-nmi) or print the serial console NMI command (default: "
                             "%(default)s; negative: never)")
    parser.add_argument("--send-nmi", action="store_true",
                        help="send the NMI with `az serial-console send nmi` (needs the Azure CLI and its extension)")
    parser.add_argument("--dump-wait-minutes", type=float,
                        help="after the crash, how long Windows gets to write the dump (default: 3, plus 1 per 8 GB "
                             "of RAM for a complete dump)")
    parser.add_argument("--leave-stopped", action="store_true",
                        help="after rolling back, leave the VM deallocated even if it was running")
    parser.add_argument("--no-collect", action="store_true", help="after the swap run, do not collect the dump")
    parser.add_argument("--timeout-minutes", type=float,
                        help=f"remote command timeout (default: {PREPARE_TIMEOUT_MINUTES} to prepare, "
                             "repair.collect_timeout_minutes to collect)")
    parser.add_argument("--agent-wait-minutes", type=float, default=collect.DEFAULT_AGENT_WAIT_MINUTES)
    parser.add_argument("--poll-seconds", type=float, default=collect.DEFAULT_POLL_SECONDS)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="local output folder (default: %(default)s)")


def settings_from(args: argparse.Namespace, config: Config) -> PrepareSettings:
    memory_gb = args.memory_gb if args.memory_gb is not None else config.source.memory_gb
    return PrepareSettings(
        dump_type=DUMP_TYPES[args.type], memory_mb=int(round(memory_gb * 1024)), dump_file=args.dump_file,
        auto_reboot=args.auto_reboot, nmi_crash_dump=not args.no_nmi_crash_dump, dedicated=args.dedicated_dump,
        dedicated_file=args.dedicated_dump_file, ems=not args.no_ems, allow_dirty_hive=args.allow_dirty_hive)


def trigger_options(args: argparse.Namespace, settings: PrepareSettings) -> TriggerOptions:
    wait = args.dump_wait_minutes
    if wait is None:
        wait = 3.0 + (settings.memory_mb / 1024 / 8 if settings.dump_type == 1 else 0.0)
    if args.trigger_timeout_minutes <= 0:
        raise CrashcartError("--trigger-timeout-minutes must be positive", "e.g. 30", ExitCode.USAGE)
    return TriggerOptions(timeout_s=args.trigger_timeout_minutes * 60,
                          nmi_after_s=None if args.nmi_after_minutes < 0 else args.nmi_after_minutes * 60,
                          auto_nmi=args.send_nmi, dump_wait_s=max(0.0, wait * 60), poll_s=max(0.01, args.poll_seconds),
                          leave_stopped=args.leave_stopped)


def _write_json(container: Any, folder: Path, blob: str, name: str, document: dict[str, Any]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    try:
        evidence.upload_text(container, blob, json.dumps(document, indent=2, sort_keys=True, default=str), "application/json")
    except CrashcartError as err:
        log.warning("%s could not be stored in evidence: %s (kept in %s)", blob, err.message, folder / name)
    return str(folder / name)


def run(args: argparse.Namespace) -> int:
    from scripts.azure.clients import AzureClients

    config = Config.load(args.config)
    outputs = load_repair_outputs(args.outputs_file)
    settings = settings_from(args, config)
    options = trigger_options(args, settings) if args.swap else None
    if args.swap and args.dry_run:
        raise CrashcartError("--swap and --dry-run exclude each other", "drop one of them", ExitCode.USAGE)
    if outputs.rescue_os not in TEMPLATES:
        raise CrashcartError(f"the repair stack's rescue_os is {outputs.rescue_os!r}", "redeploy the repair stack",
                             ExitCode.USAGE)
    vm = swap.VmRef.parse(outputs.source_vm_id)
    now = dt.datetime.now(dt.timezone.utc)
    stamp = collect.run_stamp(now)
    prefix = f"{vm.name}/{stamp}"
    out_dir = args.out_dir / prefix
    compute = AzureClients(outputs.subscription_id).compute
    container = evidence.container_client(outputs.evidence_blob_endpoint, outputs.evidence_container)
    timeout_minutes = args.timeout_minutes or config.repair.collect_timeout_minutes
    # preparing edits two small hives: it gets its own, shorter limit (apt-get on a Linux rescue VM included)
    timing = Timing(timeout_s=max(60, math.ceil((args.timeout_minutes or PREPARE_TIMEOUT_MINUTES) * 60)),
                    agent_wait_s=args.agent_wait_minutes * 60, poll_s=args.poll_seconds)
    document: dict[str, Any] = {"run": prefix, "vm_id": vm.id, "dump_type": settings.dump_type_name,
                                "settings": settings.parameters(run_id=stamp, mode="prepare", disk_lun=None)}

    with step(f"capture {vm.name}'s boot diagnostics (symptoms)"):
        document["symptoms"] = bootdiag.capture_symptoms(compute, container, vm.resource_group, vm.name, prefix,
                                                         out_dir=out_dir).to_dict()
    check = None
    if args.swap:
        with step("check that the disk copy can take the OS disk's place"):
            check = preflight(compute, outputs)
    try:
        found = prepare_disk(compute, container, outputs, settings, prefix=prefix, run_id=stamp,
                             inspect=args.dry_run, timing=timing)
    except PrepareFailed as err:
        document.update(status="not_prepared", prepare=err.remote_result, error=err.message, hint=err.hint)
        _write_json(container, out_dir, f"{prefix}/prepare/manifest.json", "prepare-manifest.json", document)
        emit_json(document)
        report_error(err)
        return int(err.exit_code)
    document["prepare"] = found
    changed = changed_values(found)
    for change in changed:
        log.info("    %s %s\\%s: %s -> %s", change.get("store"), change.get("key"), change.get("name"),
                 _shown(change.get("old")), _shown(change.get("new")))
    document["manifest"] = _write_json(container, out_dir, f"{prefix}/prepare/manifest.json", "prepare-manifest.json",
                                       {**document, "status": found.get("status")})
    if not args.swap:
        document["status"] = found.get("status")
        document["next"] = ("pipenv run prepare-dump --swap" if not args.dry_run else "pipenv run prepare-dump")
        log.info("next: `%s` swaps the prepared copy in, triggers the crash, collects the dump and rolls back",
                 "pipenv run prepare-dump --swap")
        emit_json(document)
        return int(ExitCode.OK)

    assert options is not None and check is not None
    try:
        outcome = swap_trigger_restore(compute, container, outputs, prefix=prefix, out_dir=out_dir, check=check,
                                       options=options)
    except SwapFailed as err:
        document.update(status="failed", swap=err.outcome.to_dict(), error=err.message, hint=err.hint)
        _write_json(container, out_dir, f"{prefix}/prepare/report.json", "prepare-report.json", document)
        emit_json(document)
        report_error(err)
        return int(err.exit_code)
    document["swap"] = outcome.to_dict()
    code = ExitCode.OK
    if not args.no_collect:
        with step("collect the new dump from the disk copy"):
            try:
                result = collect.collect_dump(outputs, config, timeout_minutes=timeout_minutes,
                                              agent_wait_minutes=args.agent_wait_minutes,
                                              poll_seconds=args.poll_seconds, out_dir=args.out_dir, now=now)
                document["collect"] = result.to_dict()
            except collect.CollectError as err:
                document["collect"] = err.result.to_dict() if err.result is not None else None
                document.update(error=err.message, hint=err.hint)
                code = err.exit_code
    document["status"] = "collected" if code == ExitCode.OK and not args.no_collect else (
        "swapped" if args.no_collect else "not_collected")
    _write_json(container, out_dir, f"{prefix}/prepare/report.json", "prepare-report.json", document)
    emit_json(document)
    if code != ExitCode.OK:
        report_error(CrashcartError(document.get("error", ""), document.get("hint", ""), code))
    return int(code)


def _shown(record: Any) -> str:
    if not record:
        return "(absent)"
    return str(record.get("value", record.get("hex", record)))
