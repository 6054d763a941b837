"""AWS Lambda entry point for the SQS event source (``ReportBatchItemFailures`` on).

The pipeline and its clients are built on the first invocation and kept for the warm container, so
secrets, templates and connections are cached across invocations.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from channel_processor.bootstrap import build
from channel_processor.config import Settings
from channel_processor.entrypoints.sqs_batch import (
    batch_item_failures,
    delivery_from_lambda_record,
    process_batch,
)
from channel_processor.observability import logger
from channel_processor.pipeline import Pipeline

# Kept back from the Lambda deadline so the handler can still report partial failures.
_DEADLINE_MARGIN_SECONDS = 2.0

_lock = threading.Lock()
_pipeline: Pipeline | None = None


def _get_pipeline(event_source_arn: str | None) -> Pipeline:
    global _pipeline
    with _lock:
        if _pipeline is None:
            settings = Settings.from_env()
            if settings.queue_url is None and event_source_arn:
                settings = Settings.from_env(queue_url=queue_url_from_arn(event_source_arn))
            _pipeline = build(settings)
        return _pipeline


def queue_url_from_arn(arn: str) -> str:
    """``arn:aws:sqs:REGION:ACCOUNT:NAME`` -> the queue URL (heartbeat needs it, the event has not)."""
    import boto3

    _, _partition, _, region, account, name = arn.split(":", 5)
    client = boto3.client("sqs", region_name=region)
    url: str = client.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]
    return url


def reset() -> None:
    """Forget the cached pipeline (tests, or a configuration change)."""
    global _pipeline
    with _lock:
        _pipeline = None


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    records = event.get("Records") or []
    deadline = None
    if context is not None and hasattr(context, "get_remaining_time_in_millis"):
        remaining = context.get_remaining_time_in_millis() / 1000.0
        deadline = time.monotonic() + remaining - _DEADLINE_MARGIN_SECONDS
    pipeline = _get_pipeline(records[0].get("eventSourceARN") if records else None)
    deliveries = [delivery_from_lambda_record(r, deadline) for r in records]
    results = process_batch(pipeline, deliveries, pipeline.settings.batch_concurrency)
    response = batch_item_failures(deliveries, results)
    pipeline.deps.metrics.flush()
    logger.info(
        "batch done",
        extra={
            "event": "batch_done",
            "records": len(records),
            "retry": len(response["batchItemFailures"]),
            "outcomes": [r.outcome.value for r in results],
        },
    )
    return response
