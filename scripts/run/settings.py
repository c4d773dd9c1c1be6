"""Every knob of a repair-run, resolved once: the command line first, then CRASHCART_* in the
environment, then the defaults. Everything after this reads `RunSettings`, never os.environ.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.azure import ids
from scripts.base import userfiles
from scripts.base.errors import CrashcartError, ExitCode, printable
from scripts.collection.contract import OUT_DIR
from scripts.config.model import DEFAULT_PATH
from scripts.run import numbers
from scripts.run.numbers import Range

DEFAULT_OUT_DIR = str(OUT_DIR)
LEFTOVER_POLICIES = ("resume", "destroy")
DEFAULT_TEARDOWN_ATTEMPTS = 3
DEFAULT_TEARDOWN_RETRY_SECONDS = 30.0
DEPLOY_ALLOWANCE_MINUTES = 60  # default --timeout: collect timeout + this, for synth and both applies
DEFAULT_LOCK_LEASE_SECONDS = 60

# The knobs' ranges (scripts.run.numbers): a nan, inf or absurd value is a usage error, never a loop that
# stops early (nan compares false), waits forever (inf) or overflows the deadline timer.
TIMEOUT_SECONDS = Range(1, numbers.WEEK_MINUTES * 60, unit="seconds")
TEARDOWN_ATTEMPTS = Range(1, 100, integer=True)
TEARDOWN_RETRY_SECONDS = Range(0, 3600, unit="seconds")
LOCK_LEASE_SECONDS = Range(15, 60, integer=True, unit="seconds")  # Azure's limits for a blob lease
FIX_SETTLE_SECONDS = Range(0, 3600, unit="seconds")


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
    lock_lease_seconds: int = DEFAULT_LOCK_LEASE_SECONDS
    fix: str = ""  # --fix RECIPE[:ARG] (scripts.run.repair_fix): after the collection, fix the copy and verify the boot
    fix_boot_timeout_seconds: float = 20 * 60.0
    fix_settle_seconds: float = 120.0

    @property
    def stacks_dir(self) -> Path:
        return self.project_dir / "cdktf.out" / "stacks"

    @property
    def keeps_stack(self) -> bool:
        """--keep leaves a deployed repair stack in place; --cleanup exists to remove it, so it never keeps."""
        return self.keep and not self.cleanup_only

    def collect_options(self) -> dict[str, Any]:
        """The CollectRequest fields these settings decide (unset ones keep the collection's defaults)."""
        options: dict[str, Any] = {"out_dir": self.out_dir}
        if self.agent_wait_minutes is not None:
            options["agent_wait_minutes"] = self.agent_wait_minutes
        if self.poll_seconds is not None:
            options["poll_seconds"] = self.poll_seconds
        return options

    @classmethod
    def resolve(cls, args: argparse.Namespace, env: Mapping[str, str]) -> "RunSettings":
        project = Path(args.project_dir or env.get("CRASHCART_PROJECT_DIR") or ".").absolute()
        userfiles.require_folder(project, "--project-dir (CRASHCART_PROJECT_DIR)")
        config = Path(args.config or env.get("CRASHCART_CONFIG") or DEFAULT_PATH)
        out_dir = Path(args.out_dir or env.get("CRASHCART_OUT_DIR") or DEFAULT_OUT_DIR)
        # checked before the preflight and synth (minutes): a file in the way would fail only at the end
        userfiles.require_folder(out_dir if out_dir.is_absolute() else project / out_dir,
                                 "--out-dir (CRASHCART_OUT_DIR)", create=True)
        timeout = args.timeout or env.get("CRASHCART_RUN_TIMEOUT")
        policy = args.on_leftovers or env.get("CRASHCART_ON_LEFTOVERS") or "resume"
        if policy not in LEFTOVER_POLICIES:
            raise CrashcartError(f'CRASHCART_ON_LEFTOVERS="{policy}" is not valid',
                                 f"use one of: {', '.join(LEFTOVER_POLICIES)}", ExitCode.USAGE)
        return cls(
            project_dir=project,
            config_path=config if config.is_absolute() else project / config,
            vm_id=checked_vm_id(args.vm or env.get("CRASHCART_VM_ID") or ""),
            timeout_seconds=parse_duration(timeout, "--timeout") if timeout else None,
            keep=bool(args.keep) or env_flag(env, "CRASHCART_KEEP"),
            on_leftovers=policy,
            cleanup_only=bool(args.cleanup),
            skip_synth=bool(args.skip_synth) or env_flag(env, "CRASHCART_SKIP_SYNTH"),
            out_dir=out_dir if out_dir.is_absolute() else project / out_dir,
            teardown_attempts=numbers.env_number(env, "CRASHCART_TEARDOWN_ATTEMPTS", TEARDOWN_ATTEMPTS,
                                                 DEFAULT_TEARDOWN_ATTEMPTS),
            teardown_retry_seconds=numbers.env_number(env, "CRASHCART_TEARDOWN_RETRY_SECONDS",
                                                      TEARDOWN_RETRY_SECONDS, DEFAULT_TEARDOWN_RETRY_SECONDS),
            agent_wait_minutes=numbers.env_number(env, "CRASHCART_AGENT_WAIT_MINUTES", numbers.WAIT_MINUTES, None),
            poll_seconds=numbers.env_number(env, "CRASHCART_POLL_SECONDS", numbers.POLL_SECONDS, None),
            lock_lease_seconds=numbers.env_number(env, "CRASHCART_LOCK_LEASE_SECONDS", LOCK_LEASE_SECONDS,
                                                  DEFAULT_LOCK_LEASE_SECONDS),
            fix=(getattr(args, "fix", None) or env.get("CRASHCART_FIX") or "").strip(),
            fix_boot_timeout_seconds=numbers.env_number(env, "CRASHCART_FIX_BOOT_TIMEOUT_SECONDS", TIMEOUT_SECONDS,
                                                        20 * 60.0),
            fix_settle_seconds=numbers.env_number(env, "CRASHCART_FIX_SETTLE_SECONDS", FIX_SETTLE_SECONDS, 120.0),
        )


def checked_vm_id(given: str) -> str:
    """--vm (CRASHCART_VM_ID) as a VM resource ID, checked at once (not after minutes of preflight and synth);
    a trailing '/' (as some copies of the portal's URL carry) is dropped. "" when not given."""
    vm_id = given.strip().rstrip("/")
    if given.strip() and ids.try_parse(vm_id, "vm") is None:
        raise CrashcartError(f'--vm (CRASHCART_VM_ID) "{printable(given)[:300]}" is not a VM resource ID',
                             f"pass the VM's resource ID: {ids.FORMS['vm']} "
                             "(`az vm show -g <rg> -n <name> --query id -o tsv`)", ExitCode.USAGE)
    return vm_id


def env_flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_duration(text: str, what: str) -> float:
    """`90` (minutes), `90m`, `2h`, `1h30m`, `45s` -> seconds, from 1 s to a week."""
    value = text.strip().lower()
    hint = "write it as 90m, 2h, 1h30m, 45s or a number of minutes (at most a week)"
    if re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,12})?", value):
        seconds = float(value) * 60
    else:
        parts = re.findall(r"([0-9]{1,12}(?:\.[0-9]{1,12})?)([hms])", value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise CrashcartError(f'{what} "{numbers.shown_text(text)}" is not a duration', hint, ExitCode.USAGE)
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if not TIMEOUT_SECONDS.minimum <= seconds <= TIMEOUT_SECONDS.maximum:
        raise CrashcartError(f'{what} "{numbers.shown_text(text)}" is out of range: from 1s to a week (168h)', hint,
                             ExitCode.USAGE)
    return seconds


def minutes(seconds: float) -> str:
    """A duration as a person reads it in the log: `90m`, `45s`."""
    return f"{seconds / 60:.0f}m" if seconds >= 60 else f"{seconds:.0f}s"
