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

from scripts.base.endpoints import is_loopback
from scripts.base.errors import CrashcartError, ExitCode
from scripts.base.rangeio import check_url

PUBLIC_ARM = "https://management.azure.com"
ARM_ENDPOINT_ENV = "CRASHCART_ARM_ENDPOINT"


def arm_endpoint() -> str:
    """The ARM endpoint: CRASHCART_ARM_ENDPOINT (checked: an https URL with a host, or a plain-HTTP loopback
    one), else public Azure."""
    endpoint = (os.environ.get(ARM_ENDPOINT_ENV) or PUBLIC_ARM).strip().rstrip("/")
    if endpoint != PUBLIC_ARM:
        _check_arm_endpoint(endpoint)
    return endpoint


def _check_arm_endpoint(endpoint: str) -> None:
    hint = (f"set {ARM_ENDPOINT_ENV} to the cloud's Resource Manager URL (e.g. https://management.usgovcloudapi.net), "
            "or unset it for public Azure")
    try:
        check_url(endpoint)  # a host and a valid port, the check every URL the kit is given passes
    except CrashcartError as err:
        raise CrashcartError(f"{ARM_ENDPOINT_ENV}: {err.message}", hint, ExitCode.USAGE) from None
    if not (urllib.parse.urlsplit(endpoint).scheme == "https" or is_loopback(endpoint)):
        raise CrashcartError(f"{ARM_ENDPOINT_ENV}={endpoint!r} is not an https:// URL (a token goes only over HTTPS; "
                             "plain HTTP only to a loopback double)", hint, ExitCode.USAGE)


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

    @functools.cached_property
    def authorization(self) -> Any:
        """Microsoft.Authorization: the caller's effective permissions at a scope (preflight)."""
        from azure.mgmt.authorization import AuthorizationManagementClient

        return AuthorizationManagementClient(_arm_credential(), self.subscription_id, **_arm_kwargs())


def resource_graph() -> Any:
    """Azure Resource Graph (a tenant-level service: no subscription; each query names its subscriptions),
    on the kit's ARM endpoint and credential like every management client."""
    from azure.mgmt.resourcegraph import ResourceGraphClient

    return ResourceGraphClient(_arm_credential(), **_arm_kwargs())


def storage_credential(account_url: str) -> Any:
    """Azure AD credential for the data plane. Azurite (loopback) accepts a bearer token only over
    HTTPS, so against a loopback endpoint the caller passes Azurite's well-known key instead."""
    if is_loopback(account_url):
        return None
    return credential()
