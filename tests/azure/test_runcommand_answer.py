"""scripts.azure.runcommand.run_for_answer: the one way a script's result line is read (prepare, fix, live)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from scripts import remote
from scripts.azure.runcommand import Answer, Execution, Outcome, RemoteCommand, run_for_answer
from scripts.base.errors import CrashcartError, ExitCode

LINE = 'CRASHCART_RESULT {"status": "prepared", "notes": ["hive was dirty"]}'


def _runner(execution: Execution, seen: list | None = None) -> SimpleNamespace:
    """A runner on no VM: every command ends as `execution` says (and is kept in `seen`)."""
    return SimpleNamespace(vm_name="rescue-01", run=lambda command, on_status=None: (
        (seen if seen is not None else []).append(command) or Outcome(execution, 1.0, True)))


def _answer(log_text=None, log_error: CrashcartError | None = None) -> Answer:
    def read_log():
        if log_error:
            raise log_error
        return log_text

    return Answer(parse=lambda text: remote.parse_marked(text, remote.RESULT_MARKER), ran="the prepare run command",
                  unfinished="preparing the disk copy", timeout_hint="see error.log", failure_hint="see the extension",
                  read_log=read_log, log_name="run/prepare/runcommand/output.log")


COMMAND = RemoteCommand(name="crashcart-prepare-x", script="exit 0", timeout_s=1200)


def test_the_answer_comes_from_the_output_blob_when_the_instance_view_lost_it(caplog):
    seen: list = []
    runner = _runner(Execution(state="Succeeded", exit_code=0, output="...4 KB of upload progress..."), seen)
    with caplog.at_level(logging.INFO, logger="crashcart"):
        found, ended = run_for_answer(runner, COMMAND, _answer(log_text="noise\n" + LINE + "\n"), what="rescue VM x",
                                      doing="run the prepare script", shown="prepare on x", step_text="prepare")
    assert found["status"] == "prepared" and ended.state == "Succeeded" and seen == [COMMAND]
    assert "note: hive was dirty" in caplog.text


def test_a_timeout_is_a_timeout_even_with_an_answer():
    runner = _runner(Execution(state="TimedOut", exit_code=None, output=LINE))
    with pytest.raises(CrashcartError) as err:
        run_for_answer(runner, COMMAND, _answer(), what="rescue VM x", doing="run the prepare script")
    assert err.value.exit_code == ExitCode.TIMED_OUT
    assert err.value.message == "preparing the disk copy did not finish within 20 min"


def test_no_answer_anywhere_says_how_it_ended_and_the_last_error_lines(caplog):
    runner = _runner(Execution(state="Failed", exit_code=1, output="", error="a\nb\nc\nd: disk busy\n"))
    refused = CrashcartError("403 on output.log", "grant the role", ExitCode.AZURE_AUTH)
    with caplog.at_level(logging.WARNING, logger="crashcart"), pytest.raises(CrashcartError) as err:
        run_for_answer(runner, COMMAND, _answer(log_error=refused), what="rescue VM x", doing="run the prepare script")
    assert err.value.exit_code == ExitCode.COLLECT_FAILED and err.value.hint == "see the extension"
    assert err.value.message == ("the prepare run command ended Failed (exit 1) without a result: b | c | d: disk busy")
    assert "could not read run/prepare/runcommand/output.log: 403 on output.log" in caplog.text
