"""`python -m scripts`: the verb table's door, as an operator types at it."""

from __future__ import annotations

import pytest

from scripts.__main__ import VERBS, main
from scripts.base.errors import ExitCode


def test_help_asked_for_goes_to_stdout_and_a_missing_verb_to_stderr(capsys):
    assert main(["--help"]) == ExitCode.OK
    out = capsys.readouterr()
    assert all(verb in out.out for verb in VERBS) and out.err == ""
    assert main([]) == ExitCode.USAGE
    out = capsys.readouterr()
    assert "verbs:" in out.err and out.out == ""


@pytest.mark.parametrize("flag", ["-v", "--verbose"])
def test_verbose_before_the_verb_is_the_verbs_own(flag, capsys, tmp_path):
    """`python -m scripts -v triage X` said "unknown verb '-v'" (CLI review); it now means `triage -v X`."""
    code = main([flag, "triage", str(tmp_path / "missing.dmp")])
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE and "unknown verb" not in err and "missing.dmp" in err


def test_an_unknown_verb_names_the_verbs(capsys):
    assert main(["tirage"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "unknown verb 'tirage'" in err and "triage" in err
