"""The reconciler on AWS back ends (moto: DynamoDB, SQS repair queue and DLQ, Secrets Manager) with the
Twilio fake behind the real SDK: ``channel-processor reconcile --aws``, the scheduled Lambda handler,
two reconcilers at once, and ``dlq show|redrive --aws``."""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import boto3
import pytest

from channel_processor.adapters.dynamodb_store import DynamoDBConversationStore
from channel_processor.adapters.sqs import SQSDeadLetters, SQSRepairLog
from channel_processor.bootstrap import build
from channel_processor.config import Settings
from channel_processor.context import validate
from channel_processor.domain import (
    Draft,
    PendingFinalUpdate,
    iso,
    mask_phone,
    message_entry,
    utcnow,
)
from channel_processor.entrypoints import lambda_reconcile
from channel_processor.entrypoints.cli import main
from channel_processor.entrypoints.lambda_sqs import handler
from channel_processor.reconcile import Reconciler
from tests.integration.aws_world import REGION, AwsWorld, aws_error
from tests.support import RECIPIENT, body, context_object


class LambdaContext:
    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def conversation_id(data: dict[str, Any]) -> str:
    return str(data["conversation_data"]["conversation_id"])


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def final_update_failure(aws: AwsWorld) -> dict[str, Any]:
    """Process one Context Object whose Step 8 write is throttled; returns its repair entry."""
    failing = {"on": True}

    def throttle_final_update(params: dict[str, Any]) -> None:
        if failing["on"] and "initial_message_sent" in json.dumps(params):
            raise aws_error("ProvisionedThroughputExceededException", "UpdateItem")

    aws.on_call("dynamodb", "UpdateItem", throttle_final_update)
    aws.send(body(context_object()))
    assert handler(aws.receive_event(), LambdaContext()) == {"batchItemFailures": []}
    failing["on"] = False
    [entry] = peek_repairs(aws)
    return entry


def peek_repairs(aws: AwsWorld) -> list[dict[str, Any]]:
    reply = aws.client("sqs").receive_message(
        QueueUrl=aws.repair_url, MaxNumberOfMessages=10, VisibilityTimeout=0
    )
    return [json.loads(m["Body"]) for m in reply.get("Messages", [])]


def sending_after_lost_answer(aws: AwsWorld, accepted: bool) -> str:
    """The create's answer is a 503: with ``accepted`` the message exists at Twilio."""
    if accepted:
        aws.twilio.accept_then_fail(503, calls=[1])
    else:
        aws.twilio.fail("create", 503, calls=[1])
    data = context_object()
    aws.send(body(data))
    handler(aws.receive_event(), LambdaContext())
    aws.twilio.clear_faults()
    record = aws.record(RECIPIENT, conversation_id(data))
    assert record is not None and record["conversation_status"] == "sending"
    return conversation_id(data)


# -- the cases of issue 4 ----------------------------------------------------------------------------


def test_given_a_final_update_failure_on_aws_when_reconcile_then_sent_and_a_second_run_changes_nothing(
    aws: AwsWorld,
) -> None:
    entry = final_update_failure(aws)

    code, out, _ = cli("reconcile", "--aws", "--json")

    summary = json.loads(out)
    assert code == 0 and summary["repairs_applied"] == [entry["conversation_id"]]
    record = aws.record(RECIPIENT, entry["conversation_id"])
    assert record is not None and record["conversation_status"] == "initial_message_sent"
    assert [m["message_id"] for m in record["messages"]] == [entry["message_sid"]]
    assert record["initial_processing_time_ms"] == entry["processing_time_ms"]
    assert record["thread_id"] == entry["thread_id"] and record["thread_id"].startswith("conv_")
    assert "open_status" not in record
    assert peek_repairs(aws) == []
    assert aws.twilio.creates_to(RECIPIENT) == 1 and aws.twilio.calls["list"] == 0

    again, out, _ = cli("reconcile", "--aws", "--json")
    assert again == 0 and set(json.loads(out)["counts"].values()) == {0}
    assert aws.record(RECIPIENT, entry["conversation_id"]) == record


