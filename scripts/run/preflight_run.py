"""Preflight as a verb and as repair-run's first step: which strategy was asked for, the Azure reads
(scripts.run.preflight_azure), the verdict (scripts.run.preflight_checks), and for repair-run the strategy
handed on to synth and collect.

Which strategy is asked for: `--strategy` (CRASHCART_REPAIR_STRATEGY) or a `repair.strategy` the config sets
forces one; a config that does not set it (or sets "auto") leaves the choice to preflight: snapshot-export
when nothing rules it out, else rescue-vm, with the reason in the log and the report. repair-run passes the
choice on as CRASHCART_REPAIR_STRATEGY, the documented override, so synth (a child process: the stack's
snapshot policy depends on it) and the collection read the same value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from scripts.base.console import log
from scripts.base.errors import CrashcartError, printable
from scripts.collection.strategies import AUTO, StrategyChoice
from scripts.config.model import Config
from scripts.run.preflight_checks import Verdict, conclude, render

STRATEGY_ENV = "CRASHCART_REPAIR_STRATEGY"


def requested_strategy(config: Config, env: Mapping[str, str], cli: str | None = None) -> tuple[str, str]:
    """(what is asked for: "auto" or a strategy, what forced it: "" when nothing did)."""
    if cli:
        return cli, "" if cli == AUTO else "--strategy"
    value = str(config.repair.strategy)
    if value == AUTO or "strategy" not in config.repair.model_fields_set:
        return AUTO, ""
    if env.get(STRATEGY_ENV):
        return value, f"--strategy / {STRATEGY_ENV}"
    return value, "repair.strategy in the config"


def run_preflight(config: Config, requested: str, forced_by: str = "", *, evidence_endpoint: str = "") -> Verdict:
    """Every check, then the verdict (nothing is created)."""
    from scripts.run.preflight_azure import AzurePreflight

    findings = AzurePreflight(config, evidence_endpoint=evidence_endpoint).findings()
    return conclude(findings, requested, forced_by)


def blocker_error(verdict: Verdict) -> CrashcartError:
    """The run-stopping error for a verdict with blockers: the first one, its fix, its exit code."""
    first = verdict.blockers[0]
    more = f" (and {len(verdict.blockers) - 1} more blocker(s) above)" if len(verdict.blockers) > 1 else ""
    return CrashcartError(f"preflight: {first.check} ({first.subject}): {first.detail}{more}", first.fix,
                          first.exit_code)


def strategy_left_to_preflight(config_path: Path, env: Mapping[str, str] | None = None) -> bool:
    """Whether repair-run's preflight step chooses the strategy (a config that cannot be read: no, the
    "load config" step says what is wrong with it)."""
    env = os.environ if env is None else env
    try:
        return requested_strategy(Config.load(config_path, env), env)[0] == AUTO
    except CrashcartError:
        return False


def choose_for_run(config_path: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """repair-run's first step. When the strategy is left to preflight, runs every check (a blocker stops the
    run before anything exists) and sets CRASHCART_REPAIR_STRATEGY to the choice; a forced strategy is kept
    and only said (`pipenv run preflight` checks the rest). Returns what the run report records."""
    env = os.environ if env is None else env
    config = Config.load(config_path, env)
    requested, forced_by = requested_strategy(config, env)
    if requested != AUTO:
        log.info("    strategy: %s (forced by %s; `pipenv run preflight` checks the roles, quota and policies)",
                 requested, forced_by)
        return {"strategy": asdict(StrategyChoice(requested, False, f"forced by {forced_by}", forced_by))}
    verdict = run_preflight(config, requested)
    render(verdict)
    if verdict.exit_code:
        raise blocker_error(verdict)
    choice = verdict.choice
    log.info("    strategy: %s - %s", choice.strategy, printable(choice.reason))
    os.environ[STRATEGY_ENV] = choice.strategy  # for synth (a child process) and the collection
    return {"strategy": asdict(choice), "warnings": [f"{f.check} ({f.subject}): {f.detail}"
                                                     for f in verdict.findings if f.status == "warn"]}
