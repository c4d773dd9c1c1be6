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


@pytest.mark.parametrize("text", ["0", "0s", "169h", "99999999999999999999", "1e9", "nan", "inf", "١٢m"])
def test_a_duration_outside_1s_to_a_week_is_a_usage_error(text):
    """A huge --timeout used to overflow the deadline timer (OverflowError, exit 70)."""
    with pytest.raises(Exception) as err:
        parse_duration(text, "--timeout")
    assert getattr(err.value, "exit_code", None) == 2 and "--timeout" in str(err.value)


def test_the_vm_is_checked_at_once_and_a_trailing_slash_is_dropped():
    from scripts.run.settings import checked_vm_id

    vm = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Compute/" \
         "virtualMachines/web-01"
    assert checked_vm_id(f" {vm}/ ") == vm and checked_vm_id("") == ""
    with pytest.raises(Exception) as err:
        checked_vm_id("web-01")
    assert getattr(err.value, "exit_code", None) == 2 and "--vm" in str(err.value)
