"""In-memory ``Sender`` for unit tests: records sends, answers lookups from them, and lets a test
script any call (raise, return something else, or accept the message and then raise)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from channel_processor.adapters.twilio_sender import check_variables, whatsapp_address
from channel_processor.domain import SendRequest, SentMessage, Template, utcnow
from channel_processor.errors import SendRejected
from channel_processor.ports import TwilioCredentials

DEFAULT_TEMPLATE = Template(
    sid="HX" + "b" * 32,
    body="Hi {{1}}, {{2}} from {{3}} here. Can we talk about your project?",
    variables=("1", "2", "3"),
)


@dataclass(frozen=True)
class FindSentQuery:
    """What ``find_sent`` was asked (the ``request`` a script sees for op ``"find_sent"``)."""

    to: str
    from_: str
    since: datetime


@dataclass(frozen=True)
class AcceptThenRaise:
    """Return this from a script for ``"send"``: the message is recorded (it exists at the
    provider), then ``error`` is raised, as when Twilio accepted it but the answer was lost."""

    error: BaseException


@dataclass(frozen=True)
class Sent:
    """One message the fake accepted."""

    credentials: TwilioCredentials
    request: SendRequest
    message: SentMessage


# script(op, request) -> None (default behaviour) | a value to return instead | raises.
# op is "template" (request: the content SID), "send" (SendRequest), "find_sent" (FindSentQuery).
Script = Callable[[str, Any], Any]


@dataclass
class FakeSender:
    script: Script | None = None
    templates: dict[str, Template] = field(
        default_factory=lambda: {DEFAULT_TEMPLATE.sid: DEFAULT_TEMPLATE}
    )
    clock: Callable[[], datetime] = utcnow
    sent: list[Sent] = field(default_factory=list)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _scripted(self, op: str, request: Any) -> Any:
        with self._lock:
            self.calls.append((op, request))
        return self.script(op, request) if self.script is not None else None

    def sends_to(self, number: str) -> int:
        wanted = whatsapp_address(number)
        with self._lock:
            return sum(1 for s in self.sent if whatsapp_address(s.request.to) == wanted)

    def template(self, credentials: TwilioCredentials, content_sid: str) -> Template:
        scripted = self._scripted("template", content_sid)
        if scripted is not None:
            return _expect(scripted, Template)
        try:
            return self.templates[content_sid]
        except KeyError:
            raise SendRejected(f"unknown template {content_sid!r}", code="20404") from None

    def send(self, credentials: TwilioCredentials, request: SendRequest) -> SentMessage:
        scripted = self._scripted("send", request)
        if scripted is not None and not isinstance(scripted, AcceptThenRaise):
            return _expect(scripted, SentMessage)
        check_variables(request.variables)
        template = self.templates.get(request.content_sid)
        message = SentMessage(
            sid="SM" + uuid.uuid4().hex,
            status="queued",
            created_at=self.clock(),
            body=template.render(request.variables) if template else None,
        )
        with self._lock:
            self.sent.append(Sent(credentials, request, message))
        if isinstance(scripted, AcceptThenRaise):
            raise scripted.error
        return message

    def find_sent(
        self, credentials: TwilioCredentials, to: str, from_: str, since: datetime
    ) -> list[SentMessage]:
        query = FindSentQuery(to, from_, since)
        scripted = self._scripted("find_sent", query)
        if scripted is not None:
            return list(scripted)
        since_utc = since if since.tzinfo else since.replace(tzinfo=UTC)
        with self._lock:
            return [
                s.message
                for s in self.sent
                if whatsapp_address(s.request.to) == whatsapp_address(to)
                and whatsapp_address(s.request.from_) == whatsapp_address(from_)
                and s.message.created_at is not None
                and s.message.created_at >= since_utc
            ]


def _expect(value: Any, kind: type[Any]) -> Any:
    if not isinstance(value, kind):
        raise TypeError(f"script returned {type(value).__name__}, expected {kind.__name__}")
    return value
