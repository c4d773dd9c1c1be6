"""repair-run's settings: durations (scripts/run/settings.py)."""

from __future__ import annotations

import pytest

from scripts.run.settings import parse_duration


@pytest.mark.parametrize("text,seconds", [("90", 5400), ("90m", 5400), ("2h", 7200), ("1h30m", 5400), ("45s", 45)])
def test_durations(text, seconds):
    assert parse_duration(text, "--timeout") == seconds


def test_a_bad_duration_is_a_usage_error():
    with pytest.raises(Exception) as err:
        parse_duration("soon", "--timeout")
    assert getattr(err.value, "exit_code", None) == 2
