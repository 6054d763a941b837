"""The cases of the exactly-once issue, each by name: the real Lambda handler on moto (DynamoDB, SQS,
Secrets Manager) with the Twilio and OpenAI HTTP fakes, or the pipeline on fakes where only the
timing matters, always fed by the event-source emulator."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from channel_processor.adapters.sqs import SQSVisibilityExtender
from channel_processor.heartbeat import Heartbeat
from tests.fakes.openai_server import SERVER_ERROR
from tests.fakes.twilio_server import Fault
from tests.faults.emulator import Crash, EventSource
from tests.faults.points import FaultWorld, conversation, with_settings
from tests.faults.queue import MotoQueue
from tests.integration.aws_world import AwsWorld
from tests.support import RECIPIENT, body, context_object


def conversation_id(data: dict[str, Any]) -> str:
    return str(data["conversation_data"]["conversation_id"])


@pytest.fixture()
def fast_aws(
    aws: AwsWorld, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[AwsWorld, MotoQueue]]:
    """The AWS world with a queue whose redeliveries come within a second or two."""
    # Receives come about a second apart; the lease (and the send lease: the Twilio timeout)
    # must run out well within maxReceiveCount of them, even on a loaded machine.
    queue = MotoQueue(aws.endpoint, visibility_seconds=1, max_receive_count=8)
    for name, value in {
        "CP_QUEUE_URL": queue.url,
        "CP_DLQ_URL": queue.dlq_url,
        "CP_MAX_RECEIVE_COUNT": "8",
        "CP_LEASE_SECONDS": "0.5",
        "CP_HEARTBEAT_INTERVAL_SECONDS": "0.3",
        "CP_HEARTBEAT_EXTENSION_SECONDS": "1",
        "CP_TWILIO_TIMEOUT_SECONDS": "1",
        "CP_SEND_SETTLE_SECONDS": "0",
    }.items():
        monkeypatch.setenv(name, value)
    yield aws, queue


def drain(queue: MotoQueue, data: dict[str, Any], seconds: float = 40.0) -> EventSource:
    from channel_processor.entrypoints.lambda_sqs import handler

    queue.send(body(data))
    source = EventSource(queue, handler, batch_size=10)
    source.run(max_seconds=seconds)
    assert not source.report.timed_out
    return source


def heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sqs-heartbeat"]


# -- Twilio accepted, the answer lost -------------------------------------------------------------


def test_twilio_answers_201_after_the_client_timeout_creates_once_across_redeliveries(
    fast_aws: tuple[AwsWorld, MotoQueue],
) -> None:
    aws, queue = fast_aws
    # given Twilio that stores the message and answers 2.5 s later, with a 1 s client timeout
    aws.twilio.accept_then_delay(2.5, calls=[1])
    data = context_object()
    # when the message is delivered until the queue is empty
    source = drain(queue, data)
    # then one create in total, and the redelivery's lookup finished the record with that SID
    assert aws.twilio.creates_to(RECIPIENT) == 1
    assert source.report.invocations >= 2 and aws.twilio.calls["list"] >= 1
    record = aws.record(RECIPIENT, conversation_id(data))
    assert record is not None and record["conversation_status"] == "initial_message_sent"
    assert record["messages"][0]["message_id"] == aws.twilio.messages[0].sid


@pytest.mark.parametrize("fault", ["503", "drop"])
def test_twilio_failing_after_accepting_creates_once(
    fast_aws: tuple[AwsWorld, MotoQueue], fault: str
) -> None:
    aws, queue = fast_aws
    # given Twilio that accepts the first create, then answers 503 / drops the connection
    if fault == "503":
        aws.twilio.accept_then_fail(503, calls=[1])
    else:
        aws.twilio.accept_then_drop(calls=[1])
    data = context_object()
    # when it is delivered until the queue is empty
    drain(queue, data)
    # then it was created once and the record ends sent with that message
    # (the redelivery asked Twilio, found it, and finished the record)
    assert aws.twilio.creates_to(RECIPIENT) == 1 and aws.twilio.calls["list"] >= 1
    record = aws.record(RECIPIENT, conversation_id(data))
    assert record is not None and record["conversation_status"] == "initial_message_sent"
    assert record["message_sid"] == aws.twilio.messages[0].sid


def test_crash_after_the_send_before_the_final_update_is_completed_by_the_redelivery_lookup(
    fast_aws: tuple[AwsWorld, MotoQueue],
) -> None:
    aws, queue = fast_aws
    crashed = {"n": 0}

    def die_on_the_final_update(params: dict[str, Any]) -> None:
        # the final update is the one write that sets initial_message_sent
        if "initial_message_sent" in json.dumps(params, default=str) and not crashed["n"]:
            crashed["n"] += 1
            raise Crash("Lambda timed out before the final update")

    # given a run that dies at the DynamoDB call of the final update (at the SDK seam)
    aws.on_call("dynamodb", "UpdateItem", die_on_the_final_update)
    data = context_object()
    # when the queue is drained
    source = drain(queue, data)
    # then the crash happened, Twilio was asked once, and the lookup completed the record
    assert crashed["n"] == 1 and source.report.crashes == 1
    assert aws.twilio.creates_to(RECIPIENT) == 1
    assert aws.twilio.calls["list"] >= 1
    record = aws.record(RECIPIENT, conversation_id(data))
    assert record is not None and record["conversation_status"] == "initial_message_sent"
    assert record["message_sid"] == aws.twilio.messages[0].sid


# -- heartbeat ------------------------------------------------------------------------------------


def test_heartbeat_tick_after_the_message_was_deleted_loses_the_lease_inside_its_thread(
    aws: AwsWorld,
) -> None:
    queue = MotoQueue(aws.endpoint, visibility_seconds=5)
    queue.send("{}")
    [message] = queue.receive(1)
    errors: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment,arg-type]
    try:
        # given a running heartbeat whose message is then deleted
        beat = Heartbeat(
            SQSVisibilityExtender(queue.client, queue.url),
            message.receipt_handle,
            interval_seconds=0.1,
            extension_seconds=5,
        ).start()
        queue.delete(message.receipt_handle)
        # when the next tick runs
        deadline = time.monotonic() + 5
        while not beat.lease_lost and time.monotonic() < deadline:
            time.sleep(0.05)
        beat.stop()
    finally:
        threading.excepthook = previous
    # then the lease is lost, nothing escaped the thread, and the thread is gone
    assert beat.lease_lost
    assert errors == []
    assert heartbeat_threads() == []


@pytest.mark.parametrize("why", ["deleted", "expired"])
def test_lease_lost_during_the_attempt_means_no_send_and_no_heartbeat_left(
    fast_aws: tuple[AwsWorld, MotoQueue], why: str
) -> None:
    aws, queue = fast_aws
    data = context_object()
    queue.send(body(data))
    [message] = queue.receive(1)
    if why == "expired":
        # SQS's answer to an extension with an expired handle, at the SDK seam
        def expired(params: dict[str, Any]) -> None:
            raise ClientError(
                {
                    "Error": {
                        "Code": "InvalidParameterValue",
                        "Message": "Value x for parameter ReceiptHandle is invalid. Reason: "
                        "The receipt handle has expired.",
                    }
                },
                "ChangeMessageVisibility",
            )

        aws.on_call("sqs", "ChangeMessageVisibility", expired)
    else:
        queue.delete(message.receipt_handle)
    # OpenAI slow enough for ticks to happen before the send
    aws.openai.answer(lambda request, n: _delayed_fill(request, 1.0))
    from channel_processor.entrypoints.lambda_sqs import handler
    from tests.faults.emulator import LambdaContext, lambda_event

    # when the handler runs the message with the lost handle
    response = handler(lambda_event([message], queue.arn), LambdaContext())
    # then it asks for a retry, nothing was sent and the heartbeat thread is gone
    assert response == {"batchItemFailures": [{"itemIdentifier": message.message_id}]}
    assert aws.twilio.creates_to(RECIPIENT) == 0
    assert heartbeat_threads() == []
    record = aws.record(RECIPIENT, conversation_id(data))
    assert record is not None and record["conversation_status"] == "processing"
    assert "LeaseLost" in record["last_error"]


def _delayed_fill(request: dict[str, Any], seconds: float) -> Any:
    from tests.fakes.openai_server import Delayed, fill_schema

    return Delayed(seconds, fill_schema(request, 0))


# -- two consumers, no heartbeat --------------------------------------------------------------------


def test_visibility_shorter_than_processing_without_heartbeat_second_consumer_does_not_send() -> (
    None
):
    # given no heartbeat, a visibility of 0.3 s, an attempt that takes 1 s and two consumers
    world = FaultWorld(with_settings(lease_seconds=5.0), compose_seconds=1.0, heartbeat=False)
    c = conversation(1, "second-consumer")
    # when both poll the queue until it is empty
    source = world.run([c], consumers=2, max_seconds=20)
    # then the message was seen more than once but sent once
    assert source.report.invocations >= 2
    assert world.creates(c.recipient) == 1
    record = world.record(c.key)
    assert record is not None and record.status.value == "initial_message_sent"


def test_second_consumer_finding_a_send_in_flight_does_not_resend() -> None:
    # given no heartbeat, no settle window configured, and a Twilio create that takes 1.2 s
    # (inside the 2 s client timeout) while the message reappears every 0.3 s
    world = FaultWorld(
        with_settings(lease_seconds=5.0, twilio_timeout_seconds=2.0, send_settle_seconds=0.0),
        compose_seconds=0.0,
        heartbeat=False,
    )
    slow = {"n": 0}

    def slow_first_create(request: Any) -> None:
        slow["n"] += 1
        if slow["n"] == 1:
            time.sleep(1.2)

    world.on("sender.send", slow_first_create)
    c = conversation(2, "send-in-flight")
    # when two consumers poll until the queue is empty
    world.run([c], consumers=2, max_seconds=20)
    # then the second consumer, finding the record `sending`, did not send it again
    assert world.creates(c.recipient) == 1
    record = world.record(c.key)
    assert record is not None and record.status.value == "initial_message_sent"


# -- OpenAI transient failure ------------------------------------------------------------------------


def test_transient_openai_failure_on_the_first_attempt_is_sent_exactly_once_on_the_retry(
    fast_aws: tuple[AwsWorld, MotoQueue],
) -> None:
    aws, queue = fast_aws
    # given OpenAI answering 500 to every call of the first attempt
    aws.openai.answer(
        lambda request, n: SERVER_ERROR if n <= 3 else {"1": "Amara", "2": "Jo", "3": "Northwind"}
    )
    data = context_object()
    # when it is delivered until the queue is empty
    source = drain(queue, data)
    # then the first attempt asked for a retry and the message went out once
    record = aws.record(RECIPIENT, conversation_id(data))
    assert source.report.retried >= 1, record
    assert aws.twilio.creates_to(RECIPIENT) == 1, (record, source.report)
    assert record is not None and record["conversation_status"] == "initial_message_sent"


def test_stored_draft_is_reused_by_the_retry_and_openai_is_asked_once(
    fast_aws: tuple[AwsWorld, MotoQueue],
) -> None:
    aws, queue = fast_aws
    # given a first attempt that stores its draft, then meets Twilio's 429 (nothing sent)
    aws.twilio.inject("create", Fault(status=429, code=20429), calls=[1])
    data = context_object()
    # when it is delivered until the queue is empty
    drain(queue, data)
    # then OpenAI wrote the variables once, and the retry sent them once
    assert len(aws.openai.posts("responses")) == 1
    assert aws.twilio.creates_to(RECIPIENT) == 2  # the refused 429 and the one that was sent
    assert len(aws.twilio.messages_to(RECIPIENT)) == 1
