"""The pipeline on fakes: the promise (one send, nothing lost, a record that says what happened)."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from channel_processor.context import validate
from channel_processor.domain import Expect, Outcome, RecordKey, Status, iso, status_change, utcnow
from channel_processor.errors import (
    ComposerUnavailable,
    LookupUnavailable,
    SendOutcomeUnknown,
    SendRejected,
    SendThrottled,
    StateConflict,
    StoreUnavailable,
)
from tests.fakes.composer import FakeComposer
from tests.fakes.secrets import FakeSecretSource
from tests.fakes.sender import AcceptThenRaise, FakeSender
from tests.support import (
    OPENAI_SECRET,
    OPENAI_SECRET_NAME,
    RECIPIENT,
    TWILIO_SECRET,
    TWILIO_SECRET_NAME,
    World,
    body,
    context_object,
)

KEY = RecordKey(RECIPIENT, context_object()["conversation_data"]["conversation_id"])


def critical_lines(stderr: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("level") == "CRITICAL"]


def seed_record(
    world: World,
    data: dict[str, Any],
    status: Status,
    lease_owner: str,
    lease_for: timedelta,
    **extra: Any,
) -> None:
    """A record another attempt left behind, holding a lease that ends ``lease_for`` from now."""
    now = utcnow()
    world.store.create(
        validate(data).record_attributes()
        | status_change(status, now)
        | {
            "created_at": iso(now),
            "lease_owner": lease_owner,
            "lease_expires_at": iso(now + lease_for),
            **extra,
        }
    )


def test_valid_context_is_sent_once_and_recorded() -> None:
    world = World()
    result = world.process(context_object())
    assert result.outcome is Outcome.SENT
    assert world.sender.sends_to(RECIPIENT) == 1
    record = world.store.peek(KEY)
    assert record is not None and record.status is Status.SENT
    assert record.attributes["thread_id"].startswith("conv_")
    assert record.attributes["initial_processing_time_ms"] >= 0
    assert "lease_owner" not in record.attributes and "open_status" not in record.attributes
    [message] = record.messages
    assert message["message_id"] == result.message_sid
    assert message["role"] == "assistant" and message["total_tokens"] == 15
    assert message["content"].startswith("Hi value 1")


def test_same_message_delivered_twice_after_success_sends_once() -> None:
    world = World()
    first = world.process(context_object())
    second = world.process(context_object(), receive_count=2)
    assert (first.outcome, second.outcome) == (Outcome.SENT, Outcome.DUPLICATE)
    assert second.status == Status.SENT.value
    assert world.sender.sends_to(RECIPIENT) == 1
    assert world.composer.calls == 1


def test_final_update_failure_logs_critical_writes_repair_and_does_not_retry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    world = World()

    def fail_final_update(op: str, key: RecordKey | None) -> None:
        record = world.store.peek(key) if key else None
        if op == "update" and record is not None and record.status is Status.SENDING:
            raise StoreUnavailable("ProvisionedThroughputExceededException")

    world.store.script = fail_final_update
    result = world.process(context_object())

    assert result.outcome is Outcome.SENT and not result.should_retry
    assert world.sender.sends_to(RECIPIENT) == 1
    [pending] = world.repair_log.pending
    assert (
        pending.message_sid == result.message_sid and pending.conversation_id == KEY.conversation_id
    )
    [line] = critical_lines(capsys.readouterr().err)
    assert line["event"] == "final_db_update_failed"
    assert line["conversation_id"] == KEY.conversation_id
    assert line["message_sid"] == result.message_sid
    assert line["recipient"] != RECIPIENT and line["recipient"].endswith("23")
    assert line["repair_id"] == pending.repair_id
    assert line["pending_update"]["new_status"] == "initial_message_sent"
    assert line["pending_update"]["message"]["message_id"] == result.message_sid
    assert "WAS sent" in line["message"]
    assert RECIPIENT not in json.dumps(line)


def test_throttled_claim_is_retried_not_a_duplicate_and_sends_once_later() -> None:
    world = World()
    calls = {"create": 0}

    def throttle_first_create(op: str, key: RecordKey | None) -> None:
        if op == "create":
            calls["create"] += 1
            if calls["create"] == 1:
                raise StoreUnavailable("ThrottlingException after the SDK's retries")

    world.store.script = throttle_first_create
    first = world.process(context_object())
    second = world.process(context_object(), receive_count=2)
    assert first.outcome is Outcome.RETRY and first.should_retry
    assert second.outcome is Outcome.SENT
    assert world.sender.sends_to(RECIPIENT) == 1


def test_project_data_fractions_are_stored_as_decimal() -> None:
    world = World()
    world.process(context_object(frontend_payload__project_data={"rate": 4.5, "ratio": 0.1}))
    record = world.store.peek(KEY)
    assert record is not None
    assert record.attributes["project_data"] == {"rate": Decimal("4.5"), "ratio": Decimal("0.1")}


def test_variables_are_cleaned_before_sending() -> None:
    world = World(
        composer=FakeComposer(
            lambda req, n: {"1": "Amara\nJoy", "2": "Jo\tRep", "3": "North      wind's"}
        )
    )
    result = world.process(context_object())
    assert result.outcome is Outcome.SENT
    [sent] = world.sender.sent
    assert sent.request.variables == {"1": "Amara Joy", "2": "Jo Rep", "3": "North wind's"}


def test_composer_keys_that_do_not_match_are_reasked_then_fail_without_sending() -> None:
    world = World(composer=FakeComposer(lambda req, n: {"first_name": "Amara"}))
    result = world.process(context_object())
    assert result.outcome is Outcome.FAILED
    assert world.composer.calls == world.settings.compose_attempts
    assert (
        world.composer.requests[1].feedback
        and "missing variables" in world.composer.requests[1].feedback
    )
    assert world.sender.sent == []
    record = world.store.peek(KEY)
    assert record is not None and record.status is Status.FAILED_TO_PROCESS_AI
    assert "missing variables" in record.attributes["failure_reason"]


def test_variable_empty_after_cleaning_is_permanent_before_any_send() -> None:
    world = World(
        composer=FakeComposer(lambda req, n: {"1": " \n\t ", "2": "Jo", "3": "Northwind"})
    )
    result = world.process(context_object())
    assert result.outcome is Outcome.FAILED and world.sender.sent == []
    assert "empty after cleaning" in result.errors[0]


def test_composer_recovers_on_second_answer() -> None:
    answers = [{"1": "x"}, {"1": "Amara", "2": "Jo", "3": "Northwind"}]
    world = World(composer=FakeComposer(lambda req, n: answers[n - 1]))
    assert world.process(context_object()).outcome is Outcome.SENT
    assert world.composer.calls == 2


@pytest.mark.parametrize(
    ("secret", "named"),
    [
        ({k: v for k, v in TWILIO_SECRET.items() if k != "twilio_auth_token"}, "twilio_auth_token"),
        ("this is not json tok-very-secret-123", "is not valid json"),
    ],
)
def test_malformed_twilio_secret_fails_naming_the_problem_without_the_value(
    secret: Any, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    values = {TWILIO_SECRET_NAME: secret, OPENAI_SECRET_NAME: OPENAI_SECRET}
    world = World(secrets=FakeSecretSource(values))
    result = world.process(context_object())
    assert result.outcome is Outcome.FAILED and world.sender.sent == []
    record = world.store.peek(KEY)
    assert record is not None and record.status is Status.FAILED_SECRETS_FETCH
    assert named in record.attributes["failure_reason"].lower()
    assert "tok-very-secret-123" not in record.attributes["failure_reason"]
    assert "tok-very-secret-123" not in capsys.readouterr().err


def test_no_consent_is_recorded_forwarded_and_never_sent() -> None:
    world = World()
    result = world.process(context_object(frontend_payload__recipient_data__comms_consent=False))
    assert result.outcome is Outcome.REJECTED and world.sender.sent == []
    record = world.store.peek(KEY)
    assert record is not None and record.status is Status.FAILED_NO_CONSENT
    [letter] = world.dead_letters.forwarded
    assert "comms_consent" in letter.reasons[0]


def test_invalid_but_identifiable_input_leaves_a_record_and_goes_to_the_dlq() -> None:
    world = World()
    data = context_object(frontend_payload__request_data__channel_method="sms")
    result = world.process(data)
    assert result.outcome is Outcome.REJECTED and not result.should_retry
    record = world.store.peek(KEY)
    assert record is not None and record.status is Status.FAILED_INVALID_INPUT
    assert "channel_method" in record.attributes["failure_reason"]
    assert world.dead_letters.forwarded[0].body == body(data)


def test_body_that_is_not_json_goes_to_the_dlq_with_its_reason() -> None:
    world = World()
    result = world.process("{oops", message_id="m-bad")
    assert result.outcome is Outcome.REJECTED and result.conversation_id is None
    [letter] = world.dead_letters.forwarded
    assert letter.message_id == "m-bad" and "not JSON" in letter.reasons[0]
    assert world.store.all() == []


def test_dlq_unavailable_means_retry_not_loss() -> None:
    world = World()

    def dlq_down(body: str, reasons: Any) -> None:
        raise StoreUnavailable("SQS throttled")

    world.dead_letters.script = dlq_down
    assert world.process("{oops").outcome is Outcome.RETRY


def test_transient_composer_failure_retries_then_sends_once() -> None:
    def flaky(req: Any, n: int) -> dict[str, str]:
        if n == 1:
            raise ComposerUnavailable("OpenAI 503")
        return {"1": "Amara", "2": "Jo", "3": "Northwind"}

    world = World(composer=FakeComposer(flaky))
    first = world.process(context_object())
    record = world.store.peek(KEY)
    assert first.outcome is Outcome.RETRY
    assert record is not None and record.status is Status.PROCESSING
    assert record.attempt_count == 1 and "ComposerUnavailable" in record.attributes["last_error"]
    second = world.process(context_object(), receive_count=2)
    assert second.outcome is Outcome.SENT and world.sender.sends_to(RECIPIENT) == 1


def test_throttled_send_reuses_the_stored_draft_on_retry() -> None:
    calls = {"send": 0}

    def throttle_once(op: str, request: Any) -> Any:
        if op == "send":
            calls["send"] += 1
            if calls["send"] == 1:
                raise SendThrottled("429")
        return None

    world = World(sender=FakeSender(script=throttle_once))
    first = world.process(context_object())
    assert first.outcome is Outcome.RETRY
    record = world.store.peek(KEY)
    assert record is not None and record.status is Status.PROCESSING and record.draft is not None
    second = world.process(context_object(), receive_count=2)
    assert second.outcome is Outcome.SENT
    assert world.composer.calls == 1 and world.sender.sends_to(RECIPIENT) == 1


def test_rejected_send_is_a_permanent_failure() -> None:
    def reject(op: str, request: Any) -> Any:
        if op == "send":
            raise SendRejected("Twilio 21211: invalid 'To' number", code="21211")
        return None

    world = World(sender=FakeSender(script=reject))
    result = world.process(context_object())
    record = world.store.peek(KEY)
    assert result.outcome is Outcome.FAILED
    assert record is not None and record.status is Status.FAILED_TO_SEND_MESSAGE
    assert record.attributes["failure_code"] == "21211"


def test_live_lease_of_another_attempt_means_retry_without_sending() -> None:
    world = World()
    data = context_object()
    seed_record(world, data, Status.PROCESSING, "other-attempt", timedelta(minutes=5))
    result = world.process(data)
    assert result.outcome is Outcome.RETRY and world.sender.sent == []


def test_expired_lease_is_taken_over_and_sent_once() -> None:
    world = World()
    data = context_object()
    seed_record(world, data, Status.PROCESSING, "dead-attempt", timedelta(seconds=-1))
    assert world.process(data).outcome is Outcome.SENT
    assert world.sender.sends_to(RECIPIENT) == 1


def test_last_receive_marks_the_record_failed_and_forwards_to_the_dlq() -> None:
    world = World(
        composer=FakeComposer(lambda req, n: (_ for _ in ()).throw(ComposerUnavailable("503")))
    )
    result = world.process(context_object(), receive_count=world.settings.max_receive_count)
    record = world.store.peek(KEY)
    assert result.outcome is Outcome.FAILED and not result.should_retry
    assert record is not None and record.status is Status.FAILED_TO_PROCESS_AI
    assert "gave up after 5 receives" in record.attributes["failure_reason"]
    assert len(world.dead_letters.forwarded) == 1


def test_unknown_send_outcome_is_verified_on_redelivery_not_resent() -> None:
    calls = {"send": 0}

    def lose_first_answer(op: str, request: Any) -> Any:
        if op == "send":
            calls["send"] += 1
            if calls["send"] == 1:
                return AcceptThenRaise(SendOutcomeUnknown("read timeout after the request left"))
        return None

    world = World(sender=FakeSender(script=lose_first_answer))
    first = world.process(context_object())
    record = world.store.peek(KEY)
    assert first.outcome is Outcome.RETRY
    assert record is not None and record.status is Status.SENDING
    second = world.process(context_object(), receive_count=2)
    assert second.outcome is Outcome.SENT
    assert world.sender.sends_to(RECIPIENT) == 1 and calls["send"] == 1
    final = world.store.peek(KEY)
    assert final is not None and final.status is Status.SENT
    assert final.messages[0]["message_id"] == world.sender.sent[0].message.sid


def test_sending_record_confirmed_absent_after_settle_window_is_sent_once() -> None:
    calls = {"send": 0}

    def nothing_left(op: str, request: Any) -> Any:
        if op == "send":
            calls["send"] += 1
            if calls["send"] == 1:
                raise SendOutcomeUnknown("connection reset before any byte was answered")
        return None

    world = World(sender=FakeSender(script=nothing_left))
    assert world.process(context_object()).outcome is Outcome.RETRY
    second = world.process(context_object(), receive_count=2)
    assert second.outcome is Outcome.SENT
    assert world.sender.sends_to(RECIPIENT) == 1


def test_sending_record_within_settle_window_waits() -> None:
    world = World(
        sender=FakeSender(
            script=lambda op, r: (
                (_ for _ in ()).throw(SendOutcomeUnknown("x")) if op == "send" else None
            )
        )
    )
    world.settings = world.settings.__class__(
        **{**world.settings.__dict__, "send_settle_seconds": 600.0}
    )
    assert world.process(context_object()).outcome is Outcome.RETRY
    second = world.process(context_object(), receive_count=2)
    assert second.outcome is Outcome.RETRY and second.status == "sending"


def test_unverifiable_send_on_last_receive_needs_reconciliation(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def lookup_down(op: str, request: Any) -> Any:
        if op == "send":
            return AcceptThenRaise(SendOutcomeUnknown("503 after acceptance"))
        if op == "find_sent":
            raise LookupUnavailable("Twilio unreachable")
        return None

    world = World(sender=FakeSender(script=lookup_down))
    world.process(context_object())
    result = world.process(context_object(), receive_count=world.settings.max_receive_count)
    record = world.store.peek(KEY)
    assert result.outcome is Outcome.FAILED
    assert record is not None and record.status is Status.NEEDS_RECONCILIATION
    assert world.sender.sends_to(RECIPIENT) == 1
    assert any(
        line["event"] == "needs_reconciliation" for line in critical_lines(capsys.readouterr().err)
    )


def test_lost_lease_stops_before_the_send() -> None:
    class LostHeartbeat:
        lease_lost = True

        def start(self) -> LostHeartbeat:
            return self

        def stop(self) -> None:
            pass

        def check(self) -> None:
            from channel_processor.errors import LeaseLost

            raise LeaseLost("receipt handle expired")

    world = World()
    pipeline = world.pipeline()
    pipeline._heartbeat_factory = lambda delivery, keys: LostHeartbeat()
    from channel_processor.pipeline import Delivery

    result = pipeline.process(Delivery(body=body(context_object()), receipt_handle="rh"))
    assert result.outcome is Outcome.RETRY and world.sender.sent == []


def test_secrets_are_fetched_once_for_many_records() -> None:
    from channel_processor.secrets import CachedSecretSource

    inner = FakeSecretSource({TWILIO_SECRET_NAME: TWILIO_SECRET, OPENAI_SECRET_NAME: OPENAI_SECRET})
    world = World(secrets=CachedSecretSource(inner, ttl_seconds=300))  # type: ignore[arg-type]
    for n in range(50):
        world.process(context_object(request_id=f"00000000-0000-4000-8000-{n:012d}"))
    assert world.sender.sends_to(RECIPIENT) == 50
    assert inner.gets[TWILIO_SECRET_NAME] == 1 and inner.gets[OPENAI_SECRET_NAME] == 1


def test_a_record_moved_on_by_someone_else_is_never_overwritten() -> None:
    world = World()
    world.process(context_object())
    record = world.store.peek(KEY)
    assert record is not None
    with pytest.raises(StateConflict):
        world.store.update(
            KEY, Expect.status(Status.PROCESSING), {"conversation_status": "processing"}
        )
    assert world.store.peek(KEY).status is Status.SENT  # type: ignore[union-attr]


def test_a_redriven_dead_letter_envelope_is_processed_as_its_original_body() -> None:
    world = World()
    original = body(context_object())
    envelope = json.dumps(
        {"reasons": ["claim: throttled"], "original_body": original, "source_message_id": "m-0"}
    )
    result = world.process(envelope)
    assert result.outcome is Outcome.SENT and world.sender.sends_to(RECIPIENT) == 1


def test_a_redriven_invalid_body_goes_back_to_the_dlq_unwrapped() -> None:
    world = World()
    envelope = json.dumps({"reasons": ["not JSON"], "original_body": "{oops"})
    assert world.process(envelope).outcome is Outcome.REJECTED
    assert world.dead_letters.forwarded[0].body == "{oops"


def test_sending_record_with_a_live_lease_is_left_alone_while_the_send_may_be_in_flight() -> None:
    world = World()
    data = context_object()
    seed_record(
        world,
        data,
        Status.SENDING,
        "attempt-in-flight",
        timedelta(minutes=2),
        send_attempt_id="s-1",
        send_started_at=iso(utcnow()),
    )
    result = world.process(data, receive_count=2)
    assert result.outcome is Outcome.RETRY
    assert [op for op, _ in world.sender.calls] == [] and world.sender.sent == []


def throttle_every_update(op: str, key: RecordKey | None) -> None:
    if op == "update":
        raise StoreUnavailable("ProvisionedThroughputExceededException after the SDK's retries")


def test_permanent_failure_that_cannot_be_recorded_is_retried_not_acked() -> None:
    broken = {k: v for k, v in TWILIO_SECRET.items() if k != "twilio_auth_token"}
    world = World(
        secrets=FakeSecretSource({TWILIO_SECRET_NAME: broken, OPENAI_SECRET_NAME: OPENAI_SECRET})
    )
    world.settings = world.settings.__class__(**{**world.settings.__dict__, "lease_seconds": 0.05})
    world.store.script = throttle_every_update
    result = world.process(context_object())
    assert result.should_retry and "could not be recorded" in result.errors[0]
    world.store.script = None
    time.sleep(0.1)  # the lease it could not release runs out
    again = world.process(context_object(), receive_count=2)
    record = world.store.peek(KEY)
    assert again.outcome is Outcome.FAILED
    assert record is not None and record.status is Status.FAILED_SECRETS_FETCH


def test_last_receive_that_cannot_record_the_failure_hands_the_message_back_to_sqs() -> None:
    world = World(
        composer=FakeComposer(lambda r, n: (_ for _ in ()).throw(ComposerUnavailable("503")))
    )
    world.store.script = throttle_every_update
    result = world.process(context_object(), receive_count=world.settings.max_receive_count)
    # not acked: SQS's redrive moves it to the DLQ after this receive, nothing is lost
    assert result.should_retry and world.dead_letters.forwarded == []


def test_last_receive_on_a_busy_record_goes_to_the_dlq_with_the_reason() -> None:
    world = World()
    data = context_object()
    seed_record(world, data, Status.PROCESSING, "crashed-attempt", timedelta(seconds=60))
    result = world.process(data, receive_count=world.settings.max_receive_count)
    [letter] = world.dead_letters.forwarded
    assert result.outcome is Outcome.FAILED and not result.should_retry
    assert "live lease" in letter.reasons[0] and world.sender.sent == []


def test_number_that_cannot_be_e164_is_rejected_before_anything_is_sent() -> None:
    world = World()
    result = world.process(context_object(recipient_tel="00555 000 1111"))
    assert result.outcome is Outcome.REJECTED
    assert "recipient_tel" in result.errors[0] and world.sender.calls == []
    assert world.store.all() == []


def test_the_sending_write_renews_the_lease_over_the_twilio_call() -> None:
    seen: dict[str, Any] = {}
    world = World()

    def look_at_the_record(op: str, request: Any) -> Any:
        if op == "send":
            record = world.store.peek(KEY)
            assert record is not None
            seen["lease"] = record.lease_expires_at
            seen["started"] = record.send_started_at
        return None

    world.sender = FakeSender(script=look_at_the_record)
    world.settings = world.settings.__class__(
        **{**world.settings.__dict__, "lease_seconds": 1.0, "twilio_timeout_seconds": 30.0}
    )
    world.process(context_object())
    from channel_processor.domain import parse_iso

    lease = parse_iso(seen["lease"]) - parse_iso(seen["started"])
    assert lease >= timedelta(seconds=30)
