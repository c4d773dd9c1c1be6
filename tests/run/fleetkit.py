"""A fleet of doubled VMs for `fleet run` (tests/run/test_fleet*.py, bench/fleet_bench.py).

What is real: the fleet CLI and orchestrator, one repair-run child process per VM (deploy, collect, tear
down), the collection against the loopback ARM double (a rescue VM per VM, Run Command) and Azurite (the
evidence container: dumps, locks, the fleet manifest), the Azure SDK's retry policy on 429.
What stands in: `terraform` (tests/support/fake_terraform.py) behind a shim that gives each VM's folder
its own cues (outputs, faults, log) - the fleet passes one environment to every child, as it must - and,
instead of one synth per VM (15 s of jsii each), each VM's folder is given the session's synthesized
stacks rewritten for that VM (its state key, tags and names), which repair-run's own check
(`check_repair_stack_is_for`) accepts only when they are right.

Faults a fleet can be given per VM: `no_dump` (the rescue VM's script finds no dump), `throttled`
(ARM answers 429 with Retry-After: 1 to the first two reads of the rescue VM), `throttled_forever`
(429 until the SDK's retries give up: the VM is left for a re-run), `deploy_fails` (terraform apply of
the repair stack fails half-way).

How long things take is the ARM double's duration profile (`arm.durations`, scripts/devkit/armdouble.py):
zero by default; with one, the run commands and long-running operations take their modelled time in the
double and terraform's apply and destroy of the repair stack theirs (`terraform_waits`, the fake's
FAKE_TF_SLEEP), so a fleet waits as it would on Azure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.azure.identity import vm_key
from scripts.azure.runcommand import DEFAULT_POLL_SECONDS
from scripts.devkit import arm_compute
from scripts.devkit.armdouble import ArmDouble, Durations, Request, Response, error_response
from tests.run.repairkit import SOURCE_VM, SUB, Project, repair_outputs
from tests.support.fake_terraform import TerraformLog, command_of

FAKE_TF = Path(__file__).resolve().parents[1] / "support" / "fake_terraform.py"
PER_VM_ENV = "FLEETKIT_PER_VM"


def vm_ids(count: int, prefix: str = "app") -> list[str]:
    return [SOURCE_VM.replace("prod-web", f"prod-{prefix}").replace("web-01", f"{prefix}-{i:02d}")
            for i in range(1, count + 1)]


def name_of(vm_id: str) -> str:
    return vm_id.rsplit("/", 1)[-1]


def rescue_group(vm_id: str) -> str:
    return f"crashcart-repair-{vm_key(vm_id)}"


def write_shim(bin_dir: Path) -> Path:
    """`terraform` that applies the cues of the VM whose folder it runs in (<work>/<key>/cdktf.out/stacks/<s>),
    then runs the fake."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "terraform"
    shim.write_text(
        f"#!{sys.executable}\nimport json, os, pathlib, runpy\n"
        f"table = os.environ.get({PER_VM_ENV!r})\n"
        "if table:\n"
        "    key = pathlib.Path.cwd().parents[2].name\n"
        "    os.environ.update(json.loads(pathlib.Path(table).read_text()).get(key, {}))\n"
        f"runpy.run_path({str(FAKE_TF)!r}, run_name='__main__')\n")
    shim.chmod(0o755)
    return shim


def terraform_waits(durations: Durations) -> str:
    """The ARM double's duration profile for what terraform does outside it (the fake's FAKE_TF_SLEEP): the
    repair stack's apply (the rescue VM created and booted) and destroy."""
    waits = {"apply:repair": durations.of("deploy"), "destroy:repair": durations.of("destroy")}
    return ",".join(f"{cue}={seconds:.3f}" for cue, seconds in waits.items() if seconds > 0)


