"""Terraform on the synthesized stacks (cdktf.out/stacks/<stack>), through python-terraform.

These are the commands a person would type in a stack folder (`terraform init`, `apply`, `output`,
`state list`, `apply -destroy`), run non-interactively (`-input=false`, TF_IN_AUTOMATION=1), with
the state wherever the stack's backend block says (local files by default, an azurerm blob for
pipelines): nothing here knows or overrides the backend, so a person and the pipeline always see the
same state.

python-terraform 0.10.1 builds the command lines (options as keyword arguments, `IsFlagged`, the
variables and the working folder); what it gets wrong is plugged here, without forking it:
- its `destroy()` passes `-force`, which Terraform >= 0.15 rejects: worked around in one place,
  `RepairStackDir.destroy`, which says how;
- `cmd(..., synchronous=False)` (the only way to get the process, which graceful interruption needs)
  also leaks `-synchronous=false` onto the command line, and an empty variables dict becomes an
  empty `-var-file`: `_PythonTerraform.generate_cmd_string` drops both;
- it starts terraform in the kit's process group, where a terminal's Ctrl-C reaches it directly, and
  logs raw output bytes through its own logger: `_PythonTerraform.cmd` starts the process through
  scripts.run.child.spawn instead (own session, umask 077, nothing logged);
- secrets: values reach Terraform only as `TF_VAR_*` in the child's environment, set just for the
  moment the process is spawned, never on argv, in a file or in a log line.

What Terraform says reaches the operator cleaned: `-no-color` on every command, and `clean_line` drops
what is left of escape sequences, box drawing and control characters; `CommandResult.error_summary`
keeps Terraform's own `Error:` lines, which say more than any paraphrase.

The evidence stack can be initialised, read and created here, never destroyed: only
`RepairStackDir` has a `destroy`, and the one place that runs commands refuses any destroy outside
the repair folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from python_terraform import IsFlagged, Terraform

from scripts.base.console import environment
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.stop import StopRequest
from scripts.run.child import clean_line, spawn, supervise

log = logging.getLogger("crashcart.terraform")

EVIDENCE = "evidence"
REPAIR = "repair"
STACK_FILE = "cdk.tf.json"

# What every terraform child gets: no prompts, no "run terraform apply now" advice, no version check.
AUTOMATION_ENV = {"TF_IN_AUTOMATION": "1", "TF_INPUT": "0", "CHECKPOINT_DISABLE": "1"}
# What a person types to run a repair-stack command by hand (the value is not used by a destroy).
PASSWORD_HINT = "TF_VAR_rescue_admin_password=<any 12+ characters>"
LOCK_TIMEOUT = "120s"  # a lock held by a run that just died (blob lease) is released within a minute

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
        """Terraform's own error lines ("Error: ..."), cleaned, which say more than any paraphrase."""
        text = [clean_line(ln) for ln in (self.stderr + "\n" + self.stdout).splitlines()]
        errors = list(dict.fromkeys(ln for ln in text if ln.startswith("Error:")))
        if not errors:
            errors = [ln for ln in text if ln and not ln.startswith("Warning:")][-lines:]
        return "; ".join(errors[:lines]) or f"exit code {self.code}"

    def says(self, text: str) -> bool:
        return text in self.stderr + self.stdout


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

    def cmd(self, cmd: str, *args: Any, **kwargs: Any) -> tuple[subprocess.Popen, None, None]:
        """Every command python-terraform runs (apply, plan, init, ... all come here): the command line it
        builds, started by the kit in its own session (scripts.run.child.spawn), never waited for here."""
        argv = self.generate_cmd_string(cmd, *args, **kwargs)
        env = os.environ.copy() if self.is_env_vars_included else {}
        return spawn(argv, cwd=self.working_dir or None, env=env, private=True), None, None


_spawn_lock = threading.Lock()


@contextlib.contextmanager
def _child_environment(extra: Mapping[str, str]) -> Iterator[None]:
    """python-terraform copies os.environ when it spawns: put `extra` there only for that instant."""
    with _spawn_lock, environment(dict(extra)):
        yield