def test_given_a_sending_record_whose_message_exists_at_twilio_then_completed_with_that_sid(
    aws: AwsWorld,
) -> None:
    cid = sending_after_lost_answer(aws, accepted=True)
    [message] = aws.twilio.messages_to(RECIPIENT)

    code, out, _ = cli("reconcile", "--aws", "--json")

    assert code == 0 and json.loads(out)["sending_completed"] == [cid]
    record = aws.record(RECIPIENT, cid)
    assert record is not None and record["conversation_status"] == "initial_message_sent"
    assert [m["message_id"] for m in record["messages"]] == [message.sid]
    assert record["messages"][0]["content"] == message.body
    assert aws.twilio.creates_to(RECIPIENT) == 1  # found: never a send from reconciling it


def test_given_a_sending_record_absent_at_twilio_after_the_settle_window_then_sent_once(
    aws: AwsWorld,
) -> None:
    cid = sending_after_lost_answer(aws, accepted=False)
    assert aws.twilio.messages_to(RECIPIENT) == []

    code, out, _ = cli("reconcile", "--aws", "--json")
    again, _, _ = cli("reconcile", "--aws", "--json")

    assert code == 0 and again == 0 and json.loads(out)["sending_resent"] == [cid]
    [message] = aws.twilio.messages_to(RECIPIENT)
    record = aws.record(RECIPIENT, cid)
    assert record is not None and record["conversation_status"] == "initial_message_sent"
    assert [m["message_id"] for m in record["messages"]] == [message.sid]
    assert aws.twilio.creates_to(RECIPIENT) == 2  # the failed first request, the one resend


