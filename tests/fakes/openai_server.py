"""A local HTTP fake of OpenAI's ``POST /v1/conversations`` and ``POST /v1/responses``, answering
with bodies the real SDK parses; each test scripts the answers and reads the recorded requests."""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass(frozen=True)
class Fault:
    """An HTTP error as OpenAI sends it (``{"error": {...}}``), optionally after a delay."""

    status: int
    code: str | None = None
    type: str = "invalid_request_error"
    message: str = "scripted failure"
    delay: float = 0.0


# The answers OpenAI gives most often when things go wrong.
INSUFFICIENT_QUOTA = Fault(
    429,
    code="insufficient_quota",
    type="insufficient_quota",
    message="You exceeded your current quota, please check your plan and billing details.",
)
RATE_LIMITED = Fault(
    429,
    code="rate_limit_exceeded",
    type="requests",
    message="Rate limit reached for gpt-4.1-mini on requests per min (RPM).",
)
SERVER_ERROR = Fault(500, code="server_error", type="server_error", message="Internal error.")
INVALID_API_KEY = Fault(
    401,
    code="invalid_api_key",
    message="Incorrect API key provided: sk-test***************1234.",
)


@dataclass(frozen=True)
class RawOutput:
    """Output text that is not the requested JSON (e.g. a truncated answer)."""

    text: str


@dataclass(frozen=True)
class Refusal:
    text: str = "I'm sorry, I can't help with that."


@dataclass(frozen=True)
class Delayed:
    """Wait ``seconds`` before giving ``then`` (a client timeout fires first when shorter)."""

    seconds: float
    then: Answer


Answer = dict[str, Any] | Fault | RawOutput | Refusal | Delayed
Script = Callable[[dict[str, Any], int], Answer]


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


def fill_schema(request_json: dict[str, Any], call_number: int) -> dict[str, Any]:
    """Default answer: a plausible value for every property of the schema that was sent."""
    schema = request_json.get("text", {}).get("format", {}).get("schema", {})
    return {name: f"value {name}" for name in schema.get("properties", {})}


@dataclass
class OpenAIFake:
    """The fake's state; ``base_url`` goes to the SDK (``.../v1``)."""

    base_url: str = ""
    script: Script = fill_schema
    conversation_fault: Fault | None = None
    conversation_delay: float = 0.0
    requests: list[Recorded] = field(default_factory=list)
    conversations: dict[str, dict[str, Any]] = field(default_factory=dict)
    response_calls: int = 0
    errors: list[str] = field(default_factory=list)  # exceptions raised by scripts
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _closing: threading.Event = field(default_factory=threading.Event, repr=False)

    def answer(self, script: Script) -> None:
        self.script = script

    def answer_always(self, answer: Answer) -> None:
        self.script = lambda _request, _n: answer

    def posts(self, path: str) -> list[dict[str, Any]]:
        """Bodies of the POSTs to ``/v1/<path>``, in order."""
        with self._lock:
            return [r.body for r in self.requests if r.path == f"/v1/{path}"]

    def wait(self, seconds: float) -> None:
        # Wakes early when the server shuts down, so a test never waits for a delay it set.
        self._closing.wait(seconds)

    def handle(self, method: str, path: str, headers: dict[str, str], body: dict[str, Any]) -> Any:
        """Returns (status, JSON body)."""
        with self._lock:
            self.requests.append(Recorded(method, path, headers, body))
        if not headers.get("authorization", "").startswith("Bearer "):
            return _error(Fault(401, message="You didn't provide an API key."))
        if method == "POST" and path == "/v1/conversations":
            return self._create_conversation(body)
        if method == "POST" and path == "/v1/responses":
            with self._lock:
                self.response_calls += 1
                call_number = self.response_calls
            return self._create_response(body, self.script(body, call_number))
        return _error(Fault(404, message=f"Invalid URL ({method} {path})"))

    def _create_conversation(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.wait(self.conversation_delay)
        if self.conversation_fault is not None:
            self.wait(self.conversation_fault.delay)
            return _error(self.conversation_fault)
        conversation = {
            "id": f"conv_{uuid.uuid4().hex}{uuid.uuid4().hex[:16]}",
            "object": "conversation",
            "created_at": int(time.time()),
            "metadata": body.get("metadata") or {},
        }
        with self._lock:
            self.conversations[conversation["id"]] = {
                **conversation,
                "items": list(body.get("items") or []),
            }
        return 200, conversation

    def _create_response(self, body: dict[str, Any], answer: Answer) -> tuple[int, dict[str, Any]]:
        while isinstance(answer, Delayed):
            self.wait(answer.seconds)
            answer = answer.then
        if isinstance(answer, Fault):
            self.wait(answer.delay)
            return _error(answer)
        problem = _schema_problem(body)
        if problem:
            return _error(Fault(400, code="invalid_json_schema", message=problem))
        conversation = body.get("conversation")
        conversation_id = conversation.get("id") if isinstance(conversation, dict) else conversation
        if conversation_id is not None:
            with self._lock:
                known = self.conversations.get(conversation_id)
            if known is None:
                return _error(
                    Fault(404, message=f"Conversation with id '{conversation_id}' not found.")
                )
        if isinstance(answer, Refusal):
            content: dict[str, Any] = {"type": "refusal", "refusal": answer.text}
            text = answer.text
        else:
            text = answer.text if isinstance(answer, RawOutput) else json.dumps(answer)
            content = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        message = {
            "id": f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [content],
        }
        if conversation_id is not None:
            with self._lock:
                items = self.conversations[conversation_id]["items"]
                items.extend(body.get("input") or [])
                items.append(message)
        input_tokens = 40 + len(json.dumps(body.get("input"))) // 4
        output_tokens = 1 + len(text) // 4
        now = int(time.time())
        return 200, {
            "id": f"resp_{uuid.uuid4().hex}{uuid.uuid4().hex[:16]}",
            "object": "response",
            "created_at": now,
            "completed_at": now,
            "status": "completed",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": f"{body.get('model')}-2025-04-14",
            "output": [message],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "conversation": {"id": conversation_id} if conversation_id else None,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": 1.0,
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_logprobs": 0,
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            },
            "user": None,
            "metadata": body.get("metadata") or {},
        }


