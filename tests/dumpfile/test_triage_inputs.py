"""`pipenv run triage <path-or-url>`: no path or URL a user can give ends in a traceback (exit 70) or a hang.

A named pipe, a socket, a device or a directory is refused at once (exit 2) without being opened for reading
(opening a FIFO waits for a writer forever); a URL that is not one is a usage error (exit 2); a SAS never shows.
The verb runs in-process through the real entry point (scripts.__main__.main), and in a subprocess where a hang
has to be told apart from an answer.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scripts.__main__ import main
from scripts.base import rangeio
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.rangeio import open_source

REPO = Path(__file__).resolve().parents[2]
DOCUMENTED = {int(code) for code in ExitCode} - {int(ExitCode.BUG)}


@pytest.fixture
def verb(capsys, monkeypatch):
    """Runs `triage <argument>` through the real entry point; (exit code, stdout, stderr). The crashcart logger
    is put back afterwards (setup_logging points it at the captured stderr)."""
    logger = logging.getLogger("crashcart")
    saved = logger.handlers[:], logger.level, logger.propagate
    monkeypatch.setattr(rangeio, "_BACKOFF", 0.0)  # the retries of an unreachable loopback URL, without the wait

    def run(argument: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(["triage", argument])
        except SystemExit as stop:  # argparse: an argument that looks like an option ("-h", "--json")
            code = int(stop.code or 0)
            out, err = capsys.readouterr()
            assert code in (0, 2) and "Traceback" not in err
            return code, out, "error: (argparse's usage message)\n"
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    logger.handlers[:], logger.level, logger.propagate = saved


def _no_traceback(code: int, out: str, err: str) -> None:
    assert code in DOCUMENTED, (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert err.startswith("error: ") and len(err.splitlines()) <= 2  # what happened, what to do next


@pytest.mark.slow  # subprocess
def test_a_named_pipe_is_refused_at_once(tmp_path):
    """Before #13 `triage <fifo>` waited forever for a writer."""
    fifo = tmp_path / "MEMORY.DMP"
    os.mkfifo(fifo)
    result = subprocess.run([sys.executable, "-m", "scripts", "triage", str(fifo)], cwd=REPO, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "CI": "1"})
    assert result.returncode == ExitCode.USAGE and "Traceback" not in result.stderr
    assert f"error: {fifo} is a named pipe (FIFO), not a dump file" in result.stderr


def test_sockets_devices_and_directories_are_refused_without_being_read(tmp_path, verb):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    try:
        for path, what in ((tmp_path / "sock", "a socket"), (Path("/dev/zero"), "a character device"),
                           (tmp_path, "a directory")):
            code, out, err = verb(str(path))
            _no_traceback(code, out, err)
            assert code == ExitCode.USAGE and f"{path} is {what}, not a dump file" in err
    finally:
        server.close()


@pytest.mark.parametrize("argument, code, said", [
    ("", ExitCode.USAGE, "no dump path or URL was given"),
    ("/etc/passwd/MEMORY.DMP", ExitCode.USAGE, "Not a directory"),
    ("x" * 5000, ExitCode.USAGE, "File name too long"),
    ("bad\udcffname.dmp", ExitCode.USAGE, "no such file: bad\\udcffname.dmp"),  # a non-UTF-8 byte in argv
    ("a\nb.dmp", ExitCode.USAGE, "no such file: a\\nb.dmp"),
    ("http://[::1", ExitCode.USAGE, "is not a valid URL"),  # ValueError from urlsplit: exit 70 before #13
    ("https://[zz]/c/b", ExitCode.USAGE, "is not a valid URL"),
    ("http://127.0.0.1:99999/c/b?sig=s3cr3t", ExitCode.USAGE, "is not a valid URL"),  # exit 5 before #13
    ("http://", ExitCode.USAGE, "names no host"),
    ("https://example.com/c/b", ExitCode.USAGE, "not an Azure Storage endpoint"),
    ("https://acct.blob.core.windows.net/", ExitCode.USAGE, "names no blob"),  # exit 3 "no token" before (CLI review)
    ("https://acct.blob.core.windows.net/dumps?sig=s3cr3t", ExitCode.USAGE, "names no blob"),
    ("HTTPS://127.0.0.1:9/C/MEMORY.DMP?sig=s3cr3t", ExitCode.AZURE_FAILED, "could not reach"),  # the scheme in capitals
    ("ftp://host/c/b?sig=s3cr3t", ExitCode.USAGE, "only local paths and http(s) blob URLs"),
    ("http://127.0.0.1:9/c/MEMORY.DMP?sv=1&sig=s3cr3t", ExitCode.AZURE_FAILED, "could not reach"),
    ("http://user:pa55@127.0.0.1:9/c/MEMORY.DMP?sig=s3cr3t", ExitCode.AZURE_FAILED, "could not reach"),
])
def test_odd_paths_and_urls_are_told_not_crashed(verb, argument, code, said):
    got, out, err = verb(argument)
    _no_traceback(got, out, err)
    assert got == code and said in err
    assert "s3cr3t" not in err + out and "pa55" not in err + out  # a SAS or a password never shows


def test_a_path_with_a_nul_is_a_usage_error():
    """argv cannot carry a NUL, but a caller of open_source can: ValueError before #13."""
    with pytest.raises(CrashcartError, match="NUL character") as caught:
        open_source("MEMORY\0.DMP")
    assert caught.value.exit_code == ExitCode.USAGE


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argument=st.one_of(
    st.text(max_size=80),
    st.builds(lambda scheme, rest: scheme + rest, st.sampled_from(["http://", "https://", "file://", "HTTP://"]),
              st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=60)),
).filter(lambda text: "\0" not in text and "sig=" not in text))  # nothing that would go out to a network
def test_no_argument_ends_in_a_traceback(verb, argument):
    _no_traceback(*verb(argument))
