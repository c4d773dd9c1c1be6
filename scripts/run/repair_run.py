"""`pipenv run repair-run`: the whole job in one unattended command, with the teardown guaranteed.

    discover (no config yet) -> synth -> leftovers of an earlier run? -> deploy evidence (when absent)
    -> deploy repair -> outputs -> collect -> destroy repair (always) -> report

This module owns that order and nothing else; every step is a small function over the modules that
do the work (discover, main.py, scripts.terraform, scripts.outputs, scripts.collect), each of which a
person can also run alone. Terraform runs on cdktf.out/stacks/* exactly as a person would run it.

What "guaranteed" means here. Once the repair stack may exist (its apply started, or an earlier run
left resources in its state), the run ends by destroying it, whatever happened: a failed step, a bug,
SIGINT, SIGTERM or the --timeout deadline. Signals never cut a step in half: a running terraform is
asked to stop gracefully (it finishes the calls in flight and saves its state, so the destroy knows
everything it created), the collect step is abandoned, and the teardown itself cannot be interrupted
(only SIGKILL can stop it; the next run, or `--cleanup`, or `pipenv run sweep` then finishes the job).
`--keep` skips the teardown and says how to do it later. The evidence stack is never destroyed: the
Terraform layer has no way to destroy it (scripts/terraform.py).

A re-run after a crash finds what the last one left: the repair stack's state lives in the configured
backend (local files, or an azurerm blob in pipelines), so `terraform state list` tells. With
`--on-leftovers resume` (default) the run applies the stack again (Terraform completes whatever is
missing) and collects; with `destroy` it removes the leftovers first and starts clean. `--cleanup`
only removes them. A marker file in the output folder notes the run in progress, so a second run in
the same folder refuses to start while the first is alive, and a crashed run is named in the log.

Output: one JSON document on stdout (also written to <out-dir>/repair-run.json, the report a pipeline
publishes), the human log on stderr. Exit codes: scripts/errors.py, README "Exit codes".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import secrets
import signal
import socket
import string
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from scripts.base.console import emit_json, log, report_error, step
from scripts.config.model import DEFAULT_PATH, Config
from scripts.base.errors import CrashcartError, ExitCode
from scripts.run.terraform import EvidenceStackDir, RepairStackDir, supervise, terraform_binary

T = TypeVar("T")

DEFAULT_OUT_DIR = "crashcart-out"
RESULT_FILE = "repair-run.json"
MARKER_FILE = "repair-run.marker.json"
LEFTOVER_POLICIES = ("resume", "destroy")
DEFAULT_TEARDOWN_ATTEMPTS = 3
DEFAULT_TEARDOWN_RETRY_SECONDS = 30.0
DEPLOY_ALLOWANCE_MINUTES = 60  # default --timeout: collect timeout + this, for synth and both applies
PASSWORD_VARIABLE = "rescue_admin_password"
SSH_KEY_VARIABLE = "rescue_admin_ssh_public_key"


# ---- command line -------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH",
                        help=f"config file (env CRASHCART_CONFIG; default {DEFAULT_PATH} in the project folder); "
                             "written by discover when it does not exist")
    parser.add_argument("--vm", metavar="RESOURCE_ID",
                        help="the broken VM, discovered when the config file does not exist yet (env CRASHCART_VM_ID)")
    parser.add_argument("--timeout", metavar="DURATION",
                        help="stop and tear down after this long: 90m, 2h, 45s, or minutes "
                             "(env CRASHCART_RUN_TIMEOUT; default: repair.collect_timeout_minutes + 60m). "
                             "The teardown itself is not counted")
    parser.add_argument("--keep", action="store_true", default=None,
                        help="leave the repair stack deployed at the end (env CRASHCART_KEEP=1)")
    parser.add_argument("--on-leftovers", choices=LEFTOVER_POLICIES, default=None,
                        help="when an earlier run left repair resources: resume (apply again and collect; "
                             "default) or destroy them first (env CRASHCART_ON_LEFTOVERS)")
    parser.add_argument("--cleanup", action="store_true",
                        help="only destroy what an earlier run left of the repair stack, then exit")
    parser.add_argument("--skip-synth", action="store_true", default=None,
                        help="use the stacks already in cdktf.out (env CRASHCART_SKIP_SYNTH=1)")
    parser.add_argument("--project-dir", metavar="PATH",
                        help="folder with main.py and cdktf.out (env CRASHCART_PROJECT_DIR; default: current folder)")
    parser.add_argument("--out-dir", metavar="PATH",
                        help=f"where the report is written (env CRASHCART_OUT_DIR; default {DEFAULT_OUT_DIR})")
    parser.add_argument("--strategy", choices=("rescue-vm", "snapshot-export"),
                        help="how the dump gets out (sets repair.strategy, like CRASHCART_REPAIR_STRATEGY)")


@dataclass(frozen=True)
class RunSettings:
    """Every knob of a run, from the command line first, then the environment, then defaults."""

    project_dir: Path
    config_path: Path
    vm_id: str = ""
    timeout_seconds: float | None = None  # None: derived from the config once it is loaded
    keep: bool = False
    on_leftovers: str = "resume"
    cleanup_only: bool = False
    skip_synth: bool = False
    out_dir: Path = Path(DEFAULT_OUT_DIR)
    teardown_attempts: int = DEFAULT_TEARDOWN_ATTEMPTS
    teardown_retry_seconds: float = DEFAULT_TEARDOWN_RETRY_SECONDS
    agent_wait_minutes: float | None = None  # None: collect's default
    poll_seconds: float | None = None  # None: collect's default

    @property
    def stacks_dir(self) -> Path:
        return self.project_dir / "cdktf.out" / "stacks"

    @classmethod
    def resolve(cls, args: argparse.Namespace, env: Mapping[str, str]) -> "RunSettings":
        project = Path(args.project_dir or env.get("CRASHCART_PROJECT_DIR") or ".").absolute()
        config = Path(args.config or env.get("CRASHCART_CONFIG") or DEFAULT_PATH)
        out_dir = Path(args.out_dir or env.get("CRASHCART_OUT_DIR") or DEFAULT_OUT_DIR)
        timeout = args.timeout or env.get("CRASHCART_RUN_TIMEOUT")
        policy = args.on_leftovers or env.get("CRASHCART_ON_LEFTOVERS") or "resume"
        if policy not in LEFTOVER_POLICIES:
            raise CrashcartError(f'CRASHCART_ON_LEFTOVERS="{policy}" is not valid',
                                 f"use one of: {', '.join(LEFTOVER_POLICIES)}", ExitCode.USAGE)
        return cls(
            project_dir=project,
            config_path=config if config.is_absolute() else project / config,
            vm_id=(args.vm or env.get("CRASHCART_VM_ID") or "").strip(),
            timeout_seconds=parse_duration(timeout, "--timeout") if timeout else None,
            keep=bool(args.keep) or _env_flag(env, "CRASHCART_KEEP"),
            on_leftovers=policy,
            cleanup_only=bool(args.cleanup),
            skip_synth=bool(args.skip_synth) or _env_flag(env, "CRASHCART_SKIP_SYNTH"),
            out_dir=out_dir if out_dir.is_absolute() else project / out_dir,
            teardown_attempts=max(1, int(_number(env, "CRASHCART_TEARDOWN_ATTEMPTS", DEFAULT_TEARDOWN_ATTEMPTS))),
            teardown_retry_seconds=_number(env, "CRASHCART_TEARDOWN_RETRY_SECONDS", DEFAULT_TEARDOWN_RETRY_SECONDS),
            agent_wait_minutes=_number(env, "CRASHCART_AGENT_WAIT_MINUTES", None),
            poll_seconds=_number(env, "CRASHCART_POLL_SECONDS", None),
        )


def _number(env: Mapping[str, str], name: str, default: Any) -> Any:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise CrashcartError(f'{name}="{text}" is not a number', f"set {name} to a number, or unset it",
                             ExitCode.USAGE) from None
    if value < 0:
        raise CrashcartError(f'{name}="{text}" is negative', f"set {name} to 0 or more", ExitCode.USAGE)
    return value


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_duration(text: str, what: str) -> float:
    """`90` (minutes), `90m`, `2h`, `1h30m`, `45s` -> seconds."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value) * 60
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise CrashcartError(f'{what} "{text}" is not a duration',
                             "write it as 90m, 2h, 1h30m, 45s or a number of minutes", ExitCode.USAGE)
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


