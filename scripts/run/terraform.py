"""Terraform on the synthesized stacks (cdktf.out/stacks/<stack>), through python-terraform.

These are the commands a person would type in a stack folder (`terraform init`, `apply`, `output`,
`state list`, `apply -destroy`), run non-interactively (`-input=false`, TF_IN_AUTOMATION=1), with
the state wherever the stack's backend block says (local files by default, an azurerm blob for
pipelines): nothing here knows or overrides the backend, so a person and the pipeline always see the
same state.

python-terraform 0.10.1 builds the command lines (options as keyword arguments, `IsFlagged`, the
variables and the working folder) and starts the process; what it gets wrong is plugged here, without
forking it:
- its `destroy()` passes `-force`, which Terraform >= 0.15 rejects: worked around in one place,
  `RepairStackDir.destroy`, which says how;
- `cmd(..., synchronous=False)` (the only way to get the process, which graceful interruption needs)
  also leaks `-synchronous=false` onto the command line, and an empty variables dict becomes an
  empty `-var-file`: `_PythonTerraform.generate_cmd_string` drops both;
- secrets: values reach Terraform only as `TF_VAR_*` in the child's environment, set just for the
  moment the process is spawned, never on argv, in a file or in a log line.

The evidence stack can be initialised, read and created here, never destroyed: only
`RepairStackDir` has a `destroy`, and the one place that runs commands refuses any destroy outside
the repair folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from python_terraform import IsFlagged, Terraform

from scripts.azure.poll import poll
from scripts.base.console import environment
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.stop import StopRequest

log = logging.getLogger("crashcart.terraform")

EVIDENCE = "evidence"
REPAIR = "repair"
STACK_FILE = "cdk.tf.json"

# What every terraform child gets: no prompts, no "run terraform apply now" advice, no version check.
AUTOMATION_ENV = {"TF_IN_AUTOMATION": "1", "TF_INPUT": "0", "CHECKPOINT_DISABLE": "1"}
LOCK_TIMEOUT = "120s"  # a lock held by a run that just died (blob lease) is released within a minute

# Terraform prints this on its first SIGINT/SIGTERM and then stops after the in-flight operations.
_ACK_MARKERS = ("Interrupt received", "Stopping operation")
ACK_GRACE_SECONDS = 2.0


def terraform_binary() -> str:
    """`CRASHCART_TERRAFORM` or `terraform` on PATH."""
    name = os.environ.get("CRASHCART_TERRAFORM", "terraform")
    found = shutil.which(name)
    if not found:
        raise CrashcartError(
            f"terraform was not found ({name})",
            "install Terraform >= 1.5 (https://developer.hashicorp.com/terraform/install) or point "
            "CRASHCART_TERRAFORM at the binary",
            ExitCode.USAGE)
    return found


@dataclass(frozen=True)
class CommandResult:
    argv: list[str]
    code: int
    stdout: str
    stderr: str
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return self.code == 0

    def error_summary(self, lines: int = 3) -> str:
        """Terraform's own error lines ("Error: ..."), which say more than any paraphrase."""
        text = [ln.strip().lstrip("│╷╵").strip() for ln in (self.stderr + "\n" + self.stdout).splitlines()]
        errors = [ln for ln in text if ln.startswith("Error:")]
        if not errors:
            errors = [ln for ln in text if ln][-lines:]
        return "; ".join(errors[:lines]) or f"exit code {self.code}"


class _PythonTerraform(Terraform):
    """python-terraform with the two argv leaks of 0.10.1 plugged (see the module docstring), and a
    check run on every command line before it is started."""

    def __init__(self, working_dir: str, terraform_bin_path: str, check: Callable[[list[str]], None]):
        super().__init__(working_dir=working_dir, terraform_bin_path=terraform_bin_path)
        self.check = check
        self.argv: list[str] = []

    def generate_cmd_string(self, cmd: str, *args: Any, **kwargs: Any) -> list[str]:
        kwargs.pop("synchronous", None)
        if kwargs.get("var") == {}:
            kwargs.pop("var")
        argv = super().generate_cmd_string(cmd, *args, **kwargs)
        self.check(argv)
        self.argv = argv
        return argv


_spawn_lock = threading.Lock()


@contextlib.contextmanager
def _child_environment(extra: Mapping[str, str]) -> Iterator[None]:
    """python-terraform copies os.environ when it spawns: put `extra` there only for that instant."""
    with _spawn_lock, environment(dict(extra)):
        yield


