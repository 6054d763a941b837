"""TwilioSender through the real Twilio SDK against the local fake of Twilio: what reaches the
wire, how every failure is classified, and that a create is never sent twice."""

from __future__ import annotations

import http.client
import inspect
import json
import socket
import time
from datetime import timedelta

import pytest
import requests
import requests.exceptions
import twilio.base.exceptions
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError

from channel_processor.adapters.twilio_sender import TwilioSender, classify_error
from channel_processor.domain import SendRequest, utcnow
from channel_processor.errors import (
    LookupUnavailable,
    ProcessorError,
    SendOutcomeUnknown,
    SendRejected,
    SendThrottled,
)
from channel_processor.ports import TwilioCredentials
from tests.fakes.twilio_server import ACCOUNT_SID, CONTENT_SID, Fault, TwilioFake

RECIPIENT = "+12025550123"
COMPANY = "+14155552671"
VARIABLES = {"1": "Ana", "2": "Sam", "3": "Acme Solar"}
TIMEOUT = 0.5


def _sender(fake: TwilioFake, timeout: float = TIMEOUT) -> TwilioSender:
    return TwilioSender(timeout_seconds=timeout, base_url=fake.base_url)


def _request(**changes: object) -> SendRequest:
    fields: dict[str, object] = {
        "to": RECIPIENT,
        "from_": COMPANY,
        "content_sid": CONTENT_SID,
        "variables": dict(VARIABLES),
    }
    fields.update(changes)
    return SendRequest(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# What reaches Twilio
# ---------------------------------------------------------------------------------------------


def test_variables_with_an_apostrophe_reach_twilio_as_an_intact_json_string(
    twilio_fake: TwilioFake,
) -> None:
    # given variables holding an apostrophe and an accent
    variables = {"1": "O'Brien", "2": "José", "3": "Rock 'n' Roll Ltd"}
    # when the message is sent
    sent = _sender(twilio_fake).send(twilio_fake.credentials(), _request(variables=variables))
    # then Twilio received them as one JSON string that decodes to exactly the same values
    form = twilio_fake.creates[0]
    assert json.loads(form["ContentVariables"]) == variables
    assert form["ContentSid"] == CONTENT_SID
    # and the body Twilio rendered carries them unchanged
    assert sent.body is not None and "O'Brien" in sent.body and "José" in sent.body


@pytest.mark.parametrize(
    "to", [RECIPIENT, f"whatsapp:{RECIPIENT}", f"whatsapp:whatsapp:{RECIPIENT}"]
)
@pytest.mark.parametrize("from_", [COMPANY, f"whatsapp:{COMPANY}"])
def test_the_whatsapp_prefix_appears_exactly_once_whatever_the_input(
    twilio_fake: TwilioFake, to: str, from_: str
) -> None:
    # when numbers are given with or without the channel prefix
    _sender(twilio_fake).send(twilio_fake.credentials(), _request(to=to, from_=from_))
    # then Twilio sees the prefix exactly once on each
    form = twilio_fake.creates[0]
    assert form["To"] == f"whatsapp:{RECIPIENT}"
    assert form["From"] == f"whatsapp:{COMPANY}"


def test_the_send_returns_twilio_s_sid_status_time_and_rendered_body(
    twilio_fake: TwilioFake,
) -> None:
    # when a message is sent
    before = utcnow().replace(microsecond=0)
    sent = _sender(twilio_fake).send(twilio_fake.credentials(), _request())
    # then the answer is Twilio's message, as our own value object
    stored = twilio_fake.messages[0]
    assert sent.sid == stored.sid
    assert sent.status == "queued"
    assert sent.created_at is not None and sent.created_at >= before
    assert sent.body == "Hi Ana, Sam from Acme Solar here. Can we talk about your project?"


def test_messaging_service_and_status_callback_are_passed_when_given(
    twilio_fake: TwilioFake,
) -> None:
    # given a request with a messaging service and a status callback
    service = "MG" + "c" * 32
    callback = "https://hooks.example.com/twilio/status"
    request = _request(messaging_service_sid=service, status_callback=callback)
    # when it is sent
    _sender(twilio_fake).send(twilio_fake.credentials(), request)
    # then both reach Twilio
    form = twilio_fake.creates[0]
    assert form["MessagingServiceSid"] == service
    assert form["StatusCallback"] == callback


def test_optional_fields_are_not_sent_when_absent(twilio_fake: TwilioFake) -> None:
    # when a plain request is sent
    _sender(twilio_fake).send(twilio_fake.credentials(), _request())
    # then Twilio sees neither optional field
    assert "MessagingServiceSid" not in twilio_fake.creates[0]
    assert "StatusCallback" not in twilio_fake.creates[0]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "empty"),
        ("two\nlines", "newline"),
        ("a\ttab", "tab"),
        ("five     spaces", "more than 4 consecutive spaces"),
    ],
)
def test_a_variable_twilio_would_refuse_is_rejected_before_any_request(
    twilio_fake: TwilioFake, value: str, problem: str
) -> None:
    # given a variable that breaks Twilio's rules
    request = _request(variables={**VARIABLES, "3": value})
    # when it is sent, then it is rejected naming the variable and the problem
    with pytest.raises(SendRejected, match=rf"'3'.*{problem}"):
        _sender(twilio_fake).send(twilio_fake.credentials(), request)
    # and nothing reached Twilio
    assert twilio_fake.creates == []


