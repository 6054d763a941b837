"""SQS adapters: the repair queue, the dead-letter queue, and the heartbeat's visibility extension.

SQS errors are translated in one table (``SQS_ERRORS``); what a "lost receipt handle" means depends
on the operation (the heartbeat must stop, an ack can be dropped, a send just retries).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from channel_processor.domain import PendingFinalUpdate
from channel_processor.errors import LeaseLost, ProcessorError, StoreUnavailable
from channel_processor.ports import RepairEntry

if TYPE_CHECKING:
    from mypy_boto3_sqs.client import SQSClient

log = logging.getLogger(__name__)

# SQS keeps a message invisible at most 12 hours after it was received.
MAX_VISIBILITY_SECONDS = 43_200
# SQS's classic message size limit; queues may allow more, never less.
DEFAULT_MAX_MESSAGE_BYTES = 262_144
_MAX_ATTRIBUTE_CHARS = 1024

# The one translation table of SQS error codes. SQS speaks JSON now but still reports the old
# query-protocol codes (``AWS.SimpleQueueService.*``) that botocore puts in Error.Code, with the
# JSON shape name in Error.QueryErrorCode: both spellings are listed. Codes not listed are treated
# as unavailable and logged.
SQS_ERRORS: Mapping[str, type[ProcessorError]] = {
    # The receipt handle no longer names an in-flight message: the message is visible again (or
    # gone), another consumer may hold it. The lease is lost.
    "ReceiptHandleIsInvalid": LeaseLost,
    "MessageNotInflight": LeaseLost,
    "AWS.SimpleQueueService.MessageNotInflight": LeaseLost,
    "QueueDoesNotExist": LeaseLost,
    "AWS.SimpleQueueService.NonExistentQueue": LeaseLost,
    "InvalidIdFormat": LeaseLost,  # a receipt handle SQS cannot even parse
    # Transient: throttled, overloaded, internal failure.
    "RequestThrottled": StoreUnavailable,
    "ThrottlingException": StoreUnavailable,
    "Throttling": StoreUnavailable,
    "OverLimit": StoreUnavailable,
    "AWS.SimpleQueueService.OverLimit": StoreUnavailable,
    "KmsThrottled": StoreUnavailable,
    "ServiceUnavailable": StoreUnavailable,
    "InternalError": StoreUnavailable,
    "InternalFailure": StoreUnavailable,
    "RequestLimitExceeded": StoreUnavailable,
    # Deployment faults (permissions, KMS key, queue type): retrying lets the input reach the
    # DLQ intact through SQS's own redrive instead of being dropped here.
    "UnsupportedOperation": StoreUnavailable,
    "AWS.SimpleQueueService.UnsupportedOperation": StoreUnavailable,
    "InvalidSecurity": StoreUnavailable,
    "InvalidAddress": StoreUnavailable,
    "AccessDenied": StoreUnavailable,
    "AccessDeniedException": StoreUnavailable,
    "KmsDisabled": StoreUnavailable,
    "KmsInvalidState": StoreUnavailable,
    "KmsNotFound": StoreUnavailable,
    "KmsOptInRequired": StoreUnavailable,
    "KmsAccessDenied": StoreUnavailable,
    "KmsInvalidKeyUsage": StoreUnavailable,
    "InvalidMessageContents": StoreUnavailable,
    # Two InvalidParameterValue cases become LeaseLost in ``translate``: an expired receipt handle
    # ("Value ... for parameter ReceiptHandle is invalid") and a message already held for SQS's
    # 12 hours ("Total VisibilityTimeout for the message is beyond the limit"): no retry of the
    # extension can succeed, the message will reappear, so the attempt must stop before sending.
    "InvalidParameterValue": StoreUnavailable,
}
_LEASE_LOST_PARAMETER_MESSAGES = ("receipthandle", "beyond the limit")
# Transport failures (connect/read timeouts, resets) are all BotoCoreError subclasses.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (BotoCoreError,)


def translate(exc: Exception, operation: str) -> ProcessorError:
    """Map an SDK exception to the processor's error tree (the only place that does it)."""
    if isinstance(exc, ClientError):
        error_info = exc.response.get("Error", {})
        code = str(error_info.get("Code", ""))
        query_code = str(error_info.get("QueryErrorCode", ""))
        error = SQS_ERRORS.get(code) or SQS_ERRORS.get(query_code)
        if error is None:
            log.warning("unmapped SQS error %s on %s: treated as unavailable", code, operation)
            error = StoreUnavailable
        message = str(error_info.get("Message", ""))
        if "InvalidParameterValue" in (code, query_code) and any(
            phrase in message.lower() for phrase in _LEASE_LOST_PARAMETER_MESSAGES
        ):
            error = LeaseLost
        return error(f"SQS {operation}: {code}")
    if isinstance(exc, TRANSPORT_ERRORS):
        return StoreUnavailable(f"SQS {operation}: {type(exc).__name__}")
    raise TypeError(f"not an SDK error: {exc!r}") from exc


