"""scripts.base.userfiles: a file an operator names is read the one way - a pipe, a folder or a missing path is
a usage error naming the option (and a pipe is refused before it is opened: reading it would block forever);
UTF-8 with or without Notepad's byte-order mark."""

from __future__ import annotations

import os

import pytest

from scripts.base import userfiles
from scripts.base.errors import CrashcartError, ExitCode


def refused(path, **kwargs) -> CrashcartError:
    with pytest.raises(CrashcartError) as caught:
        userfiles.read_text(path, "--thing", "pass a text file", **kwargs)
    assert caught.value.exit_code == ExitCode.USAGE and "\n" not in caught.value.message
    assert "--thing" in caught.value.message
    return caught.value


def test_a_byte_order_mark_is_dropped_and_crlf_is_kept_for_the_parser(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    assert userfiles.read_text(path, "--thing", "").splitlines() == ["line one", "line two"]


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in refused(fifo).message


def test_a_folder_a_missing_file_and_other_encodings_are_refused(tmp_path):
    assert "folder" in refused(tmp_path).message
    assert "no such file" in refused(tmp_path / "missing").message
    latin = tmp_path / "latin.txt"
    latin.write_bytes("M\u00fcller".encode("latin-1"))
    assert "not UTF-8" in refused(latin).message
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 2000)
    assert "too large" in refused(big, max_bytes=1000).message


def test_require_folder_refuses_a_file_and_a_missing_folder(tmp_path):
    afile = tmp_path / "f"
    afile.write_text("x")
    for path, create, words in ((afile, False, "is a file"), (afile, True, "is a file"),
                                (afile / "sub", True, "is a file"), (tmp_path / "gone", False, "does not exist")):
        with pytest.raises(CrashcartError) as caught:
            userfiles.require_folder(path, "--out", create=create)
        assert caught.value.exit_code == ExitCode.USAGE and words in caught.value.message
    assert userfiles.require_folder(tmp_path / "new" / "deeper", "--out", create=True) == tmp_path / "new" / "deeper"
    assert userfiles.require_folder(tmp_path, "--out") == tmp_path