# ---------------------------------------------------------------------------------------------
# Failures of the create, and the promise never to send twice
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [21211, 21610, 21656, 63016, 63049, 21408])
def test_a_permanent_twilio_error_is_rejected_with_its_code(
    twilio_fake: TwilioFake, code: int
) -> None:
    # given Twilio refuses the message with a 400 and that code
    twilio_fake.fail("create", status=400, code=code)
    # when it is sent
    with pytest.raises(SendRejected) as raised:
        _sender(twilio_fake).send(twilio_fake.credentials(), _request())
    # then the error carries Twilio's code and names it in the reason
    assert raised.value.code == str(code)
    assert str(code) in raised.value.reason
    assert twilio_fake.creates_to(RECIPIENT) == 1


def test_an_invalid_number_is_rejected_with_code_21211_and_a_masked_reason(
    twilio_fake: TwilioFake,
) -> None:
    # given Twilio answers 21211 and quotes the number in its message, as it does
    twilio_fake.inject(
        "create",
        Fault(status=400, code=21211, message=f"The 'To' number {RECIPIENT} is not valid."),
    )
    # when it is sent
    with pytest.raises(SendRejected) as raised:
        _sender(twilio_fake).send(twilio_fake.credentials(), _request())
    # then the code is Twilio's and the reason explains it without the full number
    assert raised.value.code == "21211"
    assert "invalid 'To' phone number" in raised.value.reason
    assert RECIPIENT not in raised.value.reason


@pytest.mark.parametrize(("status", "code"), [(429, 20429), (429, None), (400, 20429)])
def test_a_throttled_create_is_retryable_because_nothing_was_sent(
    twilio_fake: TwilioFake, status: int, code: int | None
) -> None:
    # given Twilio answers too-many-requests (by HTTP status or by code)
    twilio_fake.fail("create", status=status, code=code)
    # when it is sent, then the caller is told to retry later
    with pytest.raises(SendThrottled):
        _sender(twilio_fake).send(twilio_fake.credentials(), _request())
    # and no message exists at Twilio
    assert twilio_fake.messages == []


def test_a_503_is_an_unknown_outcome_and_the_sdk_does_not_retry(twilio_fake: TwilioFake) -> None:
    # given Twilio answers 503
    twilio_fake.fail("create", status=503)
    # when it is sent, then the outcome is unknown
    with pytest.raises(SendOutcomeUnknown):
        _sender(twilio_fake).send(twilio_fake.credentials(), _request())
    # and exactly one create reached Twilio
    assert twilio_fake.creates_to(RECIPIENT) == 1


