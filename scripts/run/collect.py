"""repair-run's collect step: the collection for repair.strategy, within what is left of the deadline.

The only step Python runs itself, so the only one a signal abandons at once (StopGuard.interruptible);
the collection's own polls also see the stop request through CollectRequest.stop.
"""

from __future__ import annotations

from scripts.base.errors import CrashcartError
from scripts.collection.contract import CollectRequest
from scripts.collection.strategies import collector_for
from scripts.config.model import Config
from scripts.config.stackoutputs import RepairOutputs
from scripts.run.result import RunResult, jsonable
from scripts.run.settings import RunSettings
from scripts.run.stop import StopGuard


def collect(outputs: RepairOutputs, config: Config, settings: RunSettings, stop: StopGuard,
            result: RunResult) -> None:
    """Runs the collection; its result (or the partial one a CollectError carries) goes into
    result.collect either way."""
    timeout = float(config.repair.collect_timeout_minutes)
    remaining = stop.remaining_seconds()
    if remaining is not None:
        timeout = max(1 / 60, min(timeout, remaining / 60))
    request = CollectRequest(outputs, config, timeout_minutes=timeout, progress=True, stop=stop,
                             **settings.collect_options())
    try:
        with stop.interruptible():
            result.collect = jsonable(collector_for(config.repair.strategy).collect(request))
    except CrashcartError as err:
        partial = getattr(err, "result", None)
        if partial is not None:
            result.collect = jsonable(partial)
        raise