class NotInitialized(CrashcartError):
    """Terraform was never initialised in a stack folder: nothing was deployed from it."""


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

    def backend(self) -> tuple[str, dict[str, Any]]:
        """The synthesized backend block: ("local", {"path": ...}) or ("azurerm", {..., "key": ...})."""
        block = self.synthesized().get("terraform", {}).get("backend", {}) or {"local": {}}
        kind, settings = next(iter(block.items()))
        return kind, dict(settings or {})

    def local_state_path(self) -> Path | None:
        """Where a local backend keeps the state (None for a remote backend), resolved like Terraform does:
        relative to the stack folder."""
        kind, settings = self.backend()
        if kind != "local":
            return None
        return Path(os.path.normpath(self.path / settings.get("path", "terraform.tfstate")))

    def state_location(self) -> str:
        """Where the state lives, as a person would look for it."""
        kind, settings = self.backend()
        local = self.local_state_path()
        if local is not None:
            return str(local)
        return f"{kind} backend: " + ", ".join(f"{k}={settings[k]}" for k in sorted(settings)
                                               if k in ("storage_account_name", "container_name", "key"))

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
        result = self._run("state list", lambda tf: tf.cmd("state list", no_color=IsFlagged, synchronous=False))
        if result.ok:
            return [clean_line(line) for line in result.stdout.splitlines() if clean_line(line)]
        if result.says("No state file was found"):
            return []
        raise CrashcartError(f"terraform state list failed in {self.path}: {result.error_summary()}",
                             "check access to the state backend and re-run", ExitCode.DEPLOY_FAILED)

    def outputs(self) -> dict[str, Any]:
        """`terraform output -json`, as {name: value}; empty when nothing is deployed. NotInitialized when
        Terraform was never initialised in this folder (nothing was deployed from here)."""
        result = self._run("output", lambda tf: tf.cmd("output", json=IsFlagged, no_color=IsFlagged,
                                                       synchronous=False))
        if not result.ok and result.says("Backend initialization required"):
            raise NotInitialized(f"the {self.name} stack was never initialised in {self.path} (terraform: "
                                 f"{result.error_summary(lines=1)})", "", ExitCode.USAGE)
        if not result.ok:
            raise CrashcartError(f"terraform output failed in {self.path}: {result.error_summary()}",
                                 "check access to the state backend and re-run", ExitCode.DEPLOY_FAILED)
        try:
            raw = json.loads(result.stdout or "{}")
            return {str(name): item.get("value") for name, item in raw.items()}
        except (ValueError, AttributeError, RecursionError):
            raise CrashcartError(f"terraform output in {self.path} printed no JSON object",
                                 "check the terraform binary (CRASHCART_TERRAFORM) and re-run",
                                 ExitCode.DEPLOY_FAILED) from None

    def pulled_state(self) -> dict[str, Any] | None:
        """`terraform state pull`: the state document (None when there is none)."""
        result = self._run("state pull", lambda tf: tf.cmd("state pull", synchronous=False))
        if not result.ok:
            raise CrashcartError(f"terraform state pull failed in {self.path}: {result.error_summary()}",
                                 "check access to the state backend and re-run", ExitCode.DEPLOY_FAILED)
        try:
            document = json.loads(result.stdout) if result.stdout.strip() else None
        except (ValueError, RecursionError):
            document = None
        return document if isinstance(document, dict) else None

    def _before_command(self) -> None:
        """What a stack does before each of its terraform commands (nothing by default)."""

    def _apply(self, env: Mapping[str, str], *args: str, shielded: bool = False, **options: Any) -> CommandResult:
        """`terraform apply -auto-approve` (python-terraform spells it skip_plan=True)."""
        return self._run("apply", lambda tf: tf.apply(*args, skip_plan=True, lock_timeout=LOCK_TIMEOUT,
                                                        synchronous=False, **options), env=env, loud=True,
                         shielded=shielded)

    def _run(self, label: str, start: Callable[[Terraform], tuple[Any, Any, Any]],
             env: Mapping[str, str] | None = None, loud: bool = False, shielded: bool = False) -> CommandResult:
        """The one place a terraform process starts. Refuses to destroy anything but the repair stack."""
        self._before_command()
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

    def missing_outputs(self, values: dict[str, Any] | None = None) -> set[str]:
        """Declared outputs the deployed state lacks (`values`: its outputs as already read; else read now).
        The repair stack reads the evidence state's outputs (cdktf's cross-stack references), so "deployed"
        means "has every output this synth declares"."""
        return self.declared_outputs() - set(self.outputs() if values is None else values)

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
        result = self._run("show", lambda tf: tf.cmd("show", str(plan_file), json=IsFlagged, no_color=IsFlagged,
                                                     synchronous=False))
        if not result.ok:
            raise CrashcartError(f"terraform show failed for the evidence plan: {result.error_summary()}",
                                 "re-run; nothing was changed", ExitCode.DEPLOY_FAILED)
        try:
            changes = json.loads(result.stdout or "{}").get("resource_changes", [])
            return [str(change.get("address", "?")) for change in changes
                    if "delete" in change.get("change", {}).get("actions", [])]
        except (ValueError, AttributeError, RecursionError):
            raise CrashcartError("terraform show printed no readable plan for the evidence stack",
                                 "re-run; nothing was changed", ExitCode.DEPLOY_FAILED) from None


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

    # ---- the local state file, which holds the rescue VM's admin password while the stack exists ---------
    def local_state_files(self) -> list[Path]:
        """The local state file and Terraform's .backup of it (none for a remote backend)."""
        path = self.local_state_path()
        return [] if path is None else [path, path.with_name(path.name + ".backup")]

    def _before_command(self) -> None:
        """A state file from before (another tool, an older kit) is made private before Terraform writes
        into it: Terraform keeps an existing file's mode, and creates new ones under umask 077."""
        for file in self.local_state_files():
            if file.exists() and file.stat().st_mode & 0o077:
                file.chmod(0o600)

    def forget_local_state(self) -> list[Path]:
        """After a destroy that left nothing: deletes the local state file and its .backup (the password of
        the VM that is gone went with them). Returns what was deleted."""
        deleted = []
        for file in self.local_state_files():
            if file.exists():
                file.unlink()
                deleted.append(file)
        return deleted
