"""A recording stand-in for the `terraform` executable, for fault-injection tests of repair-run.

The fixture writes a `terraform` shim onto PATH that runs this file. It behaves like Terraform >= 1.x
where the orchestrator can observe it, and nowhere else:
- it keeps a state file where the stack's backend block says (`terraform.backend.local.path` in
  cdk.tf.json, relative to the stack folder, exactly like Terraform; an azurerm backend's `key` is
  kept under FAKE_TF_REMOTE_DIR), so "what exists" is the resources listed in that file;
- `init` is required before anything that reads state; `apply` needs a value for every declared
  variable without a default (TF_VAR_<name>); plain `destroy -force` is rejected the way Terraform
  >= 0.15 rejects it; `state list` without state fails with "No state file was found!";
- one SIGINT/SIGTERM stops gracefully ("Interrupt received.", then the state of what was created so
  far is written and it exits 1); a second one exits at once *without* writing state, as Terraform
  warns ("data loss may have occurred") - recorded as `lost_state`, which a test must never see;
- state is written like Terraform's local backend does: the previous state goes to `<path>.backup`,
  new files get the mode the process's umask allows; the repair group's `name` and `tags` (as the
  synthesized stack gives them) are kept as its attributes, as in a real state; `state pull` prints it.
Every record names the process's session and group (`sid`, `pgid`) and the end record how many
interrupts it received (`interrupts`).

Cues (environment):
  FAKE_TF_LOG           JSONL file: one record per invocation start and end: argv, cwd, stack, which
                        selected variables were present, and for secrets only sha256 + length
  FAKE_TF_FAIL          comma list of <command>:<stack>[:<times>]  (command: init plan apply destroy
                        output state show); apply/destroy fail half-way, after writing partial state
  FAKE_TF_SLEEP         comma list of <command>:<stack>=<seconds>: pause half-way (interruptible); how long an
                        apply or destroy takes on Azure (tests/run/fleetkit.py sets it from the ARM double's
                        duration profile, scripts/devkit/armdouble.py Durations: the rescue VM is created here)
  FAKE_TF_OUTPUTS       JSON file {"<stack>": {"<output>": value}}; other outputs get "fake-<name>"
  FAKE_TF_PLAN_DELETES  comma list of stacks whose plans also delete their first resource
  FAKE_TF_REMOTE_DIR    where azurerm-backend states live
  FAKE_TF_KILL          comma list of <command>:<stack>: half-way (after writing partial state) SIGKILL the
                        process that started terraform - the kit dies mid-step, as with `kill -9` - and exit
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

SECRET_VARS = ("TF_VAR_rescue_admin_password", "TF_VAR_rescue_admin_ssh_public_key")
WATCHED_ENV = ("TF_IN_AUTOMATION", "TF_INPUT", "CHECKPOINT_DISABLE", "CRASHCART_ARM_ENDPOINT") + SECRET_VARS

_interrupts = 0


def _on_signal(signum: int, frame: Any) -> None:
    global _interrupts
    _interrupts += 1
    if _interrupts == 1:
        print("\nInterrupt received.\nPlease wait for Terraform to exit or data loss may occur.\n"
              "Gracefully shutting down...\n\nStopping operation...", flush=True)
        return
    print("Two interrupts received. Exiting immediately. Note that data loss may have occurred.", flush=True)
    _record({"phase": "end", "exit": 1, "lost_state": True, "interrupts": _interrupts})
    os._exit(1)


# ---- recording --------------------------------------------------------------------------------------
_context: dict[str, Any] = {}


def _record(extra: dict[str, Any]) -> None:
    path = os.environ.get("FAKE_TF_LOG")
    if not path:
        return
    record = {**_context, **extra, "t": time.time(), "pid": os.getpid(), "sid": os.getsid(0),
              "pgid": os.getpgid(0)}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _secret_facts(argv: list[str], stack_dir: Path) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    for name in SECRET_VARS:
        value = os.environ.get(name)
        if not value:
            continue
        files_with_it = []
        state = Stack(stack_dir).state_path if (stack_dir / "cdk.tf.json").exists() else None
        extra = [state, state.with_name(state.name + ".backup")] if state else []
        for file in list(stack_dir.rglob("*")) + extra:
            if file.is_file() and file.stat().st_size < 5_000_000:
                if value.encode() in file.read_bytes():
                    files_with_it.append(str(file))
        facts[name] = {"sha256": hashlib.sha256(value.encode()).hexdigest(), "len": len(value),
                       "in_argv": any(value in a for a in argv), "in_files": files_with_it}
    return facts


# ---- cues ---------------------------------------------------------------------------------------------
def _cues(var: str) -> list[str]:
    return [c.strip() for c in os.environ.get(var, "").split(",") if c.strip()]


def _should_fail(command: str, stack: str) -> bool:
    for cue in _cues("FAKE_TF_FAIL"):
        parts = cue.split(":")
        if parts[0] != command or parts[1] != stack:
            continue
        if len(parts) == 2:
            return True
        counts_file = Path(os.environ["FAKE_TF_LOG"] + f".{command}.{stack}.count")
        count = int(counts_file.read_text()) if counts_file.exists() else 0
        counts_file.write_text(str(count + 1))
        return count < int(parts[2])
    return False


def _kill_the_kit(command: str, stack: str) -> None:
    """FAKE_TF_KILL: the process that started this terraform dies by SIGKILL, now."""
    if f"{command}:{stack}" in _cues("FAKE_TF_KILL"):
        _record({"phase": "killed-parent", "parent": os.getppid()})
        os.kill(os.getppid(), signal.SIGKILL)
        print("Error: the process that started terraform is gone", flush=True)
        _record({"phase": "end", "exit": 1, "interrupts": _interrupts})
        os._exit(1)


def _sleep_seconds(command: str, stack: str) -> float:
    for cue in _cues("FAKE_TF_SLEEP"):
        key, _, seconds = cue.partition("=")
        if key == f"{command}:{stack}":
            return float(seconds)
    return 0.0


def _pause(seconds: float) -> bool:
    """Sleeps, returning early (True) on an interrupt."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if _interrupts:
            return True
        time.sleep(0.05)
    return bool(_interrupts)