def test_a_response_slower_than_the_timeout_is_an_unknown_outcome_within_the_timeout(
    twilio_fake: TwilioFake,
) -> None:
    # given Twilio answers only after four times the client's timeout
    twilio_fake.delay("create", TIMEOUT * 4)
    sender = _sender(twilio_fake)
    # when it is sent
    started = time.monotonic()
    with pytest.raises(SendOutcomeUnknown):
        sender.send(twilio_fake.credentials(), _request())
    elapsed = time.monotonic() - started
    # then the caller learns it within about the timeout, after exactly one create
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 1.0
    assert twilio_fake.creates_to(RECIPIENT) == 1


def test_accepted_then_503_is_unknown_and_the_message_is_found_by_a_lookup(
    twilio_fake: TwilioFake,
) -> None:
    # given Twilio stores the message, then answers 503
    twilio_fake.accept_then_fail(503)
    sender = _sender(twilio_fake)
    since = utcnow() - timedelta(seconds=2)
    # when it is sent, then the outcome is unknown
    with pytest.raises(SendOutcomeUnknown):
        sender.send(twilio_fake.credentials(), _request())
    # and the lookup the pipeline makes next finds the one message
    found = sender.find_sent(twilio_fake.credentials(), RECIPIENT, COMPANY, since)
    assert [m.sid for m in found] == [twilio_fake.messages[0].sid]
    assert twilio_fake.creates_to(RECIPIENT) == 1


def test_accepted_then_connection_dropped_is_unknown_after_one_create(
    twilio_fake: TwilioFake,
) -> None:
    # given Twilio stores the message, then drops the connection without answering
    twilio_fake.accept_then_drop()
    # when it is sent, then the outcome is unknown (the reset is not retried)
    with pytest.raises(SendOutcomeUnknown):
        _sender(twilio_fake).send(twilio_fake.credentials(), _request())
    assert twilio_fake.creates_to(RECIPIENT) == 1
    assert len(twilio_fake.messages_to(RECIPIENT)) == 1


def test_accepted_then_answered_too_late_is_unknown_after_one_create(
    twilio_fake: TwilioFake,
) -> None:
    # given Twilio stores the message and answers after the client's timeout
    twilio_fake.accept_then_delay(TIMEOUT * 4)
    # when it is sent, then the outcome is unknown
    with pytest.raises(SendOutcomeUnknown):
        _sender(twilio_fake).send(twilio_fake.credentials(), _request())
    assert twilio_fake.creates_to(RECIPIENT) == 1
    assert len(twilio_fake.messages_to(RECIPIENT)) == 1


def test_only_the_scripted_call_fails_and_the_next_send_goes_through(
    twilio_fake: TwilioFake,
) -> None:
    # given only the first create is throttled
    twilio_fake.fail("create", status=429, code=20429, calls=[1])
    sender = _sender(twilio_fake)
    # when the caller sends, is throttled, and sends again later
    with pytest.raises(SendThrottled):
        sender.send(twilio_fake.credentials(), _request())
    sent = sender.send(twilio_fake.credentials(), _request())
    # then the second attempt is the one message
    assert [m.sid for m in twilio_fake.messages] == [sent.sid]
    assert twilio_fake.creates_to(RECIPIENT) == 2


def test_a_refused_connection_is_retryable_because_nothing_left_the_machine() -> None:
    # given a loopback port where nothing listens
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sender = TwilioSender(timeout_seconds=TIMEOUT, base_url=f"http://127.0.0.1:{port}")
    credentials = TwilioCredentials(ACCOUNT_SID, "token", CONTENT_SID)
    # when a message is sent, then the caller may retry
    with pytest.raises(SendThrottled):
        sender.send(credentials, _request())


def test_wrong_credentials_are_rejected_with_twilio_s_code(twilio_fake: TwilioFake) -> None:
    # given an auth token Twilio does not know
    credentials = TwilioCredentials(ACCOUNT_SID, "not-the-token", CONTENT_SID)
    # when a message is sent, then it is rejected with Twilio's authentication code
    with pytest.raises(SendRejected) as raised:
        _sender(twilio_fake).send(credentials, _request())
    assert raised.value.code == "20003"


