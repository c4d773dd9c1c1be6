"""The evidence container's data plane, as the operator's side sees it: read, check, link.

Authentication is Azure AD only (the account has no shared key): DefaultAzureCredential through
`scripts.azure.storage_credential`. Tests and the local demo talk to Azurite instead, by setting
CRASHCART_STORAGE_CONNECTION_STRING to Azurite's well-known development connection string; that
variable is refused for anything but a loopback endpoint, so no account key can ever be used against
a real account from here. (Azurite over HTTPS uses a self-signed certificate: the tests trust it
through requests' own REQUESTS_CA_BUNDLE.)

A freshly made role assignment can take minutes to be honoured by storage, which answers 403
AuthorizationPermissionMismatch meanwhile: `auth_retry` waits that out (bounded, through
scripts.azure.poll) before failing; every other storage error becomes the operator's CrashcartError
through scripts.azure.errors with the storage roles named in the hint (STORAGE_HINTS).

Nothing the kit writes replaces a blob. Every write (`upload_bytes`/`upload_text`, and through
`create_only` the server-side copy's Put Block List and its zero-source page blob) is conditional on
If-None-Match: *, under a per-run prefix (`<vm key>/<UTC run stamp>/`): a name that is already taken
is `BlobExists` (exit 12, naming the blob), never an overwrite. Each write carries a random
`crashcart_write` metadata value, so a write the SDK retried after the service had already done it (a
timeout on the way back) is recognised as the kit's own and not mistaken for a collision.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from scripts.azure.clients import storage_credential
from scripts.azure.errors import translate_azure_error
from scripts.azure.poll import poll
from scripts.base.endpoints import STORAGE_UNREACHABLE_HINT, is_loopback_host
from scripts.base.errors import CrashcartError, ExitCode, first_line

log = logging.getLogger("crashcart.evidence")

CONNECTION_STRING_ENV = "CRASHCART_STORAGE_CONNECTION_STRING"
SAS_MAX_DAYS = 7  # a user delegation key, and so its SAS, is valid for at most 7 days
HEADER_BYTES = 0x2000
ROLE_WAIT_MAX_INTERVAL_S = 30.0
WRITE_ID = "crashcart_write"  # metadata: which write made the blob (a retried create is not a collision)

# What to do next when storage refuses or fails, for translate_azure_error(..., hints=STORAGE_HINTS).
STORAGE = "the evidence blob or container"
STORAGE_HINTS = {
    "auth": "the signed-in identity needs the 'Storage Blob Data Reader' role (Contributor to upload the report) "
            "on the evidence container",
    "failed": "retry in a few minutes; re-run with -v for the full error",
    "unreachable": STORAGE_UNREACHABLE_HINT,
}
# The storage SDK's own retries: a refused or unresolvable connection is tried once more, a couple of seconds
# later, not for ~90 s; a credential that cannot sign in is not retried at all (fail_fast_retry_policy).
RETRY_CONNECT = 1
RETRY_CONNECT_BACKOFF_S = 2.0

T = TypeVar("T")


def _connection_string_endpoint(connection_string: str) -> str:
    parts = dict(p.split("=", 1) for p in connection_string.split(";") if "=" in p)
    return parts.get("BlobEndpoint", "")


def container_client(blob_endpoint: str, container: str, credential: Any = None) -> Any:
    """A ContainerClient for the evidence container. `credential` overrides the default (tests pass a
    token credential for Azurite's OAuth mode)."""
    from azure.storage.blob import ContainerClient

    connection_string = os.environ.get(CONNECTION_STRING_ENV)
    if credential is None and connection_string:
        endpoint = _connection_string_endpoint(connection_string)
        if not is_loopback_host(endpoint):
            raise CrashcartError(
                f"{CONNECTION_STRING_ENV} names {endpoint or 'no BlobEndpoint'}: it is only for the local "
                "storage emulator (a loopback endpoint)",
                f"unset {CONNECTION_STRING_ENV}; against Azure, crashcart signs in with Azure AD", ExitCode.USAGE)
        return ContainerClient.from_connection_string(connection_string, container,
                                                      retry_policy=fail_fast_retry_policy())
    if credential is None:
        credential = storage_credential(blob_endpoint)
    return ContainerClient(blob_endpoint, container, credential=credential, retry_policy=fail_fast_retry_policy())


def fail_fast_retry_policy() -> Any:
    """The storage SDK's ExponentialRetry (its defaults for a service's 5xx/429 and a dropped answer), minus two
    waits that help nobody: it retries any AzureError, including the credential's ClientAuthenticationError
    (not signed in: each retry asks every DefaultAzureCredential source again), and a connection that cannot
    be made 3 times 15-40 s apart. Here a sign-in failure is raised at once, and a connection is tried
    RETRY_CONNECT more times RETRY_CONNECT_BACKOFF_S later. The 403 of a role still propagating is waited out by
    auth_retry, above the SDK."""
    from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
    from azure.storage.blob import ExponentialRetry

    class FailFastRetry(ExponentialRetry):
        def increment(self, settings: dict[str, Any], request: Any, response: Any = None, error: Any = None) -> bool:
            if isinstance(error, ClientAuthenticationError) and getattr(error, "status_code", None) is None:
                return False  # the credential could not sign in: asking it again gives the same answer
            settings["no_connection"] = isinstance(error, ServiceRequestError)
            return bool(super().increment(settings, request, response=response, error=error))

        def get_backoff_time(self, settings: dict[str, Any]) -> float:
            if settings.get("no_connection"):
                return RETRY_CONNECT_BACKOFF_S
            return float(super().get_backoff_time(settings))

    return FailFastRetry(retry_connect=RETRY_CONNECT)


def blob_url(container: Any, name: str) -> str:
    return container.get_blob_client(name).url


def auth_retry(func: Callable[[], T], what: str, wait_seconds: float = 120.0, first_delay: float = 2.0) -> T:
    """Runs `func` (`what` it does, e.g. "read <blob>"), retrying while storage answers 403
    AuthorizationPermissionMismatch (a role assignment still propagating), for up to `wait_seconds`;
    other storage errors (not signed in, unreachable, ...), and the refusal once the wait is over, become
    CrashcartErrors. A failed sign-in is not waited on."""
    from azure.core.exceptions import AzureError

    refused: list[AzureError] = []

    def attempt() -> tuple[T] | None:
        try:
            return (func(),)  # a tuple: func itself may answer None (a blob that does not exist)
        except (AzureError, ConnectionError, TimeoutError) as err:
            if not _role_not_effective(err):
                raise translate_azure_error(err, STORAGE, doing=what, hints=STORAGE_HINTS) from None
            log.info("storage says the role assignment is not effective yet (%s): %s; retrying", what, first_line(err))
            refused[:] = [err]
            return None

    done = poll(attempt, timeout_s=wait_seconds, interval_s=first_delay, max_interval_s=ROLE_WAIT_MAX_INTERVAL_S,
                backoff=2.0, on_timeout=lambda: translate_azure_error(refused[-1], STORAGE, doing=what,
                                                                      hints=STORAGE_HINTS))
    return done[0]


def _role_not_effective(err: Any) -> bool:
    code = getattr(err, "error_code", None) or ""
    code = getattr(code, "value", code)
    return getattr(err, "status_code", None) == 403 and code == "AuthorizationPermissionMismatch"


def properties(container: Any, name: str) -> Any | None:
    """The blob's properties, or None when it does not exist."""
    from azure.core.exceptions import ResourceNotFoundError

    def get() -> Any:
        try:
            return container.get_blob_client(name).get_blob_properties()
        except ResourceNotFoundError:
            return None

    return auth_retry(get, f"read the properties of {name}")


def read_bytes(container: Any, name: str, offset: int = 0, length: int | None = None) -> bytes | None:
    """Bytes of a blob (a range of it), or None when it does not exist."""
    from azure.core.exceptions import ResourceNotFoundError

    def get() -> bytes | None:
        try:
            return container.download_blob(name, offset=offset, length=length).readall()
        except ResourceNotFoundError:
            return None

    return auth_retry(get, f"read {name}")


def read_tail(container: Any, name: str, max_bytes: int = 64 * 1024) -> str | None:
    """The last `max_bytes` of a (growing, append) blob as text, or None when it does not exist yet."""
    props = properties(container, name)
    if props is None:
        return None
    size = props.size or 0
    start = max(0, size - max_bytes)
    data = read_bytes(container, name, start, size - start) if size else b""
    return (data or b"").decode("utf-8", errors="replace")


def sha256(container: Any, name: str) -> str:
    """SHA-256 of a whole blob, streamed (never held in memory)."""
    def compute() -> str:
        digest = hashlib.sha256()
        for chunk in container.download_blob(name, max_concurrency=4).chunks():
            digest.update(chunk)
        return digest.hexdigest()

    return auth_retry(compute, f"read {name}")


def list_names(container: Any, prefix: str) -> list[str]:
    return auth_retry(lambda: [b.name for b in container.list_blobs(name_starts_with=prefix)], f"list {prefix}")


class BlobExists(CrashcartError):
    """A write found its name taken: nothing was overwritten (If-None-Match: *)."""

    def __init__(self, name: str, message: str = ""):
        run = name.rsplit("/", 1)[0] if "/" in name else name
        super().__init__(
            message or f"evidence blob {name} already exists: nothing was overwritten (every write is If-None-Match: *)",
            f"an earlier run already wrote under {run}/ with the same run stamp; keep what is there and run "
            "again (a new run writes under a new stamp)", ExitCode.COLLECT_FAILED)
        self.name = name


def create_only(container: Any, name: str, put: Callable[[dict[str, Any]], T], what: str,
                metadata: dict[str, str] | None = None) -> T:
    """Runs `put(conditions)` - an SDK call that creates blob `name`, given `conditions` as its keyword
    arguments: If-None-Match: * and `metadata` with this write's id. A name already taken raises
    BlobExists, unless the blob there is this very write (the SDK retried a create the service had done)."""
    from azure.core import MatchConditions
    from azure.core.exceptions import HttpResponseError

    write_id = uuid.uuid4().hex
    conditions = {"match_condition": MatchConditions.IfMissing, "metadata": {**(metadata or {}), WRITE_ID: write_id}}

    def attempt() -> tuple[T | None]:
        try:
            return (put(dict(conditions)),)
        except HttpResponseError as err:
            if not _name_taken(err):
                raise
        existing = container.get_blob_client(name).get_blob_properties()
        if (existing.metadata or {}).get(WRITE_ID) != write_id:
            raise BlobExists(name)
        log.info("%s: the service had already done this write (a retried request); it stands", name)
        return (None,)

    return auth_retry(attempt, what)[0]  # type: ignore[return-value]


def _name_taken(err: Any) -> bool:
    """409 BlobAlreadyExists, or 412 ConditionNotMet (how the service answers If-None-Match: * on an
    existing blob, depending on the operation)."""
    code = getattr(err, "error_code", None) or ""
    code = str(getattr(code, "value", code))
    return err.status_code in (409, 412) and code in ("BlobAlreadyExists", "ConditionNotMet")


def upload_bytes(container: Any, name: str, data: bytes, content_type: str) -> str:
    """Puts a small blob (manifest, report, boot diagnostics) that must not exist yet (BlobExists if it does)."""
    from azure.storage.blob import ContentSettings

    client = container.get_blob_client(name)
    create_only(container, name, lambda conditions: client.upload_blob(
        data, content_settings=ContentSettings(content_type=content_type), **conditions), f"upload {name}")
    return client.url


def upload_text(container: Any, name: str, text: str, content_type: str) -> str:
    return upload_bytes(container, name, text.encode("utf-8"), content_type)


def uses_emulator_key() -> bool:
    """True when storage is reached with the emulator's key (tests, demo): no Azure AD, so no user
    delegation SAS."""
    return bool(os.environ.get(CONNECTION_STRING_ENV))


def check_sas_days(days: int) -> None:
    if not 1 <= days <= SAS_MAX_DAYS:
        raise CrashcartError(
            f"--sas-days {days} is out of range: a user delegation SAS is valid for 1 to {SAS_MAX_DAYS} days",
            f"pick 1-{SAS_MAX_DAYS}; for longer sharing, run `collect --sas` again later (new links) or share the "
            "blobs through the support case's own upload workspace", ExitCode.USAGE)


def user_delegation_sas(container: Any, name: str, days: int, now: dt.datetime | None = None) -> tuple[str, dt.datetime]:
    """A read-only HTTPS link to one blob, signed with a user delegation key (Azure AD; no account key).
    Returns (url, expiry). Storage caps a user delegation key, and so the link, at 7 days."""
    from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas

    check_sas_days(days)
    now = now or dt.datetime.now(dt.timezone.utc)
    start = now - dt.timedelta(minutes=5)  # clock skew
    expiry = now + dt.timedelta(days=days) - dt.timedelta(minutes=6)
    service = BlobServiceClient(_account_url(container), credential=container.credential,
                                retry_policy=fail_fast_retry_policy())
    key = auth_retry(lambda: service.get_user_delegation_key(start, expiry),
                     "get a user delegation key (needs Storage Blob Data Reader or higher)")
    token = generate_blob_sas(container.account_name, container.container_name, name, user_delegation_key=key,
                              permission=BlobSasPermissions(read=True), start=start, expiry=expiry,
                              protocol="https")
    return f"{container.get_blob_client(name).url}?{token}", expiry


def _account_url(container: Any) -> str:
    """The account URL of a container client (host-style on Azure, path-style on Azurite)."""
    url = container.url
    suffix = "/" + urllib.parse.quote(container.container_name)
    return url[: -len(suffix)] if url.endswith(suffix) else url.rsplit("/", 1)[0]
