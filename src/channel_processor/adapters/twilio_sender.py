"""The Sender port on Twilio's SDK: WhatsApp template messages through the Content API.

Every SDK and transport exception is translated in ``classify_error`` (one table); a create is
never retried here, so a failure after the request left is reported as ``SendOutcomeUnknown``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Literal

import requests
from requests.adapters import HTTPAdapter
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client
from urllib3.exceptions import MaxRetryError, NewConnectionError

from channel_processor.domain import SendRequest, SentMessage, Template, mask_phone
from channel_processor.errors import (
    LookupUnavailable,
    ProcessorError,
    SendOutcomeUnknown,
    SendRejected,
    SendThrottled,
)
from channel_processor.ports import TwilioCredentials

_log = logging.getLogger(__name__)

Operation = Literal["send", "template", "lookup"]

# --------------------------------------------------------------------------------------------
# Addresses and variables (shared with the sandbox sender so both refuse the same input)
# --------------------------------------------------------------------------------------------

_CHANNEL_PREFIX = re.compile(r"^(?:\s*whatsapp:)+", re.IGNORECASE)
_SPACE_RUN = re.compile(r" {5,}")
_PLACEHOLDER = re.compile(r"\{\{\s*([^}\s]+)\s*\}\}")


def whatsapp_address(number: str) -> str:
    """``+1202...`` or ``whatsapp:+1202...`` -> ``whatsapp:+1202...`` (the prefix exactly once)."""
    return "whatsapp:" + _CHANNEL_PREFIX.sub("", number.strip()).strip()


def check_variables(variables: Mapping[str, Any]) -> None:
    """Twilio's rules for content variables, checked again just before the send.

    The pipeline sanitises first; this is defence in depth so a value Twilio would refuse (or
    render badly) never leaves the process. Raises ``SendRejected`` naming the variable.
    """
    for name, value in variables.items():
        problem = None
        if not isinstance(value, str):
            problem = f"is a {type(value).__name__}, not a string"
        elif not value.strip():
            problem = "is empty"
        elif "\n" in value or "\r" in value:
            problem = "contains a newline"
        elif "\t" in value:
            problem = "contains a tab"
        elif _SPACE_RUN.search(value):
            problem = "contains more than 4 consecutive spaces"
        if problem:
            raise SendRejected(
                f"template variable {name!r} {problem}", code="invalid_content_variables"
            )


def template_from_content(
    content_sid: str, types: Mapping[str, Any] | None, variables: Mapping[str, Any] | None
) -> Template:
    """Build a ``Template`` from a Content resource's ``types`` and ``variables``.

    The body is ``twilio/text``'s, else the first other type that has one; the variable names are
    the keys of ``variables`` (numeric keys in numeric order), else the body's ``{{name}}``s.
    """
    body: str | None = None
    ordered = sorted((types or {}).items(), key=lambda kv: kv[0] != "twilio/text")
    for _type_name, spec in ordered:
        if isinstance(spec, Mapping) and isinstance(spec.get("body"), str):
            body = spec["body"]
            break
    if body is None:
        raise SendRejected(f"content {content_sid} has no text body", code="template_without_body")
    names = [str(key) for key in (variables or {})]
    if names and all(name.isdigit() for name in names):
        names.sort(key=int)
    if not names:
        names = list(dict.fromkeys(_PLACEHOLDER.findall(body)))
    return Template(sid=content_sid, body=body, variables=tuple(names))


# --------------------------------------------------------------------------------------------
# Error classification: the one place SDK and transport exceptions become ours
# --------------------------------------------------------------------------------------------


class _Kind(Enum):
    THROTTLED = "throttled"  # Twilio said 429 / 20429: refused before accepting
    NOT_SENT = "not_sent"  # the request never left the machine (connect failed, bad URL)
    REJECTED = "rejected"  # any other 4xx: permanent
    UNKNOWN = "unknown"  # 5xx, timeout, reset after sending, anything unrecognised


# Twilio codes we expect to see, so the record's reason says what went wrong in words.
_CODE_MEANINGS = {
    20003: "authentication failed (check the account SID and auth token)",
    20404: "resource not found",
    20429: "too many requests",
    21211: "invalid 'To' phone number",
    21408: "permission to send to this region is not enabled",
    21610: "the recipient has opted out (replied STOP)",
    21655: "invalid ContentSid",
    21656: "invalid ContentVariables",
    63016: "outside the 24-hour session window: a freeform message is not allowed",
    63049: "Meta chose not to deliver this marketing message",
}

# Raised by requests before any byte is written to a socket: nothing can have been sent.
_BEFORE_SENDING: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectTimeout,
    requests.exceptions.URLRequired,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidHeader,
    requests.exceptions.InvalidJSONError,
)

_PHONE_LIKE = re.compile(r"\+?\d{7,15}")


def _mask_numbers(text: str) -> str:
    """Twilio's messages quote the phone number; the reason reaches logs, so mask it."""
    return _PHONE_LIKE.sub(lambda m: mask_phone(m.group(0)), text)