# ---------------------------------------------------------------------------------------------
# The SDK client: timeout, retries, caching, the base_url seam
# ---------------------------------------------------------------------------------------------


def test_the_sdk_client_always_has_the_timeout_and_no_retries(twilio_fake: TwilioFake) -> None:
    # when the client of an account is built
    client = _sender(twilio_fake, timeout=3.5).client_for(twilio_fake.credentials())
    # then its HTTP client has the configured timeout (the SDK's default is none)
    assert client.http_client.timeout == 3.5
    # and neither scheme retries a request
    for prefix in ("https://", "http://"):
        retries = client.http_client.session.get_adapter(prefix + "api.twilio.com").max_retries
        assert retries.total == 0


def test_the_timeout_is_set_without_a_base_url_too() -> None:
    # when the sender is built for the real Twilio
    sender = TwilioSender(timeout_seconds=7)
    client = sender.client_for(TwilioCredentials(ACCOUNT_SID, "token", CONTENT_SID))
    # then the timeout is set and no URL is rewritten
    assert client.http_client.timeout == 7
    assert client.http_client.base_url is None


def test_a_timeout_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="timeout"):
        TwilioSender(timeout_seconds=0)


def test_one_client_per_account_and_a_new_one_when_the_token_changes(
    twilio_fake: TwilioFake,
) -> None:
    # given a sender and two accounts
    sender = _sender(twilio_fake)
    other = "AC" + "2" * 32
    twilio_fake.add_account(other, "other-token")
    first = sender.client_for(twilio_fake.credentials())
    # then the same account gets the same client, another account another one
    assert sender.client_for(twilio_fake.credentials()) is first
    assert sender.client_for(twilio_fake.credentials(other)) is not first
    # and a rotated token gets a fresh client that uses it
    rotated = TwilioCredentials(ACCOUNT_SID, "rotated-token", CONTENT_SID)
    assert sender.client_for(rotated) is not first
    assert sender.client_for(rotated).password == "rotated-token"


def test_messages_of_two_accounts_go_to_their_own_account(twilio_fake: TwilioFake) -> None:
    # given a second account
    other = "AC" + "2" * 32
    twilio_fake.add_account(other, "other-token")
    sender = _sender(twilio_fake)
    # when each account sends
    sender.send(twilio_fake.credentials(), _request())
    sender.send(twilio_fake.credentials(other), _request(to="+447700900123"))
    # then Twilio stored each under its account
    assert [(m.account_sid, m.to) for m in twilio_fake.messages] == [
        (ACCOUNT_SID, f"whatsapp:{RECIPIENT}"),
        (other, "whatsapp:+447700900123"),
    ]


# ---------------------------------------------------------------------------------------------
# Templates (Content API)
# ---------------------------------------------------------------------------------------------


def test_a_template_is_fetched_once_and_then_served_from_the_cache(
    twilio_fake: TwilioFake,
) -> None:
    sender = _sender(twilio_fake)
    # when the same template is asked for twice
    first = sender.template(twilio_fake.credentials(), CONTENT_SID)
    second = sender.template(twilio_fake.credentials(), CONTENT_SID)
    # then Twilio was asked once
    assert first == second
    assert twilio_fake.calls["content"] == 1


def test_an_expired_template_cache_entry_is_fetched_again(twilio_fake: TwilioFake) -> None:
    sender = TwilioSender(TIMEOUT, base_url=twilio_fake.base_url, template_cache_seconds=0)
    sender.template(twilio_fake.credentials(), CONTENT_SID)
    sender.template(twilio_fake.credentials(), CONTENT_SID)
    assert twilio_fake.calls["content"] == 2


