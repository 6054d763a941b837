"""Long-running SQS worker: long-polls a queue and runs each batch exactly as the Lambda does
(same pipeline, same partial-failure rule: a message is deleted unless its result says retry)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

from channel_processor.entrypoints.sqs_batch import delivery_from_sqs_message, process_batch
from channel_processor.observability import logger
from channel_processor.pipeline import Pipeline, ProcessResult

LONG_POLL_SECONDS = 20
SQS_MAX_BATCH = 10


class Worker:
    def __init__(
        self,
        pipeline: Pipeline,
        sqs_client: Any,
        queue_url: str,
        *,
        max_messages: int = SQS_MAX_BATCH,
        wait_seconds: int = LONG_POLL_SECONDS,
        on_result: Callable[[ProcessResult], None] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.sqs = sqs_client
        self.queue_url = queue_url
        self.max_messages = max(1, min(max_messages, SQS_MAX_BATCH))
        self.wait_seconds = wait_seconds
        self.stopping = threading.Event()
        self._on_result = on_result

    def stop(self, *_: Any) -> None:
        """Finish the batch in hand, then return (SIGTERM/SIGINT in containers)."""
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self, max_batches: int | None = None) -> int:
        """Poll until stopped (or ``max_batches`` polls); returns the number of messages handled."""
        handled = polls = 0
        while not self.stopping.is_set() and (max_batches is None or polls < max_batches):
            polls += 1
            handled += self.poll_once()
        return handled

    def poll_once(self) -> int:
        response = self.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=self.max_messages,
            WaitTimeSeconds=self.wait_seconds,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        messages = response.get("Messages") or []
        if not messages:
            return 0
        deliveries = [delivery_from_sqs_message(m) for m in messages]
        results = process_batch(self.pipeline, deliveries, self.pipeline.settings.batch_concurrency)
        done = [
            {"Id": str(i), "ReceiptHandle": d.receipt_handle}
            for i, (d, r) in enumerate(zip(deliveries, results, strict=True))
            if not r.should_retry
        ]
        if done:
            reply = self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=done)
            for failure in reply.get("Failed") or []:
                # Not fatal: the message comes back and the record's status makes it a duplicate.
                logger.warning(
                    "delete failed", extra={"event": "delete_failed", "code": failure.get("Code")}
                )
        self.pipeline.deps.metrics.flush()
        for result in results:
            if self._on_result:
                self._on_result(result)
        return len(messages)