def supervise(proc: subprocess.Popen, label: str, stop: StopRequest | None, *, shielded: bool = False,
              loud: bool = False, graceful: bool = True,
              ack_grace: float = ACK_GRACE_SECONDS) -> tuple[int, str, str, bool]:
    """Waits for a child, streaming its output to the log, and passes a stop request on to it.

    Terraform stops cleanly on one SIGINT (it finishes the calls in flight and writes the state) and
    exits at once, possibly losing state, on a second. A Ctrl-C on a terminal reaches the whole
    process group, terraform included, so it is forwarded only if terraform has not acknowledged it
    within `ack_grace` seconds (a SIGTERM sent to this process alone, or the deadline, which terraform
    never sees). A shielded child (teardown) is never interrupted. `graceful=False` (synth) sends
    SIGTERM: it has nothing to save.
    """
    out: list[str] = []
    err: list[str] = []
    acknowledged = threading.Event()

    def pump(stream: Any, sink: list[str], level: int) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            sink.append(line)
            if any(marker in line for marker in _ACK_MARKERS):
                acknowledged.set()
            if line.strip():
                log.log(level, "    %s| %s", label, line)
        stream.close()

    level = logging.INFO if loud else logging.DEBUG
    readers = [threading.Thread(target=pump, args=(proc.stdout, out, level), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err, level), daemon=True)]
    for reader in readers:
        reader.start()
    stop_seen: float | None = None
    forwarded = False

    def wait_briefly() -> None:
        # Waiting on the stdout reader ends the moment the child exits (its pipe closes); polling the
        # process would add up to 50 ms per command.
        if readers[0].is_alive():
            readers[0].join(timeout=0.2)
        else:
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass

    def exited() -> int | None:
        """Waits up to 0.2 s for the child; its exit code once it ended, else passes a stop request on
        (once). The wait comes first, so a command that ends at once never sees the stop."""
        nonlocal stop_seen, forwarded
        wait_briefly()
        code = proc.poll()
        if code is not None or stop is None or shielded or forwarded or not stop.reason:
            return code
        now = time.monotonic()
        if stop_seen is None:
            stop_seen = now
            log.info("    %s: stopping (%s); waiting for it to finish what is in flight", label, stop.reason)
        if acknowledged.is_set():
            forwarded = True  # it got the signal itself (terminal Ctrl-C); a second one would kill it
        elif stop.is_deadline or now - stop_seen >= ack_grace:
            proc.send_signal(signal.SIGINT if graceful else signal.SIGTERM)
            forwarded = True
        return None

    # The probe does the waiting; no deadline and no StopRun here: a stop is forwarded to the child,
    # which is waited for until it exits.
    poll(exited, timeout_s=math.inf, interval_s=0.0, jitter=0.0)
    for reader in readers:
        reader.join(timeout=5)
    return proc.returncode, "\n".join(out), "\n".join(err), stop_seen is not None