# ---- the stack and its state ----------------------------------------------------------------------------
class Stack:
    def __init__(self, folder: Path):
        self.folder = folder
        self.name = folder.name
        self.config = json.loads((folder / "cdk.tf.json").read_text())

    @property
    def state_path(self) -> Path:
        backend = self.config.get("terraform", {}).get("backend", {})
        if "azurerm" in backend:
            return Path(os.environ["FAKE_TF_REMOTE_DIR"]) / backend["azurerm"]["key"]
        path = backend.get("local", {}).get("path", "terraform.tfstate")
        return (self.folder / path).resolve()

    def addresses(self) -> list[str]:
        return [f"{rtype}.{name}" for rtype, items in self.config.get("resource", {}).items() for name in items]

    def declared_outputs(self) -> list[str]:
        return list(self.config.get("output", {}))

    def required_variables(self) -> list[str]:
        return [n for n, v in self.config.get("variable", {}).items() if "default" not in v]

    def load(self) -> dict[str, Any] | None:
        if not self.state_path.exists():
            return None
        return json.loads(self.state_path.read_text())

    def attributes(self, address: str) -> dict[str, Any]:
        """What a real state keeps of a resource (here: id, and a resource group's name and tags)."""
        rtype, name = address.split(".", 1)
        declared = self.config.get("resource", {}).get(rtype, {}).get(name, {})
        attributes: dict[str, Any] = {"id": f"/fake/{address}"}
        if rtype == "azurerm_resource_group":
            attributes.update(name=declared.get("name", ""), tags=declared.get("tags", {}))
        return attributes

    def save(self, resources: list[str], outputs: dict[str, Any]) -> None:
        old = self.load() or {}
        state = {"version": 4, "terraform_version": "1.11.4", "serial": old.get("serial", 0) + 1,
                 "lineage": old.get("lineage", f"fake-{self.name}"),
                 "outputs": {k: {"value": v, "type": "string"} for k, v in outputs.items()},
                 "resources": [{"mode": "managed", "type": a.split(".")[0], "name": a.split(".")[1],
                                "instances": [{"attributes": self.attributes(a)}]} for a in resources]}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        if self.state_path.exists():  # like Terraform's local backend: the previous state is kept beside it
            backup = self.state_path.with_name(self.state_path.name + ".backup")
            backup.write_bytes(self.state_path.read_bytes())
        # Written in place, as Terraform does: an existing file keeps its mode, a new one gets the umask's.
        with open(self.state_path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(state, indent=2))

    def resources(self) -> list[str]:
        state = self.load() or {}
        return [f"{r['type']}.{r['name']}" for r in state.get("resources", [])]

    def output_values(self) -> dict[str, Any]:
        state = self.load() or {}
        return {k: v["value"] for k, v in state.get("outputs", {}).items()}

    def configured_output_values(self) -> dict[str, Any]:
        path = os.environ.get("FAKE_TF_OUTPUTS")
        given = json.loads(Path(path).read_text()).get(self.name, {}) if path else {}
        return {name: given.get(name, f"fake-{name}") for name in self.declared_outputs()}