def _unavailable(exc: Exception, operation: str) -> StoreUnavailable:
    """For sends and receives a missing queue is an outage, not a lost lease."""
    error = translate(exc, operation)
    return error if isinstance(error, StoreUnavailable) else StoreUnavailable(str(error))


def _json_default(value: object) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


class SQSRepairLog:
    """``ports.RepairLog`` on an SQS queue: one message per pending final update."""

    def __init__(
        self,
        client: SQSClient,
        queue_url: str,
        visibility_timeout: int | None = None,
        wait_seconds: int = 0,
    ) -> None:
        self._client = client
        self._queue_url = queue_url
        self._visibility_timeout = visibility_timeout  # None: the queue's own setting
        self._wait_seconds = wait_seconds

    def put(self, update: PendingFinalUpdate) -> str:
        repair_id = update.repair_id or uuid.uuid4().hex
        body = json.dumps(update.with_repair_id(repair_id).to_dict(), default=_json_default)
        try:
            self._client.send_message(QueueUrl=self._queue_url, MessageBody=body)
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc, "SendMessage") from exc
        return repair_id

    def receive(self, max_entries: int = 10) -> list[RepairEntry]:
        request: dict[str, Any] = {
            "QueueUrl": self._queue_url,
            "MaxNumberOfMessages": min(max(1, max_entries), 10),  # SQS's per-call cap
            "WaitTimeSeconds": self._wait_seconds,
        }
        if self._visibility_timeout is not None:
            request["VisibilityTimeout"] = self._visibility_timeout
        try:
            response = self._client.receive_message(**request)
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc, "ReceiveMessage") from exc
        entries: list[RepairEntry] = []
        for message in response.get("Messages", []):
            try:
                update = PendingFinalUpdate.from_dict(json.loads(message["Body"]))
            except (KeyError, TypeError, ValueError):
                # Left on the queue: the repair queue's own redrive moves it aside for a human.
                log.error(
                    "unreadable repair-queue message %s left in place", message.get("MessageId")
                )
                continue
            if update.repair_id is None:
                update = update.with_repair_id(str(message.get("MessageId", "")))
            entries.append(RepairEntry(update=update, handle=message["ReceiptHandle"]))
        return entries

    def ack(self, entry: RepairEntry) -> None:
        try:
            self._client.delete_message(QueueUrl=self._queue_url, ReceiptHandle=entry.handle)
        except (ClientError, BotoCoreError) as exc:
            error = translate(exc, "DeleteMessage")
            if isinstance(error, LeaseLost):
                # The entry is visible again and will be applied once more: harmless, because
                # applying a pending update is a conditional write that only succeeds once.
                log.warning("repair entry %s outlived its receipt handle", entry.update.repair_id)
                return
            raise error from exc


class SQSDeadLetters:
    """``ports.DeadLetters`` on the DLQ: a JSON envelope with the reasons and the original body."""

    def __init__(
        self,
        client: SQSClient,
        dlq_url: str,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._client = client
        self._dlq_url = dlq_url
        self._max_bytes = max_message_bytes

    def forward(self, body: str, reasons: Sequence[str], message_id: str | None) -> None:
        reasons = [str(r) for r in reasons]
        envelope = json.dumps(
            {"reasons": reasons, "original_body": body, "source_message_id": message_id}
        )
        attributes: dict[str, Any] = {}
        if reasons:
            attributes["reason"] = _string_attribute(reasons[0])
        if message_id:
            attributes["source_message_id"] = _string_attribute(message_id)
        if len(envelope.encode()) > self._max_bytes and body:
            # Escaping can push a body that fitted its own queue past the limit: keep the body
            # verbatim (it is what must not be lost) and carry the reasons as attributes.
            attributes["format"] = _string_attribute("raw")
            attributes["reasons"] = _string_attribute(json.dumps(reasons))
            envelope = body
        try:
            self._client.send_message(
                QueueUrl=self._dlq_url, MessageBody=envelope, MessageAttributes=attributes
            )
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc, "SendMessage") from exc


def _string_attribute(text: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": text[:_MAX_ATTRIBUTE_CHARS] or "-"}


class SQSVisibilityExtender:
    """``ports.VisibilityExtender``: pushes a received message's visibility timeout forward."""

    def __init__(self, client: SQSClient, queue_url: str) -> None:
        self._client = client
        self._queue_url = queue_url

    def extend(self, receipt_handle: str, seconds: int) -> None:
        try:
            self._client.change_message_visibility(
                QueueUrl=self._queue_url,
                ReceiptHandle=receipt_handle,
                VisibilityTimeout=max(0, min(int(seconds), MAX_VISIBILITY_SECONDS)),
            )
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, "ChangeMessageVisibility") from exc
