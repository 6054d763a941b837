"""Context Object validation: every problem at once with its JSON path, E.164 numbers, consent."""

from __future__ import annotations

from decimal import Decimal

import pytest

from channel_processor.context import normalise_phone, parse_body, require_consent, validate
from channel_processor.errors import InvalidInput, NoConsent
from tests.support import COMPANY_NUMBER, RECIPIENT, body, context_object


@pytest.mark.parametrize(
    "typed", ["+1 (202) 555-0123", "12025550123", "0012025550123", "whatsapp:+12025550123"]
)
def test_phone_inputs_become_e164(typed: str) -> None:
    assert normalise_phone(typed) == "+12025550123"


def test_international_prefix_number_that_is_not_valid_is_rejected() -> None:
    with pytest.raises(ValueError, match="not a valid phone number"):
        normalise_phone("00555 000 1111")


def test_national_number_needs_a_default_region() -> None:
    with pytest.raises(ValueError):
        normalise_phone("(202) 555-0123")
    assert normalise_phone("(202) 555-0123", default_region="US") == "+12025550123"


def test_valid_context_is_normalised() -> None:
    context = validate(parse_body(body(context_object())))
    assert context.recipient_tel == RECIPIENT
    assert context.company_number == COMPANY_NUMBER
    assert context.key.primary_channel == RECIPIENT
    attrs = context.record_attributes()
    assert attrs["channel_method"] == "whatsapp"
    assert attrs["gsi_recipient_tel"] == RECIPIENT


def test_fractions_are_parsed_as_decimal() -> None:
    data = parse_body(body(context_object(frontend_payload__project_data={"a": 4.5, "b": 0.1})))
    context = validate(data)
    assert context.record_attributes()["project_data"] == {"a": Decimal("4.5"), "b": Decimal("0.1")}


def test_channel_method_compares_case_insensitively() -> None:
    for method in ("WHATSAPP", "WhatsApp", "whatsapp"):
        validate(context_object(frontend_payload__request_data__channel_method=method))


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    data = context_object(recipient_tel="00555 000 1111")
    del data["frontend_payload"]["company_data"]["company_id"]
    data["frontend_payload"]["request_data"]["channel_method"] = "sms"
    del data["company_data_payload"]["channel_config"]["whatsapp"]["whatsapp_credentials_id"]
    with pytest.raises(InvalidInput) as caught:
        validate(data)
    paths = sorted(problem.split(":", 1)[0] for problem in caught.value.problems)
    assert paths == [
        "$.company_data_payload.channel_config.whatsapp.whatsapp_credentials_id",
        "$.frontend_payload.company_data.company_id",
        "$.frontend_payload.recipient_data.recipient_tel",
        "$.frontend_payload.request_data.channel_method",
    ]


def test_wrong_channel_and_mismatched_conversation_id_are_reported() -> None:
    data = context_object(frontend_payload__request_data__channel_method="email")
    data["conversation_data"]["conversation_id"] = "something-else"
    with pytest.raises(InvalidInput) as caught:
        validate(data)
    problems = caught.value.problems
    assert any("channel_method" in p and "'email'" in p for p in problems)
    assert any(p.startswith("$.conversation_data.conversation_id") for p in problems)


def test_body_that_is_not_json_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match=r"^\$: body is not JSON"):
        parse_body("{not json")


def test_top_level_that_is_not_an_object_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="expected a JSON object"):
        validate([1, 2])


def test_openai_key_reference_required_only_for_the_openai_composer() -> None:
    data = context_object()
    del data["company_data_payload"]["ai_config"]
    validate(data)
    with pytest.raises(InvalidInput, match="api_key_reference"):
        validate(data, require_openai_key=True)


@pytest.mark.parametrize("consent", [False, None, "yes"])
def test_consent_must_be_exactly_true(consent: object) -> None:
    data = context_object(frontend_payload__recipient_data__comms_consent=consent)
    if consent is None:
        del data["frontend_payload"]["recipient_data"]["comms_consent"]
    try:
        context = validate(data)
    except InvalidInput:
        assert consent == "yes"  # a non-boolean is itself invalid input
        return
    with pytest.raises(NoConsent):
        require_consent(context)


def test_empty_project_data_is_allowed() -> None:
    context = validate(context_object(frontend_payload__project_data={}))
    assert context.record_attributes()["project_data"] == {}
