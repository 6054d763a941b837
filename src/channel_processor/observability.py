"""JSON logs with correlation keys bound per record, and the metrics recorder the pipeline reports to.

Keys are bound per thread (records of a batch run on their own threads), so a line always carries the
conversation it is about. Phone numbers are masked before they reach a line; secrets never do.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from aws_lambda_powertools import Logger

SERVICE = "whatsapp-channel-processor"
STEP8_EVENT = "final_db_update_failed"


class _CurrentStderrHandler(logging.StreamHandler[Any]):
    """Writes to whatever ``sys.stderr`` is now (test capture, CLI redirection), not at import."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


# The level is explicit so importing never parses LOG_LEVEL: Settings validates it and the
# composition root applies it (set_level), with a clear error for a bad value.
logger = Logger(
    service=SERVICE, logger_handler=_CurrentStderrHandler(), use_rfc3339=True, level="INFO"
)


def set_level(level: str) -> None:
    logger.setLevel(level)


def set_service(name: str) -> None:
    """The ``service`` key of every log line (POWERTOOLS_SERVICE_NAME, read via Settings)."""
    logger.append_keys(service=name)


@contextmanager
def log_context(**keys: Any) -> Iterator[None]:
    """Bind correlation keys (conversation_id, request_id, message_id) for this thread."""
    present = {k: v for k, v in keys.items() if v is not None}
    logger.thread_safe_append_keys(**present)
    try:
        yield
    finally:
        logger.thread_safe_remove_keys(list(present))


class Metrics(Protocol):
    """Counters per outcome and per-step latency (EMF in AWS, counted in memory locally)."""

    def count(self, name: str, value: int = 1, **dimensions: str) -> None: ...

    def latency(self, step: str, milliseconds: float) -> None: ...

    def flush(self) -> None:
        """Write what was gathered (end of a batch); a no-op where nothing is written."""
        ...


class InMemoryMetrics:
    """Thread-safe counters: the CLI's summary and the tests read them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.latencies: dict[str, list[float]] = {}

    def count(self, name: str, value: int = 1, **dimensions: str) -> None:
        label = name + "".join(f"[{k}={v}]" for k, v in sorted(dimensions.items()))
        with self._lock:
            self.counts[name] += value
            if dimensions:
                self.counts[label] += value

    def latency(self, step: str, milliseconds: float) -> None:
        with self._lock:
            self.latencies.setdefault(step, []).append(milliseconds)

    def flush(self) -> None:
        return None


DEFAULT_NAMESPACE = "WhatsAppChannelProcessor"


class EmfMetrics:
    """CloudWatch Embedded Metric Format through Powertools: counts and latencies are gathered from
    the batch's threads and written as one EMF line per dimension set when the batch ends."""

    def __init__(self, namespace: str = DEFAULT_NAMESPACE, service: str = SERVICE) -> None:
        self.namespace, self.service = namespace, service
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self._latencies: dict[str, list[float]] = {}

    def count(self, name: str, value: int = 1, **dimensions: str) -> None:
        with self._lock:
            self._counts[(name, tuple(sorted(dimensions.items())))] += value

    def latency(self, step: str, milliseconds: float) -> None:
        with self._lock:
            self._latencies.setdefault(step, []).append(round(milliseconds, 3))

    def flush(self) -> None:
        from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit

        with self._lock:
            counts, self._counts = self._counts, Counter()
            latencies, self._latencies = self._latencies, {}
        groups: dict[tuple[tuple[str, str], ...], list[tuple[str, float, Any]]] = {}
        for (name, dims), total in counts.items():
            groups.setdefault(dims, []).append((name, float(total), MetricUnit.Count))
        for step, values in latencies.items():
            for ms in values[:100]:  # EMF keeps at most 100 values per metric per line
                groups.setdefault((("step", step),), []).append(
                    ("step_latency_ms", ms, MetricUnit.Milliseconds)
                )
        for dims, metrics in groups.items():
            emf = EphemeralMetrics(namespace=self.namespace, service=self.service)
            for key, val in dims:
                emf.add_dimension(name=key, value=val)
            for name, amount, unit in metrics:
                emf.add_metric(name=name, unit=unit, value=amount)
            emf.flush_metrics()
