"""Credentials and Azure SDK clients: the one place that decides which endpoint and which auth.

Production uses DefaultAzureCredential against Azure Resource Manager. `CRASHCART_ARM_ENDPOINT`
points every management client at another endpoint (a sovereign cloud, or the loopback ARM double
the tests and the local demo run). Only a plain-HTTP loopback endpoint gets no authentication: a
token must never be sent to a server we did not authenticate, and nothing else may skip auth.
"""

from __future__ import annotations

import functools
import os
import urllib.parse
from dataclasses import dataclass
from typing import Any

from scripts.base.errors import CrashcartError, ExitCode

PUBLIC_ARM = "https://management.azure.com"
STORAGE_SCOPE = "https://storage.azure.com/.default"


def arm_endpoint() -> str:
    return os.environ.get("CRASHCART_ARM_ENDPOINT", PUBLIC_ARM).rstrip("/")


def is_loopback(url: str) -> bool:
    parsed = urllib.parse.urlsplit(url)
    return parsed.scheme == "http" and parsed.hostname in ("127.0.0.1", "localhost", "::1")


@functools.lru_cache(maxsize=1)
def credential() -> Any:
    """DefaultAzureCredential: environment, workload identity (pipelines' OIDC), managed identity, az login."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(exclude_interactive_browser_credential=True)


def _arm_kwargs() -> dict[str, Any]:
    endpoint = arm_endpoint()
    kwargs: dict[str, Any] = {"base_url": endpoint}
    if endpoint != PUBLIC_ARM:
        kwargs["credential_scopes"] = [f"{endpoint}/.default"]
    if is_loopback(endpoint):
        from azure.core.pipeline.policies import SansIOHTTPPolicy

        kwargs["authentication_policy"] = SansIOHTTPPolicy()
    return kwargs


def _arm_credential() -> Any:
    if is_loopback(arm_endpoint()):
        return _NoCredential()
    return credential()


class _NoCredential:
    """Stands where a credential is required; never asked for a token (the auth policy is a no-op)."""

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:  # pragma: no cover - never reached
        raise CrashcartError("no credential is used against a loopback endpoint", exit_code=ExitCode.BUG)


@dataclass(frozen=True)
class AzureClients:
    """Management clients for one subscription, created lazily (each SDK import costs time)."""

    subscription_id: str

    @functools.cached_property
    def compute(self) -> Any:
        from azure.mgmt.compute import ComputeManagementClient

        return ComputeManagementClient(_arm_credential(), self.subscription_id, **_arm_kwargs())

    @functools.cached_property
    def resource(self) -> Any:
        # azure-mgmt-resource >= 24 moved the client into the `resources` subpackage.
        from azure.mgmt.resource.resources import ResourceManagementClient

        return ResourceManagementClient(_arm_credential(), self.subscription_id, **_arm_kwargs())


def storage_credential(account_url: str) -> Any:
    """Azure AD credential for the data plane. Azurite (loopback) accepts a bearer token only over
    HTTPS, so against a loopback endpoint the caller passes Azurite's well-known key instead."""
    if is_loopback(account_url):
        return None
    return credential()


def translate_azure_error(err: Exception, what: str) -> CrashcartError:
    """Turns an azure-core HttpResponseError (or an auth failure) into an operator-facing message."""
    from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError

    status = getattr(err, "status_code", None)
    # ClientAuthenticationError is an HttpResponseError too: without a status it came from the
    # credential (not signed in), with 401/403 from ARM (signed in, not allowed).
    if isinstance(err, ClientAuthenticationError) and status is None:
        return CrashcartError(
            f"could not sign in to Azure while reading {what}: {_first_line(err)}",
            "run `az login` (or set AZURE_CLIENT_ID/AZURE_TENANT_ID for workload identity) and re-run",
            ExitCode.AZURE_AUTH,
        )
    code = getattr(getattr(err, "error", None), "code", None) or ""
    detail = getattr(getattr(err, "error", None), "message", None) or _first_line(err)
    if isinstance(err, ResourceNotFoundError) or status == 404:
        return CrashcartError(
            f"{what} was not found ({code or 'NotFound'}): {detail}",
            "check the subscription, resource group and name (az vm list -o table), and that you are "
            "signed in to the right tenant",
            ExitCode.AZURE_NOT_FOUND,
        )
    if status in (401, 403) or isinstance(err, ClientAuthenticationError):
        return CrashcartError(
            f"not allowed to read {what} ({code or status}): {detail}",
            "the signed-in identity needs at least the Reader role on the VM's resource group "
            "(and Disk Snapshot Contributor to snapshot it); ask the subscription owner",
            ExitCode.AZURE_AUTH,
        )
    return CrashcartError(
        f"Azure failed while reading {what} ({code or status}): {detail}",
        "retry in a few minutes; if it persists, re-run with -v and check the Azure status page",
        ExitCode.AZURE_FAILED,
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
