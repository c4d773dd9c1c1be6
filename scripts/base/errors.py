"""Exit codes and the one exception type every verb raises for an expected failure.

A `CrashcartError` is something an operator can act on: it carries what happened, what to do next
and the exit code a pipeline can branch on. Anything else escaping a verb is a bug and is reported as
one (exit 70) rather than as a user mistake.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Documented in README.md ("Exit codes"); the numbers are a public contract for pipelines."""

    OK = 0
    USAGE = 2  # bad command line or configuration: fix the input and re-run
    AZURE_AUTH = 3  # not signed in, or the identity lacks a role on the resource
    AZURE_NOT_FOUND = 4  # a resource named in the config or on the command line does not exist
    AZURE_FAILED = 5  # any other Azure error (throttling, conflict, service error)
    # collection outcomes (collect, repair-run)
    NO_DUMP = 10  # the disk was read, no memory dump was on it: see prepare-dump
    DISK_NOT_FOUND = 11  # the disk copy or its Windows volume was not found on the rescue VM
    COLLECT_FAILED = 12  # the remote command or the upload failed
    TIMED_OUT = 13  # the remote command did not finish within the timeout
    AGENT_NOT_READY = 14  # the rescue VM's agent never reported Ready, so no command could run
    VERIFY_FAILED = 15  # a blob is missing, short, or not a kernel dump
    # fix --verify (and repair-run --fix)
    CRASHED_AGAIN = 16  # the fixed copy crashed again at boot: the VM was rolled back to its original OS disk
    # dump files (triage)
    BAD_DUMP = 20  # not a kernel dump, truncated, corrupt or encrypted
    DUMP_PARTIAL = 21  # the dump is truncated or damaged past its header: the verdict is from what is there
    # orchestration (repair-run, sweep)
    DEPLOY_FAILED = 30  # terraform could not create the repair stack
    TEARDOWN_FAILED = 31  # the repair stack could not be destroyed: resources are left, see the message
    INTERRUPTED = 130  # SIGINT/SIGTERM: teardown still ran unless --keep
    BUG = 70  # an unexpected error inside crashcart: please report it with the log


class CrashcartError(Exception):
    """An expected failure, told to the operator as `message` plus a `hint` saying what to do next."""

    exit_code: ExitCode = ExitCode.AZURE_FAILED

    def __init__(self, message: str, hint: str = "", exit_code: ExitCode | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class ConfigError(CrashcartError):
    """Invalid configuration: names the field, the value given and the form expected."""

    exit_code = ExitCode.USAGE

    def __init__(self, field: str, value: object, expected: str, hint: str = ""):
        if isinstance(value, str):
            shown = f'"{printable(value)}"'
        else:
            try:
                shown = printable(repr(value))
            except ValueError:  # an integer too long to print (Python refuses over 4300 digits)
                shown = f"<a {type(value).__name__} too long to show>"
        super().__init__(
            f"config: {field} = {shown} is not valid: expected {expected}",
            hint or "fix the value in the config file (or the CRASHCART_* environment variable) and re-run",
        )
        self.field = field
        self.value = value
        self.expected = expected


def printable(text: str) -> str:
    """`text` with every non-printable character (newline, escape, bidi override, zero-width) as its Python
    escape: a value from outside printed raw could forge a log line or reorder a message on a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def first_line(err: BaseException | str | None) -> str:
    """The first line of an error's message, never empty: an exception with no message (EOFError(),
    a bare TimeoutError) is named by its type instead of crashing the caller's message."""
    if isinstance(err, BaseException):
        text = str(getattr(err, "message", None) or err or "").strip()
        return text.splitlines()[0] if text else type(err).__name__
    text = str(err or "").strip()
    return text.splitlines()[0] if text else "(no message)"


DEFAULT_HINTS = {
    "sign_in": "run `az login` (or set AZURE_CLIENT_ID/AZURE_TENANT_ID for workload identity) and re-run",
    "auth": "the signed-in identity lacks a role for this (README 'Pipeline identity' lists them); ask the "
            "subscription owner, or re-run once a new role assignment has propagated (up to 10 minutes)",
    "not_found": "check the subscription, resource group and name (az resource list -o table), and that you are "
                 "signed in to the right tenant",
    "throttled": "Azure is throttling this subscription: wait a minute and re-run",
    "unreachable": "check this machine's network, proxy and DNS for the Azure endpoint, then re-run",
    "failed": "retry in a few minutes; if it persists, re-run with -v and check the Azure status page",
}


def for_status(status: int | None, code: str, what: str, detail: str = "", *, doing: str | None = None,
               hints: dict[str, str] | None = None) -> CrashcartError:
    """The one mapping from an HTTP answer (status, service error code) to an operator-facing error and an
    exit code. `what` names the resource (for "was not found"), `doing` the action ("read <what>")."""
    hints = {**DEFAULT_HINTS, **(hints or {})}
    doing = doing or f"read {what}"
    said = f"{code or status or 'error'}" + (f"): {detail}" if detail else ")")
    if status in (401, 403):
        return CrashcartError(f"not allowed to {doing} ({said}", hints["auth"], ExitCode.AZURE_AUTH)
    if status == 404:
        return CrashcartError(f"{what} was not found ({code or 'NotFound'}" + (f"): {detail}" if detail else ")"),
                              hints["not_found"], ExitCode.AZURE_NOT_FOUND)
    if status == 429:
        return CrashcartError(f"Azure throttled the requests to {doing} ({said}", hints["throttled"],
                              ExitCode.AZURE_FAILED)
    return CrashcartError(f"Azure failed to {doing} ({said}", hints["failed"], ExitCode.AZURE_FAILED)