# ---- commands -------------------------------------------------------------------------------------------
def fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"\nError: {message}\n\n")
    return code


def needs_init(stack: Stack) -> int | None:
    if not (stack.folder / ".terraform").is_dir():
        return fail('Backend initialization required, please run "terraform init"')
    return None


def cmd_init(stack: Stack, args: list[str]) -> int:
    if _should_fail("init", stack.name):
        return fail("Failed to get existing workspaces: the state container could not be reached")
    (stack.folder / ".terraform").mkdir(exist_ok=True)
    print("Terraform has been successfully initialized!")
    return 0


def check_variables(stack: Stack, args: list[str]) -> int | None:
    for name in stack.required_variables():
        if not os.environ.get(f"TF_VAR_{name}") and not any(a.startswith(f"-var={name}=") for a in args):
            return fail(f'No value for required variable\n\nThe root module input variable "{name}" is not set')
    return None


def cmd_apply(stack: Stack, args: list[str], destroy: bool) -> int:
    if "-auto-approve" not in args and "-auto-approve=true" not in args and not any(a.endswith(".tfplan") for a in args):
        return fail("apply requires -auto-approve in automation (would prompt)")
    problem = needs_init(stack) or check_variables(stack, args)
    if problem:
        return problem
    command = "destroy" if destroy else "apply"
    have = stack.resources()
    if destroy:
        remaining = list(have)
        half = len(remaining) // 2
        for _ in range(half):
            remaining.pop()
        stack.save(remaining, stack.output_values() if remaining else {})
        _kill_the_kit(command, stack.name)
        if _pause(_sleep_seconds(command, stack.name)):
            print("Error: execution halted")
            return 1
        if _should_fail(command, stack.name):
            return fail("deleting Network Interface: unexpected status 400 (NicInUse): a VM is still using it")
        stack.save([], {})
        print(f"Destroy complete! Resources: {len(have)} destroyed.")
        return 0
    wanted = stack.addresses()
    first_half = wanted[: max(1, len(wanted) // 2)]
    stack.save(sorted(set(have) | set(first_half)), stack.output_values())
    for address in first_half:
        print(f"{address}: Creation complete after 1s [id=/fake/{address}]")
    _kill_the_kit(command, stack.name)
    if _pause(_sleep_seconds(command, stack.name)):
        print("Error: execution halted")
        return 1
    if _should_fail(command, stack.name):
        return fail("creating Windows Virtual Machine: unexpected status 409 (Conflict): "
                    "OperationNotAllowed: quota exceeded for Standard DSv5 Family vCPUs")
    stack.save(wanted, stack.configured_output_values())
    print(f"Apply complete! Resources: {len(set(wanted) - set(have))} added, 0 changed, 0 destroyed.")
    return 0


def cmd_plan(stack: Stack, args: list[str]) -> int:
    problem = needs_init(stack) or check_variables(stack, args)
    if problem:
        return problem
    if _should_fail("plan", stack.name):
        return fail("building plan: the provider could not authenticate")
    have = set(stack.resources())
    changes = [{"address": a, "change": {"actions": ["create"]}} for a in stack.addresses() if a not in have]
    if stack.name in _cues("FAKE_TF_PLAN_DELETES"):
        victim = stack.addresses()[0]
        changes.append({"address": victim, "change": {"actions": ["delete", "create"]}})
    missing_outputs = set(stack.declared_outputs()) - set(stack.output_values())
    out = next((a.split("=", 1)[1] for a in args if a.startswith("-out=")), None)
    if out:
        Path(out).write_text(json.dumps({"format_version": "1.2", "resource_changes": changes}))
    changed = bool(changes or missing_outputs)
    return 2 if changed and "-detailed-exitcode" in args else 0


def cmd_show(stack: Stack, args: list[str]) -> int:
    if _should_fail("show", stack.name):
        return fail("reading plan file")
    plan = Path(args[-1])
    print(plan.read_text())
    return 0


def cmd_output(stack: Stack, args: list[str]) -> int:
    problem = needs_init(stack)
    if problem:
        return problem
    if _should_fail("output", stack.name):
        return fail("reading state: blob lease held by another process")
    values = stack.output_values()
    print(json.dumps({k: {"sensitive": False, "type": type(v).__name__, "value": v} for k, v in values.items()}))
    return 0


def cmd_state(stack: Stack, args: list[str]) -> int:
    problem = needs_init(stack)
    if problem:
        return problem
    if args[:1] == ["pull"]:
        if _should_fail("state", stack.name):
            return fail("reading state: blob lease held by another process")
        print(json.dumps(stack.load()) if stack.load() is not None else "")
        return 0
    if args[:1] != ["list"]:
        return fail(f"unsupported state subcommand {args[:1]}")
    if _should_fail("state", stack.name):
        return fail("reading state: blob lease held by another process")
    if stack.load() is None:
        sys.stderr.write("No state file was found!\n\nState management commands require a state file.\n")
        return 1
    for address in stack.resources():
        print(address)
    return 0


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    cwd = Path.cwd()
    _context.update(argv=argv, cwd=str(cwd), stack=cwd.name,
                    env={k: k in os.environ for k in WATCHED_ENV})
    if not argv or argv[0] in ("version", "-version", "--version"):
        print("Terraform v1.11.4\non linux_amd64")
        return 0
    if not (cwd / "cdk.tf.json").exists():
        return fail("No configuration files")
    stack = Stack(cwd)
    _context["secrets"] = _secret_facts(argv, cwd)
    _record({"phase": "start", "resources_before": stack.resources()})
    command, args = argv[0], argv[1:]
    if command == "init":
        code = cmd_init(stack, args)
    elif command == "apply":
        code = cmd_apply(stack, args, destroy="-destroy" in args)
    elif command == "destroy":
        if "-force" in args:
            sys.stderr.write("flag provided but not defined: -force\n")
            code = 1
        else:
            code = cmd_apply(stack, args + ["-auto-approve"], destroy=True)
    elif command == "plan":
        code = cmd_plan(stack, args)
    elif command == "show":
        code = cmd_show(stack, args)
    elif command == "output":
        code = cmd_output(stack, args)
    elif command == "state":
        code = cmd_state(stack, args)
    else:
        code = fail(f"fake terraform does not implement {command!r}")
    _record({"phase": "end", "exit": code, "resources_after": stack.resources(), "interrupts": _interrupts})
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# ---- for the tests that put this fake on PATH ---------------------------------------------------------------
def write_shim(bin_dir: Path, python: str = sys.executable) -> Path:
    """Writes an executable `terraform` into bin_dir that runs this file with `python`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "terraform"
    shim.write_text(f"#!{python}\nimport runpy\nrunpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')\n")
    shim.chmod(0o755)
    return shim


class TerraformLog:
    """The JSONL the fake writes, read back: which commands ran where, and what they saw."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def calls(self, stack: str | None = None, command: str | None = None) -> list[dict[str, Any]]:
        """Invocations (their start records), optionally of one stack and one command."""
        found = []
        for r in self.records():
            if r.get("phase") != "start" or (stack and r.get("stack") != stack):
                continue
            if command and command_of(r["argv"]) != command:
                continue
            found.append(r)
        return found

    def commands(self, stack: str | None = None) -> list[str]:
        return [command_of(r["argv"]) for r in self.calls(stack)]

    def lost_state(self) -> bool:
        return any(r.get("lost_state") for r in self.records())


def command_of(argv: list[str]) -> str:
    """init | plan | show | apply | destroy | output | state list | ... (`apply -destroy` is destroy)."""
    if not argv:
        return ""
    if argv[0] == "apply" and "-destroy" in argv:
        return "destroy"
    if argv[0] == "state":
        return " ".join(argv[:2])
    return argv[0]
