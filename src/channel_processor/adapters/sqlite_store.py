"""The embedded back end: conversation records, repair log and dead letters in one SQLite file.

Conditional writes behave exactly as on DynamoDB: each is a read-check-write inside one
``BEGIN IMMEDIATE`` transaction, so threads and processes sharing the file serialise on it.
"""

from __future__ import annotations

import builtins
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from channel_processor.adapters.dynamodb_store import (
    ATTEMPT_COUNT_ATTR,
    MESSAGES_ATTR,
    check_changes,
    from_storage,
    is_blank,
    new_item,
    to_storable,
)
from channel_processor.domain import (
    OPEN_STATUS_ATTR,
    ConversationRecord,
    Expect,
    PendingFinalUpdate,
    RecordKey,
    Status,
    iso,
    utcnow,
)
from channel_processor.errors import (
    ProcessorError,
    RecordExists,
    StateConflict,
    StoreUnavailable,
)
from channel_processor.ports import RepairEntry

log = logging.getLogger(__name__)

# The one translation table of sqlite3 errors, looked up along the exception's MRO. Every
# database failure means "try again later" to the pipeline (SQS redelivers; the DLQ catches what
# never heals); the extended error code is logged when it is not an expected transient one.
SQLITE_ERRORS: Mapping[type[sqlite3.Error], type[ProcessorError]] = {
    sqlite3.OperationalError: StoreUnavailable,  # locked, busy, I/O, disk full, cannot open
    sqlite3.IntegrityError: StoreUnavailable,
    sqlite3.DataError: StoreUnavailable,
    sqlite3.InternalError: StoreUnavailable,
    sqlite3.NotSupportedError: StoreUnavailable,
    sqlite3.ProgrammingError: StoreUnavailable,  # e.g. a closed database
    sqlite3.InterfaceError: StoreUnavailable,
    sqlite3.DatabaseError: StoreUnavailable,  # corrupt file, not a database
    sqlite3.Error: StoreUnavailable,
}
# Primary result codes that are a normal consequence of sharing the file: not worth a warning.
EXPECTED_CODES = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})


def translate(exc: sqlite3.Error) -> ProcessorError:
    """Map a sqlite3 exception to the processor's error tree (the only place that does it)."""
    error = next(
        (SQLITE_ERRORS[cls] for cls in type(exc).__mro__ if cls in SQLITE_ERRORS),
        StoreUnavailable,
    )
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    if not any(str(name).startswith(code) for code in EXPECTED_CODES):
        log.warning("SQLite error %s: %s", name, exc)
    return error(f"SQLite: {name}: {exc}")


