"""What Lambda and the worker share: SQS messages to deliveries, a bounded concurrent batch, and the
partial-failure report (only records that must come back are listed)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from channel_processor.pipeline import Delivery, Pipeline, ProcessResult


def delivery_from_lambda_record(record: Mapping[str, Any], deadline: float | None) -> Delivery:
    attributes = record.get("attributes") or {}
    return Delivery(
        body=record.get("body") or "",
        message_id=record.get("messageId"),
        receipt_handle=record.get("receiptHandle"),
        receive_count=int(attributes.get("ApproximateReceiveCount") or 1),
        deadline=deadline,
    )


def delivery_from_sqs_message(message: Mapping[str, Any]) -> Delivery:
    attributes = message.get("Attributes") or {}
    return Delivery(
        body=message.get("Body") or "",
        message_id=message.get("MessageId"),
        receipt_handle=message.get("ReceiptHandle"),
        receive_count=int(attributes.get("ApproximateReceiveCount") or 1),
    )


def process_batch(
    pipeline: Pipeline, deliveries: Sequence[Delivery], concurrency: int
) -> list[ProcessResult]:
    """Each record on its own thread (bounded); results in input order. An exception escaping the
    pipeline (a crash, a Lambda timeout) propagates: then nothing of the batch is acknowledged."""
    if len(deliveries) <= 1 or concurrency <= 1:
        return [pipeline.process(d) for d in deliveries]
    with ThreadPoolExecutor(max_workers=min(concurrency, len(deliveries))) as pool:
        return list(pool.map(pipeline.process, deliveries))


def batch_item_failures(
    deliveries: Iterable[Delivery], results: Iterable[ProcessResult]
) -> dict[str, list[dict[str, str]]]:
    """The Lambda partial-batch response, with the exact keys AWS reads."""
    return {
        "batchItemFailures": [
            {"itemIdentifier": d.message_id or ""}
            for d, r in zip(deliveries, results, strict=True)
            if r.should_retry
        ]
    }