class StackDir:
    """One synthesized stack folder and the Terraform commands that create and read it."""

    name: ClassVar[str] = ""

    def __init__(self, stacks_dir: Path, stop: StopRequest | None = None):
        self.stacks_dir = Path(stacks_dir).absolute()
        self.path = self.stacks_dir / self.name
        self.stop = stop

    # ---- the synthesized configuration -----------------------------------------------------------
    @property
    def stack_file(self) -> Path:
        return self.path / STACK_FILE

    def synthesized(self) -> dict[str, Any]:
        try:
            return json.loads(self.stack_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CrashcartError(f"{self.stack_file} does not exist",
                                 "synthesize the stacks first (`pipenv run python main.py` or `npx cdktf synth`)",
                                 ExitCode.USAGE) from None

    def declared_outputs(self) -> set[str]:
        return set(self.synthesized().get("output", {}))

    def declared_variables(self) -> set[str]:
        return set(self.synthesized().get("variable", {}))

    # ---- commands -----------------------------------------------------------------------------------
    def init(self) -> None:
        result = self._run("init", lambda tf: tf.init(reconfigure=IsFlagged, backend=True, synchronous=False))
        if not result.ok:
            raise CrashcartError(
                f"terraform init failed in {self.path}: {result.error_summary()}",
                "check that the state backend is reachable with your identity ([backend] in the config; "
                "azurerm needs Storage Blob Data Contributor on the state container) and re-run",
                ExitCode.DEPLOY_FAILED)

    def resources(self) -> list[str]:
        """`terraform state list`: the addresses the state holds (empty when nothing was ever applied)."""
        result = self._run("state list", lambda tf: tf.cmd("state list", synchronous=False))
        if result.ok:
            return [line.strip() for line in result.stdout.splitlines() if line.strip()]
        if "No state file was found" in result.stderr + result.stdout:
            return []
        raise CrashcartError(f"terraform state list failed in {self.path}: {result.error_summary()}",
                             "check access to the state backend and re-run", ExitCode.DEPLOY_FAILED)

    def outputs(self) -> dict[str, Any]:
        """`terraform output -json`, as {name: value}; empty when nothing is deployed."""
        result = self._run("output", lambda tf: tf.cmd("output", json=IsFlagged, synchronous=False))
        if not result.ok:
            raise CrashcartError(f"terraform output failed in {self.path}: {result.error_summary()}",
                                 "check access to the state backend and re-run", ExitCode.DEPLOY_FAILED)
        raw = json.loads(result.stdout or "{}")
        return {name: item.get("value") for name, item in raw.items()}

    def _apply(self, env: Mapping[str, str], *args: str, shielded: bool = False, **options: Any) -> CommandResult:
        """`terraform apply -auto-approve` (python-terraform spells it skip_plan=True)."""
        return self._run("apply", lambda tf: tf.apply(*args, skip_plan=True, lock_timeout=LOCK_TIMEOUT,
                                                        synchronous=False, **options), env=env, loud=True,
                         shielded=shielded)

    def _run(self, label: str, start: Callable[[Terraform], tuple[Any, Any, Any]],
             env: Mapping[str, str] | None = None, loud: bool = False, shielded: bool = False) -> CommandResult:
        """The one place a terraform process starts. Refuses to destroy anything but the repair stack."""
        tf = _PythonTerraform(str(self.path), terraform_binary(),
                              check=lambda argv: _refuse_destroy_outside_repair(self, argv))
        with _child_environment({**AUTOMATION_ENV, **(env or {})}):
            proc, _, _ = start(tf)
        code, out, err, interrupted = supervise(proc, f"terraform {self.name}", self.stop,
                                                shielded=shielded, loud=loud)
        argv = tf.argv
        log.debug("    terraform %s: %s -> exit %s", self.name, " ".join(argv[1:]), code)
        return CommandResult(argv, code, out, err, interrupted)


def _refuse_destroy_outside_repair(stack: StackDir, argv: list[str]) -> None:
    destroying = "destroy" in argv[1:2] or "-destroy" in argv
    if destroying and (stack.name != REPAIR or stack.path.name != REPAIR or not isinstance(stack, RepairStackDir)):
        raise CrashcartError(f"refused to run a destroy in {stack.path}: only the repair stack is ever destroyed",
                             "this is a bug in crashcart; nothing was run", ExitCode.BUG)


class EvidenceStackDir(StackDir):
    """The long-lived stack: created when absent, read otherwise, never destroyed (there is no method)."""

    name = EVIDENCE

    def missing_outputs(self) -> set[str]:
        """Declared outputs the deployed state lacks. The repair stack reads the evidence state's outputs
        (cdktf's cross-stack references), so "deployed" means "has every output this synth declares"."""
        return self.declared_outputs() - set(self.outputs())

    def deploy(self) -> None:
        """Plans, refuses any plan that would delete or replace something (blobs live in there), applies
        exactly that plan."""
        plan_file = self.path / "evidence.tfplan"
        try:
            result = self._run("plan", lambda tf: tf.plan(out=str(plan_file), lock_timeout=LOCK_TIMEOUT,
                                                           synchronous=False), loud=True)
            if result.code not in (0, 2):  # -detailed-exitcode: 0 no changes, 2 changes
                raise CrashcartError(f"terraform plan failed for the evidence stack: {result.error_summary()}",
                                     "fix the cause above and re-run; nothing was changed", ExitCode.DEPLOY_FAILED)
            destructive = self.destructive_changes(plan_file)
            if destructive:
                raise CrashcartError(
                    f"the evidence stack's plan would delete or replace {', '.join(destructive)}",
                    "repair-run never deletes evidence: review the change with `cd cdktf.out/stacks/evidence && "
                    "terraform plan`, and apply it yourself if it is really wanted", ExitCode.DEPLOY_FAILED)
            if result.code == 0:
                return
            applied = self._apply({}, str(plan_file))
            if not applied.ok:
                raise CrashcartError(f"terraform apply failed for the evidence stack: {applied.error_summary()}",
                                     "fix the cause above and re-run: what was created is kept and reused",
                                     ExitCode.DEPLOY_FAILED)
        finally:
            plan_file.unlink(missing_ok=True)

    def destructive_changes(self, plan_file: Path) -> list[str]:
        result = self._run("show", lambda tf: tf.cmd("show", str(plan_file), json=IsFlagged, synchronous=False))
        if not result.ok:
            raise CrashcartError(f"terraform show failed for the evidence plan: {result.error_summary()}",
                                 "re-run; nothing was changed", ExitCode.DEPLOY_FAILED)
        plan = json.loads(result.stdout or "{}")
        return [change.get("address", "?") for change in plan.get("resource_changes", [])
                if "delete" in change.get("change", {}).get("actions", [])]


class RepairStackDir(StackDir):
    """The short-lived stack: deployed, read and destroyed by every run."""

    name = REPAIR

    def deploy(self, variables: Mapping[str, str]) -> CommandResult:
        return self._apply(variables)

    def destroy(self, variables: Mapping[str, str]) -> CommandResult:
        """Destroys what the repair stack's state holds. Shielded from stop requests: a half-done destroy is
        what leaves resources behind.

        The workaround for python-terraform 0.10.1's `destroy()`, which passes `-force` - a flag Terraform
        >= 0.15 rejects ("flag provided but not defined: -force", tests/run/test_terraform.py shows it).
        The spelling every Terraform since 0.15 accepts is `apply -destroy -auto-approve`: python-terraform's
        `apply()` with destroy=IsFlagged. Nothing else in the kit destroys a stack."""
        if self.path.name != REPAIR:
            raise CrashcartError(f"refused to destroy {self.path}", "this is a bug in crashcart", ExitCode.BUG)
        return self._apply(variables, destroy=IsFlagged, shielded=True)