# ---- stopping: signals and the deadline -------------------------------------------------------------------
class StopRun(BaseException):
    """Raised inside the one step Python itself runs (collect) when the run must stop. A BaseException,
    so that no `except Exception` in a library swallows it."""


class StopGuard:
    """Turns SIGINT, SIGTERM and the --timeout deadline into a stop request, and decides where it acts.

    Nothing is cut in half: a signal only records the request, which the next step boundary turns into
    StopRun; a running terraform or synth child is asked to stop by scripts.terraform.supervise; only
    the collect step (inside `interruptible()`) is abandoned at once. The teardown runs outside
    `interruptible()`, so no signal can stop it.
    """

    def __init__(self, deadline_seconds: float | None):
        self.deadline_seconds = deadline_seconds
        self.reason: str | None = None
        self.is_deadline = False
        self._interruptible = False
        self._started = time.monotonic()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopGuard":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        if hasattr(signal, "setitimer"):
            self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_deadline)
        if self.deadline_seconds is not None:
            self.arm(self.deadline_seconds)
        return self

    def arm(self, deadline_seconds: float) -> None:
        """Sets the deadline, counted from the start of the run (the default one needs the config)."""
        self.deadline_seconds = deadline_seconds
        remaining = self.remaining_seconds() or 0.0
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 0.001))

    def __exit__(self, *exc: object) -> None:
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._request(signal.Signals(signum).name, deadline=False)

    def _on_deadline(self, signum: int, frame: Any) -> None:
        self._request(f"--timeout of {_minutes(self.deadline_seconds or 0)} reached", deadline=True)

    def _request(self, reason: str, deadline: bool) -> None:
        if self.reason is not None:
            log.warning("%s received: already stopping (%s); the teardown will still run - only SIGKILL "
                        "stops it, and then `pipenv run repair-run --cleanup` finishes it", reason, self.reason)
            return
        self.reason, self.is_deadline = reason, deadline
        log.warning("%s: stopping; the repair stack will be torn down", reason)
        if self._interruptible:
            self._interruptible = False
            raise StopRun(reason)

    def check(self) -> None:
        if self.reason is not None:
            raise StopRun(self.reason)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        self.check()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def remaining_seconds(self) -> float | None:
        if self.deadline_seconds is None:
            return None
        return max(0.0, self.deadline_seconds - (time.monotonic() - self._started))


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f}m" if seconds >= 60 else f"{seconds:.0f}s"