def dumps(value: Any) -> str:
    """JSON text with ``Decimal`` written as a JSON number (``json`` would refuse or round it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


def loads(text: str) -> Any:
    """Inverse of ``dumps``: fractions come back as ``Decimal``, whole numbers as ``int``."""
    return from_storage(json.loads(text, parse_float=Decimal))


class SQLiteDatabase:
    """One connection to the file, shared by the threads of this process under a lock; other
    processes coordinate through SQLite's file locks (WAL mode, busy timeout)."""

    def __init__(self, path: str | Path, busy_timeout_seconds: float = 5.0) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN ourselves, so a transaction is exactly what
            # the code says (the module's implicit transactions start too late for a lock).
            self._connection = sqlite3.connect(
                self.path,
                timeout=busy_timeout_seconds,
                isolation_level=None,
                check_same_thread=False,
            )
            self._connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_seconds * 1000)}")
            self._connection.execute("PRAGMA journal_mode = WAL")
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        except OSError as exc:
            raise StoreUnavailable(f"SQLite: cannot open {self.path}: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the database's write lock from its first statement."""
        with self._lock:
            try:
                self._connection.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise translate(exc) from exc
            try:
                yield self._connection
                self._connection.execute("COMMIT")
            except BaseException as exc:
                if self._connection.in_transaction:
                    self._connection.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise translate(exc) from exc
                raise

    def read(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._connection.execute(sql, parameters).fetchall()
            except sqlite3.Error as exc:
                raise translate(exc) from exc

    def script(self, sql: str) -> None:
        with self.transaction() as connection:
            for statement in sql.split(";"):
                if statement.strip():
                    connection.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._connection.close()


_CONVERSATIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    primary_channel TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    open_status TEXT,
    updated_at TEXT,
    record TEXT NOT NULL,
    PRIMARY KEY (primary_channel, conversation_id)
);
CREATE INDEX IF NOT EXISTS conversations_open
    ON conversations (open_status, updated_at) WHERE open_status IS NOT NULL
"""


class SQLiteConversationStore:
    """``ports.ConversationStore`` in a SQLite file; records kept as JSON with the indexed
    columns the open-status query needs."""

    def __init__(self, path: str | Path, busy_timeout_seconds: float = 5.0) -> None:
        self._db = SQLiteDatabase(path, busy_timeout_seconds)
        self._db.script(_CONVERSATIONS_SCHEMA)

    def create(self, item: Mapping[str, Any]) -> ConversationRecord:
        attributes = from_storage(new_item(item))
        key = RecordKey(attributes["primary_channel"], attributes["conversation_id"])
        with self._db.transaction() as connection:
            existing = self._select(connection, key)
            if existing is not None:
                raise RecordExists(existing)
            connection.execute(
                "INSERT INTO conversations VALUES (?, ?, ?, ?, ?)",
                (*self._columns(key, attributes), dumps(attributes)),
            )
        return ConversationRecord(attributes)

    def get(self, key: RecordKey) -> ConversationRecord | None:
        rows = self._db.read(
            "SELECT record FROM conversations WHERE primary_channel = ? AND conversation_id = ?",
            (key.primary_channel, key.conversation_id),
        )
        return ConversationRecord(loads(rows[0][0])) if rows else None

    def update(
        self,
        key: RecordKey,
        expect: Expect,
        changes: Mapping[str, Any],
        append_message: Mapping[str, Any] | None = None,
        increment_attempts: bool = False,
    ) -> ConversationRecord:
        check_changes(changes, append_message, increment_attempts)
        with self._db.transaction() as connection:
            record = self._select(connection, key)
            if record is None or not _matches(expect, record):
                raise StateConflict(
                    f"{key.conversation_id!r} is missing or not in the expected state"
                )
            attributes = apply_changes(
                record.attributes, changes, append_message, increment_attempts
            )
            connection.execute(
                "UPDATE conversations SET open_status = ?, updated_at = ?, record = ? "
                "WHERE primary_channel = ? AND conversation_id = ?",
                (
                    *self._columns(key, attributes)[2:],
                    dumps(attributes),
                    key.primary_channel,
                    key.conversation_id,
                ),
            )
        return ConversationRecord(attributes)

    def find(self, conversation_id: str) -> list[ConversationRecord]:
        rows = self._db.read(
            "SELECT record FROM conversations WHERE conversation_id = ? ORDER BY primary_channel",
            (conversation_id,),
        )
        return [ConversationRecord(loads(row[0])) for row in rows]

    def list_open(
        self, status: Status, updated_before: datetime, limit: int = 100
    ) -> list[ConversationRecord]:
        rows = self._db.read(
            "SELECT record FROM conversations WHERE open_status = ? AND updated_at < ? "
            "ORDER BY updated_at ASC LIMIT ?",
            (status.value, iso(updated_before), max(1, limit)),
        )
        return [ConversationRecord(loads(row[0])) for row in rows]

    def close(self) -> None:
        self._db.close()

    @staticmethod
    def _select(connection: sqlite3.Connection, key: RecordKey) -> ConversationRecord | None:
        row = connection.execute(
            "SELECT record FROM conversations WHERE primary_channel = ? AND conversation_id = ?",
            (key.primary_channel, key.conversation_id),
        ).fetchone()
        return ConversationRecord(loads(row[0])) if row else None

    @staticmethod
    def _columns(key: RecordKey, attributes: Mapping[str, Any]) -> tuple[Any, ...]:
        return (
            key.primary_channel,
            key.conversation_id,
            attributes.get(OPEN_STATUS_ATTR),
            attributes.get("updated_at"),
        )


def _matches(expect: Expect, record: ConversationRecord) -> bool:
    try:
        return expect.matches(record)
    except (KeyError, ValueError):  # no status, or one this version does not know: no match
        return False


def apply_changes(
    attributes: Mapping[str, Any],
    changes: Mapping[str, Any],
    append_message: Mapping[str, Any] | None,
    increment_attempts: bool,
) -> dict[str, Any]:
    """The record after an update, computed the way DynamoDB's update expression would."""
    result = dict(attributes)
    for name, value in changes.items():
        if is_blank(name, value):
            result.pop(name, None)
        else:
            result[name] = from_storage(to_storable(value))
    if append_message is not None:
        message = from_storage(to_storable(dict(append_message)))
        result[MESSAGES_ATTR] = [*(result.get(MESSAGES_ATTR) or []), message]
    if increment_attempts:
        result[ATTEMPT_COUNT_ATTR] = int(result.get(ATTEMPT_COUNT_ATTR) or 0) + 1
    return result


_REPAIR_SCHEMA = """
CREATE TABLE IF NOT EXISTS repair_log (
    id TEXT PRIMARY KEY,
    payload TEXT NOT NULL,
    created_at TEXT NOT NULL,
    visible_after REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS repair_log_visible ON repair_log (visible_after)
"""


class SQLiteRepairLog:
    """``ports.RepairLog`` as a table; a received entry stays invisible for ``visibility_seconds``
    (like an SQS message) so two reconcilers never work on it at the same time."""

    def __init__(
        self,
        path: str | Path,
        visibility_seconds: float = 30.0,
        busy_timeout_seconds: float = 5.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        # Wall-clock time, not monotonic: other processes read the same visible_after values.
        self._now = now
        self._visibility = visibility_seconds
        self._db = SQLiteDatabase(path, busy_timeout_seconds)
        self._db.script(_REPAIR_SCHEMA)

    def put(self, update: PendingFinalUpdate) -> str:
        repair_id = update.repair_id or uuid.uuid4().hex
        payload = dumps(to_storable(update.with_repair_id(repair_id).to_dict()))
        with self._db.transaction() as connection:
            connection.execute(
                "INSERT OR REPLACE INTO repair_log VALUES (?, ?, ?, ?)",
                (repair_id, payload, iso(utcnow()), 0.0),
            )
        return repair_id

    def receive(self, max_entries: int = 10) -> list[RepairEntry]:
        now = self._now()
        entries: list[RepairEntry] = []
        with self._db.transaction() as connection:
            rows = connection.execute(
                "SELECT id, payload FROM repair_log WHERE visible_after <= ? "
                "ORDER BY created_at, id LIMIT ?",
                (now, max(1, max_entries)),
            ).fetchall()
            for repair_id, payload in rows:
                connection.execute(
                    "UPDATE repair_log SET visible_after = ? WHERE id = ?",
                    (now + self._visibility, repair_id),
                )
                update = PendingFinalUpdate.from_dict(loads(payload)).with_repair_id(repair_id)
                entries.append(RepairEntry(update=update, handle=repair_id))
        return entries

    def ack(self, entry: RepairEntry) -> None:
        with self._db.transaction() as connection:
            connection.execute("DELETE FROM repair_log WHERE id = ?", (entry.handle,))

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class DeadLetter:
    """An input that can never succeed, as stored by ``SQLiteDeadLetters`` (for the CLI)."""

    id: int
    body: str
    reasons: tuple[str, ...]
    message_id: str | None
    created_at: str


_DEAD_LETTER_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL,
    reasons TEXT NOT NULL,
    message_id TEXT,
    created_at TEXT NOT NULL
)
"""


class SQLiteDeadLetters:
    """``ports.DeadLetters`` as a table the CLI can list."""

    def __init__(self, path: str | Path, busy_timeout_seconds: float = 5.0) -> None:
        self._db = SQLiteDatabase(path, busy_timeout_seconds)
        self._db.script(_DEAD_LETTER_SCHEMA)

    def forward(self, body: str, reasons: Sequence[str], message_id: str | None) -> None:
        with self._db.transaction() as connection:
            connection.execute(
                "INSERT INTO dead_letters (body, reasons, message_id, created_at) "
                "VALUES (?, ?, ?, ?)",
                (body, json.dumps([str(r) for r in reasons]), message_id, iso(utcnow())),
            )

    def list(self, limit: int | None = None) -> builtins.list[DeadLetter]:
        """Stored dead letters, oldest first."""
        rows = self._db.read(
            "SELECT id, body, reasons, message_id, created_at FROM dead_letters "
            "ORDER BY id LIMIT ?",
            (-1 if limit is None else limit,),
        )
        return [
            DeadLetter(
                id=row[0],
                body=row[1],
                reasons=tuple(json.loads(row[2])),
                message_id=row[3],
                created_at=row[4],
            )
            for row in rows
        ]

    def remove(self, letter_id: int) -> None:
        """Delete one letter (after a local redrive dealt with it). Idempotent."""
        with self._db.transaction() as connection:
            connection.execute("DELETE FROM dead_letters WHERE id = ?", (letter_id,))

    def close(self) -> None:
        self._db.close()
