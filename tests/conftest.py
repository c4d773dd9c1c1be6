"""Session-wide fixtures: real components started once on 127.0.0.1 and shared by the tests."""

from __future__ import annotations

import pytest

from scripts.devkit.armdouble import ArmDouble
from scripts.devkit.azurite import start_azurite


@pytest.fixture(scope="session")
def azurite():
    """A running Azurite (Blob service) for the whole session; tests use their own containers."""
    with start_azurite() as instance:
        yield instance


@pytest.fixture
def evidence_container(azurite, monkeypatch):
    """A fresh evidence container in the session's Azurite, as the kit reaches it (scripts.evidence, through
    the test-only emulator connection string)."""
    import uuid

    from scripts.evidence import blobs as evidence

    monkeypatch.setenv(evidence.CONNECTION_STRING_ENV, azurite.connection_string)
    name = f"dumps-{uuid.uuid4().hex[:10]}"
    azurite.service_client().create_container(name)
    return evidence.container_client(azurite.blob_endpoint, name)


@pytest.fixture
def arm(monkeypatch):
    """A fresh ARM double per test; every management client made by scripts.azure talks to it."""
    with ArmDouble() as double:
        monkeypatch.setenv("CRASHCART_ARM_ENDPOINT", double.url)
        yield double


@pytest.fixture(scope="session")
def synthesized(tmp_path_factory):
    """Every config variant's stacks, synthesized once for the session (jsii import ~15 s)."""
    from tests.support.synth import synth_variants

    return synth_variants(tmp_path_factory.mktemp("synth"))
