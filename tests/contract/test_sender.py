"""The Sender contract, held by every implementation: the in-memory fake, the SQLite sandbox and
the Twilio adapter (through the real SDK against the local fake of Twilio)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from channel_processor.adapters.sandbox_sender import SandboxSender
from channel_processor.adapters.twilio_sender import TwilioSender
from channel_processor.domain import SendRequest, Template, utcnow
from channel_processor.errors import SendOutcomeUnknown, SendRejected
from channel_processor.ports import Sender, TwilioCredentials
from tests.fakes.sender import AcceptThenRaise, FakeSender
from tests.fakes.twilio_server import (
    ACCOUNT_SID,
    CONTENT_BODY,
    CONTENT_SID,
    TwilioFake,
    twilio_fake,  # noqa: F401  (fixture)
)

TEMPLATE = Template(sid=CONTENT_SID, body=CONTENT_BODY, variables=("1", "2", "3"))
RECIPIENT = "+12025550123"
OTHER_RECIPIENT = "+447700900123"
COMPANY = "+14155552671"
VARIABLES = {"1": "Ana", "2": "Sam", "3": "Acme Solar"}


@dataclass
class Case:
    sender: Sender
    credentials: TwilioCredentials


@pytest.fixture(params=["fake", "sandbox", "twilio"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    if request.param == "fake":
        yield Case(FakeSender(templates={TEMPLATE.sid: TEMPLATE}), _credentials())
    elif request.param == "sandbox":
        sandbox = SandboxSender(tmp_path / "sandbox.db", {TEMPLATE.sid: TEMPLATE})
        yield Case(sandbox, _credentials())
        sandbox.close()
    else:
        fake: TwilioFake = request.getfixturevalue("twilio_fake")
        yield Case(TwilioSender(timeout_seconds=5, base_url=fake.base_url), fake.credentials())


def _credentials() -> TwilioCredentials:
    return TwilioCredentials(account_sid=ACCOUNT_SID, auth_token="token", template_sid=CONTENT_SID)


def _request(to: str = RECIPIENT, **changes: object) -> SendRequest:
    fields: dict[str, object] = {
        "to": to,
        "from_": COMPANY,
        "content_sid": CONTENT_SID,
        "variables": dict(VARIABLES),
    }
    fields.update(changes)
    return SendRequest(**fields)  # type: ignore[arg-type]


def test_a_sent_message_is_found_by_a_lookup_from_just_before_the_send(case: Case) -> None:
    # given a moment just before the send
    since = utcnow() - timedelta(seconds=2)
    # when a message is sent
    sent = case.sender.send(case.credentials, _request())
    # then it has a Twilio-like SID and a lookup from that moment finds it
    assert sent.sid.startswith("SM") and len(sent.sid) == 34
    found = case.sender.find_sent(case.credentials, RECIPIENT, COMPANY, since)
    assert [m.sid for m in found] == [sent.sid]


def test_a_lookup_from_after_the_send_does_not_find_the_message(case: Case) -> None:
    # given a message sent now
    case.sender.send(case.credentials, _request())
    # when the lookup starts later than the send
    found = case.sender.find_sent(
        case.credentials, RECIPIENT, COMPANY, utcnow() + timedelta(seconds=3)
    )
    # then nothing is found
    assert found == []


def test_a_lookup_finds_only_messages_to_that_recipient(case: Case) -> None:
    # given a message to one recipient
    since = utcnow() - timedelta(seconds=2)
    case.sender.send(case.credentials, _request())
    # when another recipient is looked up
    found = case.sender.find_sent(case.credentials, OTHER_RECIPIENT, COMPANY, since)
    # then nothing is found
    assert found == []


def test_a_lookup_matches_numbers_with_or_without_the_channel_prefix(case: Case) -> None:
    # given a message sent to a number written with the channel prefix
    since = utcnow() - timedelta(seconds=2)
    sent = case.sender.send(case.credentials, _request(to=f"whatsapp:{RECIPIENT}"))
    # when it is looked up with the bare number
    found = case.sender.find_sent(case.credentials, RECIPIENT, f"whatsapp:{COMPANY}", since)
    # then it is found
    assert [m.sid for m in found] == [sent.sid]


def test_template_returns_the_body_and_the_variable_names(case: Case) -> None:
    # when the template is fetched
    template = case.sender.template(case.credentials, CONTENT_SID)
    # then its body and variable names are the configured ones
    assert template == TEMPLATE


def test_an_unknown_template_is_rejected(case: Case) -> None:
    # when a template that does not exist is fetched, then the send is rejected for good
    with pytest.raises(SendRejected):
        case.sender.template(case.credentials, "HX" + "0" * 32)


def test_a_variable_with_a_newline_is_rejected_naming_it_and_nothing_is_sent(case: Case) -> None:
    # given a variable value Twilio would refuse
    since = utcnow() - timedelta(seconds=2)
    bad = _request(variables={**VARIABLES, "2": "Sam\nSmith"})
    # when it is sent, then it is rejected naming the variable
    with pytest.raises(SendRejected, match="'2'"):
        case.sender.send(case.credentials, bad)
    # and no message exists
    assert case.sender.find_sent(case.credentials, RECIPIENT, COMPANY, since) == []


def test_concurrent_sends_each_get_their_own_message(case: Case) -> None:
    # given twelve sends from four threads at once
    since = utcnow() - timedelta(seconds=2)
    with ThreadPoolExecutor(max_workers=4) as pool:
        sent = list(pool.map(lambda _: case.sender.send(case.credentials, _request()), range(12)))
    # then every send has its own SID and the lookup finds all of them
    sids = {m.sid for m in sent}
    assert len(sids) == 12
    found = case.sender.find_sent(case.credentials, RECIPIENT, COMPANY, since)
    assert {m.sid for m in found} == sids


def test_the_sandbox_lists_what_it_recorded_with_the_rendered_preview(tmp_path: Path) -> None:
    # given a sandbox that "sent" one message
    sandbox = SandboxSender(tmp_path / "nested" / "local.db", {TEMPLATE.sid: TEMPLATE})
    sent = sandbox.send(_credentials(), _request())
    # when its messages are listed (by a new instance on the same file, as the CLI would)
    listed = SandboxSender(tmp_path / "nested" / "local.db", {}).messages()
    # then the message is there, addressed like Twilio's, with its variables and preview
    assert len(listed) == 1
    message = listed[0]
    assert message.sid == sent.sid
    assert (message.to, message.from_) == (f"whatsapp:{RECIPIENT}", f"whatsapp:{COMPANY}")
    assert message.content_sid == CONTENT_SID
    assert message.variables == VARIABLES
    assert message.rendered == sent.body == TEMPLATE.render(VARIABLES)
    assert message.created_at == sent.created_at
    sandbox.close()


def test_the_fake_can_accept_a_message_and_then_report_an_unknown_outcome() -> None:
    # given a fake scripted to accept the send and lose the answer
    def script(op: str, request: object) -> object:
        return AcceptThenRaise(SendOutcomeUnknown("reset")) if op == "send" else None

    fake = FakeSender(script=script, templates={TEMPLATE.sid: TEMPLATE})
    since = utcnow() - timedelta(seconds=2)
    # when it is sent, then the caller sees the unknown outcome
    with pytest.raises(SendOutcomeUnknown):
        fake.send(_credentials(), _request())
    # and the message exists, as it would at Twilio
    assert fake.sends_to(RECIPIENT) == 1
    assert len(fake.find_sent(_credentials(), RECIPIENT, COMPANY, since)) == 1
    assert [op for op, _ in fake.calls] == ["send", "find_sent"]