@dataclass
class Fleet:
    """The VMs, their folders, their doubles and their faults."""

    project: Project
    arm: ArmDouble
    ids: list[str]
    fleet_id: str
    root: Path  # where the kit keeps its own files (shim, cues, dumps)
    no_dump: set[str] = field(default_factory=set)
    throttled: set[str] = field(default_factory=set)
    throttled_forever: set[str] = field(default_factory=set)
    deploy_fails: set[str] = field(default_factory=set)
    culprits: dict[str, str] = field(default_factory=dict)  # vm id -> faulting driver of its dump
    throttle_log: list[tuple[str, float]] = field(default_factory=list)  # (vm id, time) of each 429 answered
    dumps: dict[str, bytes] = field(default_factory=dict)  # faulting driver -> dump bytes

    @property
    def work_dir(self) -> Path:
        return self.project.root / "crashcart-fleet" / self.fleet_id

    def folder(self, vm_id: str) -> Path:
        return self.work_dir / vm_key(vm_id)

    def log(self, vm_id: str) -> TerraformLog:
        return TerraformLog(self.root / f"{vm_key(vm_id)}-terraform.jsonl")

    @property
    def vms_file(self) -> Path:
        return self.root / "vms.txt"

    @property
    def container(self) -> Any:
        return self.project.azurite.service_client().get_container_client(self.project.lock_container)

    # ---- setting the scene ---------------------------------------------------------------------------------
    def build(self) -> "Fleet":
        self.vms_file.write_text("# the fleet\n" + "".join(v + "\n" for v in self.ids))
        write_shim(self.root / "bin")
        cues: dict[str, dict[str, str]] = {}
        for vm_id in self.ids:
            self._folder(vm_id)
            cues[vm_key(vm_id)] = self._cues(vm_id)
            arm_compute.install_rescue_vm(self.arm, resource_group=rescue_group(vm_id), agent=["Ready"])
        (self.root / "cues.json").write_text(json.dumps(cues))
        arm_compute.install_run_commands(self.arm, lambda: arm_compute.Scripted(
            ["Pending", "Running", "Succeeded"], effect=self._remote_script))
        self.arm.route("GET", r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Compute/"
                              r"virtualMachines/crashcart-rescue", self._rescue_vm_get)
        return self

    def _folder(self, vm_id: str) -> None:
        """The VM's folder as `fleet run --skip-synth` expects it: its config and its stacks."""
        folder = self.folder(vm_id)
        stacks = folder / "cdktf.out" / "stacks"
        if stacks.exists():
            return
        source = self.project.root / "cdktf.out" / "stacks"
        shutil.copytree(source / "evidence", stacks / "evidence", ignore=shutil.ignore_patterns(".terraform"))
        (stacks / "repair").mkdir(parents=True)
        text = (source / "repair" / "cdk.tf.json").read_text()
        (stacks / "repair" / "cdk.tf.json").write_text(self.rewrite(text, vm_id))
        (folder / "repair.toml").write_text(self.rewrite((self.project.root / "repair.toml").read_text(), vm_id))

    @staticmethod
    def rewrite(text: str, vm_id: str) -> str:
        rg = vm_id.split("/")[4]
        return (text.replace(vm_key(SOURCE_VM), vm_key(vm_id)).replace(SOURCE_VM, vm_id)
                .replace("prod-web", rg).replace("web-01", name_of(vm_id)))

    def _cues(self, vm_id: str) -> dict[str, str]:
        key = vm_key(vm_id)
        outputs = self.root / f"{key}-outputs.json"
        group = rescue_group(vm_id)
        base = f"/subscriptions/{SUB}/resourceGroups/{group}/providers/Microsoft.Compute"
        repair = {**repair_outputs(self.project.azurite.blob_endpoint), "resource_group_name": group,
                  "rescue_vm_id": arm_compute.vm_id(resource_group=group), "source_vm_id": vm_id,
                  "source_os_disk_id": vm_id.replace("virtualMachines/", "disks/") + "_OsDisk_1",
                  "disk_copy_id": f"{base}/disks/{name_of(vm_id)}-crashcart-copy",
                  "snapshot_id": f"{base}/snapshots/{name_of(vm_id)}-crashcart-snapshot",
                  "evidence_container": self.project.lock_container}
        outputs.write_text(json.dumps({"repair": repair, "evidence": self.project.evidence_outputs()}))
        cues = {"FAKE_TF_OUTPUTS": str(outputs), "FAKE_TF_LOG": str(self.log(vm_id).path)}
        if vm_id in self.deploy_fails:
            cues["FAKE_TF_FAIL"] = "apply:repair"
        return cues

    # ---- the doubles' behaviour --------------------------------------------------------------------------------
    def _vm_of_prefix(self, prefix: str) -> str:
        key = prefix.split("/", 1)[0]
        return next(v for v in self.ids if vm_key(v) == key)

    def _dump(self, driver: str) -> bytes:
        if driver not in self.dumps:
            from scripts.devkit.dumpbuilder import build_triage_dump

            path = self.root / f"dump-{driver}.dmp"
            build_triage_dump(path, faulting_module=driver)
            self.dumps[driver] = path.read_bytes()
        return self.dumps[driver]

    def _remote_script(self, parameters: dict[str, str]) -> dict[str, Any]:
        """What collect.ps1 does on the rescue VM: upload the dump and its manifest, or find none."""
        vm_id = self._vm_of_prefix(parameters["Prefix"])
        if vm_id in self.no_dump:
            message = r"the broken volume holds no memory dump (looked at F:\Windows\MEMORY.DMP, F:\Windows\Minidump)"
            return {"output": arm_compute.result_line("no_dump", message=message, files=[]), "exit_code": 10}
        data = self._dump(self.culprits.get(vm_id, "contosoflt.sys"))
        name = f"{parameters['Prefix']}/Minidump/crash.dmp"
        container = self.container
        container.upload_blob(name, data)
        manifest = {"blob": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                    "header": {"bugcheck_code": "0x7e"}}
        container.upload_blob(f"{name}.manifest.json", json.dumps(manifest))
        files = [{"blob": name, "kind": "minidump", "source_path": r"F:\Windows\Minidump\crash.dmp",
                  "size": len(data), "uploaded": True}]
        return {"output": arm_compute.result_line("collected", files=files)}

    def _rescue_vm_get(self, d: ArmDouble, req: Request, m: Any) -> Response:
        """ARM throttling the reads of some rescue VMs: 429 with Retry-After, as ARM answers."""
        vm_id = next((v for v in self.ids if rescue_group(v).lower() in req.path.lower()), None)
        throttles = sum(1 for v, _ in self.throttle_log if v == vm_id)
        if vm_id in self.throttled_forever or (vm_id in self.throttled and throttles < 2):
            self.throttle_log.append((vm_id, time.monotonic()))
            response = error_response(429, "TooManyRequests", "The request is being throttled as the limit has "
                                                              "been reached for operation type - Read_ObjectId.")
            response.headers["Retry-After"] = "0" if vm_id in self.throttled_forever else "1"
            return response
        found = d.get(req.path)
        return Response(200, found) if found is not None else d.not_found(req.path)

    # ---- running it -------------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = {**self.project.env, "PATH": f"{self.root / 'bin'}{os.pathsep}{self.project.env['PATH']}",
               PER_VM_ENV: str(self.root / "cues.json"), "CRASHCART_ARM_ENDPOINT": self.arm.url}
        waits = terraform_waits(self.arm.durations)
        if waits:
            env["FAKE_TF_SLEEP"] = waits
            # the kit polls Azure every DEFAULT_POLL_SECONDS (10 s): at the profile's scale, as the waits are
            env["CRASHCART_POLL_SECONDS"] = f"{max(0.2, DEFAULT_POLL_SECONDS * self.arm.durations.scale):.2f}"
        return env

    def command(self, *args: str, selector: str | None = None, synth: bool = False) -> list[str]:
        """`fleet run`, by default with --skip-synth (each folder holds its stacks already); `synth`: the
        fleet synthesizes them (one jsii load: seconds of CPU)."""
        chosen = ["--selector", selector] if selector else ["--vms", str(self.vms_file)]
        return [sys.executable, "-m", "scripts", "fleet", "run", *chosen, "--fleet-id", self.fleet_id,
                *([] if synth else ["--skip-synth"]), *args]

    def start(self, *args: str, selector: str | None = None, synth: bool = False) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args, selector=selector, synth=synth), cwd=self.project.root,
                                env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def run(self, *args: str, timeout: float = 600, selector: str | None = None,
            synth: bool = False) -> "FleetOutcome":
        return finish(self.start(*args, selector=selector, synth=synth), timeout)

    def in_graph(self) -> list[str]:
        """The fleet's VMs as Windows VMs in the ARM double, with Resource Graph, resource SKUs and compute usages
        served (what `--selector` and the quota-derived --max-parallel read)."""
        from scripts.devkit import arm_graph, arm_skus, arm_usage
        from scripts.devkit.arm_vm import add_broken_vm

        for install in (arm_graph.install, arm_skus.install, arm_usage.install):
            install(self.arm)
        return [add_broken_vm(self.arm, name=name_of(v), resource_group=v.split("/")[4]).vm_id for v in self.ids]

    # ---- what is left -----------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return json.loads(self.container.download_blob(f"fleets/{self.fleet_id}/fleet.json").readall())

    def leaked(self) -> list[str]:
        """Repair resources still in some VM's state, run commands still on a rescue VM, locks still held."""
        left = []
        for vm_id in self.ids:
            state = self.folder(vm_id) / f"terraform.repair.{vm_key(vm_id)}.tfstate"
            if state.exists() and json.loads(state.read_text())["resources"]:
                left.append(f"{vm_key(vm_id)}: repair resources in {state}")
        left += [f"run command {k}" for k in self.arm.resources if "/runcommands/" in k]
        for blob in self.container.list_blobs(name_starts_with="locks/"):
            if blob.lease.state == "leased":
                left.append(f"lock {blob.name} still leased")
        return left

    def repair_runs(self, vm_id: str) -> int:
        """How many repair applies ran for the VM."""
        return len([c for c in self.log(vm_id).calls("repair") if command_of(c["argv"]) == "apply"])