def test_given_twilio_unreachable_when_reconcile_then_needs_reconciliation_and_exit_1(
    aws: AwsWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    cid = sending_after_lost_answer(aws, accepted=True)
    aws.twilio.fail_lookups(500)
    capsys.readouterr()

    code, out, _ = cli("reconcile", "--aws", "--json")

    assert code == 1 and json.loads(out)["needs_reconciliation"] == [cid]
    record = aws.record(RECIPIENT, cid)
    assert record is not None and record["conversation_status"] == "needs_reconciliation"
    assert record["open_status"] == "needs_reconciliation"
    assert aws.twilio.creates_to(RECIPIENT) == 1
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    [critical] = [x for x in lines if x.get("event") == "needs_reconciliation"]
    assert critical["level"] == "CRITICAL" and critical["recipient"] == mask_phone(RECIPIENT)


def test_scheduled_lambda_applies_the_repair_and_emits_the_reconciled_metric(
    aws: AwsWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = final_update_failure(aws)
    lambda_reconcile.reset()
    capsys.readouterr()
    try:
        result = lambda_reconcile.handler({"source": "aws.events"}, LambdaContext())
    finally:
        lambda_reconcile.reset()

    assert result["repairs_applied"] == [entry["conversation_id"]] and not result["needs_human"]
    record = aws.record(RECIPIENT, entry["conversation_id"])
    assert record is not None and record["conversation_status"] == "initial_message_sent"
    emf = [json.loads(x) for x in capsys.readouterr().out.splitlines() if '"_aws"' in x]
    [reconciled] = [x for x in emf if "reconciled" in x]
    assert reconciled["reconciled"] in (1.0, [1.0]) and reconciled["how"] == "repair_log"


def test_scheduled_lambda_raises_after_logging_when_the_table_is_unreachable(
    aws: AwsWorld,
) -> None:
    def table_down(params: dict[str, Any]) -> None:
        raise aws_error("InternalServerError", "Query")

    aws.on_call("dynamodb", "Query", table_down)
    lambda_reconcile.reset()
    try:
        with pytest.raises(lambda_reconcile.ReconcileFailed):
            lambda_reconcile.handler({}, LambdaContext())
    finally:
        lambda_reconcile.reset()


# -- two reconcilers at once -------------------------------------------------------------------------


def test_given_two_reconcilers_at_once_over_50_repair_entries_on_aws_then_each_applied_once(
    aws: AwsWorld,
) -> None:
    client = aws.client("dynamodb")
    store = DynamoDBConversationStore(client, aws.table)
    repair_log = SQSRepairLog(aws.client("sqs"), aws.repair_url)
    now = utcnow()
    draft = Draft(variables={"1": "Ada"}, rendered="Hi Ada", thread_id="conv_1", total_tokens=3)
    expected: dict[str, str] = {}
    for n in range(50):
        data = context_object(request_id=f"00000000-0000-4000-8000-{n:012d}")
        record = store.create(
            validate(data).record_attributes()
            | {
                "conversation_status": "sending",
                "open_status": "sending",
                "created_at": iso(now),
                "updated_at": iso(now),
                "messages": [],
                "send_attempt_id": f"s-{n}",
                "send_started_at": iso(now),
                "draft": draft.to_item(),
            }
        )
        sid = f"SM{n:032d}"
        expected[record.conversation_id] = sid
        repair_log.put(
            PendingFinalUpdate(
                primary_channel=record.primary_channel,
                conversation_id=record.conversation_id,
                send_attempt_id=f"s-{n}",
                message_sid=sid,
                thread_id="conv_1",
                updated_at=iso(now),
                processing_time_ms=1500,
                message=message_entry(sid=sid, at=now, content="Hi Ada", draft=draft),
            )
        )
    # Records inside the settle window: this is about the repair log alone.
    settings = Settings.from_env(send_settle_seconds=60.0)
    barrier = threading.Barrier(2)
    summaries: list[Any] = []

    def run() -> None:
        reconciler = Reconciler(build(settings).deps, settings)
        barrier.wait(timeout=10)
        summaries.append(reconciler.run())

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    applied = [cid for s in summaries for cid in s.repairs_applied]
    assert len(summaries) == 2 and sorted(applied) == sorted(expected)
    for cid, sid in expected.items():
        stored = aws.record(RECIPIENT, cid)
        assert stored is not None and stored["conversation_status"] == "initial_message_sent"
        assert [m["message_id"] for m in stored["messages"]] == [sid]
    assert peek_repairs(aws) == []
    assert aws.twilio.creates == [] and aws.twilio.calls["list"] == 0


# -- dead letters ------------------------------------------------------------------------------------


def test_dlq_show_on_aws_lists_forwarded_and_moved_letters_without_hiding_them(
    aws: AwsWorld,
) -> None:
    sqs = aws.client("sqs")
    SQSDeadLetters(sqs, aws.dlq_url).forward("{oops", ["$: body is not JSON"], "m-1")
    sqs.send_message(QueueUrl=aws.dlq_url, MessageBody=body(context_object()))  # as SQS moves one

    code, out, _ = cli("dlq", "show", "--aws", "--json")
    text_code, text, _ = cli("dlq", "show", "--aws")

    letters = {x["forwarded_by"]: x for x in map(json.loads, out.splitlines())}
    assert code == 0 and text_code == 0 and set(letters) == {"processor", "sqs"}
    assert letters["processor"]["reasons"] == ["$: body is not JSON"]
    assert letters["processor"]["source_message_id"] == "m-1"
    assert letters["sqs"]["conversation_id"] == conversation_id(context_object())
    assert letters["sqs"]["recipient"] == mask_phone(RECIPIENT)
    assert RECIPIENT not in out and RECIPIENT not in text and "2 dead letter(s)" in text
    # peeking hid nothing: both are still there for the next reader
    assert len(aws.dlq_bodies()) == 2


def test_dlq_redrive_on_aws_starts_a_message_move_task_from_the_dlq_to_the_queue(
    aws: AwsWorld,
) -> None:
    # moto has no StartMessageMoveTask: answer it at the SDK seam and keep what was asked
    asked: list[dict[str, Any]] = []

    class Answer:
        status_code = 200

    def answer(params: dict[str, Any], **_: Any) -> Any:
        asked.append(json.loads(params["body"]))
        return Answer(), {"TaskHandle": "task-handle-123"}

    boto3.DEFAULT_SESSION.events.register("before-call.sqs.StartMessageMoveTask", answer)  # type: ignore[union-attr]

    code, out, _ = cli("dlq", "redrive", "--aws")

    arn = f"arn:aws:sqs:{REGION}:123456789012:"
    assert code == 0 and "task-handle-123" in out
    assert asked == [
        {
            "SourceArn": arn + aws.dlq_url.rsplit("/", 1)[-1],
            "DestinationArn": arn + aws.queue_url.rsplit("/", 1)[-1],
        }
    ]
