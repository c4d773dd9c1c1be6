"""`sweep`: a subscription taken from the environment that is not a GUID is told by the variable's name."""

from __future__ import annotations

import argparse

import pytest

from scripts.base.errors import CrashcartError, ExitCode
from scripts.cli import sweep


@pytest.mark.parametrize("name", ["AZURE_SUBSCRIPTION_ID", "CRASHCART_SOURCE_SUBSCRIPTION_ID"])
def test_a_bad_subscription_in_the_environment_names_the_variable(monkeypatch, tmp_path, name):
    for other in ("AZURE_SUBSCRIPTION_ID", "CRASHCART_SOURCE_SUBSCRIPTION_ID"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, "garbage")
    args = argparse.Namespace(subscription=None, config=str(tmp_path / "none.toml"), delete=False, now=None,
                              no_wait=False)
    with pytest.raises(CrashcartError) as caught:
        sweep.run(args)
    assert caught.value.exit_code == ExitCode.USAGE
    assert caught.value.message == f'{name}="garbage" is not a subscription ID' and name in caught.value.hint


def test_the_command_line_wins_over_a_bad_environment(monkeypatch, tmp_path):
    """--subscription is what is swept; a stale variable beside it is not an error (resolve_subscription's order)."""
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", "garbage")
    args = argparse.Namespace(subscription="not-a-guid", config=None, delete=False, now=None, no_wait=False)
    with pytest.raises(CrashcartError) as caught:
        sweep.run(args)
    assert caught.value.message == '"not-a-guid" is not a subscription ID'
