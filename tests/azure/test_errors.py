"""scripts.azure.errors: every Azure failure reads the same way and maps to one exit code."""

from __future__ import annotations

import pytest
from azure.core.exceptions import (ClientAuthenticationError, HttpResponseError, ResourceNotFoundError,
                                   ServiceRequestError, ServiceResponseTimeoutError)

from scripts.azure.errors import azure_call, is_transient, translate_azure_error
from scripts.base.errors import CrashcartError, ExitCode, first_line


class Response:
    def __init__(self, status: int):
        self.status_code = status
        self.reason = "reason"
        self.headers = {}

    def text(self):
        return ""


def http_error(status: int, message: str = "denied") -> HttpResponseError:
    err = HttpResponseError(message=message, response=Response(status))
    err.status_code = status
    return err


@pytest.mark.parametrize("err, code, words", [
    (http_error(403, "AuthorizationFailed: no action"), ExitCode.AZURE_AUTH, "not allowed to read VM web-01"),
    (ResourceNotFoundError("gone"), ExitCode.AZURE_NOT_FOUND, "VM web-01 was not found"),
    (http_error(429), ExitCode.AZURE_FAILED, "throttled"),
    (http_error(500), ExitCode.AZURE_FAILED, "Azure failed to read VM web-01"),
    (ServiceRequestError("connection refused"), ExitCode.AZURE_FAILED, "could not reach Azure"),
    (ServiceResponseTimeoutError("slow"), ExitCode.AZURE_FAILED, "did not answer in time"),
    (ClientAuthenticationError("no credential"), ExitCode.AZURE_AUTH, "could not sign in"),
])
def test_each_failure_has_its_code_and_words(err, code, words):
    translated = translate_azure_error(err, "VM web-01")
    assert translated.exit_code == code and words in translated.message and translated.hint


def test_azure_call_translates_and_passes_values_through():
    assert azure_call(lambda: 7, "x") == 7

    def refuse():
        raise http_error(403)

    with pytest.raises(CrashcartError) as caught:
        azure_call(refuse, "disk d", doing="snapshot disk d")
    assert caught.value.exit_code == ExitCode.AZURE_AUTH and "not allowed to snapshot disk d" in caught.value.message


def test_transient_is_throttling_service_errors_and_the_network():
    assert is_transient(http_error(429)) and is_transient(http_error(503)) and is_transient(ServiceRequestError("x"))
    assert not is_transient(http_error(403)) and not is_transient(http_error(404))


def test_first_line_never_fails_on_an_empty_message():
    assert first_line(EOFError()) == "EOFError"
    assert first_line(ValueError("a\nb")) == "a"
    assert first_line("") == "(no message)"