def _connection_refused(exc: BaseException) -> bool:
    """``ConnectionError(MaxRetryError(reason=NewConnectionError))``: the TCP connect failed."""
    for arg in getattr(exc, "args", ()):
        if isinstance(arg, MaxRetryError) and isinstance(arg.reason, NewConnectionError):
            return True
        if isinstance(arg, NewConnectionError):
            return True
    return False


def _as_int(value: object) -> int | None:
    text = str(value).strip() if isinstance(value, int | str) else ""
    return int(text) if text.isdigit() else None


def _kind_of(exc: BaseException) -> tuple[_Kind, int | None, int | None, str]:
    """(kind, http status, twilio code, message) of any exception the SDK call raised."""
    if isinstance(exc, TwilioRestException | TwilioServiceException):
        status, code = _as_int(exc.status), _as_int(exc.code)
        if isinstance(exc, TwilioRestException):
            message = str(exc.msg)
        else:
            message = str(exc.detail or exc.title)
        # HTTP status first, Twilio code second (a 429 wins whatever its code says).
        if status == 429 or code == 20429:
            kind = _Kind.THROTTLED
        elif status is not None and 400 <= status < 500:
            kind = _Kind.REJECTED
        else:
            kind = _Kind.UNKNOWN
        return kind, status, code, message
    if isinstance(exc, _BEFORE_SENDING) or (
        isinstance(exc, requests.exceptions.ConnectionError) and _connection_refused(exc)
    ):
        return _Kind.NOT_SENT, None, None, type(exc).__name__
    # ReadTimeout, ConnectionError (reset, RemoteDisconnected), ChunkedEncodingError, SSLError,
    # a 2xx with a body that is not JSON, any other surprise: the request may have been accepted.
    return _Kind.UNKNOWN, None, None, type(exc).__name__


def _describe(status: int | None, code: int | None, message: str) -> str:
    parts = []
    if status is not None:
        parts.append(f"HTTP {status}")
    if code is not None:
        meaning = _CODE_MEANINGS.get(code)
        parts.append(f"Twilio error {code}" + (f" ({meaning})" if meaning else ""))
    head = ", ".join(parts) or "transport error"
    return f"{head}: {_mask_numbers(message)}" if message else head


