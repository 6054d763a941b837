"""Composer on OpenAI's Responses API: structured output whose keys are exactly the template's
variables, one OpenAI Conversation per conversation record, SDK errors translated in one table."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import cache
from importlib import resources
from typing import Any

import openai
from openai.types.responses import Response

from channel_processor.domain import Draft, Template
from channel_processor.errors import ComposeFailed, ComposerUnavailable, ProcessorError
from channel_processor.ports import ComposeRequest

logger = logging.getLogger(__name__)

# Bump together with a new prompts/<PROMPT_VERSION>.md; the version is written into the metadata of
# every Conversation and Response so an answer can be traced to the text that produced it.
PROMPT_VERSION = "whatsapp_template_v1"
SCHEMA_NAME = "whatsapp_template_variables"

# OpenAI metadata values are capped at 512 characters.
_METADATA_VALUE_MAX = 512
# A multi-tenant container sees one API key per company; keep the clients of the recent ones only.
_MAX_CLIENTS = 64


@cache
def load_instructions(version: str = PROMPT_VERSION) -> str:
    """The versioned instructions shipped in ``channel_processor/prompts``."""
    path = resources.files("channel_processor").joinpath("prompts", f"{version}.md")
    return path.read_text(encoding="utf-8")


def build_schema(template: Template) -> dict[str, Any]:
    """Strict JSON schema: one required string per template variable and nothing else."""
    return {
        "type": "object",
        "properties": {
            name: {
                "type": "string",
                "description": f"Replaces {{{{{name}}}}} in the template body.",
            }
            for name in template.variables
        },
        "required": list(template.variables),
        "additionalProperties": False,
    }


def build_input(request: ComposeRequest) -> dict[str, Any]:
    """The facts the model may use; contact details (phone, e-mail) are left out on purpose."""
    context = request.context
    frontend = _mapping(context.get("frontend_payload"))
    company = _mapping(context.get("company_data_payload"))
    recipient = _mapping(frontend.get("recipient_data"))
    reps = _mapping(company.get("company_rep"))
    facts: dict[str, Any] = {
        "template": {
            "body": request.template.body,
            "variables": list(request.template.variables),
        },
        "recipient": {
            "first_name": recipient.get("recipient_first_name"),
            "last_name": recipient.get("recipient_last_name"),
        },
        "company": {
            "company_name": company.get("company_name"),
            "project_name": company.get("project_name"),
            "company_rep": {k: v for k, v in reps.items() if v not in (None, "")},
        },
        "project": _mapping(frontend.get("project_data")),
    }
    if request.feedback:
        facts["previous_answer_refused"] = request.feedback
    return facts


# --- the error table: the only place OpenAI SDK exceptions become ours ---

_Translate = Callable[[openai.OpenAIError], ProcessorError]


def _describe(exc: openai.OpenAIError, *, with_message: bool = True) -> str:
    status = getattr(exc, "status_code", None)
    code = getattr(exc, "code", None)
    head = " ".join(str(part) for part in ("OpenAI", status, code or type(exc).__name__) if part)
    if not with_message:
        return head
    message = str(getattr(exc, "message", "") or exc)[:300]
    return f"{head}: {message}"


def _unavailable(exc: openai.OpenAIError) -> ProcessorError:
    return ComposerUnavailable(_describe(exc))


def _failed(default_code: str, *, with_message: bool = True) -> _Translate:
    def translate(exc: openai.OpenAIError) -> ProcessorError:
        code = getattr(exc, "code", None) or default_code
        return ComposeFailed(_describe(exc, with_message=with_message), code=str(code))

    return translate


def _rate_limited(exc: openai.OpenAIError) -> ProcessorError:
    # 429 means two different things: a burst (wait and retry) or an empty account (retrying
    # only burns the queue's receive count), told apart by the error code alone.
    if getattr(exc, "code", None) == "insufficient_quota":
        return ComposeFailed(_describe(exc), code="insufficient_quota")
    return ComposerUnavailable(_describe(exc))


def _other_status(exc: openai.OpenAIError) -> ProcessorError:
    status = getattr(exc, "status_code", 0)
    if status >= 500 or status == 408:
        return ComposerUnavailable(_describe(exc))
    return _failed(f"http_{status}")(exc)


# Looked up along the exception's MRO, so the most specific class listed wins.
ERROR_TABLE: Mapping[type[openai.OpenAIError], _Translate] = {
    openai.RateLimitError: _rate_limited,
    openai.APITimeoutError: _unavailable,
    openai.APIConnectionError: _unavailable,
    openai.InternalServerError: _unavailable,
    # 409: the conversation is busy with another response; the SDK itself treats it as retryable.
    openai.ConflictError: _unavailable,
    # The message of a 401 quotes part of the key: keep it out of the record's failure_reason.
    openai.AuthenticationError: _failed("authentication_error", with_message=False),
    openai.PermissionDeniedError: _failed("permission_denied"),
    openai.BadRequestError: _failed("bad_request"),
    openai.NotFoundError: _failed("not_found"),
    openai.UnprocessableEntityError: _failed("unprocessable_entity"),
    openai.APIResponseValidationError: _failed("invalid_response"),
    openai.APIStatusError: _other_status,
    openai.OpenAIError: _failed("openai_error"),
}


def translate_error(exc: openai.OpenAIError) -> ProcessorError:
    for cls in type(exc).__mro__:
        translate = ERROR_TABLE.get(cls)
        if translate is not None:
            return translate(exc)
    raise AssertionError("unreachable: OpenAIError is in the table")  # pragma: no cover


# --- the adapter ---


class OpenAIComposer:
    """``Composer`` on the Responses API; thread safe (one SDK client per API key, shared)."""

    def __init__(
        self,
        base_url: str | None = None,
        default_model: str = "gpt-4.1-mini",
        max_retries: int = 0,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self._base_url = base_url
        self._default_model = default_model
        self._max_retries = max_retries
        self._clients: OrderedDict[str, openai.OpenAI] = OrderedDict()
        self._clients_lock = threading.Lock()

    def compose(self, request: ComposeRequest) -> Draft:
        if not request.api_key:
            raise ComposeFailed("no OpenAI API key was given", code="missing_api_key")
        # One budget for the whole compose: conversation create, response create and any SDK
        # retries must all fit in it, so each HTTP attempt gets a share of what is left.
        deadline = time.monotonic() + request.timeout_seconds
        client = self._client(request.api_key)
        model = request.model or self._default_model
        custom = bool(request.instructions)
        instructions = request.instructions or load_instructions()
        metadata = self._metadata(request, custom_instructions=custom)
        try:
            thread_id = request.thread_id
            if thread_id is None:
                conversation = self._bounded(client, deadline).conversations.create(
                    metadata=metadata
                )
                thread_id = conversation.id
            response = self._bounded(client, deadline).responses.create(
                model=model,
                instructions=instructions,
                input=[
                    {
                        "role": "user",
                        "content": json.dumps(
                            build_input(request), ensure_ascii=False, default=str
                        ),
                    }
                ],
                conversation=thread_id,
                text={
                    "format": {
                        "type": "json_schema",
                        "name": SCHEMA_NAME,
                        "strict": True,
                        "schema": build_schema(request.template),
                    }
                },
                metadata=metadata,
                store=True,
            )
        except openai.OpenAIError as exc:
            raise translate_error(exc) from exc
        variables = self._variables(response)
        usage = response.usage
        draft = Draft(
            variables=variables,
            rendered=request.template.render(variables),
            thread_id=thread_id,
            response_id=response.id,
            model=response.model or model,
            prompt_tokens=usage.input_tokens if usage else 0,
            completion_tokens=usage.output_tokens if usage else 0,
            total_tokens=usage.total_tokens if usage else 0,
        )
        logger.info(
            "openai composed template variables",
            extra={
                "thread_id": draft.thread_id,
                "response_id": draft.response_id,
                "model": draft.model,
                "prompt_version": metadata["prompt_version"],
                "total_tokens": draft.total_tokens,
                "variable_names": sorted(variables),
            },
        )
        return draft

    def _client(self, api_key: str) -> openai.OpenAI:
        with self._clients_lock:
            client = self._clients.get(api_key)
            if client is None:
                client = openai.OpenAI(
                    api_key=api_key, base_url=self._base_url, max_retries=self._max_retries
                )
                self._clients[api_key] = client
                if len(self._clients) > _MAX_CLIENTS:
                    # Not closed: another thread may still be using it; the GC closes its pool.
                    self._clients.popitem(last=False)
            else:
                self._clients.move_to_end(api_key)
            return client

    def _bounded(self, client: openai.OpenAI, deadline: float) -> openai.OpenAI:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ComposerUnavailable("OpenAI time budget exhausted before the call")
        return client.with_options(
            timeout=remaining / (self._max_retries + 1), max_retries=self._max_retries
        )

    @staticmethod
    def _metadata(request: ComposeRequest, *, custom_instructions: bool) -> dict[str, str]:
        conversation = _mapping(request.context.get("conversation_data"))
        metadata = {
            "prompt_version": PROMPT_VERSION,
            "instructions": "company" if custom_instructions else "repo",
            "template_sid": request.template.sid,
            "channel": "whatsapp",
            "conversation_id": str(conversation.get("conversation_id") or ""),
        }
        return {k: v[:_METADATA_VALUE_MAX] for k, v in metadata.items() if v}

    @staticmethod
    def _variables(response: Response) -> dict[str, str]:
        """The answer as a dict; wrong keys are returned as they are (the pipeline re-asks)."""
        refusals = [
            part.refusal
            for item in response.output
            if item.type == "message"
            for part in item.content
            if part.type == "refusal"
        ]
        if refusals:
            logger.debug("openai refusal: %s", refusals)
            raise ComposeFailed("the model refused to write the variables", code="refusal")
        details = response.incomplete_details
        if response.status == "incomplete" and details and details.reason == "content_filter":
            raise ComposeFailed(
                "the answer was stopped by the content filter", code="content_filter"
            )
        if response.status == "failed":
            error = response.error
            code = error.code if error else "response_failed"
            if code in ("server_error", "rate_limit_exceeded"):
                raise ComposerUnavailable(f"OpenAI response {response.id} failed: {code}")
            raise ComposeFailed(f"OpenAI response {response.id} failed: {code}", code=str(code))
        text = response.output_text
        logger.debug("openai raw output: %s", text)
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            # Not an object at all (truncated, empty): an empty answer makes the pipeline re-ask
            # with "missing variables", the bounded path the spec wants for schema breaks.
            logger.warning(
                "openai output is not a JSON object",
                extra={"response_id": response.id, "status": response.status},
            )
            return {}
        return {str(k): _as_text(v) for k, v in parsed.items()}


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)
