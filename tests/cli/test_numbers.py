"""Every numeric option of every verb, and repair-run's numeric knobs, refuse nan, inf and out-of-range
values the same way: exit 2 and one `error:` line naming the option (scripts/run/numbers.py) - never a
traceback (70), an OverflowError, a usage dump or a wait that never ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CASES = [
    ("collect", "--timeout-minutes", "nan"),
    ("collect", "--timeout-minutes", "1e999"),
    ("collect", "--agent-wait-minutes", "inf"),
    ("collect", "--poll-seconds", "nan"),
    ("collect", "--sas-days", "nan"),
    ("collect", "--sas-days", "1e400"),
    ("prepare-dump", "--memory-gb", "nan"),
    ("prepare-dump", "--trigger-timeout-minutes", "inf"),
    ("prepare-dump", "--nmi-after-minutes", "nan"),
    ("prepare-dump", "--dump-wait-minutes", "inf"),
    ("prepare-dump", "--timeout-minutes", "-inf"),
    ("prepare-dump", "--agent-wait-minutes", "nan"),
    ("prepare-dump", "--poll-seconds", "inf"),
    ("rollback", "--poll-seconds", "nan"),
    ("demo", "--memory-mib", "nan"),
    ("demo", "--memory-mib", "9" * 5000),
    ("sweep", "--now", "nan"),
    ("repair-run", "--timeout", "99999999999999999999"),  # was an OverflowError in the deadline timer
    ("repair-run", "--timeout", "inf"),
]


def run_verb(cwd: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CRASHCART_", "AZURE_", "ARM_"))}
    return subprocess.run([sys.executable, "-m", "scripts", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**clean, "PYTHONPATH": str(REPO), **(env or {})})


def assert_one_line_usage_error(done: subprocess.CompletedProcess, names: str) -> None:
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and names in errors[0], done.stderr
    assert "Traceback" not in done.stderr and "usage:" not in done.stderr
    assert len(done.stderr.splitlines()) <= 2  # the error and what to do next


@pytest.mark.parametrize("verb,option,value", CASES, ids=[f"{v}{o}={x[:8]}" for v, o, x in CASES])
def test_a_non_finite_or_huge_number_is_one_usage_line(tmp_path, verb, option, value):
    done = run_verb(tmp_path, verb, f"{option}={value}")
    assert_one_line_usage_error(done, option)


ENV_CASES = [
    ("CRASHCART_TEARDOWN_RETRY_SECONDS", "nan"),  # stopped the destroy retries: exit 31, resources left
    ("CRASHCART_TEARDOWN_ATTEMPTS", "inf"),
    ("CRASHCART_POLL_SECONDS", "nan"),
    ("CRASHCART_AGENT_WAIT_MINUTES", "inf"),
    ("CRASHCART_LOCK_LEASE_SECONDS", "nan"),
    ("CRASHCART_RUN_TIMEOUT", "99999999999999999h"),
]


@pytest.mark.parametrize("name,value", ENV_CASES, ids=[n for n, _ in ENV_CASES])
def test_repair_run_refuses_a_non_finite_knob_before_doing_anything(tmp_path, name, value):
    done = run_verb(tmp_path, "repair-run", "--skip-synth", env={name: value})
    assert_one_line_usage_error(done, name if name != "CRASHCART_RUN_TIMEOUT" else "--timeout")
    assert not (tmp_path / "crashcart-out").exists()  # refused before the run started
