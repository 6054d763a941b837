"""A local HTTP fake of the Twilio endpoints the Sender uses (Messages create/list, Content fetch),
with fault knobs, so the adapter is tested through the real SDK and a real socket.

The SDK's hosts are all rewritten to one base URL, so requests are routed by path alone.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from channel_processor.ports import TwilioCredentials

Op = Literal["create", "list", "content"]

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "fake-auth-token-0123456789abcdef"
CONTENT_SID = "HX" + "a" * 32
CONTENT_BODY = "Hi {{1}}, {{2}} from {{3}} here. Can we talk about your project?"
CONTENT_VARIABLES = {"1": "first_name", "2": "company_rep", "3": "company_name"}

_MESSAGES_PATH = re.compile(r"^/2010-04-01/Accounts/(?P<account>[^/]+)/Messages\.json$")
_CONTENT_PATH = re.compile(r"^/v1/Content/(?P<sid>[^/]+)$")
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_PLACEHOLDER = re.compile(r"\{\{\s*([^}\s]+)\s*\}\}")


@dataclass
class Fault:
    """How the fake misbehaves on a call.

    delay:  seconds to wait before answering (after storing the message when ``accept``).
    status/code: answer this HTTP status with Twilio's JSON error body instead of the result.
    accept: for a create, store the message first (it exists at "Twilio"), then misbehave.
    drop:   close the connection without any answer.
    """

    delay: float = 0.0
    status: int | None = None
    code: int | None = None
    message: str | None = None
    accept: bool = False
    drop: bool = False


@dataclass
class _Rule:
    fault: Fault
    calls: frozenset[int] | None  # 1-based call numbers of that op; None means every call


@dataclass
class Content:
    sid: str
    body: str
    variables: dict[str, str]
    types: dict[str, Any] | None = None

    def to_json(self, account_sid: str) -> dict[str, Any]:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "sid": self.sid,
            "account_sid": account_sid,
            "friendly_name": f"template_{self.sid[-6:]}",
            "language": "en",
            "variables": dict(self.variables),
            "types": self.types or {"twilio/text": {"body": self.body}},
            "url": f"https://content.twilio.com/v1/Content/{self.sid}",
            "date_created": now,
            "date_updated": now,
            "links": {
                "approval_fetch": f"https://content.twilio.com/v1/Content/{self.sid}/ApprovalRequests"
            },
        }


@dataclass
class StoredMessage:
    sid: str
    account_sid: str
    to: str
    from_: str
    body: str
    content_sid: str | None
    content_variables: str | None
    messaging_service_sid: str | None
    status_callback: str | None
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        stamp = format_datetime(self.created_at.replace(microsecond=0), usegmt=False)
        uri = f"/2010-04-01/Accounts/{self.account_sid}/Messages/{self.sid}.json"
        return {
            "sid": self.sid,
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": self.body,
            "date_created": stamp,
            "date_updated": stamp,
            # Like Twilio, a message still queued has not been sent: no date_sent yet.
            "date_sent": None,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": self.from_,
            "messaging_service_sid": self.messaging_service_sid,
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "status": "queued",
            "subresource_uris": {"media": uri.replace(".json", "/Media.json")},
            "to": self.to,
            "uri": uri,
        }


@dataclass
class TwilioFake:
    """State and knobs of the fake; ``base_url`` is what ``TwilioSender(base_url=...)`` takes."""

    base_url: str = ""
    accounts: dict[str, str] = field(default_factory=lambda: {ACCOUNT_SID: AUTH_TOKEN})
    contents: dict[str, Content] = field(default_factory=dict)
    creates: list[dict[str, str]] = field(default_factory=list)  # every create received
    messages: list[StoredMessage] = field(default_factory=list)  # every message accepted
    calls: dict[str, int] = field(default_factory=lambda: {"create": 0, "list": 0, "content": 0})
    _rules: dict[str, list[_Rule]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)

    # -- set-up ----------------------------------------------------------------------------
    def credentials(self, account_sid: str = ACCOUNT_SID) -> TwilioCredentials:
        return TwilioCredentials(
            account_sid=account_sid,
            auth_token=self.accounts[account_sid],
            template_sid=CONTENT_SID,
        )

    def add_account(self, account_sid: str, auth_token: str) -> None:
        self.accounts[account_sid] = auth_token

    def add_content(
        self,
        sid: str,
        body: str,
        variables: dict[str, str] | None = None,
        types: dict[str, Any] | None = None,
    ) -> Content:
        content = Content(sid=sid, body=body, variables=dict(variables or {}), types=types)
        self.contents[sid] = content
        return content

    # -- fault knobs -----------------------------------------------------------------------
    def inject(self, op: Op, fault: Fault, calls: Iterable[int] | None = None) -> None:
        """Misbehave on the given 1-based call numbers of ``op`` (every call when None)."""
        rule = _Rule(fault, frozenset(calls) if calls is not None else None)
        with self._lock:
            self._rules.setdefault(op, []).append(rule)

    def fail(
        self, op: Op, status: int, code: int | None = None, calls: Iterable[int] | None = None
    ) -> None:
        self.inject(op, Fault(status=status, code=code), calls)

    def delay(self, op: Op, seconds: float, calls: Iterable[int] | None = None) -> None:
        self.inject(op, Fault(delay=seconds), calls)

    def accept_then_fail(self, status: int = 503, calls: Iterable[int] | None = None) -> None:
        self.inject("create", Fault(accept=True, status=status), calls)

    def accept_then_drop(self, calls: Iterable[int] | None = None) -> None:
        self.inject("create", Fault(accept=True, drop=True), calls)

    def accept_then_delay(self, seconds: float, calls: Iterable[int] | None = None) -> None:
        self.inject("create", Fault(accept=True, delay=seconds), calls)

    def fail_lookups(self, status: int = 500, calls: Iterable[int] | None = None) -> None:
        self.inject("list", Fault(status=status), calls)

    def clear_faults(self) -> None:
        with self._lock:
            self._rules.clear()

    # -- observations ----------------------------------------------------------------------
    def creates_to(self, number: str) -> int:
        """How many create requests were received for this recipient (with or without prefix)."""
        wanted = _bare(number)
        with self._lock:
            return sum(1 for form in self.creates if _bare(form.get("To", "")) == wanted)

    def messages_to(self, number: str) -> list[StoredMessage]:
        wanted = _bare(number)
        with self._lock:
            return [m for m in self.messages if _bare(m.to) == wanted]

    # -- request handling (called from the server's threads) -------------------------------
    def _next_call(self, op: Op) -> tuple[int, Fault | None]:
        with self._lock:
            self.calls[op] += 1
            number = self.calls[op]
            for rule in self._rules.get(op, []):
                if rule.calls is None or number in rule.calls:
                    return number, rule.fault
            return number, None

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)


def _bare(number: str) -> str:
    return re.sub(r"^(?:whatsapp:)+", "", number.strip(), flags=re.IGNORECASE)


def _render(body: str, variables: dict[str, Any]) -> str:
    return _PLACEHOLDER.sub(lambda m: str(variables.get(m.group(1), m.group(0))), body)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        return None

    # -- plumbing --------------------------------------------------------------------------
    @property
    def fake(self) -> TwilioFake:
        return self.server.fake

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): that is the point of some tests

    def _error(self, status: int, code: int | None, message: str) -> None:
        payload: dict[str, Any] = {"status": status, "message": message}
        if code is not None:
            payload["code"] = code
            payload["more_info"] = f"https://www.twilio.com/docs/errors/{code}"
        self._send_json(status, payload)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _account(self) -> str | None:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return user if self.fake.accounts.get(user) == password else None

    def _apply(self, fault: Fault | None) -> bool:
        """Play the fault's misbehaviour; True when the request has been answered (or dropped)."""
        if fault is None:
            return False
        self.fake._sleep(fault.delay)
        if fault.drop:
            self._drop()
            return True
        if fault.status is not None:
            self._error(fault.status, fault.code, fault.message or f"Injected HTTP {fault.status}")
            return True
        return False

    # -- routes ----------------------------------------------------------------------------
    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode() if length else ""
        match = _MESSAGES_PATH.match(path)
        if not match:
            self._error(404, 20404, f"The requested resource {path} was not found")
            return
        form = {key: values[0] for key, values in parse_qs(raw, keep_blank_values=True).items()}
        with self.fake._lock:
            self.fake.creates.append(form)
        _, fault = self.fake._next_call("create")
        account = self._account()
        if account is None or account != match["account"]:
            self._error(401, 20003, "Authenticate")
            return
        if fault is not None and not fault.accept and self._apply(fault):
            return
        message, problem = self._validate(account, form)
        if problem is not None:
            self._error(400, problem[0], problem[1])
            return
        assert message is not None
        with self.fake._lock:
            self.fake.messages.append(message)
        if fault is not None and fault.accept and self._apply(fault):
            return
        self._send_json(201, message.to_json())

    def _validate(
        self, account: str, form: dict[str, str]
    ) -> tuple[StoredMessage | None, tuple[int, str] | None]:
        to, from_ = form.get("To", ""), form.get("From", "")
        if not to:
            return None, (21604, "A 'To' phone number is required.")
        if not _E164.match(_bare(to)):
            return None, (21211, f"The 'To' number {to} is not a valid phone number.")
        if not from_ and not form.get("MessagingServiceSid"):
            return None, (21603, "A 'From' phone number is required.")
        content_sid = form.get("ContentSid")
        body = form.get("Body", "")
        variables_text = form.get("ContentVariables")
        if content_sid:
            content = self.fake.contents.get(content_sid)
            if content is None:
                return None, (21655, "The ContentSid is Invalid.")
            variables: Any = {}
            if variables_text:
                try:
                    variables = json.loads(variables_text)
                except ValueError:
                    variables = None
                if not isinstance(variables, dict):
                    return None, (21656, "The ContentVariables Parameter is invalid.")
            body = _render(content.body, variables)
        message = StoredMessage(
            sid="SM" + uuid.uuid4().hex,
            account_sid=account,
            to=to,
            from_=from_,
            body=body,
            content_sid=content_sid,
            content_variables=variables_text,
            messaging_service_sid=form.get("MessagingServiceSid"),
            status_callback=form.get("StatusCallback"),
            created_at=datetime.now(UTC),
        )
        return message, None

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        messages = _MESSAGES_PATH.match(parts.path)
        content = _CONTENT_PATH.match(parts.path)
        op: Op | None = "list" if messages else "content" if content else None
        if op is None:
            self._error(404, 20404, f"The requested resource {parts.path} was not found")
            return
        _, fault = self.fake._next_call(op)
        account = self._account()
        if account is None or (messages and account != messages["account"]):
            self._error(401, 20003, "Authenticate")
            return
        if self._apply(fault):
            return
        if content:
            found = self.fake.contents.get(content["sid"])
            if found is None:
                self._error(404, 20404, f"The requested resource {parts.path} was not found")
            else:
                self._send_json(200, found.to_json(account))
            return
        self._list(account, parts.path, query)

    def _list(self, account: str, path: str, query: dict[str, str]) -> None:
        with self.fake._lock:
            chosen = [m for m in self.fake.messages if m.account_sid == account]
        if "To" in query:
            chosen = [m for m in chosen if m.to == query["To"]]
        if "From" in query:
            chosen = [m for m in chosen if m.from_ == query["From"]]
        # Every message here is still queued (no date_sent), so a DateSent filter matches none
        # of them: the trap a lookup filtered by DateSent falls into with real Twilio.
        if any(key.startswith("DateSent") for key in query):
            chosen = []
        chosen.sort(key=lambda m: m.created_at, reverse=True)  # newest first, as Twilio lists
        page_size = max(1, min(int(query.get("PageSize", "50")), 1000))
        page = int(query.get("Page", "0"))
        start = page * page_size
        rows = chosen[start : start + page_size]
        filters = {k: v for k, v in query.items() if k not in ("Page", "PageSize", "PageToken")}

        def page_uri(number: int) -> str:
            params = {**filters, "PageSize": page_size, "Page": number}
            if number:
                params["PageToken"] = f"PA{number}"
            return f"{path}?{urlencode(params)}"

        more = start + page_size < len(chosen)
        self._send_json(
            200,
            {
                "messages": [m.to_json() for m in rows],
                "start": start,
                "end": start + max(len(rows) - 1, 0),
                "page": page,
                "page_size": page_size,
                "uri": page_uri(page),
                "first_page_uri": page_uri(0),
                "next_page_uri": page_uri(page + 1) if more else None,
                "previous_page_uri": page_uri(page - 1) if page else None,
            },
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, fake: TwilioFake) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake


class TwilioFakeServer:
    """Context manager: serve a ``TwilioFake`` on a free loopback port in a daemon thread."""

    def __init__(self, fake: TwilioFake | None = None) -> None:
        self.fake = fake or TwilioFake()
        if not self.fake.contents:
            self.fake.add_content(CONTENT_SID, CONTENT_BODY, CONTENT_VARIABLES)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TwilioFake:
        self._server = _Server(self.fake)
        host, port = self._server.server_address[:2]
        self.fake.base_url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(
            # A short poll interval so shutdown() at the end of each test returns quickly.
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="twilio-fake",
            daemon=True,
        )
        self._thread.start()
        return self.fake

    def __exit__(self, *exc_info: object) -> None:
        self.fake._stopping.set()  # wake handlers that are sleeping in a delay
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


@pytest.fixture()
def twilio_fake() -> Iterator[TwilioFake]:
    """A fresh fake Twilio per test: one account (``ACCOUNT_SID``/``AUTH_TOKEN``), one template
    (``CONTENT_SID``), no faults. Point ``TwilioSender(base_url=twilio_fake.base_url)`` at it."""
    with TwilioFakeServer() as fake:
        yield fake