# ---- the rescue VM's admin credential -----------------------------------------------------------------------
_PASSWORD_SPECIALS = "-_.!#%+@~^"  # no quote, backslash, $ or backtick: safe in any shell it is pasted into


@dataclass(frozen=True, repr=False)
class RescueCredential:
    """Generated per run; reaches Terraform only as TF_VAR_<variable> in its environment. Nobody logs in
    (the rescue VM is driven by Run Command), so the value is never shown and a Linux private key is
    dropped as soon as its public half exists."""

    variable: str
    value: str

    def __repr__(self) -> str:
        return f"RescueCredential({self.variable}=<redacted>)"

    @property
    def env(self) -> dict[str, str]:
        return {f"TF_VAR_{self.variable}": self.value}

    @classmethod
    def generate(cls, rescue_os: str) -> "RescueCredential":
        if rescue_os == "linux":
            return cls(SSH_KEY_VARIABLE, _ssh_public_key())
        return cls(PASSWORD_VARIABLE, _password())


def _password(length: int = 32) -> str:
    """Azure wants 12-123 characters from at least three of lower, upper, digit, special: we use all four."""
    alphabet = string.ascii_letters + string.digits + _PASSWORD_SPECIALS
    classes = (string.ascii_lowercase, string.ascii_uppercase, string.digits, _PASSWORD_SPECIALS)
    while True:
        candidate = "".join(secrets.choice(alphabet) for _ in range(length))
        if all(any(c in cls for c in candidate) for cls in classes):
            return candidate


