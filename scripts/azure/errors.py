"""Azure SDK exceptions -> the operator's CrashcartError, in one place.

Every call the kit makes through an azure-* client that can fail for reasons an operator can fix (not
signed in, a missing role, a wrong name, throttling, no network) goes through `translate_azure_error`
or `azure_call`; the status-to-exit-code table itself is scripts.base.errors.for_status, which the raw
HTTP range reader shares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from scripts.base.errors import DEFAULT_HINTS, CrashcartError, ExitCode, first_line, for_status

T = TypeVar("T")

# Azure Storage answers 403 AuthorizationFailure ("This request is not authorized to perform this operation.")
# when a network rule refuses the caller; a missing data role is AuthorizationPermissionMismatch instead.
NETWORK_RULE_CODE = "AuthorizationFailure"
NETWORK_RULE_HINT = ("the storage account's firewall does not allow this machine (no role fixes that): for the "
                     "evidence account add this machine's public IP to evidence.allowed_ip_ranges "
                     "(CRASHCART_EVIDENCE_ALLOWED_IP_RANGES) or run from a subnet in evidence.allowed_subnet_ids, then "
                     "`npx cdktf deploy evidence` and re-run; for an account the kit did not create: `az storage "
                     "account network-rule add -g <group> -n <account> --ip-address <ip>`")


def translate_azure_error(err: BaseException, what: str, *, doing: str | None = None,
                          hints: dict[str, str] | None = None) -> CrashcartError:
    """An operator-facing error for an exception raised by an Azure SDK client (or the credential)."""
    if isinstance(err, CrashcartError):
        return err
    from azure.core.exceptions import (ClientAuthenticationError, ResourceNotFoundError, ServiceRequestError,
                                       ServiceResponseError, ServiceResponseTimeoutError)

    hints = {**DEFAULT_HINTS, **(hints or {})}
    doing = doing or f"read {what}"
    status = getattr(err, "status_code", None)
    # ClientAuthenticationError is an HttpResponseError too: without a status it came from the credential
    # (not signed in), with 401/403 from the service (signed in, not allowed).
    if isinstance(err, ClientAuthenticationError) and status is None:
        return CrashcartError(f"could not sign in to Azure to {doing}: {first_line(err)}", hints["sign_in"],
                              ExitCode.AZURE_AUTH)
    if isinstance(err, (ServiceResponseTimeoutError, TimeoutError)):
        return CrashcartError(f"Azure did not answer in time to {doing}: {first_line(err)}", hints["failed"],
                              ExitCode.AZURE_FAILED)
    if isinstance(err, (ServiceRequestError, ServiceResponseError, ConnectionError)):
        return CrashcartError(f"could not reach Azure to {doing}: {first_line(err)}", hints["unreachable"],
                              ExitCode.AZURE_FAILED)
    error = getattr(err, "error", None)
    code = getattr(error, "code", None) or getattr(err, "error_code", None) or ""
    code = str(getattr(code, "value", code))  # StorageErrorCode members read as the service's code
    detail = getattr(error, "message", None) or first_line(err)
    if isinstance(err, ClientAuthenticationError) and status not in (401, 403):
        status = 403
    if isinstance(err, ResourceNotFoundError):
        status = 404
    if status == 403 and code == NETWORK_RULE_CODE:
        # Storage's answer to a request its network rules refused (firewall, private-endpoint only): no role
        # fixes it, so the role hint would send the operator the wrong way.
        hints = {**hints, "auth": NETWORK_RULE_HINT}
        detail = f"{first_line(str(detail))} (the storage account's network rules refused this machine)"
    return for_status(status, code, what, first_line(str(detail)), doing=doing, hints=hints)


def azure_call(call: Callable[[], T], what: str, *, doing: str | None = None,
               hints: dict[str, str] | None = None) -> T:
    """Runs one SDK call; an Azure exception becomes the translated CrashcartError."""
    from azure.core.exceptions import AzureError

    try:
        return call()
    except (AzureError, ConnectionError, TimeoutError) as err:
        raise translate_azure_error(err, what, doing=doing, hints=hints) from None


def is_transient(err: BaseException) -> bool:
    """Worth retrying: throttling, a service error or a dropped connection."""
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    if isinstance(err, (ServiceRequestError, ServiceResponseError, ConnectionError, TimeoutError)):
        return True
    status: Any = getattr(err, "status_code", None)
    return status == 429 or (isinstance(status, int) and status >= 500)