def _error(fault: Fault) -> tuple[int, dict[str, Any]]:
    return fault.status, {
        "error": {"message": fault.message, "type": fault.type, "param": None, "code": fault.code}
    }


def _schema_problem(body: dict[str, Any]) -> str | None:
    """What OpenAI's strict structured outputs would refuse in the schema sent, if anything."""
    fmt = (body.get("text") or {}).get("format") or {}
    if fmt.get("type") != "json_schema" or not fmt.get("strict"):
        return None
    schema = fmt.get("schema") or {}
    if schema.get("additionalProperties") is not False:
        return "Invalid schema: 'additionalProperties' is required to be supplied and to be false."
    if sorted(schema.get("required") or []) != sorted(schema.get("properties") or {}):
        return "Invalid schema: 'required' must include every key in properties."
    return None


_ids = itertools.count(1)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    fake: OpenAIFake

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out closes the socket under a delayed answer: expected, not noise.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"_unparsed": raw.decode("utf-8", "replace")}
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            status, payload = self.server.fake.handle("POST", self.path, headers, body)
        except Exception as exc:
            # A bug in a test's script must show as itself, not as a dropped connection.
            self.server.fake.errors.append(repr(exc))
            status, payload = 500, {"error": {"message": f"fake crashed: {exc!r}", "code": None}}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("x-request-id", f"req_{next(_ids):08d}")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_openai_fake() -> tuple[OpenAIFake, Callable[[], None]]:
    """Start a fake on a free loopback port; returns it and the function that stops it."""
    fake = OpenAIFake()
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fake = fake
    host, port = server.server_address[:2]
    fake.base_url = f"http://{host}:{port}/v1"
    # A short poll interval keeps shutdown (and so each test's teardown) quick.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="openai-fake", daemon=True
    )
    thread.start()

    def stop() -> None:
        fake._closing.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return fake, stop


@pytest.fixture(name="openai_fake")
def openai_fake_fixture() -> Iterator[OpenAIFake]:
    """Fixture ``openai_fake``: a fresh fake per test. A test module enables it with
    ``from tests.fakes.openai_server import openai_fake_fixture  # noqa: F401``."""
    fake, stop = start_openai_fake()
    try:
        yield fake
    finally:
        stop()
