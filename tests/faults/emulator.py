"""The Lambda SQS event source, emulated: receive a batch, build the exact Lambda event, invoke the
handler, delete what ``batchItemFailures`` does not list, and delete nothing when the handler dies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.faults.queue import Queue, Received

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]


class Crash(BaseException):
    """A simulated Lambda timeout or process death: not an ``Exception``, so no ``except
    Exception`` in the processor catches it, exactly like the runtime killing the invocation."""


@dataclass
class LambdaContext:
    """The part of Lambda's context object the handler reads."""

    timeout_seconds: float = 60.0
    started: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        return int(max(0.0, self.timeout_seconds - (time.monotonic() - self.started)) * 1000)


def lambda_event(messages: list[Received], arn: str) -> dict[str, Any]:
    """The event Lambda's SQS poller hands to the function (the fields AWS documents)."""
    return {
        "Records": [
            {
                "messageId": m.message_id,
                "receiptHandle": m.receipt_handle,
                "body": m.body,
                "attributes": {
                    "ApproximateReceiveCount": str(m.receive_count),
                    "SentTimestamp": str(int(time.time() * 1000)),
                    "SenderId": "AIDAFAULTSUITE",
                    "ApproximateFirstReceiveTimestamp": str(int(time.time() * 1000)),
                },
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": arn,
                "awsRegion": arn.split(":")[3],
            }
            for m in messages
        ]
    }


@dataclass
class RunReport:
    invocations: int = 0
    crashes: int = 0
    deleted: int = 0
    retried: int = 0
    timed_out: bool = False


class EventSource:
    """Polls ``queue`` like Lambda's SQS poller; ``consumers`` pollers run side by side."""

    def __init__(
        self,
        queue: Queue,
        handler: Handler,
        *,
        batch_size: int = 1,
        consumers: int = 1,
        function_timeout: float = 60.0,
        poll_interval: float = 0.05,
    ) -> None:
        self.queue = queue
        self.handler = handler
        self.batch_size = batch_size
        self.consumers = consumers
        self.function_timeout = function_timeout
        self.poll_interval = poll_interval
        self.report = RunReport()
        self._lock = threading.Lock()
        self._busy = 0

    def run(self, max_seconds: float = 60.0) -> RunReport:
        """Until the queue is empty with nothing in flight, or ``max_seconds`` have passed."""
        deadline = time.monotonic() + max_seconds
        threads = [
            threading.Thread(target=self._poll, args=(deadline,), name=f"poller-{n}", daemon=True)
            for n in range(self.consumers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self.report

    def _poll(self, deadline: float) -> None:
        while True:
            if time.monotonic() > deadline:
                self.report.timed_out = True
                return
            messages = self.queue.receive(self.batch_size)
            if not messages:
                with self._lock:
                    busy = self._busy
                if busy == 0 and self._drained():
                    return
                time.sleep(self.poll_interval)
                continue
            with self._lock:
                self._busy += 1
            try:
                self.invoke(messages)
            finally:
                with self._lock:
                    self._busy -= 1

    def _drained(self) -> bool:
        """Empty with nothing in flight, seen twice a poll interval apart: SQS (and moto) count
        visible and in-flight messages at two instants, so a message whose visibility ends
        between them is counted in neither, and one look alone could stop the run too early."""
        if self.queue.counts() != (0, 0):
            return False
        time.sleep(self.poll_interval)
        with self._lock:
            busy = self._busy
        return busy == 0 and self.queue.counts() == (0, 0)

    def invoke(self, messages: list[Received]) -> dict[str, Any] | None:
        """One invocation; None when it crashed (then nothing is deleted)."""
        event = lambda_event(messages, self.queue.arn)
        with self._lock:
            self.report.invocations += 1
        try:
            response = self.handler(event, LambdaContext(self.function_timeout))
        except (Exception, Crash):
            # The invocation failed as a whole: Lambda deletes nothing; every message of the
            # batch comes back when its visibility timeout ends.
            with self._lock:
                self.report.crashes += 1
            return None
        failed = {item["itemIdentifier"] for item in response.get("batchItemFailures", [])}
        for m in messages:
            if m.message_id in failed:
                with self._lock:
                    self.report.retried += 1
                continue
            self.queue.delete(m.receipt_handle)
            with self._lock:
                self.report.deleted += 1
        return response
