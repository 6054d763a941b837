"""Builders shared by the tests: Context Objects with invented values, and a pipeline on fakes."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from channel_processor.config import Settings
from channel_processor.pipeline import Delivery, Dependencies, Pipeline, ProcessResult
from tests.fakes.composer import FakeComposer
from tests.fakes.secrets import FakeSecretSource
from tests.fakes.sender import DEFAULT_TEMPLATE, FakeSender
from tests.fakes.store import FakeConversationStore, FakeDeadLetters, FakeRepairLog

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = json.loads((ROOT / "examples" / "context.json").read_text())

TWILIO_SECRET_NAME = "northwind-whatsapp-twilio"
OPENAI_SECRET_NAME = "northwind-openai"
TWILIO_SECRET = {
    "twilio_account_sid": "AC" + "1" * 32,
    "twilio_auth_token": "tok-very-secret-123",
    "twilio_template_sid": DEFAULT_TEMPLATE.sid,
}
OPENAI_SECRET = {"ai_api_key": "sk-test-very-secret"}
RECIPIENT = "+12025550123"
COMPANY_NUMBER = "+14155552671"


def context_object(
    request_id: str = "6f1c2a9e-3b7d-4c55-9a0e-2d4b8f7e1c30",
    recipient_tel: str = "+1 (202) 555-0123",
    **changes: Any,
) -> dict[str, Any]:
    """The example Context Object with a given request id (the conversation id follows it)."""
    data = copy.deepcopy(EXAMPLE)
    data["frontend_payload"]["request_data"]["request_id"] = request_id
    data["frontend_payload"]["recipient_data"]["recipient_tel"] = recipient_tel
    data["conversation_data"]["conversation_id"] = (
        f"cmp-northwind#prj-warehouse-2026#{request_id}#{COMPANY_NUMBER.lstrip('+')}"
    )
    for dotted, value in changes.items():
        target = data
        *parents, leaf = dotted.split("__")
        for part in parents:
            target = target[part]
        target[leaf] = value
    return data


def body(data: dict[str, Any]) -> str:
    return json.dumps(data)


@dataclass
class World:
    """A pipeline on fakes, with every fake reachable for assertions."""

    store: FakeConversationStore = field(default_factory=FakeConversationStore)
    repair_log: FakeRepairLog = field(default_factory=FakeRepairLog)
    dead_letters: FakeDeadLetters = field(default_factory=FakeDeadLetters)
    secrets: FakeSecretSource = field(
        default_factory=lambda: FakeSecretSource(
            {TWILIO_SECRET_NAME: TWILIO_SECRET, OPENAI_SECRET_NAME: OPENAI_SECRET}
        )
    )
    composer: FakeComposer = field(default_factory=FakeComposer)
    sender: FakeSender = field(default_factory=FakeSender)
    settings: Settings = field(
        default_factory=lambda: Settings(
            store="sqlite",
            composer="offline",
            sender="sandbox",
            secrets="local",
            send_settle_seconds=0.0,
            clock_skew_seconds=30.0,
        )
    )
    uses_openai: bool = True

    def pipeline(self, **deps: Any) -> Pipeline:
        return Pipeline(
            Dependencies(
                store=self.store,
                repair_log=self.repair_log,
                dead_letters=self.dead_letters,
                secrets=self.secrets,
                composer=self.composer,
                sender=self.sender,
                uses_openai=self.uses_openai,
                **deps,
            ),
            self.settings,
        )

    def process(
        self,
        data: dict[str, Any] | str,
        receive_count: int = 1,
        message_id: str = "m-1",
        **deps: Any,
    ) -> ProcessResult:
        raw = data if isinstance(data, str) else body(data)
        return self.pipeline(**deps).process(
            Delivery(body=raw, message_id=message_id, receive_count=receive_count)
        )
