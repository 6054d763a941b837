"""The ports: what the pipeline needs from the outside world, as small typed protocols.

Adapters implement them (``adapters/``); SDK types and SDK exceptions never cross a port, each
adapter translates its library's exceptions into ``errors`` in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from channel_processor.domain import (
    ConversationRecord,
    Draft,
    Expect,
    PendingFinalUpdate,
    RecordKey,
    SendRequest,
    SentMessage,
    Status,
    Template,
)


class ConversationStore(Protocol):
    """The conversation records; the conditional write is the lock."""

    def create(self, item: Mapping[str, Any]) -> ConversationRecord:
        """Write a new record if none exists with its key (atomic, conditional).

        ``item`` holds every attribute, keys included; ``None`` values and empty strings in
        sparse attributes are not written. Raises ``RecordExists`` carrying the stored record when
        the key is taken (and only then), ``StoreUnavailable`` on throttling or outage.
        """
        ...

    def get(self, key: RecordKey) -> ConversationRecord | None:
        """Strongly consistent read. Raises ``StoreUnavailable``."""
        ...

    def update(
        self,
        key: RecordKey,
        expect: Expect,
        changes: Mapping[str, Any],
        append_message: Mapping[str, Any] | None = None,
        increment_attempts: bool = False,
    ) -> ConversationRecord:
        """Apply ``changes`` (``None`` removes the attribute) if ``expect`` holds, atomically.

        ``append_message`` is appended to ``messages`` (created when missing);
        ``increment_attempts`` adds one to ``attempt_count``. Returns the record as written.
        Raises ``StateConflict`` when the record is missing or ``expect`` does not hold (nothing
        written), ``StoreUnavailable`` on throttling or outage (the write may not have happened).
        """
        ...

    def find(self, conversation_id: str) -> list[ConversationRecord]:
        """Every record with this conversation id, whatever its recipient (operator look-ups;
        on DynamoDB this is a filtered scan, so it is not for the hot path)."""
        ...

    def list_open(
        self, status: Status, updated_before: datetime, limit: int = 100
    ) -> list[ConversationRecord]:
        """Records in an open status (processing / sending / needs_reconciliation) last updated
        before the given moment, oldest first, read from the sparse open-status index."""
        ...


@dataclass(frozen=True)
class RepairEntry:
    """A repair-log entry as received: the pending update and the handle to acknowledge it."""

    update: PendingFinalUpdate
    handle: str


class RepairLog(Protocol):
    """Durable log of final updates that could not be written (SQS queue / SQLite table)."""

    def put(self, update: PendingFinalUpdate) -> str:
        """Store the pending update; returns the entry id. Raises ``StoreUnavailable``."""
        ...

    def receive(self, max_entries: int = 10) -> list[RepairEntry]:
        """Entries not yet acknowledged; an entry received but not acknowledged comes back."""
        ...

    def ack(self, entry: RepairEntry) -> None:
        """Remove the entry for good. Idempotent."""
        ...


class DeadLetters(Protocol):
    """Where inputs that can never succeed go, with their reasons (the queue's DLQ)."""

    def forward(self, body: str, reasons: Sequence[str], message_id: str | None) -> None:
        """Store the raw body and why it failed. Raises ``StoreUnavailable`` (then do not ack)."""
        ...


class SecretSource(Protocol):
    def get(self, name: str) -> str:
        """The secret's string value. Raises ``SecretInvalid`` when it does not exist,
        ``SecretsUnavailable`` on throttling or outage. Never logs the value."""
        ...


@dataclass(frozen=True)
class TwilioCredentials:
    account_sid: str
    auth_token: str
    template_sid: str
    messaging_service_sid: str | None = None

    def __repr__(self) -> str:  # the token must never reach a log line through repr()
        return f"TwilioCredentials(account_sid={self.account_sid!r}, auth_token='***')"


@dataclass(frozen=True)
class ComposeRequest:
    template: Template
    context: Mapping[str, Any]  # the validated Context Object as plain JSON data
    api_key: str | None  # None for composers that need no key
    model: str | None = None
    instructions: str | None = None
    thread_id: str | None = None  # reuse the OpenAI conversation when a retry already made one
    feedback: str | None = None  # why the previous answer was refused (re-ask)
    timeout_seconds: float = 20.0


class Composer(Protocol):
    def compose(self, request: ComposeRequest) -> Draft:
        """Values for the template's variables (not yet sanitised: the pipeline checks them).

        Raises ``ComposeFailed`` (permanent: quota, refusal, bad key), ``ComposerUnavailable``.
        """
        ...


class Sender(Protocol):
    def template(self, credentials: TwilioCredentials, content_sid: str) -> Template:
        """The template's body and variable names (cached per container by the adapter).
        Raises ``SendRejected`` when it does not exist, ``SendThrottled`` when unreachable."""
        ...

    def send(self, credentials: TwilioCredentials, request: SendRequest) -> SentMessage:
        """Send once, never retried inside. Raises ``SendRejected`` (permanent 4xx),
        ``SendThrottled`` (429: nothing sent), ``SendOutcomeUnknown`` (timeout, 5xx, reset)."""
        ...

    def find_sent(
        self, credentials: TwilioCredentials, to: str, from_: str, since: datetime
    ) -> list[SentMessage]:
        """Messages from ``from_`` to ``to`` created at or after ``since``.
        Raises ``LookupUnavailable`` when the provider cannot be asked."""
        ...


class VisibilityExtender(Protocol):
    def extend(self, receipt_handle: str, seconds: int) -> None:
        """Keep the message invisible ``seconds`` more from now. Raises ``LeaseLost`` when the
        handle is invalid or expired, ``StoreUnavailable`` on throttling."""
        ...


class Clock(Protocol):
    def now(self) -> datetime: ...

    def sleep(self, seconds: float) -> None: ...
