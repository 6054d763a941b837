"""The DeadLetters contract over every implementation (fake, SQLite, SQS on moto): the raw body
and every reason are kept, so nothing is lost silently."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from channel_processor.adapters.sqlite_store import SQLiteDeadLetters
from channel_processor.adapters.sqs import SQSDeadLetters
from channel_processor.ports import DeadLetters
from tests.fakes.store import FakeDeadLetters

# (body, reasons, message_id) as each back end hands them back
Stored = tuple[str, tuple[str, ...], str | None]
ReadBack = Callable[[], list[Stored]]


def sqs_dlq(endpoint: str) -> tuple[Any, str]:
    client = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
    url = client.create_queue(QueueName=f"dlq-{uuid.uuid4().hex[:12]}")["QueueUrl"]
    return client, url


def read_sqs(client: Any, url: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for _ in range(3):
        response = client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
        )
        messages.extend(response.get("Messages", []))
    return messages


def envelope_of(message: dict[str, Any]) -> Stored:
    data = json.loads(message["Body"])
    return data["original_body"], tuple(data["reasons"]), data["source_message_id"]


@pytest.fixture(params=["fake", "sqlite", "sqs"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[DeadLetters, ReadBack]:
    if request.param == "fake":
        fake = FakeDeadLetters()
        return fake, lambda: [(f.body, f.reasons, f.message_id) for f in fake.forwarded]
    if request.param == "sqlite":
        letters = SQLiteDeadLetters(tmp_path / "dlq" / "local.db")
        return letters, lambda: [(d.body, d.reasons, d.message_id) for d in letters.list()]
    client, url = sqs_dlq(request.getfixturevalue("moto_endpoint"))
    return SQSDeadLetters(client, url), lambda: [envelope_of(m) for m in read_sqs(client, url)]


def test_forward_keeps_the_raw_body_every_reason_and_the_message_id(
    backend: tuple[DeadLetters, ReadBack],
) -> None:
    letters, read_back = backend
    body = '{"frontend_payload": {"recipient_data": {"recipient_first_name": "Zoë"}}, broken'
    reasons = ["$.company_data_payload: required", "$.metadata: required"]

    letters.forward(body, reasons, "msg-123")

    assert read_back() == [(body, tuple(reasons), "msg-123")]


def test_forward_without_a_message_id_or_with_an_unusual_body_still_stores_it(
    backend: tuple[DeadLetters, ReadBack],
) -> None:
    letters, read_back = backend

    letters.forward("not json\n\ttabs & <xml/>", ["body is not JSON"], None)
    letters.forward("second", ["channel_method 'sms' is not whatsapp"], "msg-2")

    assert sorted(read_back()) == sorted(
        [
            ("not json\n\ttabs & <xml/>", ("body is not JSON",), None),
            ("second", ("channel_method 'sms' is not whatsapp",), "msg-2"),
        ]
    )


def test_sqs_dead_letter_carries_the_first_reason_as_a_message_attribute(
    moto_endpoint: str,
) -> None:
    client, url = sqs_dlq(moto_endpoint)

    SQSDeadLetters(client, url).forward("{}", ["first reason", "second reason"], "msg-9")

    (message,) = read_sqs(client, url)
    attributes = message["MessageAttributes"]
    assert attributes["reason"]["StringValue"] == "first reason"
    assert attributes["source_message_id"]["StringValue"] == "msg-9"


def test_sqs_dead_letter_too_big_for_an_envelope_keeps_the_body_verbatim(
    moto_endpoint: str,
) -> None:
    client, url = sqs_dlq(moto_endpoint)
    body = '{"text": "' + '\\n"' * 60 + '"}'  # escaping roughly doubles it

    SQSDeadLetters(client, url, max_message_bytes=len(body) + 20).forward(
        body, ["too late"], "msg-1"
    )

    (message,) = read_sqs(client, url)
    assert message["Body"] == body
    attributes = message["MessageAttributes"]
    assert attributes["format"]["StringValue"] == "raw"
    assert json.loads(attributes["reasons"]["StringValue"]) == ["too late"]


def test_sqlite_letter_can_be_removed_once_redriven(tmp_path: Path) -> None:
    letters = SQLiteDeadLetters(tmp_path / "local.db")
    letters.forward("{}", ["reason"], "m-1")
    letters.forward("[]", ["reason"], "m-2")
    first, second = letters.list()
    letters.remove(first.id)
    letters.remove(first.id)  # idempotent
    assert [letter.id for letter in letters.list()] == [second.id]
