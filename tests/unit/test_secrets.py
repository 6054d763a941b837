"""The TTL cache over a secret source, and the parsers of the Twilio and OpenAI secret shapes."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from channel_processor.errors import SecretInvalid, SecretsUnavailable
from channel_processor.secrets import (
    CachedSecretSource,
    parse_openai_key,
    parse_twilio_credentials,
)
from tests.fakes.secrets import FakeSecretSource

TOKEN = "tok-7f3a9c-very-secret"
TWILIO = {
    "twilio_account_sid": "AC00000000000000000000000000000001",
    "twilio_auth_token": TOKEN,
    "twilio_template_sid": "HX00000000000000000000000000000001",
}


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- cache ---


def test_fifty_concurrent_first_gets_fetch_once() -> None:
    # given a slow source (so every thread arrives before the first fetch ends)
    def slow(name: str, n: int) -> str | None:
        time.sleep(0.2)
        return None

    inner = FakeSecretSource({"twilio/a": "value-a"}, script=slow)
    cache = CachedSecretSource(inner, ttl_seconds=300)

    # when 50 threads ask for the same name at once
    barrier = threading.Barrier(50)

    def get() -> str:
        barrier.wait()
        return cache.get("twilio/a")

    with ThreadPoolExecutor(max_workers=50) as pool:
        values = list(pool.map(lambda _: get(), range(50)))

    # then all got the value and the source was asked once
    assert values == ["value-a"] * 50
    assert inner.gets["twilio/a"] == 1


def test_one_slow_name_does_not_hold_up_another() -> None:
    # given a source where one name takes a long time
    fetching, release = threading.Event(), threading.Event()

    def script(name: str, n: int) -> str | None:
        if name == "slow":
            fetching.set()
            release.wait(5)
        return None

    cache = CachedSecretSource(FakeSecretSource({"slow": "s", "fast": "f"}, script), 300)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(cache.get, "slow")
        assert fetching.wait(5)

        # when another name is asked for meanwhile, then it answers at once
        started = time.monotonic()
        assert cache.get("fast") == "f"
        assert time.monotonic() - started < 1.0
        release.set()
        assert pending.result(timeout=5) == "s"


def test_value_is_served_from_cache_until_the_ttl_expires() -> None:
    # given a cached value
    clock = ManualClock()
    inner = FakeSecretSource({"n": "v1"})
    cache = CachedSecretSource(inner, ttl_seconds=60, clock=clock)
    assert cache.get("n") == "v1"

    # when read again within the TTL, then the source is not asked
    clock.now += 59
    inner.values["n"] = "v2"
    assert cache.get("n") == "v1"
    assert inner.gets["n"] == 1

    # when read after the TTL, then it is fetched again
    clock.now += 2
    assert cache.get("n") == "v2"
    assert inner.gets["n"] == 2


def test_errors_are_not_cached() -> None:
    # given a source that fails the first time, then answers
    def flaky(name: str, n: int) -> str | None:
        if n == 1:
            raise SecretsUnavailable("throttled")
        return None

    inner = FakeSecretSource({"n": "v"}, script=flaky)
    cache = CachedSecretSource(inner, ttl_seconds=300)

    # when the first read fails
    with pytest.raises(SecretsUnavailable):
        cache.get("n")

    # then the next read asks the source again and gets the value
    assert cache.get("n") == "v"
    assert inner.gets["n"] == 2


def test_invalidate_forces_the_next_read_to_fetch() -> None:
    inner = FakeSecretSource({"n": "v"})
    cache = CachedSecretSource(inner, ttl_seconds=300)
    cache.get("n")

    cache.invalidate("n")
    cache.get("n")

    assert inner.gets["n"] == 2


def test_zero_ttl_means_no_caching() -> None:
    inner = FakeSecretSource({"n": "v"})
    cache = CachedSecretSource(inner, ttl_seconds=0)

    cache.get("n")
    cache.get("n")

    assert inner.gets["n"] == 2


# --- Twilio secret ---


def test_twilio_secret_parses_into_credentials() -> None:
    creds = parse_twilio_credentials(
        json.dumps({**TWILIO, "twilio_messaging_service_sid": "MG01"}), "twilio/a"
    )

    assert creds.account_sid == TWILIO["twilio_account_sid"]
    assert creds.auth_token == TOKEN
    assert creds.template_sid == TWILIO["twilio_template_sid"]
    assert creds.messaging_service_sid == "MG01"
    assert TOKEN not in repr(creds)


def test_twilio_secret_without_messaging_service_has_none() -> None:
    assert parse_twilio_credentials(json.dumps(TWILIO), "t").messaging_service_sid is None


def test_twilio_secret_missing_auth_token_names_the_key_and_the_secret() -> None:
    # given a secret without its auth token
    raw = json.dumps({k: v for k, v in TWILIO.items() if k != "twilio_auth_token"})

    # when parsing, then it is permanent and names both the secret and the key
    with pytest.raises(SecretInvalid) as caught:
        parse_twilio_credentials(raw, "twilio/company-a")
    message = str(caught.value)
    assert "twilio_auth_token" in message
    assert "twilio/company-a" in message
    assert "twilio_account_sid" not in message  # only what is missing is named
    assert caught.value.code == "secret_missing_key"


def test_twilio_secret_that_is_not_json_is_invalid_without_showing_the_value() -> None:
    # given a secret stored as plain text that contains the token
    raw = f"account={TWILIO['twilio_account_sid']} token={TOKEN}"

    # when parsing, then it is permanent and the message holds no part of the value
    with pytest.raises(SecretInvalid) as caught:
        parse_twilio_credentials(raw, "twilio/company-a")
    assert TOKEN not in str(caught.value)
    assert TWILIO["twilio_account_sid"] not in str(caught.value)
    assert "twilio/company-a" in str(caught.value)
    assert caught.value.code == "secret_not_json"


@pytest.mark.parametrize(
    "raw", ["[1, 2]", '"just a string"', json.dumps({**TWILIO, "twilio_auth_token": ""})]
)
def test_twilio_secret_of_the_wrong_shape_is_invalid(raw: str) -> None:
    with pytest.raises(SecretInvalid) as caught:
        parse_twilio_credentials(raw, "t")
    assert TOKEN not in str(caught.value)


def test_twilio_secret_with_a_non_string_token_does_not_echo_it() -> None:
    raw = json.dumps({**TWILIO, "twilio_auth_token": 987654321})

    with pytest.raises(SecretInvalid) as caught:
        parse_twilio_credentials(raw, "t")
    assert "twilio_auth_token" in str(caught.value)
    assert "987654321" not in str(caught.value)


# --- OpenAI secret ---


def test_openai_secret_as_json_object() -> None:
    assert parse_openai_key(json.dumps({"ai_api_key": " sk-abc "}), "o") == "sk-abc"


def test_openai_secret_as_bare_string_is_tolerated() -> None:
    assert parse_openai_key("sk-abc\n", "o") == "sk-abc"
    assert parse_openai_key('"sk-abc"', "o") == "sk-abc"


@pytest.mark.parametrize(
    "raw",
    [json.dumps({"api_key": "sk-abc"}), "", "{not json sk-abc", "two words sk-abc"],
)
def test_openai_secret_of_the_wrong_shape_is_invalid_without_the_value(raw: str) -> None:
    with pytest.raises(SecretInvalid) as caught:
        parse_openai_key(raw, "openai/company-a")
    assert "openai/company-a" in str(caught.value)
    assert "sk-abc" not in str(caught.value)


def test_openai_secret_missing_key_names_ai_api_key() -> None:
    with pytest.raises(SecretInvalid) as caught:
        parse_openai_key(json.dumps({"other": "x"}), "o")
    assert "ai_api_key" in str(caught.value)