def test_template_variables_come_from_the_body_when_the_content_declares_none(
    twilio_fake: TwilioFake,
) -> None:
    # given a content whose only text is a WhatsApp card body and that declares no variables
    sid = "HX" + "d" * 32
    body = "Hello {{name}}, {{ rep }} here about {{project}}; {{name}} again."
    twilio_fake.add_content(sid, body, types={"whatsapp/card": {"body": body, "actions": []}})
    # when it is fetched
    template = _sender(twilio_fake).template(twilio_fake.credentials(), sid)
    # then the variables are the placeholders, in order, once each
    assert template.body == body
    assert template.variables == ("name", "rep", "project")


def test_template_prefers_the_text_body_and_orders_numeric_variables(
    twilio_fake: TwilioFake,
) -> None:
    sid = "HX" + "e" * 32
    twilio_fake.add_content(
        sid,
        "unused",
        variables={"10": "x", "2": "y", "1": "z"},
        types={"twilio/media": {"body": "media body"}, "twilio/text": {"body": "text body"}},
    )
    template = _sender(twilio_fake).template(twilio_fake.credentials(), sid)
    assert template.body == "text body"
    assert template.variables == ("1", "2", "10")


def test_an_unknown_template_is_rejected_with_twilio_s_code(twilio_fake: TwilioFake) -> None:
    with pytest.raises(SendRejected) as raised:
        _sender(twilio_fake).template(twilio_fake.credentials(), "HX" + "0" * 32)
    assert raised.value.code == "20404"


@pytest.mark.parametrize("status", [429, 500, 503])
def test_an_unreachable_content_api_is_retryable_and_not_cached(
    twilio_fake: TwilioFake, status: int
) -> None:
    # given the first content fetch fails
    twilio_fake.fail("content", status=status, calls=[1])
    sender = _sender(twilio_fake)
    # when the template is fetched, then the caller may retry
    with pytest.raises(SendThrottled):
        sender.template(twilio_fake.credentials(), CONTENT_SID)
    # and the retry fetches it for real
    assert sender.template(twilio_fake.credentials(), CONTENT_SID).variables == ("1", "2", "3")


# ---------------------------------------------------------------------------------------------
# Lookups
# ---------------------------------------------------------------------------------------------


def test_a_lookup_returns_only_messages_between_that_pair(twilio_fake: TwilioFake) -> None:
    # given messages from two company numbers to the recipient
    sender = _sender(twilio_fake)
    since = utcnow() - timedelta(seconds=2)
    ours = sender.send(twilio_fake.credentials(), _request())
    sender.send(twilio_fake.credentials(), _request(from_="+12025550199"))
    # when our pair is looked up
    found = sender.find_sent(twilio_fake.credentials(), RECIPIENT, COMPANY, since)
    # then only our message is found
    assert [m.sid for m in found] == [ours.sid]


@pytest.mark.parametrize("status", [429, 500, 503])
def test_a_failing_lookup_is_lookup_unavailable(twilio_fake: TwilioFake, status: int) -> None:
    twilio_fake.fail_lookups(status)
    with pytest.raises(LookupUnavailable):
        _sender(twilio_fake).find_sent(
            twilio_fake.credentials(), RECIPIENT, COMPANY, utcnow() - timedelta(minutes=1)
        )


def test_a_lookup_slower_than_the_timeout_is_lookup_unavailable(twilio_fake: TwilioFake) -> None:
    twilio_fake.delay("list", TIMEOUT * 4)
    with pytest.raises(LookupUnavailable):
        _sender(twilio_fake).find_sent(
            twilio_fake.credentials(), RECIPIENT, COMPANY, utcnow() - timedelta(minutes=1)
        )


# ---------------------------------------------------------------------------------------------
# The error table covers the SDK's and the transport's exception classes
# ---------------------------------------------------------------------------------------------

