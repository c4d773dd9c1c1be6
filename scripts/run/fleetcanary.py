"""The rollout of a fix over a fleet (`fleet run --fix SPEC --canary N [--max-failure-rate R]`).

Each VM's job is `repair-run --fix SPEC`: it collects the dump, fixes the disk copy, swaps it in and
watches the VM boot; its report says whether the VM booted on the fixed disk (`fix.verify`: kept or
rolled back). The fleet fixes the first N VMs (the canary) and waits for all of them; the rest start
only when at least one canary VM was fixed and the failure rate among the fixed VMs - those whose fix
was attempted, booted or not - is at most R. After that, every VM that ends counts too: once the rate
crosses R, no new job starts (those running finish) and the VMs not started are left for a re-run with
the reason `rollout stopped: ...`. A VM whose job failed before its fix (no dump, a failed deploy) is not a
fix outcome and does not count; if no canary VM reached its fix, the rollout stops: nothing proves the fix.
"""

from __future__ import annotations

import threading
from typing import Any

from scripts.base.console import log
from scripts.base.errors import CrashcartError, ExitCode


def parse_rate(text: str | float) -> float:
    """`0.1`, `10%` -> 0.1; a usage error outside 0..1."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise CrashcartError(f"--max-failure-rate {raw[:20]!r} is not a rate", "write a fraction 0-1 (0.1) or a "
                             "percentage (10%)", ExitCode.USAGE)
    return value


def fix_outcome(report: dict[str, Any], spec: str | None) -> dict[str, Any] | None:
    """The manifest's `fix` field from a repair-run report: attempted (the run reached its fix step), booted
    (the VM booted on the fixed disk and keeps it), why not. None without --fix."""
    if not spec:
        return None
    document = report.get("fix") if isinstance(report.get("fix"), dict) else None
    if document is None:
        return {"spec": spec, "attempted": False, "booted": None, "reason": None, "status": "not reached"}
    verify = document.get("verify") if isinstance(document.get("verify"), dict) else {}
    verdict = verify.get("verdict") if isinstance(verify.get("verdict"), dict) else {}
    booted = bool(verify.get("kept_fixed_disk") or verdict.get("booted"))
    reason = None if booted else (verify.get("error") or verdict.get("reason") or
                                  ((report.get("error") or {}).get("message") if isinstance(report.get("error"), dict)
                                   else None) or "the fix was not verified")
    return {"spec": spec, "attempted": True, "booted": booted, "reason": reason,
            "boot": verdict.get("reason"), "seconds": verdict.get("seconds"),
            "status": f"{spec}: booted" if booted else f"{spec}: did not boot ({reason})"[:200]}


class Rollout:
    """Counts the fix outcomes as jobs end and decides when the rollout stops (thread-safe)."""

    def __init__(self, spec: str | None, canary: int, max_failure_rate: float):
        self.spec = spec
        self.canary = max(0, canary)
        self.max_failure_rate = max_failure_rate
        self.booted: list[str] = []
        self.not_booted: list[str] = []
        self.not_reached: list[str] = []
        self.in_canary = self.canary > 0
        self.stopped: str | None = None
        self._lock = threading.Lock()

    @property
    def fixed(self) -> int:
        return len(self.booted) + len(self.not_booted)

    @property
    def rate(self) -> float:
        return len(self.not_booted) / self.fixed if self.fixed else 0.0

    def ended(self, key: str, outcome: dict[str, Any] | None) -> None:
        with self._lock:
            if not outcome or not outcome.get("attempted"):
                self.not_reached.append(key)
            elif outcome.get("booted"):
                self.booted.append(key)
            else:
                self.not_booted.append(key)
            if not self.in_canary:
                self._judge("fix failure rate")

    def canary_done(self) -> None:
        """All canary VMs ended: the rest may start, or the rollout stops here."""
        with self._lock:
            self.in_canary = False
            if not self.fixed and not self.stopped:
                self.stopped = (f"rollout stopped: no canary VM reached its fix ({len(self.not_reached)} ended "
                                "before it), so nothing shows the fix works")
                log.error("fleet: %s", self.stopped)
                return
            self._judge("canary failure rate")
            if not self.stopped:
                log.info("fleet: canary passed: %d of %d fixed VM(s) booted (failure rate %.2f <= %.2f); the rest "
                         "start", len(self.booted), self.fixed, self.rate, self.max_failure_rate)

    def _judge(self, what: str) -> None:
        if self.stopped or not self.fixed or self.rate <= self.max_failure_rate:
            return
        self.stopped = (f"rollout stopped: {what} {self.rate:.2f} > {self.max_failure_rate:.2f} "
                        f"({len(self.not_booted)} of {self.fixed} fixed VMs did not boot)")
        log.error("fleet: %s; no new VM starts, the rest are left for a re-run", self.stopped)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {"fix": self.spec, "canary": self.canary, "max_failure_rate": self.max_failure_rate,
                    "fixed": self.fixed, "booted": len(self.booted), "not_booted": len(self.not_booted),
                    "not_reached_fix": len(self.not_reached), "failure_rate": round(self.rate, 3),
                    "stopped": self.stopped}
