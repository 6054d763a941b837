"""Visibility heartbeat: keeps one SQS message invisible while its record is being processed.

Timeline: every ``interval`` seconds ask for ``extension`` more seconds (interval < extension, so one
late tick does not let the message reappear), never past SQS's 12 hours from the receive. A handle
that SQS calls invalid or expired means another consumer may already have the message: the heartbeat
marks the lease lost and the pipeline stops before sending. Nothing raised here escapes the thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from channel_processor.errors import LeaseLost
from channel_processor.observability import logger
from channel_processor.ports import VisibilityExtender

SQS_MAX_VISIBILITY_SECONDS = 43_200


class Heartbeat:
    def __init__(
        self,
        extender: VisibilityExtender,
        receipt_handle: str,
        *,
        interval_seconds: float,
        extension_seconds: int,
        received_at: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        log_keys: dict[str, Any] | None = None,
    ) -> None:
        self._extender = extender
        self._handle = receipt_handle
        self._interval = interval_seconds
        self._extension = extension_seconds
        self._monotonic = monotonic
        self._received_at = monotonic() if received_at is None else received_at
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread: threading.Thread | None = None
        self._log_keys = log_keys or {}
        self.ticks = 0

    @property
    def lease_lost(self) -> bool:
        return self._lost.is_set()

    def check(self) -> None:
        """Raise ``LeaseLost`` if the heartbeat has lost the message (call before each step)."""
        if self._lost.is_set():
            raise LeaseLost(
                "the SQS receipt handle is no longer valid; another consumer may own it"
            )

    def start(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name="sqs-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self._interval))
            self._thread = None

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if not self._tick():
                return

    def _tick(self) -> bool:
        """One extension; False when the heartbeat must end."""
        elapsed = self._monotonic() - self._received_at
        seconds = min(self._extension, int(SQS_MAX_VISIBILITY_SECONDS - elapsed))
        if seconds <= 0:
            logger.warning(
                "heartbeat reached the SQS 12-hour visibility cap",
                extra={"event": "heartbeat_cap", **self._log_keys},
            )
            return False
        try:
            self._extender.extend(self._handle, seconds)
        except LeaseLost as exc:
            self._lost.set()
            logger.warning(
                "heartbeat lost the message",
                extra={"event": "lease_lost", "error": str(exc), **self._log_keys},
            )
            return False
        except Exception as exc:  # a throttled tick is retried next interval
            logger.warning(
                "heartbeat tick failed",
                extra={"event": "heartbeat_error", "error": repr(exc), **self._log_keys},
            )
        else:
            self.ticks += 1
        return True


class NoHeartbeat:
    """For deliveries without a receipt handle (local CLI): nothing to extend, never lost."""

    lease_lost = False
    ticks = 0

    def check(self) -> None:
        return None

    def start(self) -> NoHeartbeat:
        return self

    def stop(self) -> None:
        return None
