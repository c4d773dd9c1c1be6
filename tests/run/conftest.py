"""Fixtures for repair-run in a project folder (tests/run/repairkit.py has the helpers): the session's
one real synth, the evidence stack's state, a fresh project per test."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from tests.run.repairkit import Outcome, Project
from tests.support.fake_terraform import write_shim


@pytest.fixture(scope="session")
def tf_bin(tmp_path_factory) -> Path:
    bin_dir = tmp_path_factory.mktemp("bin")
    write_shim(bin_dir)
    return bin_dir


@pytest.fixture(scope="session")
def synthesized(tmp_path_factory, tf_bin) -> tuple[Project, Outcome]:
    """The session's one real synth, done by repair-run itself (main.py as a subprocess); the run is then
    stopped by a failing `terraform init` of the evidence stack, before anything is deployed."""
    project = Project(tmp_path_factory.mktemp("synth") / "project", tf_bin)
    outcome = project.run(env={"FAKE_TF_FAIL": "init:evidence"}, skip_synth=False, timeout=240)
    assert (project.root / "cdktf.out" / "stacks" / "repair" / "cdk.tf.json").exists(), outcome.stderr
    return project, outcome


@pytest.fixture(scope="session")
def evidence_state(synthesized, tmp_path_factory, tf_bin) -> bytes:
    """The evidence stack's state after a `terraform apply` of the synthesized stack (done once)."""
    scratch = Project(tmp_path_factory.mktemp("evidence") / "project", tf_bin)
    shutil.copytree(synthesized[0].root / "cdktf.out", scratch.root / "cdktf.out")
    return scratch.deploy_evidence()


@pytest.fixture
def project(tmp_path, tf_bin, synthesized, evidence_state, azurite) -> Project:
    """A fresh project folder with the session's synthesized stacks and the evidence stack deployed (its
    container, where the VM lock lives, a fresh one in Azurite)."""
    p = Project(tmp_path / "project", tf_bin, azurite)
    shutil.copytree(synthesized[0].root / "cdktf.out", p.root / "cdktf.out")
    p.use_evidence_state(evidence_state)
    return p


@pytest.fixture
def azurite_container(azurite):
    """The evidence container in Azurite (a fresh name per test), reached with the emulator's key."""
    name = f"dumps{uuid.uuid4().hex[:8]}"
    azurite.service_client().create_container(name)
    return azurite, name
