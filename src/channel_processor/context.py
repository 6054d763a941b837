"""The Context Object (SPEC §2): parsing, validation with every problem at once, and normalisation.

Problems are reported as ``$.json.path: what is wrong``. Numbers with fractions are parsed as
``Decimal`` from the raw JSON so they reach DynamoDB exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import phonenumbers
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from channel_processor.domain import RecordKey
from channel_processor.errors import InvalidInput, NoConsent

CHANNEL = "whatsapp"


class _Model(BaseModel):
    # Upstream adds informational fields over time; unknown fields are kept, never an error.
    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)


class CompanyData(_Model):
    company_id: str = Field(min_length=1)
    project_id: str = Field(min_length=1)


class RecipientData(_Model):
    recipient_first_name: str | None = None
    recipient_last_name: str | None = None
    recipient_tel: str = Field(min_length=1)
    recipient_email: str | None = None
    # Strict: "yes", 1 or "true" must not count as consent.
    comms_consent: StrictBool | None = None


class RequestData(_Model):
    request_id: str = Field(min_length=1)
    channel_method: str = Field(min_length=1)
    initial_request_timestamp: str | None = None


class FrontendPayload(_Model):
    company_data: CompanyData
    recipient_data: RecipientData
    project_data: dict[str, Any] = Field(default_factory=dict)
    request_data: RequestData


class OpenAIChannelConfig(_Model):
    api_key_reference: str | None = None
    assistant_id_template_sender: str | None = None
    model: str | None = None
    instructions: str | None = None


class OpenAIConfig(_Model):
    whatsapp: OpenAIChannelConfig | None = None


class AIConfig(_Model):
    openai_config: OpenAIConfig | None = None


class WhatsAppChannelConfig(_Model):
    company_whatsapp_number: str = Field(min_length=1)
    whatsapp_credentials_id: str = Field(min_length=1)


class ChannelConfig(_Model):
    whatsapp: WhatsAppChannelConfig


class CompanyDataPayload(_Model):
    company_id: str | None = None
    project_id: str | None = None
    company_name: str | None = None
    project_name: str | None = None
    project_status: str | None = None
    allowed_channels: list[str] | None = None
    company_rep: dict[str, str | None] = Field(default_factory=dict)
    ai_config: AIConfig | None = None
    channel_config: ChannelConfig


class ConversationData(_Model):
    conversation_id: str = Field(min_length=1)
    conversation_status: str | None = None


class Metadata(_Model):
    router_version: str | None = None


class _Envelope(_Model):
    frontend_payload: FrontendPayload
    company_data_payload: CompanyDataPayload
    conversation_data: ConversationData
    metadata: Metadata = Field(default_factory=Metadata)


@dataclass(frozen=True)
class ContextObject:
    """A validated Context Object with its numbers in E.164."""

    raw: dict[str, Any]  # the JSON as received (Decimals for fractions)
    envelope: _Envelope
    recipient_tel: str
    company_number: str

    @property
    def conversation_id(self) -> str:
        return self.envelope.conversation_data.conversation_id

    @property
    def key(self) -> RecordKey:
        return RecordKey(self.recipient_tel, self.conversation_id)

    @property
    def request_id(self) -> str:
        return self.envelope.frontend_payload.request_data.request_id

    @property
    def credentials_id(self) -> str:
        return self.envelope.company_data_payload.channel_config.whatsapp.whatsapp_credentials_id

    @property
    def openai(self) -> OpenAIChannelConfig:
        ai = self.envelope.company_data_payload.ai_config
        whatsapp = ai.openai_config.whatsapp if ai and ai.openai_config else None
        return whatsapp or OpenAIChannelConfig()

    def record_attributes(self) -> dict[str, Any]:
        """The business attributes of a new conversation record (SPEC §3)."""
        fp = self.raw["frontend_payload"]
        cdp = self.raw["company_data_payload"]
        recipient = fp["recipient_data"]
        request = fp["request_data"]
        return {
            "primary_channel": self.recipient_tel,
            "conversation_id": self.conversation_id,
            "company_id": fp["company_data"]["company_id"],
            "project_id": fp["company_data"]["project_id"],
            "request_id": request["request_id"],
            "channel_method": CHANNEL,
            "company_name": cdp.get("company_name"),
            "project_name": cdp.get("project_name"),
            "company_rep": cdp.get("company_rep") or {},
            "ai_config": ((cdp.get("ai_config") or {}).get("openai_config") or {}).get(CHANNEL)
            or {},
            "channel_config": (cdp.get("channel_config") or {}).get(CHANNEL) or {},
            "recipient_first_name": recipient.get("recipient_first_name"),
            "recipient_last_name": recipient.get("recipient_last_name"),
            "recipient_tel": self.recipient_tel,
            "recipient_email": recipient.get("recipient_email"),
            "comms_consent": bool(recipient.get("comms_consent")),
            "project_data": fp.get("project_data") or {},
            "router_version": (self.raw.get("metadata") or {}).get("router_version"),
            "initial_request_timestamp": request.get("initial_request_timestamp"),
            "gsi_company_whatsapp_number": self.company_number,
            "gsi_recipient_tel": self.recipient_tel,
        }


def normalise_phone(raw: str, default_region: str | None = None) -> str:
    """E.164 from what people type. Digits without ``+`` already carry the country code (``00``
    is the international prefix); a national number is read only with a default region."""
    text = raw.strip().removeprefix("whatsapp:").strip()
    compact = re.sub(r"[\s().\-/]", "", text)
    if not compact:
        raise ValueError("is empty")
    candidates: list[tuple[str, str | None]] = []
    if compact.startswith("+"):
        candidates.append((compact, None))
    elif compact.startswith("00"):
        candidates.append(("+" + compact[2:], None))
    else:
        candidates.append(("+" + compact, None))
        if default_region:
            candidates.append((compact, default_region))
    for number, region in candidates:
        try:
            parsed = phonenumbers.parse(number, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(parsed):
            return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    raise ValueError(f"{_masked_input(text)!r} is not a valid phone number (E.164 expected)")


def _masked_input(text: str) -> str:
    # Error messages end up in records and logs: keep the shape, hide the middle digits.
    return text if len(text) <= 4 else text[:3] + "…" + text[-2:]


def expected_conversation_id(
    company_id: str, project_id: str, request_id: str, company_number: str
) -> str:
    return f"{company_id}#{project_id}#{request_id}#{company_number.lstrip('+')}"


def parse_body(body: str | bytes) -> Any:
    """JSON with fractions as Decimal. Raises InvalidInput naming the position of the error."""
    try:
        return json.loads(body, parse_float=Decimal)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput([f"$: body is not JSON ({exc})"]) from exc


# The dead-letter envelope the processor writes (adapters/sqs.py SQSDeadLetters): an operator's
# redrive (SQS message-move task) sends it back to the queue as it is, so it is opened here.
DEAD_LETTER_KEYS = frozenset({"reasons", "original_body", "source_message_id"})


def dead_letter_body(data: Any) -> str | None:
    """The original body when ``data`` is a redriven dead-letter envelope, else None."""
    if (
        isinstance(data, Mapping)
        and "original_body" in data
        and set(data) <= DEAD_LETTER_KEYS
        and isinstance(data["original_body"], str)
    ):
        return data["original_body"]
    return None


def _path(loc: tuple[int | str, ...]) -> str:
    path = "$"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def validate(
    data: Any, *, default_region: str | None = None, require_openai_key: bool = False
) -> ContextObject:
    """Validate a parsed Context Object. Raises ``InvalidInput`` listing every problem; consent
    is checked separately (``require_consent``) so the record can be written first."""
    if not isinstance(data, Mapping):
        raise InvalidInput([f"$: expected a JSON object, got {type(data).__name__}"])
    problems: list[str] = []
    envelope: _Envelope | None = None
    try:
        envelope = _Envelope.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            problems.append(f"{_path(err['loc'])}: {err['msg'].lower()}")

    # These checks read the raw JSON, so they report even when other fields broke the model.
    recipient_tel = company_number = ""
    raw_tel = _dig(data, "frontend_payload", "recipient_data", "recipient_tel")
    if isinstance(raw_tel, str) and raw_tel.strip():
        try:
            recipient_tel = normalise_phone(raw_tel, default_region)
        except ValueError as exc:
            problems.append(f"$.frontend_payload.recipient_data.recipient_tel: {exc}")
    raw_company = _dig(
        data, "company_data_payload", "channel_config", "whatsapp", "company_whatsapp_number"
    )
    if isinstance(raw_company, str) and raw_company.strip():
        try:
            company_number = normalise_phone(raw_company, default_region)
        except ValueError as exc:
            problems.append(
                "$.company_data_payload.channel_config.whatsapp.company_whatsapp_number: "
                + str(exc)
            )
    method = _dig(data, "frontend_payload", "request_data", "channel_method")
    if isinstance(method, str) and method.strip() and method.strip().lower() != CHANNEL:
        problems.append(
            f"$.frontend_payload.request_data.channel_method: {method!r} is not {CHANNEL!r}"
        )
    company_id = _dig(data, "frontend_payload", "company_data", "company_id")
    project_id = _dig(data, "frontend_payload", "company_data", "project_id")
    request_id = _dig(data, "frontend_payload", "request_data", "request_id")
    given_id = _dig(data, "conversation_data", "conversation_id")
    parts = (company_id, project_id, request_id, given_id)
    if company_number and all(isinstance(p, str) for p in parts):
        wanted = expected_conversation_id(
            str(company_id).strip(),
            str(project_id).strip(),
            str(request_id).strip(),
            company_number,
        )
        if str(given_id).strip() != wanted:
            problems.append(
                "$.conversation_data.conversation_id: does not match "
                "company_id#project_id#request_id#company number"
            )
    if require_openai_key and not _dig(
        data, "company_data_payload", "ai_config", "openai_config", "whatsapp", "api_key_reference"
    ):
        problems.append(
            "$.company_data_payload.ai_config.openai_config.whatsapp.api_key_reference: "
            "field required"
        )
    if problems:
        raise InvalidInput(problems)
    assert envelope is not None
    return ContextObject(
        raw=dict(data),
        envelope=envelope,
        recipient_tel=recipient_tel,
        company_number=company_number,
    )


def require_consent(context: ContextObject) -> None:
    """Raises ``NoConsent`` unless ``comms_consent`` is exactly true (missing counts as no)."""
    if context.envelope.frontend_payload.recipient_data.comms_consent is not True:
        raise NoConsent(
            "$.frontend_payload.recipient_data.comms_consent: recipient has not consented",
            code="no_consent",
        )


def _dig(data: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(part)
    return data


def identify(data: Any, default_region: str | None = None) -> RecordKey | None:
    """Best-effort record key of an invalid Context Object, so the record can say why."""
    try:
        conversation_id = data["conversation_data"]["conversation_id"]
        tel = data["frontend_payload"]["recipient_data"]["recipient_tel"]
        if not (isinstance(conversation_id, str) and conversation_id and isinstance(tel, str)):
            return None
        return RecordKey(normalise_phone(tel, default_region), conversation_id)
    except (KeyError, TypeError, ValueError):
        return None
