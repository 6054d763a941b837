"""The Sender port without Twilio: each "sent" message is recorded in a local SQLite table.

It refuses what Twilio would refuse (unknown template, bad variables), so a local run fails the
same way a real one would, and it answers ``find_sent`` from its own table.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from channel_processor.adapters.twilio_sender import check_variables, whatsapp_address
from channel_processor.domain import SendRequest, SentMessage, Template, iso, parse_iso, utcnow
from channel_processor.errors import SendRejected
from channel_processor.ports import TwilioCredentials

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandbox_messages (
    sid          TEXT PRIMARY KEY,
    to_address   TEXT NOT NULL,
    from_address TEXT NOT NULL,
    content_sid  TEXT NOT NULL,
    variables    TEXT NOT NULL,
    rendered     TEXT NOT NULL,
    created_at   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sandbox_messages_by_pair
    ON sandbox_messages (to_address, from_address, created_at);
"""

_COLUMNS = "sid, to_address, from_address, content_sid, variables, rendered, created_at"


@dataclass(frozen=True)
class SandboxMessage:
    """One recorded message; addresses carry the ``whatsapp:`` prefix as Twilio's would."""

    sid: str
    to: str
    from_: str
    content_sid: str
    variables: dict[str, str]
    rendered: str
    created_at: datetime


class SandboxSender:
    """``ports.Sender`` that records instead of sending; safe to share between threads."""

    def __init__(
        self,
        sqlite_path: str | Path,
        templates: Mapping[str, Template],
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._templates = dict(templates)
        self._clock = clock
        path = str(sqlite_path)
        if path != ":memory:" and not path.startswith("file:"):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: writes are tiny and the store may share the file.
        self._conn = sqlite3.connect(
            path, timeout=30, check_same_thread=False, isolation_level=None
        )
        self._lock = threading.Lock()
        with self._lock:
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def template(self, credentials: TwilioCredentials, content_sid: str) -> Template:
        try:
            return self._templates[content_sid]
        except KeyError:
            known = ", ".join(sorted(self._templates)) or "none"
            raise SendRejected(
                f"unknown template {content_sid!r} (sandbox templates: {known})",
                code="21655",
            ) from None

    def send(self, credentials: TwilioCredentials, request: SendRequest) -> SentMessage:
        template = self.template(credentials, request.content_sid)
        check_variables(request.variables)
        # Millisecond precision, like every timestamp the record stores.
        now = parse_iso(iso(self._clock()))
        message = SandboxMessage(
            sid="SM" + uuid.uuid4().hex,
            to=whatsapp_address(request.to),
            from_=whatsapp_address(request.from_),
            content_sid=request.content_sid,
            variables=dict(request.variables),
            rendered=template.render(request.variables),
            created_at=now,
        )
        with self._lock:
            self._conn.execute(
                f"INSERT INTO sandbox_messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    message.sid,
                    message.to,
                    message.from_,
                    message.content_sid,
                    json.dumps(message.variables, ensure_ascii=False),
                    message.rendered,
                    iso(message.created_at),
                ),
            )
        return SentMessage(
            sid=message.sid, status="queued", created_at=message.created_at, body=message.rendered
        )

    def find_sent(
        self, credentials: TwilioCredentials, to: str, from_: str, since: datetime
    ) -> list[SentMessage]:
        since_utc = since if since.tzinfo else since.replace(tzinfo=UTC)
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM sandbox_messages"
                " WHERE to_address = ? AND from_address = ? AND created_at >= ?"
                " ORDER BY created_at DESC",
                (whatsapp_address(to), whatsapp_address(from_), iso(since_utc)),
            ).fetchall()
        return [
            SentMessage(sid=m.sid, status="queued", created_at=m.created_at, body=m.rendered)
            for m in map(_message, rows)
        ]

    def messages(self) -> list[SandboxMessage]:
        """Every recorded message, oldest first (for tests and the CLI)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM sandbox_messages ORDER BY created_at, rowid"
            ).fetchall()
        return [_message(row) for row in rows]


def _message(row: tuple[str, str, str, str, str, str, str]) -> SandboxMessage:
    sid, to, from_, content_sid, variables, rendered, created_at = row
    return SandboxMessage(
        sid=sid,
        to=to,
        from_=from_,
        content_sid=content_sid,
        variables={str(k): str(v) for k, v in json.loads(variables).items()},
        rendered=rendered,
        created_at=parse_iso(created_at),
    )
