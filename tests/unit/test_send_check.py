"""The one answer to "did the send reach Twilio?" shared by the redelivery and the reconciler."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from channel_processor.domain import ConversationRecord, Draft, SentMessage, iso, utcnow
from channel_processor.errors import LookupUnavailable, StateConflict
from channel_processor.ports import TwilioCredentials
from channel_processor.send_check import Verdict, check_send, pick_match, take_over_send
from tests.fakes.sender import FakeSender
from tests.fakes.store import FakeConversationStore
from tests.support import COMPANY_NUMBER, RECIPIENT, TWILIO_SECRET

CREDS = TwilioCredentials(
    TWILIO_SECRET["twilio_account_sid"],
    TWILIO_SECRET["twilio_auth_token"],
    TWILIO_SECRET["twilio_template_sid"],
)
NOW = utcnow()


def sending_record(started_seconds_ago: float, draft: bool = True) -> ConversationRecord:
    started = NOW - timedelta(seconds=started_seconds_ago)
    attrs: dict[str, Any] = {
        "primary_channel": RECIPIENT,
        "conversation_id": "c#p#r#14155552671",
        "conversation_status": "sending",
        "open_status": "sending",
        "created_at": iso(started - timedelta(seconds=2)),
        "updated_at": iso(started),
        "send_attempt_id": "s-1",
        "send_started_at": iso(started),
    }
    if draft:
        attrs["draft"] = Draft({"1": "Amara"}, "Hi Amara").to_item()
    return ConversationRecord(attrs)


def check(sender: FakeSender, record: ConversationRecord, settle: float = 60) -> Any:
    return check_send(
        sender, CREDS, record, COMPANY_NUMBER, now=NOW, settle_seconds=settle, skew_seconds=30
    )


def found(*bodies: str | None) -> FakeSender:
    messages = [SentMessage(f"SM{n}", "queued", NOW, body) for n, body in enumerate(bodies)]
    return FakeSender(script=lambda op, req: messages if op == "find_sent" else None)


def test_our_body_among_others_is_found() -> None:
    result = check(found("Other text", "Hi Amara"), sending_record(120))
    assert result.verdict is Verdict.FOUND and result.message.sid == "SM1"


def test_messages_none_of_which_is_ours_are_ambiguous_never_absent() -> None:
    result = check(found("Other text"), sending_record(120))
    assert result.verdict is Verdict.UNKNOWN and "none matches" in result.reason


def test_nothing_within_the_settle_window_is_settling_and_after_it_absent() -> None:
    assert check(found(), sending_record(10)).verdict is Verdict.SETTLING
    assert check(found(), sending_record(120)).verdict is Verdict.ABSENT


def test_absent_without_a_draft_cannot_be_resent() -> None:
    assert check(found(), sending_record(120, draft=False)).verdict is Verdict.UNKNOWN


def test_lookup_failure_is_raised_for_the_caller_to_decide() -> None:
    def down(op: str, request: Any) -> Any:
        raise LookupUnavailable("Twilio 500")

    with pytest.raises(LookupUnavailable):
        check(FakeSender(script=down), sending_record(120))


def test_lookup_starts_at_the_send_less_the_clock_skew() -> None:
    sender = found()
    record = sending_record(120)
    check(sender, record)
    [(_, query)] = sender.calls
    assert abs(query.since - (NOW - timedelta(seconds=150))) < timedelta(milliseconds=1)
    assert query.to == RECIPIENT


def test_single_message_without_a_body_is_taken_as_ours() -> None:
    message = SentMessage("SM9", "queued", NOW, None)
    assert pick_match([message], "Hi Amara") == (message, False)


def test_only_one_of_two_takers_gets_the_resend() -> None:
    store = FakeConversationStore()
    record = store.create(sending_record(120).attributes)
    first = take_over_send(store, record, owner="a", now=NOW, lease_seconds=30)
    with pytest.raises(StateConflict):
        take_over_send(store, record, owner="b", now=NOW, lease_seconds=30)
    stored = store.peek(record.key)
    assert stored is not None and stored.send_attempt_id == first and stored.lease_owner == "a"
