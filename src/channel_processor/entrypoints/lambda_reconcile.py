"""AWS Lambda entry point of the scheduled reconciler: one reconcile pass per invocation, bounded by
the invocation's remaining time; the summary is logged, returned and counted in EMF metrics."""

from __future__ import annotations

import threading
import time
from typing import Any

from channel_processor.bootstrap import build
from channel_processor.config import Settings
from channel_processor.errors import ProcessorError
from channel_processor.observability import logger
from channel_processor.reconcile import Reconciler

# Kept back from the Lambda deadline so the summary is logged and the metrics flushed.
_DEADLINE_MARGIN_SECONDS = 5.0

_lock = threading.Lock()
_reconciler: Reconciler | None = None


class ReconcileFailed(ProcessorError):
    """A whole pass could not run (store or repair log unreachable): raised after the summary is
    logged so the function's Errors metric, and its alarm, see it."""


def _get_reconciler() -> Reconciler:
    global _reconciler
    with _lock:
        if _reconciler is None:
            settings = Settings.from_env()
            pipeline = build(settings)
            _reconciler = Reconciler(pipeline.deps, settings)
        return _reconciler


def reset() -> None:
    """Forget the cached reconciler (tests, or a configuration change)."""
    global _reconciler
    with _lock:
        _reconciler = None


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    deadline = None
    if context is not None and hasattr(context, "get_remaining_time_in_millis"):
        remaining = context.get_remaining_time_in_millis() / 1000.0
        deadline = time.monotonic() + remaining - _DEADLINE_MARGIN_SECONDS
    reconciler = _get_reconciler()
    try:
        summary = reconciler.run(deadline=deadline)
    finally:
        reconciler.deps.metrics.flush()
    result = summary.as_dict()
    logger.info("reconcile summary", extra={"event": "reconcile_summary", "summary": result})
    if summary.errors:
        raise ReconcileFailed("; ".join(summary.errors))
    return result
