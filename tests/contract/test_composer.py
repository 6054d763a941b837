"""Contract of the ``Composer`` port, held by the fake, the offline and the OpenAI composer (the
latter through the real SDK against the local OpenAI fake)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from channel_processor.adapters.offline_composer import DEFAULT_MAPPING, OfflineComposer
from channel_processor.adapters.openai_composer import PROMPT_VERSION, SCHEMA_NAME, OpenAIComposer
from channel_processor.domain import Draft, Template
from channel_processor.errors import ComposeFailed
from channel_processor.ports import Composer, ComposeRequest
from tests.fakes.composer import FakeComposer
from tests.fakes.openai_server import OpenAIFake, openai_fake_fixture  # noqa: F401

TEMPLATE = Template(
    sid="HX0123456789abcdef0123456789abcdef",
    body="Hi {{1}}, this is {{2}} from {{3}}. Are you still interested in {{4}}?",
    variables=("1", "2", "3", "4"),
)

CONTEXT: dict[str, Any] = {
    "frontend_payload": {
        "company_data": {"company_id": "ci-aaa-001", "project_id": "pi-aaa-001"},
        "recipient_data": {
            "recipient_first_name": "Maria",
            "recipient_last_name": "Silva",
            "recipient_tel": "+447700900123",
            "recipient_email": "maria@example.com",
            "comms_consent": True,
        },
        "project_data": {"job_title": "Site electrician", "hourly_rate": 24.5},
        "request_data": {
            "request_id": "6f1c2a4e-1d2b-4c5e-9f00-1234567890ab",
            "channel_method": "whatsapp",
            "initial_request_timestamp": "2026-01-15T10:00:00Z",
        },
    },
    "company_data_payload": {
        "company_id": "ci-aaa-001",
        "project_id": "pi-aaa-001",
        "company_name": "Cucumber Recruitment",
        "project_name": "Clarify Pilot",
        "company_rep": {"company_rep_1": "Carla", "company_rep_2": None},
    },
    "conversation_data": {
        "conversation_id": "ci-aaa-001#pi-aaa-001#6f1c2a4e-1d2b-4c5e-9f00-1234567890ab#12025550123",
        "conversation_status": "initiated",
    },
    "metadata": {"router_version": "1.0.0"},
}


def request(**overrides: Any) -> ComposeRequest:
    fields: dict[str, Any] = {"template": TEMPLATE, "context": CONTEXT, "api_key": "sk-test-key"}
    fields.update(overrides)
    return ComposeRequest(**fields)


ComposerFactory = Callable[[], Composer]


@pytest.fixture(params=["fake", "offline", "openai"])
def composer(request: pytest.FixtureRequest) -> Iterator[Composer]:
    if request.param == "fake":
        yield FakeComposer()
    elif request.param == "offline":
        yield OfflineComposer(DEFAULT_MAPPING)
    else:
        fake: OpenAIFake = request.getfixturevalue("openai_fake")
        yield OpenAIComposer(base_url=fake.base_url)


# --- every composer ---


def test_draft_has_exactly_the_template_variables_and_the_rendered_body(composer: Composer) -> None:
    # given a four-variable template and a complete Context Object
    # when composing
    draft = composer.compose(request())

    # then the draft answers each variable with non-empty text and renders the body with them
    assert isinstance(draft, Draft)
    assert sorted(draft.variables) == sorted(TEMPLATE.variables)
    assert all(isinstance(v, str) and v.strip() for v in draft.variables.values())
    assert draft.rendered == TEMPLATE.render(draft.variables)
    assert "{{" not in draft.rendered


def test_a_given_thread_id_is_kept_on_the_draft(composer: Composer) -> None:
    # given a first draft (which may have opened a thread)
    first = composer.compose(request())

    # when composing again on that thread
    second = composer.compose(request(thread_id=first.thread_id))

    # then the second draft stays on the same thread
    assert second.thread_id == first.thread_id


# --- offline composer ---


def test_offline_composer_reads_paths_and_literals_from_the_context() -> None:
    # given a mapping with paths and a literal
    composer = OfflineComposer({**DEFAULT_MAPPING, "4": "=your application"})

    # when composing
    draft = composer.compose(request(api_key=None))

    # then paths give the Context Object's values and the literal is taken as written
    assert draft.variables == {
        "1": "Maria",
        "2": "Carla",
        "3": "Cucumber Recruitment",
        "4": "your application",
    }
    assert draft.rendered == (
        "Hi Maria, this is Carla from Cucumber Recruitment. "
        "Are you still interested in your application?"
    )
    assert (draft.thread_id, draft.total_tokens, draft.prompt_tokens) == (None, 0, 0)


def test_offline_composer_gives_empty_text_for_a_path_that_leads_nowhere() -> None:
    # given a mapping whose variable 2 points at a representative who is null, and 4 at nothing
    mapping = {
        **DEFAULT_MAPPING,
        "2": "company_data_payload.company_rep.company_rep_2",
        "4": "company_data_payload.no_such.field",
    }

    # when composing
    draft = OfflineComposer(mapping).compose(request(api_key=None))

    # then those values are empty, for the pipeline's check to reject with their names
    assert draft.variables["2"] == ""
    assert draft.variables["4"] == ""
    assert draft.variables["1"] == "Maria"


def test_offline_composer_refuses_a_template_variable_it_has_no_mapping_for() -> None:
    # given a mapping that lacks variable 4
    mapping = {k: v for k, v in DEFAULT_MAPPING.items() if k != "4"}

    # when composing, then it fails permanently naming the variable
    with pytest.raises(ComposeFailed) as caught:
        OfflineComposer(mapping).compose(request(api_key=None))
    assert caught.value.code == "offline_mapping_incomplete"
    assert "4" in str(caught.value)
    assert TEMPLATE.sid in str(caught.value)


# --- OpenAI composer (through the real SDK) ---


def test_openai_opens_a_conversation_and_counts_tokens(openai_fake: OpenAIFake) -> None:
    # given the OpenAI composer on the fake
    composer = OpenAIComposer(base_url=openai_fake.base_url)

    # when composing without a thread
    draft = composer.compose(request())

    # then one conversation was created, tagged with the prompt version, and its id is the thread
    conversations = openai_fake.posts("conversations")
    assert len(conversations) == 1
    assert conversations[0]["metadata"]["prompt_version"] == PROMPT_VERSION
    assert draft.thread_id is not None and draft.thread_id.startswith("conv_")
    assert draft.thread_id in openai_fake.conversations
    # and the response's ids and usage are on the draft
    assert draft.response_id is not None and draft.response_id.startswith("resp_")
    assert draft.prompt_tokens > 0 and draft.completion_tokens > 0
    assert draft.total_tokens == draft.prompt_tokens + draft.completion_tokens


def test_openai_sends_a_strict_schema_of_exactly_the_template_keys(openai_fake: OpenAIFake) -> None:
    # given the OpenAI composer on the fake
    composer = OpenAIComposer(base_url=openai_fake.base_url, default_model="gpt-test-mini")

    # when composing
    draft = composer.compose(request())

    # then the request asked for strict structured output of the four variables, all strings
    [sent] = openai_fake.posts("responses")
    fmt = sent["text"]["format"]
    assert fmt["type"] == "json_schema"
    assert fmt["name"] == SCHEMA_NAME
    assert fmt["strict"] is True
    schema = fmt["schema"]
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert sorted(schema["properties"]) == ["1", "2", "3", "4"]
    assert sorted(schema["required"]) == ["1", "2", "3", "4"]
    assert {p["type"] for p in schema["properties"].values()} == {"string"}
    # and it went on the new conversation, stored, with the default model and versioned prompt
    assert sent["conversation"] == draft.thread_id
    assert sent["store"] is True
    assert sent["model"] == "gpt-test-mini"
    assert sent["metadata"]["prompt_version"] == PROMPT_VERSION
    assert "WhatsApp" in sent["instructions"]


def test_openai_input_has_the_facts_but_no_contact_details(openai_fake: OpenAIFake) -> None:
    # given the OpenAI composer on the fake
    composer = OpenAIComposer(base_url=openai_fake.base_url)

    # when composing
    composer.compose(request())

    # then the user message carries the names and project, not the phone number or e-mail
    [sent] = openai_fake.posts("responses")
    [message] = sent["input"]
    assert message["role"] == "user"
    content = message["content"]
    for fact in ("Maria", "Carla", "Cucumber Recruitment", "Clarify Pilot", "Site electrician"):
        assert fact in content
    assert "+447700900123" not in content
    assert "maria@example.com" not in content


def test_openai_reuses_an_existing_thread_without_a_new_conversation(
    openai_fake: OpenAIFake,
) -> None:
    # given a conversation made by a first compose
    composer = OpenAIComposer(base_url=openai_fake.base_url)
    first = composer.compose(request())

    # when re-asking on that thread with feedback
    second = composer.compose(
        request(thread_id=first.thread_id, feedback="variable '2' is empty after cleaning")
    )

    # then no second conversation was created and the response continued the first one
    assert len(openai_fake.posts("conversations")) == 1
    sent = openai_fake.posts("responses")[-1]
    assert sent["conversation"] == first.thread_id
    assert second.thread_id == first.thread_id
    assert second.response_id != first.response_id
    # and the model was told why its previous answer was refused
    assert "variable '2' is empty after cleaning" in sent["input"][0]["content"]


def test_openai_company_model_and_instructions_override_the_defaults(
    openai_fake: OpenAIFake,
) -> None:
    # given a request carrying the company's model and instructions
    composer = OpenAIComposer(base_url=openai_fake.base_url)

    # when composing
    draft = composer.compose(request(model="gpt-company", instructions="Be brief."))

    # then they are used, and the metadata says the instructions were the company's
    [sent] = openai_fake.posts("responses")
    assert sent["model"] == "gpt-company"
    assert sent["instructions"] == "Be brief."
    assert sent["metadata"]["instructions"] == "company"
    assert draft.model is not None and draft.model.startswith("gpt-company")


def test_openai_answer_with_wrong_keys_is_returned_for_the_pipeline_to_reask(
    openai_fake: OpenAIFake,
) -> None:
    # given a model that answers with a key the template does not have
    openai_fake.answer_always({"1": "Maria", "name": "Carla"})
    composer = OpenAIComposer(base_url=openai_fake.base_url)

    # when composing
    draft = composer.compose(request())

    # then the answer comes back as given (not an error): the pipeline re-asks
    assert draft.variables == {"1": "Maria", "name": "Carla"}