def classify_error(exc: BaseException, operation: Operation) -> ProcessorError:
    """Translate what a Twilio call raised into the processor's error for ``operation``.

    send:     429/20429 or nothing sent -> SendThrottled; other 4xx -> SendRejected(code);
              5xx, timeouts, resets and anything unrecognised -> SendOutcomeUnknown.
    template: 4xx (not 429) -> SendRejected; everything else -> SendThrottled (retry later).
    lookup:   everything -> LookupUnavailable (we cannot tell whether the message exists).
    """
    if isinstance(exc, ProcessorError):
        return exc
    kind, status, code, message = _kind_of(exc)
    reason = _describe(status, code, message)
    error_code = str(code) if code is not None else (f"http_{status}" if status else None)
    if operation == "lookup":
        return LookupUnavailable(f"Twilio message lookup failed: {reason}")
    if kind is _Kind.REJECTED:
        what = "the message" if operation == "send" else "the template fetch"
        return SendRejected(f"Twilio rejected {what}: {reason}", code=error_code)
    if operation == "template":
        return SendThrottled(f"Twilio template fetch failed, retry later: {reason}")
    if kind in (_Kind.THROTTLED, _Kind.NOT_SENT):
        return SendThrottled(f"Twilio did not accept the message, nothing sent: {reason}")
    return SendOutcomeUnknown(f"Twilio may have accepted the message: {reason}")


# --------------------------------------------------------------------------------------------
# The HTTP client seam
# --------------------------------------------------------------------------------------------

_TWILIO_ORIGIN = re.compile(r"^https://(?:[A-Za-z0-9-]+\.)*twilio\.com(?=[/?#]|$)", re.IGNORECASE)


class _HttpClient(TwilioHttpClient):  # type: ignore[misc]  # the SDK ships no type hints
    """The SDK's client with an explicit timeout, no retries, no request logging, and (tests,
    local fakes) every ``https://*.twilio.com`` origin rewritten to ``base_url``."""

    def __init__(self, timeout_seconds: float, base_url: str | None) -> None:
        # max_retries=0: a create that failed after leaving must never be sent a second time.
        super().__init__(pool_connections=True, timeout=timeout_seconds, max_retries=0)
        # The SDK only mounts the no-retry adapter for https; a local base_url is plain http.
        self.session.mount("http://", HTTPAdapter(max_retries=0))
        self.base_url = base_url.rstrip("/") if base_url else None

    def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Any:
        if self.base_url:
            base = self.base_url
            url = _TWILIO_ORIGIN.sub(lambda _m: base, url, count=1)
        return super().request(
            method,
            url,
            params=params,
            data=data,
            headers=headers,
            auth=auth,
            timeout=timeout,
            allow_redirects=allow_redirects,
        )

    # The SDK logs full URLs at INFO, query strings included (To=whatsapp:+...): no PII in logs.
    def log_request(self, kwargs: dict[str, Any]) -> None:
        return None

    def log_response(self, status_code: int, response: Any) -> None:
        return None


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


# The lookup reads pages of this size, newest first, and gives up (LookupUnavailable) past this
# many messages still inside the window rather than call a message absent it may not have seen.
_LOOKUP_PAGE = 50
_LOOKUP_MAX_SCAN = 1000