def _ssh_public_key() -> str:
    """An RSA-3072 public key in OpenSSH form (RSA: every azurerm version and Azure API accepts it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public.decode("ascii") + " crashcart-rescue"


# ---- the marker of a run in progress ---------------------------------------------------------------------------
class RunMarker:
    """<out-dir>/repair-run.marker.json while a run is in progress: who, since when, which step."""

    def __init__(self, out_dir: Path, run_id: str):
        self.path = out_dir / MARKER_FILE
        self.run_id = run_id
        self.previous: dict[str, Any] | None = None

    def claim(self) -> None:
        self.previous = self._read()
        prev = self.previous
        if prev and prev.get("host") == socket.gethostname() and _alive(int(prev.get("pid", 0))):
            raise CrashcartError(
                f"another repair-run (pid {prev['pid']}, run {prev.get('run_id')}) is working in this folder",
                "wait for it to finish, or stop it with SIGTERM (it tears down) and re-run", ExitCode.USAGE)
        if prev:
            log.warning("an earlier run (%s, started %s) stopped during '%s' without finishing; "
                        "checking what it left", prev.get("run_id"), prev.get("started_at"), prev.get("phase"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write({"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
                     "started_at": _now(), "phase": "starting"})

    def phase(self, name: str) -> None:
        data = self._read() or {}
        if data.get("run_id") == self.run_id:
            data["phase"] = name
            self._write(data)

    def release(self) -> None:
        data = self._read()
        if data and data.get("run_id") == self.run_id:
            self.path.unlink(missing_ok=True)

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _write(self, data: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        tmp.replace(self.path)


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---- the result ---------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    run_id: str
    started_at: str
    mode: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    repair_stack: dict[str, Any] = field(default_factory=lambda: {
        "touched": False, "leftovers_found": [], "destroyed": False, "kept": False, "remaining": []})
    evidence_stack: dict[str, Any] = field(default_factory=lambda: {"deployed_by_this_run": False})
    outputs: dict[str, Any] | None = None
    collect: Any = None
    status: str = "running"
    exit_code: int = 0
    error: dict[str, str] | None = None
    finished_at: str = ""


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "__dict__"):
        return {k: v for k, v in vars(value).items() if not k.startswith("_")}
    return value


# ---- the orchestrator -----------------------------------------------------------------------------------------------
class RepairRun:
    def __init__(self, settings: RunSettings, stop: StopGuard):
        self.settings = settings
        self.stop = stop
        self.run_id = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
        self.result = RunResult(self.run_id, _now(), "cleanup" if settings.cleanup_only else "repair")
        self.marker = RunMarker(settings.out_dir, self.run_id)
        self.config: Config | None = None
        self.credential: RescueCredential | None = None
        self.evidence = EvidenceStackDir(settings.stacks_dir, stop)
        self.repair = RepairStackDir(settings.stacks_dir, stop)

    # The order, in one place.
    def steps(self) -> None:
        self._step("config", self.ensure_config_file)
        if not self.settings.skip_synth:
            self._step("synth", self.synth)
        self._step("load config", self.load_config)
        self._step("find leftovers", self.find_leftovers)
        if self.settings.cleanup_only:
            return
        self._step("deploy evidence", self.ensure_evidence)
        self._step("deploy repair", self.deploy_repair)
        outputs = self._step("read outputs", self.read_outputs)
        self._step("collect", lambda: self.collect(outputs))

    def execute(self) -> int:
        """Runs the steps, then always the teardown, then the report. Returns the exit code."""
        error: CrashcartError | None = None
        bug: Exception | None = None
        completed = False
        try:
            self.marker.claim()
            self.steps()
            completed = True
        except StopRun:
            pass
        except CrashcartError as err:
            error = err
        except Exception as exc:  # a bug: still tear down first, then let it surface as one
            bug = exc
        # A signal after the last step, or during the teardown, does not change what the steps did.
        stopped = None if completed else self.stop.reason
        try:
            teardown_error = self.teardown()
        except Exception as exc:  # a bug in the teardown path: say what is left, never lose the report
            log.exception("the teardown failed unexpectedly")
            teardown_error = CrashcartError(
                f"the teardown failed unexpectedly ({exc!r}); the repair stack may still be deployed",
                "run `pipenv run repair-run --cleanup`, and please report this with the log",
                ExitCode.TEARDOWN_FAILED)
        code = self.finish(error, teardown_error, bug, stopped)
        if bug is not None:
            raise bug
        return code

    # ---- steps ----------------------------------------------------------------------------------------------------
    def _step(self, name: str, func: Callable[[], T]) -> T:
        self.stop.check()
        self.marker.phase(name)
        record: dict[str, Any] = {"name": name, "status": "running"}
        self.result.steps.append(record)
        started = time.monotonic()
        try:
            with step(name):
                value = func()
            record["status"] = "ok"
            return value
        except BaseException as exc:
            record["status"] = "stopped" if self.stop.reason else "failed"
            if isinstance(exc, CrashcartError):
                record["error"] = exc.message
            raise
        finally:
            record["seconds"] = round(time.monotonic() - started, 1)

    def ensure_config_file(self) -> None:
        """Discovers the VM when there is no config yet (needs --vm or CRASHCART_VM_ID)."""
        path = self.settings.config_path
        if path.exists():
            log.info("    config: %s", path)
            return
        if not self.settings.vm_id:
            raise CrashcartError(
                f"no config file at {path}, and no VM to discover",
                "pass --vm <VM resource ID> (or set CRASHCART_VM_ID) to discover it, or write the file "
                "(see repair.example.toml; CRASHCART_CONFIG names another path)", ExitCode.USAGE)
        from scripts.run.discover import discover_config, write_config

        log.info("    no config at %s: discovering %s", path, self.settings.vm_id)
        write_config(discover_config(self.settings.vm_id), path)

    def synth(self) -> None:
        """`<python> main.py` in the project folder, CRASHCART_CONFIG set: the CDKTF app, as a subprocess
        (scripts/ never imports cdktf). The app validates the config and exits 2 on a bad value."""
        project = self.settings.project_dir
        if not (project / "main.py").exists():
            raise CrashcartError(f"there is no main.py in {project}",
                                 "run repair-run from the crashcart folder, or pass --project-dir", ExitCode.USAGE)
        env = {**os.environ, "CRASHCART_CONFIG": str(self.settings.config_path),
               "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": os.environ.get(
                   "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")}
        proc = subprocess.Popen([sys.executable, "main.py"], cwd=project, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        code, _, err, _ = supervise(proc, "synth", self.stop, graceful=False)
        self.stop.check()
        if code != 0:
            message = _line_after(err, "error:") or (err.strip().splitlines() or [f"exit code {code}"])[-1]
            if code == int(ExitCode.USAGE):
                raise CrashcartError(f"synth rejected the config: {message}",
                                     _line_after(err, "next:") or "fix the config and re-run", ExitCode.USAGE)
            raise CrashcartError(f"synth failed (exit {code}): {message}",
                                 "run `pipenv run python main.py` to see the whole error; with a valid config "
                                 "this is a bug in crashcart", ExitCode.BUG)
        for stack in (self.evidence, self.repair):
            stack.synthesized()  # raises if a stack folder is missing

    def load_config(self) -> None:
        self.config = Config.load(self.settings.config_path)
        if self.settings.vm_id and self.config.source.vm_id.lower() != self.settings.vm_id.lower():
            raise CrashcartError(
                f"the config {self.settings.config_path} is for {self.config.source.vm_id}, "
                f"but the VM to repair is {self.settings.vm_id}",
                "remove the old config (discover then writes a new one) or point CRASHCART_CONFIG elsewhere",
                ExitCode.USAGE)
        for stack in (self.evidence, self.repair):
            stack.synthesized()
        if self.stop.deadline_seconds is None:
            self.stop.arm(self.default_timeout_seconds())
            log.info("    deadline: %s (repair.collect_timeout_minutes + %dm; --timeout sets another)",
                     _minutes(self.default_timeout_seconds()), DEPLOY_ALLOWANCE_MINUTES)
        terraform_binary()
        self.credential = RescueCredential.generate(self.config.rescue.os)
        declared = self.repair.declared_variables()
        if self.credential.variable not in declared:
            raise CrashcartError(
                f"the synthesized repair stack declares {sorted(declared)}, not {self.credential.variable} "
                f"for a {self.config.rescue.os} rescue VM", "re-run without --skip-synth", ExitCode.USAGE)

    def default_timeout_seconds(self) -> float:
        assert self.config is not None
        return (self.config.repair.collect_timeout_minutes + DEPLOY_ALLOWANCE_MINUTES) * 60.0

    def find_leftovers(self) -> None:
        """What an earlier run left in the repair stack's state, and what to do about it."""
        self.repair.init()
        leftovers = self.repair.resources()
        self.result.repair_stack["leftovers_found"] = leftovers
        if not leftovers:
            if self.settings.cleanup_only:
                log.info("    the repair stack holds nothing: nothing to clean up")
            return
        self.result.repair_stack["touched"] = True
        log.warning("    an earlier run left %d resource(s) of the repair stack: %s", len(leftovers),
                    ", ".join(leftovers))
        if self.settings.cleanup_only:
            return  # the teardown removes them
        if self.settings.on_leftovers == "destroy":
            log.info("    --on-leftovers destroy: removing them before starting again")
            error = self.destroy_repair()
            if error is not None:
                raise error
            self.result.repair_stack["destroyed"] = False  # this run deploys it again
        else:
            log.info("    --on-leftovers resume: the apply below completes the stack and the collection runs again")

    def ensure_evidence(self) -> None:
        self.evidence.init()
        missing = self.evidence.missing_outputs()
        if not missing:
            log.info("    the evidence stack is deployed: left as it is")
            return
        log.info("    the evidence stack is absent or incomplete (%d output(s) missing): deploying it", len(missing))
        self.evidence.deploy()
        self.result.evidence_stack["deployed_by_this_run"] = True

    def deploy_repair(self) -> None:
        assert self.credential is not None
        self.result.repair_stack["touched"] = True  # from here on the teardown is owed
        result = self.repair.deploy(self.credential.env)
        if not result.ok:
            raise CrashcartError(
                f"terraform apply failed for the repair stack: {result.error_summary()}",
                "fix the cause above (quota, policy, permissions: see README 'Pipeline identity') and re-run; "
                "what was created is being destroyed", ExitCode.DEPLOY_FAILED)

    def read_outputs(self) -> Any:
        from scripts.config.stackoutputs import load_repair_outputs

        try:
            outputs = load_repair_outputs(stacks_dir=self.settings.stacks_dir)
        except CrashcartError as err:
            raise CrashcartError(f"the repair stack deployed but its outputs cannot be read: {err.message}",
                                 "re-run; if it persists, check the state backend", ExitCode.DEPLOY_FAILED) from None
        self.result.outputs = dataclasses.asdict(outputs)
        return outputs

    def collect(self, outputs: Any) -> None:
        """The collection for repair.strategy: scripts.collect.collect_dump (rescue-vm: agent wait, Run
        Command, verify, report) or scripts.snapshot_export.collect_from_snapshot (same contract). The only
        step Python runs itself, so the only one a signal abandons at once."""
        assert self.config is not None
        from scripts.collection.rescue_vm import collector_for

        collect_dump = collector_for(self.config.repair.strategy)
        minutes = float(self.config.repair.collect_timeout_minutes)
        remaining = self.stop.remaining_seconds()
        if remaining is not None:
            minutes = max(1 / 60, min(minutes, remaining / 60))
        options: dict[str, Any] = {"out_dir": self.settings.out_dir}
        if self.settings.agent_wait_minutes is not None:
            options["agent_wait_minutes"] = self.settings.agent_wait_minutes
        if self.settings.poll_seconds is not None:
            options["poll_seconds"] = self.settings.poll_seconds
        try:
            with self.stop.interruptible():
                result = collect_dump(outputs, self.config, timeout_minutes=minutes, progress=True, **options)
        except CrashcartError as err:
            partial = getattr(err, "result", None)
            if partial is not None:
                self.result.collect = _jsonable(partial)
            raise
        self.result.collect = _jsonable(result)

    # ---- teardown ---------------------------------------------------------------------------------------------
    def teardown(self) -> CrashcartError | None:
        if not self.result.repair_stack["touched"]:
            return None
        if self.settings.keep and not self.settings.cleanup_only:
            self.result.repair_stack["kept"] = True
            log.warning("==> teardown skipped (--keep): the repair stack stays deployed and costs money until removed.\n"
                        "    remove it with `pipenv run repair-run --cleanup` (same config), or by hand:\n"
                        "      cd %s && TF_VAR_%s=<any 12+ characters> terraform apply -destroy -auto-approve\n"
                        "    `pipenv run sweep --delete` removes its resource group once its "
                        "crashcart-expires-at tag has passed", self.repair.path,
                        self.credential.variable if self.credential else PASSWORD_VARIABLE)
            return None
        self.marker.phase("teardown")
        blocked = self.restore_swapped_source()
        if blocked is not None:
            return blocked
        with step("teardown: destroy the repair stack"):
            return self.destroy_repair()

    def restore_swapped_source(self) -> CrashcartError | None:
        """A `prepare-dump --swap` that did not finish leaves the source VM on the disk copy, which the
        teardown would then try to delete. Put the original OS disk back first (rollback is idempotent);
        if that fails, keep the repair stack: destroying it cannot succeed and the copy is what the VM
        boots from."""
        if self.config is None:
            return None
        from scripts.nodump import rollback

        vm_name = self.config.source.vm_name
        for path in sorted((self.settings.out_dir / vm_name).glob(f"*/{rollback.MANIFEST_NAME}")):
            try:
                manifest = rollback.load_local(path)
                if manifest.state == "restored":
                    continue
                from scripts.azure.clients import AzureClients

                with step(f"teardown: put {vm_name}'s original OS disk back first ({path})"):
                    rollback.restore(AzureClients(self.config.source.subscription_id).compute, manifest, None)
            except Exception as err:  # noqa: BLE001 - whatever it was, the stack must stay
                message = err.message if isinstance(err, CrashcartError) else str(err)
                return CrashcartError(
                    f"the repair stack was NOT destroyed: {vm_name} may still run on the disk copy, and putting "
                    f"its original OS disk back failed: {message}",
                    f"run `pipenv run rollback --manifest {path}`, then `pipenv run repair-run --cleanup`",
                    ExitCode.TEARDOWN_FAILED)
        return None

    def destroy_repair(self) -> CrashcartError | None:
        """`apply -destroy` on the repair stack, retried, then checked with `state list`. Never raises
        (it runs after failures); the returned error says what is left."""
        if self.credential is None:
            self.credential = RescueCredential.generate(self.config.rescue.os if self.config else "windows")
        attempts = self.settings.teardown_attempts
        last_error = ""
        for attempt in range(1, attempts + 1):
            try:
                result = self.repair.destroy(self.credential.env)
            except CrashcartError as err:  # e.g. terraform vanished
                last_error = err.message
            else:
                if result.ok:
                    break
                last_error = result.error_summary()
            if attempt < attempts:
                wait = self.settings.teardown_retry_seconds * attempt
                log.warning("    destroy attempt %d/%d failed (%s); retrying in %.0fs", attempt, attempts,
                            last_error, wait)
                time.sleep(wait)
        try:
            remaining = self.repair.resources()
        except CrashcartError as err:
            remaining = [f"unknown: {err.message}"]
        self.result.repair_stack["remaining"] = remaining
        if not remaining:
            self.result.repair_stack["destroyed"] = True
            log.info("    the repair stack is destroyed; the evidence stack was not touched")
            return None
        return CrashcartError(
            f"the repair stack could not be destroyed ({last_error or 'unknown error'}); still deployed: "
            f"{', '.join(remaining)}",
            "run `pipenv run repair-run --cleanup` (or `cd cdktf.out/stacks/repair && terraform apply -destroy "
            "-auto-approve`) once the cause is fixed; `pipenv run sweep --delete` removes the resource group "
            "after its crashcart-expires-at time", ExitCode.TEARDOWN_FAILED)

    # ---- the end ----------------------------------------------------------------------------------------------
    def finish(self, error: CrashcartError | None, teardown_error: CrashcartError | None,
               bug: Exception | None, stopped: str | None) -> int:
        """Picks the exit code, writes the report, prints the JSON result and the human summary."""
        if teardown_error is not None:
            code, status = ExitCode.TEARDOWN_FAILED, "teardown_failed"
            if error is not None:
                teardown_error = CrashcartError(f"{error.message}; then {teardown_error.message}",
                                                teardown_error.hint, ExitCode.TEARDOWN_FAILED)
            shown: CrashcartError | None = teardown_error
        elif stopped is not None:
            code = ExitCode.TIMED_OUT if self.stop.is_deadline else ExitCode.INTERRUPTED
            status = "timed_out" if self.stop.is_deadline else "interrupted"
            shown = CrashcartError(f"stopped: {stopped}{self._during()}", self._aftermath_hint(), code)
        elif bug is not None:
            code, status, shown = ExitCode.BUG, "bug", None
        elif error is not None:
            code, status, shown = error.exit_code, "failed", error
        else:
            code, status, shown = ExitCode.OK, ("cleaned_up" if self.settings.cleanup_only else "succeeded"), None
        self.result.status = status
        self.result.exit_code = int(code)
        self.result.finished_at = _now()
        if shown is not None:
            self.result.error = {"message": shown.message + self._aftermath(), "hint": shown.hint}
        self.write_report()
        emit_json(dataclasses.asdict(self.result))
        if shown is not None:
            report_error(CrashcartError(shown.message + self._aftermath(), shown.hint, code))
        elif status == "succeeded":
            log.info("repair-run %s: done%s", self.run_id, self._aftermath())
        elif status == "cleaned_up":
            log.info("repair-run --cleanup: %s%s", "nothing was left" if not self.result.repair_stack["touched"]
                     else "the leftovers are destroyed", self._aftermath())
        if teardown_error is None:
            self.marker.release()  # kept when the teardown failed: the next run names this one
        return int(code)

    def _during(self) -> str:
        running = [s["name"] for s in self.result.steps if s["status"] == "stopped"]
        return f" during {running[-1]}" if running else ""

    def _aftermath(self) -> str:
        repair = self.result.repair_stack
        if repair["kept"]:
            return " (the repair stack was kept: --keep)"
        if repair["destroyed"]:
            return " (the repair stack was destroyed; the evidence stack was not touched)"
        if not repair["touched"]:
            return " (nothing was deployed for the repair; the evidence stack was not touched)"
        return ""

    def _aftermath_hint(self) -> str:
        return "re-run when ready: a new run starts from a clean repair stack" if self.result.repair_stack[
            "destroyed"] or not self.result.repair_stack["touched"] else "see the teardown message above"

    def write_report(self) -> None:
        out = self.settings.out_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULT_FILE).write_text(json.dumps(dataclasses.asdict(self.result), indent=2, default=str) + "\n",
                                       encoding="utf-8")


def _line_after(text: str, prefix: str) -> str:
    for line in text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return ""


def run(args: argparse.Namespace) -> int:
    if args.strategy:
        # Through the documented override, so synth (a child process) and collect see the same value.
        os.environ["CRASHCART_REPAIR_STRATEGY"] = args.strategy
    settings = RunSettings.resolve(args, os.environ)
    with StopGuard(settings.timeout_seconds) as stop:
        run_ = RepairRun(settings, stop)
        return run_.execute()
