"""Which endpoints may receive a credential: the rule every HTTP caller in the kit shares.

A token must never be sent to a server we did not authenticate. Azure AD tokens go over HTTPS to Azure
Storage hosts only; the one exception is a plain-HTTP loopback endpoint (Azurite, the ARM double), which
gets no token at all.
"""

from __future__ import annotations

import urllib.parse

STORAGE_SCOPE = "https://storage.azure.com/.default"
# Azure AD tokens for Storage go only to these hosts (public, US Government and China clouds, managed disks)
STORAGE_TOKEN_HOSTS = (".blob.core.windows.net", ".blob.core.usgovcloudapi.net", ".blob.core.chinacloudapi.cn",
                       ".blob.storage.azure.net")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(url: str) -> bool:
    """A plain-HTTP URL on this machine (the local doubles)."""
    parsed = urllib.parse.urlsplit(url)
    return parsed.scheme == "http" and parsed.hostname in LOOPBACK_HOSTS


def is_loopback_host(url: str) -> bool:
    """Any scheme, host on this machine (Azurite also serves HTTPS)."""
    return urllib.parse.urlsplit(url).hostname in LOOPBACK_HOSTS


def is_storage_host(url: str) -> bool:
    parsed = urllib.parse.urlsplit(url)
    return parsed.scheme == "https" and (parsed.hostname or "").endswith(STORAGE_TOKEN_HOSTS)

# What to do when a storage endpoint cannot be reached (DNS, refused connection, firewall): one wording for
# the raw range reader (scripts.base.rangeio) and the storage SDK path (scripts.evidence.blobs).
STORAGE_UNREACHABLE_HINT = ("check the network path to the storage account (firewall, private endpoint, proxy) "
                            "and re-run")


def token_refusal(url: str) -> str | None:
    """Why an Azure AD token must not be sent to `url` (None when it may): HTTPS to an Azure Storage host, or
    a loopback endpoint (the local doubles, which get no token at all)."""
    parsed = urllib.parse.urlsplit(url)
    if is_loopback_host(url) or is_storage_host(url):
        return None
    if parsed.scheme == "https":
        return f"refusing to send an Azure AD token to {parsed.hostname}: it is not an Azure Storage endpoint"
    scheme = "plain HTTP" if parsed.scheme == "http" else parsed.scheme or "no scheme"
    return f"refusing to send an Azure AD token over {scheme} to {parsed.hostname or url}"
