"""Did the send of a ``sending`` record reach Twilio? One answer for the redelivery (pipeline) and
the reconciler, so both follow SPEC §4 alike: found -> finish the record; confirmed absent after the
settle window -> send once (taken over conditionally); anything unclear -> never a resend.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from channel_processor.domain import (
    ConversationRecord,
    Expect,
    RecordKey,
    SentMessage,
    Status,
    iso,
    lease_until,
    mask_phone,
    parse_iso,
    status_change,
)
from channel_processor.observability import logger
from channel_processor.ports import ConversationStore, Sender, TwilioCredentials

NEEDS_RECONCILIATION_EVENT = "needs_reconciliation"


class Verdict(StrEnum):
    FOUND = "found"  # Twilio has our message: finish the record with it
    ABSENT = "absent"  # nothing after the settle window: the send may be made (once)
    SETTLING = "settling"  # nothing yet, but a just-accepted message may not be listed yet
    UNKNOWN = "unknown"  # cannot tell (ambiguous, no draft): never resend; needs reconciliation


@dataclass(frozen=True)
class SendCheck:
    verdict: Verdict
    message: SentMessage | None = None
    reason: str = ""


def send_started(record: ConversationRecord) -> datetime:
    return parse_iso(record.send_started_at or record.attributes["updated_at"])


def lookup_since(record: ConversationRecord, skew_seconds: float) -> datetime:
    """From when to look: the send's start, less the clocks' possible disagreement."""
    return send_started(record) - timedelta(seconds=skew_seconds)


def check_send(
    sender: Sender,
    credentials: TwilioCredentials,
    record: ConversationRecord,
    company_number: str,
    *,
    now: datetime,
    settle_seconds: float,
    skew_seconds: float,
) -> SendCheck:
    """Ask Twilio about the record's send. Raises what ``Sender.find_sent`` raises
    (``LookupUnavailable``) when Twilio cannot be asked; the caller decides retry or reconciliation."""
    started = send_started(record)
    found = sender.find_sent(
        credentials,
        record.primary_channel,
        company_number,
        started - timedelta(seconds=skew_seconds),
    )
    draft = record.draft
    match, ambiguous = pick_match(found, draft.rendered if draft else None)
    if ambiguous:
        return SendCheck(
            Verdict.UNKNOWN,
            reason=f"{len(found)} messages to this recipient since the send; none matches",
        )
    if match is not None:
        return SendCheck(Verdict.FOUND, match)
    if now - send_started(record) < timedelta(seconds=settle_seconds):
        return SendCheck(Verdict.SETTLING, reason="send not yet visible at Twilio")
    if draft is None:
        return SendCheck(Verdict.UNKNOWN, reason="sending record has no draft to send again")
    return SendCheck(Verdict.ABSENT, reason="confirmed absent after the settle window")


def pick_match(found: list[SentMessage], rendered: str | None) -> tuple[SentMessage | None, bool]:
    """(our message, ambiguous). Nothing found means absent; a body equal to our rendered text is
    ours; a single message with no body to compare is taken as ours; anything else is ambiguous,
    and an ambiguous answer must never lead to a resend."""
    if not found:
        return None, False
    if rendered:
        for message in found:
            if message.body == rendered:
                return message, False
    if len(found) == 1 and not found[0].body:
        return found[0], False
    return None, True


def take_over_send(
    store: ConversationStore,
    record: ConversationRecord,
    *,
    owner: str,
    now: datetime,
    lease_seconds: float,
) -> str:
    """Claim the resend of a send confirmed absent: a new send attempt, conditional on the old
    one, with a lease held through the call (a redelivery meanwhile is busy). Of two takers only
    one wins; the other gets ``StateConflict``. Returns the new send attempt id."""
    send_attempt_id = uuid.uuid4().hex
    store.update(
        record.key,
        Expect.status(Status.SENDING, send_attempt_id=record.send_attempt_id),
        {
            "send_attempt_id": send_attempt_id,
            "send_started_at": iso(now),
            "updated_at": iso(now),
            "lease_owner": owner,
            "lease_expires_at": lease_until(now, lease_seconds),
        },
    )
    return send_attempt_id


def mark_needs_reconciliation(
    store: ConversationStore,
    key: RecordKey,
    send_attempt_id: str | None,
    reason: str,
    now: datetime,
) -> None:
    """``sending`` -> ``needs_reconciliation`` for this send attempt, then the one CRITICAL line
    the alarm and the runbook expect. Raises ``StateConflict`` (the record moved on) or the
    store's ``RetryableError``; then nothing is written and nothing is logged."""
    store.update(
        key,
        Expect.status(Status.SENDING, send_attempt_id=send_attempt_id),
        {**status_change(Status.NEEDS_RECONCILIATION, now), "last_error": reason[:2000]},
    )
    logger.critical(
        "send outcome could not be verified; record needs reconciliation, nothing resent",
        extra={
            "event": NEEDS_RECONCILIATION_EVENT,
            "conversation_id": key.conversation_id,
            "recipient": mask_phone(key.primary_channel),
            "reason": reason,
        },
    )


def ms_since_created(record: ConversationRecord, sent_at: datetime) -> int:
    """Milliseconds from the record's creation to the message, for a send found after the fact."""
    return max(
        0, int((sent_at - parse_iso(record.attributes["created_at"])).total_seconds() * 1000)
    )