@dataclass
class FleetOutcome:
    code: int
    result: dict[str, Any]
    stdout: str
    stderr: str
    seconds: float = 0.0


def finish(proc: subprocess.Popen, timeout: float = 600) -> FleetOutcome:
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"fleet did not finish within {timeout}s; its log:\n{err[-5000:]}") from None
    try:
        result = json.loads(out or "{}")
    except ValueError:
        result = {}
    return FleetOutcome(proc.returncode, result, out, err, time.monotonic() - started)


def make_fleet(project: Project, arm: ArmDouble, root: Path, count: int, fleet_id: str, prefix: str = "app",
               **faults: Any) -> Fleet:
    root.mkdir(parents=True, exist_ok=True)
    return Fleet(project, arm, vm_ids(count, prefix), fleet_id, root, **faults).build()


__all__ = ["Fleet", "FleetOutcome", "ScriptedJobs", "finish", "make_fleet", "vm_ids"]


# ---- a job stand-in for the orchestration alone (the canary rollout) ------------------------------------------
class ScriptedJobs:
    """Stands for each VM's repair-run child: `outcomes[vm_id]` is "booted", "not-booted" (the fix was tried and
    rolled back: repair-run's exit 15) or "no-dump" (the collection failed before the fix: exit 10). Each
    job's fields come from VmJob.classify on the report repair-run would print, so the fleet reads them
    as it reads a child's. `order` records (vm_id, "start"|"end", time)."""

    def __init__(self, outcomes: dict[str, str], seconds: float = 0.05):
        import threading

        self.outcomes = outcomes
        self.seconds = seconds
        self.order: list[tuple[str, str, float]] = []
        self._lock = threading.Lock()

    def __call__(self, vm_id: str, settings: Any, stop: Any, container: Any) -> "ScriptedJobs._Job":
        return ScriptedJobs._Job(self, vm_id, settings, container)

    def started(self) -> list[str]:
        return [v for v, what, _ in self.order if what == "start"]

    def report(self, vm_id: str, spec: str | None) -> tuple[int, dict[str, Any]]:
        outcome = self.outcomes.get(vm_id, "booted")
        if outcome == "no-dump":
            return 10, {"collect": {"status": "no_dump", "blobs": []},
                        "error": {"message": "the broken volume holds no memory dump"}}
        blob = {"name": f"{vm_key(vm_id)}/run/Minidump/crash.dmp", "ok": True, "size": 1024, "kind": "minidump",
                "url": "https://evidence/x", "sha256": "0" * 64}
        collect = {"status": "collected", "blobs": [blob], "run": f"{vm_key(vm_id)}/run", "report_blobs": {"r": 1}}
        booted = outcome == "booted"
        verdict = {"booted": booted, "reason": "agent-ready" if booted else "bugcheck", "seconds": 1.0}
        fix = {"recipe": spec, "verify": {"kept_fixed_disk": booted, "verdict": verdict,
                                          "error": "" if booted else "the fixed copy did not boot: it crashed again"}}
        if booted:
            return 0, {"collect": collect, "fix": fix, "status": "fixed"}
        return 15, {"collect": collect, "fix": fix, "error": {"message": fix["verify"]["error"]}}

    class _Job:
        def __init__(self, kit: "ScriptedJobs", vm_id: str, settings: Any, container: Any):
            self.kit, self.vm_id, self.settings, self.container = kit, vm_id, settings, container

        def run(self) -> dict[str, Any]:
            from scripts.run.fleetjob import VmJob

            with self.kit._lock:
                self.kit.order.append((self.vm_id, "start", time.monotonic()))
            time.sleep(self.kit.seconds)
            code, report = self.kit.report(self.vm_id, self.settings.fix)
            if report["collect"]["status"] == "collected" and self.container is not None:
                for blob in report["collect"]["blobs"]:  # what the collection leaves in evidence
                    self.container.upload_blob(blob["name"], b"\0" * blob["size"], overwrite=True)
                self.container.upload_blob(f"{report['collect']['run']}/report.json", b"{}", overwrite=True)
            fields = VmJob.classify(code, report, "", self.settings.fix)
            with self.kit._lock:
                self.kit.order.append((self.vm_id, "end", time.monotonic()))
            return fields
