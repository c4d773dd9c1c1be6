"""Read-only links to the stored dumps for a support ticket, the same for every strategy.

They are user-delegation SAS links (signed with an Azure AD key, so the account needs no shared key)
and go to the verb's stdout only: the report says that they were made and until when, never the links.
Best effort: a link storage refuses to sign is a note, and a collected dump stays collected.
"""

from __future__ import annotations

import logging
from typing import Any

from scripts.base.errors import CrashcartError
from scripts.collection.contract import CollectResult
from scripts.evidence import blobs as evidence

log = logging.getLogger("crashcart.collect")


def add_sas_links(result: CollectResult, container: Any, days: int | None) -> None:
    """Read-only links for a support ticket: best effort, a collected dump stays collected."""
    if not days or not result.dumps:
        return
    if evidence.uses_emulator_key():
        result.notes.append("no SAS links: they are signed with an Azure AD user delegation key, and "
                            f"storage is reached with {evidence.CONNECTION_STRING_ENV} (emulator key)")
        return
    try:
        for blob in result.dumps:
            url, expiry = evidence.user_delegation_sas(container, blob.name, days)
            result.sas[blob.name] = url
            result.sas_expiry = expiry.isoformat()
    except CrashcartError as err:
        result.sas.clear()
        result.notes.append(f"no SAS links: {err.message} ({err.hint})")
        log.warning("SAS links could not be made: %s", err.message)
