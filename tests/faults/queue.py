"""Two queues with SQS's redelivery semantics behind one interface: a moto SQS queue with a DLQ and
redrive policy, and an in-memory twin for fast soaks (held to the same contract by test_queue.py).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from channel_processor.errors import LeaseLost
from channel_processor.ports import VisibilityExtender

REGION = "us-east-1"
ACCOUNT = "123456789012"


@dataclass(frozen=True)
class Received:
    """One message as a receive returns it."""

    message_id: str
    receipt_handle: str
    body: str
    receive_count: int


class Queue(Protocol):
    arn: str
    max_receive_count: int

    def send(self, body: str) -> str: ...

    def receive(self, max_messages: int) -> list[Received]: ...

    def delete(self, receipt_handle: str) -> None: ...

    def counts(self) -> tuple[int, int]:
        """(visible, in flight) in the main queue."""
        ...

    def dlq_bodies(self) -> list[str]:
        """Bodies of every message the redrive policy moved to the DLQ."""
        ...

    def extender(self) -> VisibilityExtender: ...


# -- moto SQS ------------------------------------------------------------------------------------


class MotoQueue:
    """A main queue and its DLQ on moto's server; ``client`` is a real boto3 SQS client."""

    def __init__(
        self,
        endpoint: str,
        *,
        visibility_seconds: int = 1,
        max_receive_count: int = 3,
        name: str | None = None,
    ) -> None:
        import boto3

        self.client: Any = boto3.client("sqs", region_name=REGION, endpoint_url=endpoint)
        name = name or f"faults-{uuid.uuid4().hex[:10]}"
        self.dlq_url = self.client.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
        dlq_arn = self.client.get_queue_attributes(
            QueueUrl=self.dlq_url, AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]
        self.url = self.client.create_queue(
            QueueName=name,
            Attributes={
                "VisibilityTimeout": str(visibility_seconds),
                "RedrivePolicy": json.dumps(
                    {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
                ),
            },
        )["QueueUrl"]
        self.arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"
        self.max_receive_count = max_receive_count
        self._dlq_seen: dict[str, str] = {}

    def send(self, body: str) -> str:
        return str(self.client.send_message(QueueUrl=self.url, MessageBody=body)["MessageId"])

    def receive(self, max_messages: int) -> list[Received]:
        reply = self.client.receive_message(
            QueueUrl=self.url,
            MaxNumberOfMessages=max(1, min(max_messages, 10)),
            WaitTimeSeconds=0,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        return [
            Received(
                m["MessageId"],
                m["ReceiptHandle"],
                m["Body"],
                int(m["Attributes"]["ApproximateReceiveCount"]),
            )
            for m in reply.get("Messages", [])
        ]

    def delete(self, receipt_handle: str) -> None:
        self.client.delete_message(QueueUrl=self.url, ReceiptHandle=receipt_handle)

    def counts(self) -> tuple[int, int]:
        attributes = self.client.get_queue_attributes(
            QueueUrl=self.url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return (
            int(attributes["ApproximateNumberOfMessages"]),
            int(attributes["ApproximateNumberOfMessagesNotVisible"]),
        )

    def dlq_bodies(self) -> list[str]:
        # Received with a long visibility and never deleted: each read adds what is new.
        while True:
            reply = self.client.receive_message(
                QueueUrl=self.dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=3600
            )
            messages = reply.get("Messages", [])
            if not messages:
                return list(self._dlq_seen.values())
            for m in messages:
                self._dlq_seen[m["MessageId"]] = m["Body"]

    def extender(self) -> VisibilityExtender:
        from channel_processor.adapters.sqs import SQSVisibilityExtender

        return SQSVisibilityExtender(self.client, self.url)


# -- in memory -----------------------------------------------------------------------------------


class ReceiptHandleInvalid(Exception):
    """What SQS says when a handle names no message in flight."""


@dataclass
class _Message:
    message_id: str
    body: str
    receive_count: int = 0
    visible_at: float = 0.0
    handle: str | None = None  # the handle of the current receive, while in flight


@dataclass
class MemoryQueue:
    """SQS semantics in a dict: a receive hides a message for ``visibility_seconds`` and counts
    it; a message received ``max_receive_count`` times goes to the DLQ on its next receive; only
    the current receipt handle may extend visibility (a stale or deleted one is invalid)."""

    visibility_seconds: float = 0.3
    max_receive_count: int = 3
    name: str = field(default_factory=lambda: f"faults-mem-{uuid.uuid4().hex[:10]}")
    now: Callable[[], float] = time.monotonic
    _messages: dict[str, _Message] = field(default_factory=dict)
    _dlq: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sequence: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def arn(self) -> str:
        return f"arn:aws:sqs:{REGION}:{ACCOUNT}:{self.name}"

    def send(self, body: str) -> str:
        message_id = str(uuid.uuid4())
        with self._lock:
            self._messages[message_id] = _Message(message_id, body)
        return message_id

    def receive(self, max_messages: int) -> list[Received]:
        now = self.now()
        out: list[Received] = []
        with self._lock:
            for message in list(self._messages.values()):
                if len(out) >= max(1, min(max_messages, 10)):
                    break
                if message.visible_at > now:
                    continue
                if message.receive_count >= self.max_receive_count:
                    del self._messages[message.message_id]
                    self._dlq.append(message.body)
                    continue
                message.receive_count += 1
                message.visible_at = now + self.visibility_seconds
                message.handle = f"{message.message_id}#{next(self._sequence)}"
                out.append(
                    Received(
                        message.message_id, message.handle, message.body, message.receive_count
                    )
                )
        return out

    def delete(self, receipt_handle: str) -> None:
        # Like SQS (and moto), an older handle of the same message still deletes it.
        message_id = receipt_handle.split("#", 1)[0]
        with self._lock:
            self._messages.pop(message_id, None)

    def change_visibility(self, receipt_handle: str, seconds: float) -> None:
        message_id = receipt_handle.split("#", 1)[0]
        with self._lock:
            message = self._messages.get(message_id)
            if message is None or message.handle != receipt_handle:
                raise ReceiptHandleInvalid(receipt_handle)
            message.visible_at = self.now() + seconds

    def counts(self) -> tuple[int, int]:
        now = self.now()
        with self._lock:
            hidden = sum(1 for m in self._messages.values() if m.visible_at > now)
            return len(self._messages) - hidden, hidden

    def dlq_bodies(self) -> list[str]:
        with self._lock:
            return list(self._dlq)

    def extender(self) -> VisibilityExtender:
        return MemoryExtender(self)


class MemoryExtender:
    """``ports.VisibilityExtender`` over ``MemoryQueue``, translating as the SQS adapter does."""

    def __init__(self, queue: MemoryQueue) -> None:
        self._queue = queue

    def extend(self, receipt_handle: str, seconds: int) -> None:
        try:
            self._queue.change_visibility(receipt_handle, seconds)
        except ReceiptHandleInvalid as exc:
            raise LeaseLost(f"receipt handle invalid: {exc}") from exc
