"""The Lambda handler and the worker against moto's server and the Twilio/OpenAI fakes, through the
real SDK clients: the cases of the end-to-end issue."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from channel_processor.bootstrap import build
from channel_processor.config import Settings
from channel_processor.entrypoints.lambda_sqs import handler
from channel_processor.entrypoints.worker import Worker
from tests.integration.aws_world import AwsWorld, aws_error
from tests.support import RECIPIENT, TWILIO_SECRET_NAME, body, context_object


def conversation_id(data: dict[str, Any]) -> str:
    return str(data["conversation_data"]["conversation_id"])


class LambdaContext:
    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def test_batch_with_a_body_that_is_not_json_sends_the_good_two_and_dead_letters_the_bad(
    aws: AwsWorld,
) -> None:
    first = context_object(request_id="11111111-1111-4111-8111-111111111111")
    second = context_object(
        request_id="22222222-2222-4222-8222-222222222222", recipient_tel="+447911123456"
    )
    aws.send(body(first))
    bad_id = aws.send("this is { not json")
    aws.send(body(second))

    response = handler(aws.receive_event(), LambdaContext())

    assert response == {"batchItemFailures": []}
    assert len(aws.twilio.creates) == 2
    assert aws.twilio.creates_to(RECIPIENT) == 1 and aws.twilio.creates_to("+447911123456") == 1
    [dead] = aws.dlq_bodies()
    assert dead["source_message_id"] == bad_id
    assert "not JSON" in dead["reasons"][0]
    record = aws.record(RECIPIENT, conversation_id(first))
    assert record is not None and record["conversation_status"] == "initial_message_sent"
    assert record["thread_id"].startswith("conv_")
    assert record["messages"][0]["message_id"] in {m.sid for m in aws.twilio.messages}


def test_final_update_failure_sends_once_logs_critical_and_writes_a_repair_entry(
    aws: AwsWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    data = context_object()

    def fail_the_final_update(params: dict[str, Any]) -> None:
        if ":v_conversation_status" in json.dumps(params) or "initial_message_sent" in json.dumps(
            params
        ):
            raise aws_error("ProvisionedThroughputExceededException", "UpdateItem")

    aws.on_call("dynamodb", "UpdateItem", fail_the_final_update)
    aws.send(body(data))
    response = handler(aws.receive_event(), LambdaContext())

    assert response == {"batchItemFailures": []}
    assert aws.twilio.creates_to(RECIPIENT) == 1
    [entry] = aws.repair_entries()
    assert entry["conversation_id"] == conversation_id(data)
    assert entry["new_status"] == "initial_message_sent"
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    [critical] = [x for x in lines if x.get("event") == "final_db_update_failed"]
    assert critical["level"] == "CRITICAL" and critical["message_sid"] == entry["message_sid"]
    assert critical["repair_id"] == entry["repair_id"]
    record = aws.record(RECIPIENT, conversation_id(data))
    assert record is not None and record["conversation_status"] == "sending"


def test_same_message_delivered_twice_after_success_is_a_duplicate(aws: AwsWorld) -> None:
    data = context_object()
    aws.send(body(data))
    event = aws.receive_event()
    assert handler(event, LambdaContext()) == {"batchItemFailures": []}
    assert handler(event, LambdaContext()) == {"batchItemFailures": []}
    assert aws.twilio.creates_to(RECIPIENT) == 1
    assert len(aws.openai.posts("responses")) == 1


def test_throttled_claim_is_retried_and_sent_exactly_once_later(aws: AwsWorld) -> None:
    data = context_object()
    puts = {"n": 0}

    def throttle_first_put(params: dict[str, Any]) -> None:
        puts["n"] += 1
        if puts["n"] == 1:
            raise aws_error("ProvisionedThroughputExceededException", "PutItem")

    aws.on_call("dynamodb", "PutItem", throttle_first_put)
    message_id = aws.send(body(data))
    event = aws.receive_event()
    assert handler(event, LambdaContext()) == {
        "batchItemFailures": [{"itemIdentifier": message_id}]
    }
    assert aws.twilio.creates_to(RECIPIENT) == 0
    assert aws.record(RECIPIENT, conversation_id(data)) is None

    assert handler(event, LambdaContext()) == {"batchItemFailures": []}
    assert aws.twilio.creates_to(RECIPIENT) == 1
    record = aws.record(RECIPIENT, conversation_id(data))
    assert record is not None and record["conversation_status"] == "initial_message_sent"


def test_record_keeps_fractions_and_reserved_word_status(aws: AwsWorld) -> None:
    data = context_object(frontend_payload__project_data={"rate": 4.5, "ratio": 0.1})
    aws.send(body(data))
    handler(aws.receive_event(), LambdaContext())
    record = aws.record(RECIPIENT, conversation_id(data))
    assert record is not None
    assert record["project_data"] == {"rate": Decimal("4.5"), "ratio": Decimal("0.1")}
    assert record["conversation_status"] == "initial_message_sent"
    assert len(record["messages"]) == 1
    assert record["created_at"].endswith("Z") and record["updated_at"].endswith("Z")


def test_twilio_secret_without_auth_token_fails_without_logging_the_value(
    aws: AwsWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    aws.client("secretsmanager").put_secret_value(
        SecretId=TWILIO_SECRET_NAME,
        SecretString=json.dumps(
            {
                "twilio_account_sid": "AC" + "1" * 32,
                "twilio_template_sid": "HXsecretvalue42",
                "twilio_auth_tokn": "tok-misspelt-but-secret",  # the key is misspelt
            }
        ),
    )
    data = context_object()
    aws.send(body(data))
    assert handler(aws.receive_event(), LambdaContext()) == {"batchItemFailures": []}
    record = aws.record(RECIPIENT, conversation_id(data))
    assert record is not None and record["conversation_status"] == "failed_secrets_fetch"
    assert "twilio_auth_token" in record["failure_reason"]
    logged = capsys.readouterr().err
    assert "HXsecretvalue42" not in logged and "tok-misspelt-but-secret" not in logged
    assert "tok-misspelt-but-secret" not in record["failure_reason"]
    assert aws.twilio.creates == []


def test_fifty_records_in_one_warm_container_fetch_each_secret_once(aws: AwsWorld) -> None:
    aws.count_calls("secretsmanager", "GetSecretValue")
    for batch in range(5):
        for n in range(10):
            aws.send(body(context_object(request_id=f"00000000-0000-4000-8000-{batch:06d}{n:06d}")))
        assert handler(aws.receive_event(), LambdaContext()) == {"batchItemFailures": []}
    assert aws.twilio.creates_to(RECIPIENT) == 50
    assert aws.calls["secretsmanager.GetSecretValue"] == 2  # one Twilio, one OpenAI


def test_no_consent_is_recorded_and_nothing_is_sent(aws: AwsWorld) -> None:
    data = context_object(frontend_payload__recipient_data__comms_consent=False)
    aws.send(body(data))
    assert handler(aws.receive_event(), LambdaContext()) == {"batchItemFailures": []}
    record = aws.record(RECIPIENT, conversation_id(data))
    assert record is not None and record["conversation_status"] == "failed_no_consent"
    assert aws.twilio.creates == [] and len(aws.dlq_bodies()) == 1


def test_worker_processes_a_queue_like_the_lambda(aws: AwsWorld) -> None:
    good = context_object()
    aws.send(body(good))
    aws.send("[]")
    pipeline = build(Settings.from_env())
    worker = Worker(pipeline, aws.client("sqs"), aws.queue_url, wait_seconds=1)
    assert worker.run(max_batches=2) == 2
    assert aws.twilio.creates_to(RECIPIENT) == 1
    assert len(aws.dlq_bodies()) == 1
    left = aws.client("sqs").receive_message(QueueUrl=aws.queue_url, WaitTimeSeconds=0)
    assert left.get("Messages", []) == []


def test_a_recorded_sqs_event_file_is_handled_as_lambda_delivers_it(aws: AwsWorld) -> None:
    # given an SQS event exactly as Lambda passes it (a sample file: valid, broken body, valid)
    path = Path(__file__).resolve().parent.parent / "events" / "sqs_batch_valid_invalid_valid.json"
    event = json.loads(path.read_text())
    # when the handler runs it (the receipt handles are not the queue's: no heartbeat tick is due)
    response = handler(event, LambdaContext())
    # then the good two are sent, the broken one is dead-lettered with its reason, none retried
    assert response == {"batchItemFailures": []}
    assert aws.twilio.creates_to("+12025550123") == 1
    assert aws.twilio.creates_to("+447911123456") == 1
    [dead] = aws.dlq_bodies()
    assert dead["source_message_id"] == event["Records"][1]["messageId"]
    assert "not JSON" in dead["reasons"][0]
