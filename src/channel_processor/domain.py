"""Conversation record, statuses and the pure decisions of the redelivery rules (no I/O here)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import Enum, StrEnum
from typing import Any


class Status(StrEnum):
    PROCESSING = "processing"
    SENDING = "sending"
    SENT = "initial_message_sent"
    NEEDS_RECONCILIATION = "needs_reconciliation"
    FAILED_SECRETS_FETCH = "failed_secrets_fetch"
    FAILED_TO_PROCESS_AI = "failed_to_process_ai"
    FAILED_TO_SEND_MESSAGE = "failed_to_send_message"
    FAILED_NO_CONSENT = "failed_no_consent"
    FAILED_INVALID_INPUT = "failed_invalid_input"
    FAILED_UNKNOWN = "failed_unknown"

    @property
    def is_final(self) -> bool:
        """No automatic processing will touch a record in this status again."""
        return self not in OPEN_STATUSES


# Records in these statuses carry ``open_status`` so the sparse index finds them (reconciler).
OPEN_STATUSES = frozenset({Status.PROCESSING, Status.SENDING, Status.NEEDS_RECONCILIATION})
FAILED_STATUSES = frozenset(s for s in Status if s.value.startswith("failed_"))

# Attribute names on the record (DynamoDB attribute == SQLite JSON key).
STATUS_ATTR = "conversation_status"
OPEN_STATUS_ATTR = "open_status"
OPEN_INDEX_NAME = "open_status-updated_at-index"

# Each message map is bounded so one append can never push the item near DynamoDB's 400 KB.
MAX_MESSAGE_CONTENT_CHARS = 4096


class Outcome(StrEnum):
    """What one input came to, as reported to the caller (CLI, metrics)."""

    SENT = "sent"
    DUPLICATE = "duplicate"
    FAILED = "failed"
    REJECTED = "rejected"
    RETRY = "retry"


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """The one timestamp format of the record: ISO-8601, UTC, milliseconds, ``Z``."""
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


def parse_iso(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def mask_phone(number: str | None) -> str:
    """``+12025550123`` -> ``+1*******23``: enough to correlate, not enough to identify."""
    if not number:
        return ""
    digits = number.removeprefix("whatsapp:")
    if len(digits) <= 4:
        return "*" * len(digits)
    return digits[:2] + "*" * (len(digits) - 4) + digits[-2:]


@dataclass(frozen=True)
class RecordKey:
    primary_channel: str
    conversation_id: str


@dataclass(frozen=True)
class Draft:
    """The composed template variables, memoised on the record so a retry never re-asks the model."""

    variables: dict[str, str]
    rendered: str
    thread_id: str | None = None
    response_id: str | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def to_item(self) -> dict[str, Any]:
        return {
            "variables": dict(self.variables),
            "rendered": self.rendered,
            "thread_id": self.thread_id,
            "response_id": self.response_id,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> Draft:
        return cls(
            variables={str(k): str(v) for k, v in dict(item.get("variables") or {}).items()},
            rendered=str(item.get("rendered") or ""),
            thread_id=item.get("thread_id"),
            response_id=item.get("response_id"),
            model=item.get("model"),
            prompt_tokens=int(item.get("prompt_tokens") or 0),
            completion_tokens=int(item.get("completion_tokens") or 0),
            total_tokens=int(item.get("total_tokens") or 0),
        )


@dataclass
class ConversationRecord:
    """One conversation as stored; ``attributes`` holds every stored attribute verbatim."""

    attributes: dict[str, Any]

    @property
    def key(self) -> RecordKey:
        return RecordKey(self.attributes["primary_channel"], self.attributes["conversation_id"])

    @property
    def conversation_id(self) -> str:
        return str(self.attributes["conversation_id"])

    @property
    def primary_channel(self) -> str:
        return str(self.attributes["primary_channel"])

    @property
    def status(self) -> Status:
        return Status(self.attributes[STATUS_ATTR])

    @property
    def lease_owner(self) -> str | None:
        return self.attributes.get("lease_owner")

    @property
    def lease_expires_at(self) -> str | None:
        return self.attributes.get("lease_expires_at")

    @property
    def send_attempt_id(self) -> str | None:
        return self.attributes.get("send_attempt_id")

    @property
    def send_started_at(self) -> str | None:
        return self.attributes.get("send_started_at")

    @property
    def attempt_count(self) -> int:
        return int(self.attributes.get("attempt_count") or 0)

    @property
    def thread_id(self) -> str | None:
        return self.attributes.get("thread_id")

    @property
    def draft(self) -> Draft | None:
        item = self.attributes.get("draft")
        return Draft.from_item(item) if item else None

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.attributes.get("messages") or [])

    def lease_is_live(self, now: datetime) -> bool:
        expires = self.lease_expires_at
        return bool(self.lease_owner and expires and parse_iso(expires) > now)


@dataclass(frozen=True)
class Expect:
    """The condition of a conditional write: the record must be in one of ``statuses`` and, where
    given, hold exactly these lease / send-attempt values."""

    statuses: frozenset[Status]
    lease_owner: str | None = None
    lease_expires_at: str | None = None
    send_attempt_id: str | None = None

    @classmethod
    def status(cls, *statuses: Status, **fields: str | None) -> Expect:
        return cls(frozenset(statuses), **fields)

    def matches(self, record: ConversationRecord) -> bool:
        """Reference semantics shared by every store (the contract tests hold them to it)."""
        if record.status not in self.statuses:
            return False
        for name in ("lease_owner", "lease_expires_at", "send_attempt_id"):
            wanted = getattr(self, name)
            if wanted is not None and record.attributes.get(name) != wanted:
                return False
        return True


def status_change(status: Status, now: datetime) -> dict[str, Any]:
    """The attributes every status transition writes, keeping the sparse open index in step."""
    return {
        STATUS_ATTR: status.value,
        "updated_at": iso(now),
        OPEN_STATUS_ATTR: status.value if status in OPEN_STATUSES else None,
    }


RELEASE_LEASE: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}


class ClaimAction(Enum):
    PROCEED = "proceed"  # we created it or own it
    TAKE_OVER = "take_over"  # processing, lease expired: take it conditionally on the old lease
    BUSY = "busy"  # processing, another attempt holds a live lease: retry later
    VERIFY_SEND = "verify_send"  # sending: ask the provider whether the message exists
    DUPLICATE = "duplicate"  # final status: nothing to do


def decide_claim(existing: ConversationRecord, now: datetime) -> ClaimAction:
    """SPEC §4: what a record found at claim time means."""
    status = existing.status
    if status is Status.PROCESSING:
        return ClaimAction.BUSY if existing.lease_is_live(now) else ClaimAction.TAKE_OVER
    if status is Status.SENDING:
        # A live lease means the send may still be in flight (a duplicate SQS message can arrive
        # mid-call): asking Twilio now could find nothing and lead to a second send.
        return ClaimAction.BUSY if existing.lease_is_live(now) else ClaimAction.VERIFY_SEND
    return ClaimAction.DUPLICATE


@dataclass(frozen=True)
class Template:
    """A WhatsApp template: its Content SID, body with ``{{name}}`` placeholders, variable names."""

    sid: str
    body: str
    variables: tuple[str, ...]

    def render(self, values: Mapping[str, str]) -> str:
        return re.sub(
            r"\{\{\s*([^}\s]+)\s*\}\}",
            lambda m: values.get(m.group(1), m.group(0)),
            self.body,
        )


_WHITESPACE_RUN = re.compile(r"\s+")


def sanitise_variables(
    values: Mapping[str, Any], expected: tuple[str, ...]
) -> tuple[dict[str, str], list[str]]:
    """Clean variables to Twilio's rules (one line, no tabs, no runs of spaces) and list what is
    still wrong: missing or unexpected keys, values empty after cleaning."""
    problems: list[str] = []
    cleaned: dict[str, str] = {}
    missing = [name for name in expected if name not in values]
    extra = [str(name) for name in values if name not in expected]
    if missing:
        problems.append(f"missing variables: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected variables: {', '.join(sorted(extra))}")
    for name in expected:
        if name not in values:
            continue
        raw = values[name]
        text = _WHITESPACE_RUN.sub(" ", "" if raw is None else str(raw)).strip()
        if not text:
            problems.append(f"variable {name!r} is empty after cleaning")
        cleaned[name] = text
    return cleaned, problems


@dataclass(frozen=True)
class SendRequest:
    to: str  # E.164, no channel prefix: the sender adds ``whatsapp:``
    from_: str
    content_sid: str
    variables: dict[str, str]
    messaging_service_sid: str | None = None
    status_callback: str | None = None


@dataclass(frozen=True)
class SentMessage:
    """A message as the provider knows it (answer to a send, or found by a lookup)."""

    sid: str
    status: str
    created_at: datetime | None = None
    body: str | None = None


def message_entry(*, sid: str, at: datetime, content: str, draft: Draft | None) -> dict[str, Any]:
    """The map appended to ``messages`` on success (SPEC §3), content bounded."""
    return {
        "message_id": sid,
        "timestamp": iso(at),
        "role": "assistant",
        "content": content[:MAX_MESSAGE_CONTENT_CHARS],
        "prompt_tokens": draft.prompt_tokens if draft else 0,
        "completion_tokens": draft.completion_tokens if draft else 0,
        "total_tokens": draft.total_tokens if draft else 0,
    }


@dataclass(frozen=True)
class PendingFinalUpdate:
    """The Step 8 update that must land on the record; also the repair-log entry's payload."""

    primary_channel: str
    conversation_id: str
    send_attempt_id: str
    message_sid: str
    thread_id: str | None
    updated_at: str
    processing_time_ms: int
    message: dict[str, Any] = field(default_factory=dict)
    repair_id: str | None = None

    @property
    def key(self) -> RecordKey:
        return RecordKey(self.primary_channel, self.conversation_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repair_id": self.repair_id,
            "primary_channel": self.primary_channel,
            "conversation_id": self.conversation_id,
            "send_attempt_id": self.send_attempt_id,
            "new_status": Status.SENT.value,
            "message_sid": self.message_sid,
            "thread_id": self.thread_id,
            "updated_at": self.updated_at,
            "processing_time_ms": self.processing_time_ms,
            "message": dict(self.message),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PendingFinalUpdate:
        return cls(
            primary_channel=str(data["primary_channel"]),
            conversation_id=str(data["conversation_id"]),
            send_attempt_id=str(data["send_attempt_id"]),
            message_sid=str(data["message_sid"]),
            thread_id=data.get("thread_id"),
            updated_at=str(data["updated_at"]),
            processing_time_ms=int(data["processing_time_ms"]),
            message=dict(data.get("message") or {}),
            repair_id=data.get("repair_id"),
        )

    def with_repair_id(self, repair_id: str) -> PendingFinalUpdate:
        return replace(self, repair_id=repair_id)

    def changes(self) -> dict[str, Any]:
        """The attribute changes of the final update (the message is appended separately)."""
        return {
            STATUS_ATTR: Status.SENT.value,
            "updated_at": self.updated_at,
            OPEN_STATUS_ATTR: None,
            "thread_id": self.thread_id,
            "initial_processing_time_ms": self.processing_time_ms,
            "message_sid": self.message_sid,
            **RELEASE_LEASE,
        }


def lease_until(now: datetime, seconds: float) -> str:
    return iso(now + timedelta(seconds=seconds))
