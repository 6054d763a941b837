"""In-memory stand-ins for the storage and SQS ports, with the real adapters' semantics (the
contract tests hold them to it) and a ``script`` hook to inject failures."""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from channel_processor.adapters.dynamodb_store import check_changes, from_storage, new_item
from channel_processor.adapters.sqlite_store import apply_changes
from channel_processor.domain import (
    OPEN_STATUS_ATTR,
    ConversationRecord,
    Expect,
    PendingFinalUpdate,
    RecordKey,
    Status,
    iso,
)
from channel_processor.errors import RecordExists, StateConflict
from channel_processor.ports import RepairEntry

# script(op_name, key): called before each operation; raise from it to make the operation fail.
# op_name is "create", "get", "update", "find" or "list_open" (the last two: key None). It runs outside the store's
# lock, so it may look at the store with ``peek`` (e.g. fail only the update of a ``sending``
# record, which is the final update).
StoreScript = Callable[[str, RecordKey | None], None]


class FakeConversationStore:
    """``ports.ConversationStore`` in a dict; thread-safe; records copied in and out."""

    def __init__(self, script: StoreScript | None = None) -> None:
        self.script = script
        self.calls: list[tuple[str, RecordKey | None]] = []
        self._records: dict[RecordKey, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def create(self, item: Mapping[str, Any]) -> ConversationRecord:
        attributes = from_storage(new_item(item))
        key = RecordKey(attributes["primary_channel"], attributes["conversation_id"])
        self._before("create", key)
        with self._lock:
            existing = self._records.get(key)
            if existing is not None:
                raise RecordExists(ConversationRecord(copy.deepcopy(existing)))
            self._records[key] = attributes
            return ConversationRecord(copy.deepcopy(attributes))

    def get(self, key: RecordKey) -> ConversationRecord | None:
        self._before("get", key)
        return self.peek(key)

    def update(
        self,
        key: RecordKey,
        expect: Expect,
        changes: Mapping[str, Any],
        append_message: Mapping[str, Any] | None = None,
        increment_attempts: bool = False,
    ) -> ConversationRecord:
        check_changes(changes, append_message, increment_attempts)
        self._before("update", key)
        with self._lock:
            current = self._records.get(key)
            if current is None or not _matches(expect, ConversationRecord(current)):
                raise StateConflict(
                    f"{key.conversation_id!r} is missing or not in the expected state"
                )
            updated = apply_changes(current, changes, append_message, increment_attempts)
            self._records[key] = updated
            return ConversationRecord(copy.deepcopy(updated))

    def find(self, conversation_id: str) -> list[ConversationRecord]:
        self._before("find", None)
        with self._lock:
            found = [a for a in self._records.values() if a["conversation_id"] == conversation_id]
        return [ConversationRecord(copy.deepcopy(a)) for a in found]

    def list_open(
        self, status: Status, updated_before: datetime, limit: int = 100
    ) -> list[ConversationRecord]:
        self._before("list_open", None)
        cutoff = iso(updated_before)
        with self._lock:
            found = [
                a
                for a in self._records.values()
                if a.get(OPEN_STATUS_ATTR) == status.value and str(a.get("updated_at")) < cutoff
            ]
        found.sort(key=lambda a: str(a.get("updated_at")))
        return [ConversationRecord(copy.deepcopy(a)) for a in found[: max(1, limit)]]

    # -- test helpers ---------------------------------------------------------------------

    def peek(self, key: RecordKey) -> ConversationRecord | None:
        """The stored record, bypassing the script (for assertions and scripts)."""
        with self._lock:
            attributes = self._records.get(key)
            return ConversationRecord(copy.deepcopy(attributes)) if attributes else None

    def all(self) -> list[ConversationRecord]:
        with self._lock:
            return [ConversationRecord(copy.deepcopy(a)) for a in self._records.values()]

    def _before(self, op: str, key: RecordKey | None) -> None:
        self.calls.append((op, key))
        if self.script is not None:
            self.script(op, key)


def _matches(expect: Expect, record: ConversationRecord) -> bool:
    try:
        return expect.matches(record)
    except (KeyError, ValueError):
        return False


# script(op_name, argument): op_name "put" (the update), "receive" (None) or "ack" (the entry).
LogScript = Callable[[str, Any], None]


class FakeRepairLog:
    """``ports.RepairLog`` in a list; received entries hide for ``visibility_seconds``."""

    def __init__(
        self,
        script: LogScript | None = None,
        visibility_seconds: float = 30.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.script = script
        self._visibility = visibility_seconds
        self._now = now
        self._lock = threading.Lock()
        # repair_id -> (update, visible_after)
        self._entries: dict[str, tuple[PendingFinalUpdate, float]] = {}
        self.acked: list[str] = []

    @property
    def pending(self) -> list[PendingFinalUpdate]:
        """Every entry not yet acknowledged, visible or not."""
        with self._lock:
            return [update for update, _ in self._entries.values()]

    def put(self, update: PendingFinalUpdate) -> str:
        if self.script is not None:
            self.script("put", update)
        repair_id = update.repair_id or uuid.uuid4().hex
        with self._lock:
            self._entries[repair_id] = (update.with_repair_id(repair_id), 0.0)
        return repair_id

    def receive(self, max_entries: int = 10) -> list[RepairEntry]:
        if self.script is not None:
            self.script("receive", None)
        now = self._now()
        received: list[RepairEntry] = []
        with self._lock:
            for repair_id, (update, visible_after) in list(self._entries.items()):
                if len(received) >= max(1, max_entries):
                    break
                if visible_after <= now:
                    self._entries[repair_id] = (update, now + self._visibility)
                    received.append(RepairEntry(update=update, handle=repair_id))
        return received

    def ack(self, entry: RepairEntry) -> None:
        if self.script is not None:
            self.script("ack", entry)
        with self._lock:
            if self._entries.pop(entry.handle, None) is not None:
                self.acked.append(entry.handle)


@dataclass(frozen=True)
class ForwardedLetter:
    body: str
    reasons: tuple[str, ...]
    message_id: str | None


class FakeDeadLetters:
    """``ports.DeadLetters`` in a list (``forwarded``); ``script(body, reasons)`` may raise."""

    def __init__(self, script: Callable[[str, Sequence[str]], None] | None = None) -> None:
        self.script = script
        self.forwarded: list[ForwardedLetter] = []
        self._lock = threading.Lock()

    def forward(self, body: str, reasons: Sequence[str], message_id: str | None) -> None:
        if self.script is not None:
            self.script(body, reasons)
        with self._lock:
            self.forwarded.append(ForwardedLetter(body, tuple(str(r) for r in reasons), message_id))


class FakeVisibilityExtender:
    """``ports.VisibilityExtender`` recording ``(receipt_handle, seconds)`` in ``calls`` (the call
    is recorded even when it fails); ``script(receipt_handle, seconds)`` may raise ``LeaseLost`` or
    ``StoreUnavailable`` (``len(fake.calls)`` tells a script which call this is)."""

    def __init__(self, script: Callable[[str, int], None] | None = None) -> None:
        self.script = script
        self.calls: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def extend(self, receipt_handle: str, seconds: int) -> None:
        with self._lock:
            self.calls.append((receipt_handle, seconds))
        if self.script is not None:
            self.script(receipt_handle, seconds)