# Raised before any byte left: retryable. Every other requests exception may follow a send.
_REQUESTS_NOTHING_SENT = {
    requests.exceptions.ConnectTimeout,
    requests.exceptions.URLRequired,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidProxyURL,
    requests.exceptions.InvalidHeader,
    requests.exceptions.InvalidJSONError,
    requests.exceptions.JSONDecodeError,
}
_REQUESTS_MAYBE_SENT = {
    requests.exceptions.RequestException,
    requests.exceptions.HTTPError,
    requests.exceptions.ConnectionError,
    requests.exceptions.ProxyError,
    requests.exceptions.SSLError,
    requests.exceptions.Timeout,
    requests.exceptions.ReadTimeout,
    requests.exceptions.TooManyRedirects,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    requests.exceptions.StreamConsumedError,
    requests.exceptions.RetryError,
    requests.exceptions.UnrewindableBodyError,
}


def _classes(module: object, base: type[BaseException]) -> set[type[BaseException]]:
    return {
        value for _, value in inspect.getmembers(module, inspect.isclass) if issubclass(value, base)
    }


def _instance(cls: type[BaseException]) -> BaseException:
    if cls is requests.exceptions.JSONDecodeError:
        return cls("Expecting value", "", 0)
    return cls("simulated")


def test_the_table_knows_every_requests_exception_class() -> None:
    # a new class in requests must be placed on one side or the other deliberately
    assert _classes(requests.exceptions, requests.exceptions.RequestException) == (
        _REQUESTS_NOTHING_SENT | _REQUESTS_MAYBE_SENT
    )


@pytest.mark.parametrize("cls", sorted(_REQUESTS_NOTHING_SENT, key=lambda c: c.__name__))
def test_requests_errors_raised_before_sending_are_retryable(cls: type[BaseException]) -> None:
    error = _instance(cls)
    assert type(classify_error(error, "send")) is SendThrottled
    assert type(classify_error(error, "template")) is SendThrottled
    assert type(classify_error(error, "lookup")) is LookupUnavailable


@pytest.mark.parametrize("cls", sorted(_REQUESTS_MAYBE_SENT, key=lambda c: c.__name__))
def test_requests_errors_that_may_follow_a_send_are_unknown_outcomes(
    cls: type[BaseException],
) -> None:
    error = _instance(cls)
    assert type(classify_error(error, "send")) is SendOutcomeUnknown
    assert type(classify_error(error, "template")) is SendThrottled
    assert type(classify_error(error, "lookup")) is LookupUnavailable


def test_a_connection_refused_inside_a_connection_error_is_retryable() -> None:
    refused = NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
    error = requests.exceptions.ConnectionError(MaxRetryError(None, "/", refused))  # type: ignore[arg-type]
    assert type(classify_error(error, "send")) is SendThrottled


@pytest.mark.parametrize(
    "error",
    [
        requests.exceptions.ConnectionError(
            ProtocolError("Connection aborted.", http.client.RemoteDisconnected("closed"))
        ),
        http.client.RemoteDisconnected("Remote end closed connection without response"),
        TimeoutError("timed out"),
        json.JSONDecodeError("Expecting value", "<html>", 0),
        KeyError("sid"),
    ],
    ids=["reset-after-send", "remote-disconnected", "socket-timeout", "2xx-not-json", "surprise"],
)
def test_anything_else_during_a_send_is_an_unknown_outcome(error: BaseException) -> None:
    assert type(classify_error(error, "send")) is SendOutcomeUnknown


def test_the_table_knows_every_twilio_exception_class() -> None:
    # every class the SDK raises must be handled below
    assert _classes(twilio.base.exceptions, TwilioException) == {
        TwilioException,
        TwilioRestException,
        TwilioServiceException,
    }


def _rest(status: int, code: int | None) -> TwilioRestException:
    return TwilioRestException(status, "https://api.twilio.com/x", "msg", code, "POST")


def _service(status: int, code: int) -> TwilioServiceException:
    return TwilioServiceException("https://twilio.com/errors", "Title", status, code)


