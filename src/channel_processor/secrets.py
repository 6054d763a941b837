"""Secrets as the pipeline uses them: a per-container TTL cache over any ``SecretSource`` and the
parsers of the Twilio and OpenAI secret shapes (errors name the secret and key, never a value)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from channel_processor.errors import SecretInvalid
from channel_processor.ports import SecretSource, TwilioCredentials


class CachedSecretSource:
    """``SecretSource`` that keeps each value ``ttl_seconds``; errors are never cached.

    Concurrent first requests for one name make one fetch (a lock per name), so a batch that
    arrives together costs one Secrets Manager call, while other names are not held up.
    """

    def __init__(
        self,
        inner: SecretSource,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._ttl = ttl_seconds
        self._clock = clock
        self._values: dict[str, tuple[float, str]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def get(self, name: str) -> str:
        cached = self._fresh(name)
        if cached is not None:
            return cached
        with self._lock_for(name):
            # Whoever held the lock before us may have fetched it already.
            cached = self._fresh(name)
            if cached is not None:
                return cached
            value = self._inner.get(name)
            if self._ttl > 0:
                self._values[name] = (self._clock() + self._ttl, value)
            return value

    def invalidate(self, name: str | None = None) -> None:
        """Forget one value (e.g. credentials the provider just refused) or all of them."""
        if name is None:
            self._values.clear()
        else:
            self._values.pop(name, None)

    def _fresh(self, name: str) -> str | None:
        entry = self._values.get(name)
        if entry is not None and entry[0] > self._clock():
            return entry[1]
        return None

    def _lock_for(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())


TWILIO_REQUIRED_KEYS = ("twilio_account_sid", "twilio_auth_token", "twilio_template_sid")
TWILIO_OPTIONAL_KEYS = ("twilio_messaging_service_sid",)
OPENAI_KEY = "ai_api_key"


def parse_twilio_credentials(raw: str, name: str) -> TwilioCredentials:
    """A JSON object with ``twilio_account_sid``, ``twilio_auth_token``, ``twilio_template_sid``
    and optionally ``twilio_messaging_service_sid``."""
    data = _json_object(raw, name)
    missing = [key for key in TWILIO_REQUIRED_KEYS if not _is_text(data.get(key))]
    if missing:
        raise SecretInvalid(
            f"secret {name!r} lacks a non-empty string for: {', '.join(missing)}",
            code="secret_missing_key",
        )
    service = data.get("twilio_messaging_service_sid")
    if service is not None and not isinstance(service, str):
        raise SecretInvalid(
            f"secret {name!r}: twilio_messaging_service_sid must be a string",
            code="secret_bad_value",
        )
    return TwilioCredentials(
        account_sid=data["twilio_account_sid"].strip(),
        auth_token=data["twilio_auth_token"].strip(),
        template_sid=data["twilio_template_sid"].strip(),
        messaging_service_sid=(service or "").strip() or None,
    )


def parse_openai_key(raw: str, name: str) -> str:
    """``{"ai_api_key": "..."}``, or the key itself as a bare string (tolerated)."""
    text = raw.strip()
    if text.startswith(("{", '"')):
        try:
            data = json.loads(text)
        except ValueError:
            raise SecretInvalid(
                f"secret {name!r} is not valid JSON", code="secret_not_json"
            ) from None
        if isinstance(data, dict):
            key = data.get(OPENAI_KEY)
            if not _is_text(key):
                raise SecretInvalid(
                    f"secret {name!r} lacks a non-empty string for: {OPENAI_KEY}",
                    code="secret_missing_key",
                )
            return str(key).strip()
        text = data.strip() if isinstance(data, str) else ""
    # A bare key is one token: whitespace inside means this is not a key but something else.
    if not text or any(ch.isspace() for ch in text):
        raise SecretInvalid(
            f"secret {name!r} is neither {{{OPENAI_KEY!r}: ...}} nor a bare API key",
            code="secret_bad_value",
        )
    return text


def _json_object(raw: str, name: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, TypeError):
        # The decoder's message quotes no input, but there is nothing useful in it either.
        raise SecretInvalid(f"secret {name!r} is not valid JSON", code="secret_not_json") from None
    if not isinstance(data, dict):
        raise SecretInvalid(f"secret {name!r} is not a JSON object", code="secret_not_json")
    return data


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())
