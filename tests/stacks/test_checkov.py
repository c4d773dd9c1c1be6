"""checkov (its own virtualenv, .tools/checkov: it pins an old `packaging`) over every synthesized stack.

Skips are declared, each with its reason, in .checkov.yaml.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.synth import REPO, VARIANTS

CHECKOV = REPO / ".tools" / "checkov" / "bin" / "checkov"


@pytest.mark.skipif(not CHECKOV.exists(), reason="checkov not installed: run `make setup`")
def test_every_variant_passes_checkov_with_zero_failed_checks(synthesized, tmp_path):
    for name in VARIANTS:
        stacks = synthesized[name].outdir / "stacks"
        result = subprocess.run(
            [str(CHECKOV), "--config-file", str(REPO / ".checkov.yaml"), "-d", str(stacks), "-o", "json"],
            capture_output=True, text=True, timeout=300)
        reports = json.loads(result.stdout)
        reports = reports if isinstance(reports, list) else [reports]
        failed = [(c["check_id"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]]
        passed = sum(r["summary"]["passed"] for r in reports)
        assert sum(r["summary"]["parsing_errors"] for r in reports) == 0, name
        assert failed == [], f"{name}: {failed}"
        assert passed > 0, f"{name}: checkov scanned nothing ({result.stderr[-500:]})"
        assert result.returncode == 0, result.stderr[-2000:]


def test_every_skip_is_justified():
    lines = (REPO / ".checkov.yaml").read_text().splitlines()
    skips = [i for i, line in enumerate(lines) if line.strip().startswith("- CKV")]
    assert skips
    for i in skips:
        assert lines[i - 1].strip().startswith("#"), f"skip {lines[i].strip()} has no reason above it"