class TwilioSender:
    """``ports.Sender`` on the Twilio SDK; one SDK client per account, templates cached."""

    def __init__(
        self,
        timeout_seconds: float,
        base_url: str | None = None,
        template_cache_seconds: float = 600,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be > 0: the SDK's default is no timeout")
        self._timeout = float(timeout_seconds)
        self._base_url = base_url
        self._template_ttl = float(template_cache_seconds)
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[str, Any]] = {}
        self._templates: dict[tuple[str, str], tuple[float, Template]] = {}

    def client_for(self, credentials: TwilioCredentials) -> Any:
        """The cached SDK client of this account (a new one if the auth token was rotated)."""
        with self._lock:
            cached = self._clients.get(credentials.account_sid)
            if cached is not None and cached[0] == credentials.auth_token:
                return cached[1]
            client = Client(
                username=credentials.account_sid,
                password=credentials.auth_token,
                http_client=_HttpClient(self._timeout, self._base_url),
            )
            self._clients[credentials.account_sid] = (credentials.auth_token, client)
            return client

    def template(self, credentials: TwilioCredentials, content_sid: str) -> Template:
        key = (credentials.account_sid, content_sid)
        with self._lock:
            cached = self._templates.get(key)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
        client = self.client_for(credentials)
        try:
            content = client.content.v1.contents(content_sid).fetch()
        except Exception as exc:
            raise classify_error(exc, "template") from exc
        template = template_from_content(content_sid, content.types, content.variables)
        with self._lock:
            self._templates[key] = (time.monotonic() + self._template_ttl, template)
        return template

    def send(self, credentials: TwilioCredentials, request: SendRequest) -> SentMessage:
        check_variables(request.variables)
        kwargs: dict[str, Any] = {
            "content_sid": request.content_sid,
            "from_": whatsapp_address(request.from_),
            "to": whatsapp_address(request.to),
        }
        if request.variables:
            kwargs["content_variables"] = json.dumps(dict(request.variables), ensure_ascii=False)
        if request.messaging_service_sid:
            kwargs["messaging_service_sid"] = request.messaging_service_sid
        if request.status_callback:
            kwargs["status_callback"] = request.status_callback
        client = self.client_for(credentials)
        started = time.monotonic()
        try:
            message = client.messages.create(**kwargs)
        except Exception as exc:
            error = classify_error(exc, "send")
            _log.warning(
                "twilio send failed to=%s error=%s after_ms=%d",
                mask_phone(request.to),
                type(error).__name__,
                (time.monotonic() - started) * 1000,
            )
            raise error from exc
        sent = _sent_message(message)
        if sent is None:
            # A 2xx without a SID: Twilio accepted something we cannot name; never resend blind.
            raise SendOutcomeUnknown("Twilio answered the create without a message SID")
        _log.info("twilio send accepted sid=%s to=%s", sent.sid, mask_phone(request.to))
        return sent

    def find_sent(
        self, credentials: TwilioCredentials, to: str, from_: str, since: datetime
    ) -> list[SentMessage]:
        since_utc = (since if since.tzinfo else since.replace(tzinfo=UTC)).astimezone(UTC)
        # date_created has whole seconds: compare to the second.
        floor = since_utc.replace(microsecond=0)
        ours = whatsapp_address(from_)
        service = credentials.messaging_service_sid
        client = self.client_for(credentials)
        result: list[SentMessage] = []
        scanned = older_in_a_row = 0
        try:
            # No DateSent filter: a message still queued has no date_sent yet, and missing it
            # would read as "absent" and lead to a second send. No From filter either: with a
            # Messaging Service, Twilio may send from another sender of its pool. Newest first,
            # page by page, until a whole page is older than the send.
            for message in client.messages.stream(to=whatsapp_address(to), page_size=_LOOKUP_PAGE):
                scanned += 1
                sent = _sent_message(message)
                if sent is not None and sent.created_at is not None and sent.created_at < floor:
                    older_in_a_row += 1
                    if older_in_a_row >= _LOOKUP_PAGE:
                        break
                    continue
                older_in_a_row = 0
                if scanned > _LOOKUP_MAX_SCAN:
                    # Absence could not be confirmed: "cannot tell" must never become a resend.
                    raise LookupUnavailable(
                        f"more than {_LOOKUP_MAX_SCAN} messages to this recipient since the send"
                    )
                sender = getattr(message, "from_", None)
                via_service = service and getattr(message, "messaging_service_sid", None) == service
                # No date means we cannot exclude it: counting it as ours is the side that never
                # sends twice.
                if sent is not None and (sender == ours or via_service):
                    result.append(sent)
        except LookupUnavailable:
            raise
        except Exception as exc:
            raise classify_error(exc, "lookup") from exc
        return result


def _sent_message(message: Any) -> SentMessage | None:
    sid = getattr(message, "sid", None)
    if not isinstance(sid, str) or not sid:
        return None
    created = getattr(message, "date_created", None)
    body = getattr(message, "body", None)
    return SentMessage(
        sid=sid,
        status=str(getattr(message, "status", None) or ""),
        created_at=created if isinstance(created, datetime) else None,
        body=body if isinstance(body, str) else None,
    )