@pytest.mark.parametrize("build", [_rest, _service], ids=["rest", "service"])
@pytest.mark.parametrize(
    ("status", "code", "on_send", "on_template"),
    [
        (429, 20429, SendThrottled, SendThrottled),
        (429, 123, SendThrottled, SendThrottled),
        (400, 20429, SendThrottled, SendThrottled),
        (400, 21211, SendRejected, SendRejected),
        (404, 20404, SendRejected, SendRejected),
        (403, 63049, SendRejected, SendRejected),
        (500, 20500, SendOutcomeUnknown, SendThrottled),
        (503, 20503, SendOutcomeUnknown, SendThrottled),
    ],
)
def test_twilio_errors_are_classified_by_status_first_then_code(
    build: object,
    status: int,
    code: int,
    on_send: type[ProcessorError],
    on_template: type[ProcessorError],
) -> None:
    error = build(status, code)  # type: ignore[operator]
    assert type(classify_error(error, "send")) is on_send
    assert type(classify_error(error, "template")) is on_template
    assert type(classify_error(error, "lookup")) is LookupUnavailable


def test_a_rejection_without_a_twilio_code_carries_the_http_status() -> None:
    rejected = classify_error(_rest(400, None), "send")
    assert isinstance(rejected, SendRejected) and rejected.code == "http_400"


def test_a_generic_twilio_exception_is_unknown_on_send() -> None:
    # e.g. the SDK's "Unable to fetch page" or a page it cannot deserialize
    error = TwilioException("Page Records can not be deserialized")
    assert type(classify_error(error, "send")) is SendOutcomeUnknown
    assert type(classify_error(error, "lookup")) is LookupUnavailable


def test_lookup_finds_a_message_sent_from_another_sender_of_the_messaging_service(
    twilio_fake: TwilioFake,
) -> None:
    # given a company whose messages go through a Messaging Service with a pool of senders
    service = "MG" + "c" * 32
    credentials = TwilioCredentials(
        account_sid=ACCOUNT_SID,
        auth_token=twilio_fake.accounts[ACCOUNT_SID],
        template_sid=CONTENT_SID,
        messaging_service_sid=service,
    )
    sender = _sender(twilio_fake)
    since = utcnow() - timedelta(seconds=2)
    sender.send(credentials, _request(messaging_service_sid=service))
    # and Twilio picked another number of the pool for it
    twilio_fake.messages[0].from_ = "whatsapp:+14155550000"
    # when the pipeline looks for it by the company number, then it is found all the same
    found = sender.find_sent(credentials, RECIPIENT, COMPANY, since)
    assert [m.sid for m in found] == [twilio_fake.messages[0].sid]
    # while a company without that service does not count another sender's message as its own
    assert sender.find_sent(twilio_fake.credentials(), RECIPIENT, COMPANY, since) == []


def test_lookup_reads_past_the_first_page_to_find_our_message(twilio_fake: TwilioFake) -> None:
    # given our message, then 60 newer ones to the same recipient from another of the account's
    # numbers (more than one page of the listing)
    sender = _sender(twilio_fake)
    since = utcnow() - timedelta(seconds=2)
    ours = sender.send(twilio_fake.credentials(), _request())
    for _ in range(60):
        sender.send(twilio_fake.credentials(), _request(from_="+14155550000"))
    # when the pipeline looks for its own, then it is found on the second page
    found = sender.find_sent(twilio_fake.credentials(), RECIPIENT, COMPANY, since)
    assert [m.sid for m in found] == [ours.sid]
    assert twilio_fake.calls["list"] >= 2


def test_lookup_that_cannot_see_the_whole_window_says_so_rather_than_absent(
    twilio_fake: TwilioFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    import channel_processor.adapters.twilio_sender as twilio_sender

    # given a scan bound lower than the messages inside the window (the real bound is 1,000)
    monkeypatch.setattr(twilio_sender, "_LOOKUP_MAX_SCAN", 5)
    sender = _sender(twilio_fake)
    since = utcnow() - timedelta(seconds=2)
    for _ in range(8):
        sender.send(twilio_fake.credentials(), _request(from_="+14155550000"))
    # when the pipeline looks for its message, then "cannot tell", never an empty answer
    with pytest.raises(LookupUnavailable):
        sender.find_sent(twilio_fake.credentials(), RECIPIENT, COMPANY, since)
